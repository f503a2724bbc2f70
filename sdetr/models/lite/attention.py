"""Key-aware deformable attention module (KDA, Lite-DETR; REFERENCE §9.4).

The sampling/weighting core is :func:`sdetr.ops.kda`; this module owns the projections, the
grid initialisation and the reference-point arithmetic, which are those of
:class:`~sdetr.models.attention.MSDeformAttn` (§3.2–§3.3).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sdetr.models.attention import MSDeformAttn, grid_init_
from sdetr.ops import kda

__all__ = ["KeyAwareDeformAttn", "grid_init_"]


class KeyAwareDeformAttn(MSDeformAttn):
    """Deformable attention whose weights come from query–key similarity, not from the query.

    Keys are sampled at the same deformable locations as the values; per head,
    ``w = softmax over the L·P samples of (query_proj(query) · k / sqrt(D))`` and
    ``out = output_proj(sum w·v)``. It is an :class:`MSDeformAttn` (same constructor sizes,
    forward signature, returns and offsets), so every place that takes MSDA takes KDA, and the
    detector's post-xavier re-initialisation reaches it.

    Args:
        d_model: channels C. n_levels: L. n_heads: M (C divisible by M, D = C / M).
        n_points: P per head and level.
        proj_key: own key projection ``key_proj``; False (the release's default) ties the keys
            to the projected values (W_K = W_V).
        backend: backend of :func:`sdetr.ops.kda` (None = the op's default).

    Parameters (Lite-DETR names): ``sampling_offsets`` Linear(C, M·L·P·2) (grid init);
    ``query_proj``, ``value_proj``, ``output_proj`` Linear(C, C); ``key_proj`` only with
    ``proj_key``; no ``attention_weights`` Linear. Projections: xavier, bias 0.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, proj_key: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__(d_model, n_levels, n_heads, n_points, backend=backend)
        del self.attention_weights  # KDA's weights come from q·k (§9.4)
        self.proj_key = proj_key
        self.query_proj = nn.Linear(d_model, d_model)
        self.key_proj = nn.Linear(d_model, d_model) if proj_key else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Grid init of the offsets, xavier/0 on the projections. Also runs from
        ``MSDeformAttn.__init__``, before ``query_proj``/``key_proj`` exist (skipped then)."""
        grid_init_(self.sampling_offsets, self.n_heads, self.n_levels, self.n_points)
        for name in ("query_proj", "key_proj", "value_proj", "output_proj"):
            linear = getattr(self, name, None)
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend from each query to P points per head and level around its reference.

        Args:
            query: (B, Q, C), already including the positional embedding.
            reference_points: (B, Q, L, 2) (x, y) or (B, Q, L, 4) (cx, cy, w, h), normalised to
                the PADDED map of each level.
            value_input: (B, N, C) flattened multi-level features, without pos.
            spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64.
            padding_mask: (B, N) bool, True = padding (keys and values zeroed there), or None.

        Returns:
            output (B, Q, C); sampling_locations (B, Q, M, L, P, 2) (x, y) of the padded maps;
            attention_weights (B, Q, M, L, P), the q·k softmax, summing to 1 over (L, P).
        """
        self._check_inputs(query, reference_points, value_input)
        b, q, _ = query.shape
        n = value_input.shape[1]
        m, l_, p = self.n_heads, self.n_levels, self.n_points
        d = self.d_model // m
        value = self._masked(self.value_proj(value_input), padding_mask)
        key = value if self.key_proj is None else self._masked(self.key_proj(value_input), padding_mask)
        offsets = self.sampling_offsets(query).view(b, q, m, l_, p, 2)
        locations = self._sampling_locations(reference_points, offsets, spatial_shapes)
        heads_query = self.query_proj(query).view(b, q, m, d)
        out, weights = kda(heads_query, key.view(b, n, m, d), value.view(b, n, m, d),
                           spatial_shapes, level_start_index, locations.to(value.dtype),
                           backend=self.backend)
        return self.output_proj(out), locations, weights

    @staticmethod
    def _masked(tokens: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return tokens if padding_mask is None else tokens.masked_fill(padding_mask[..., None], 0.0)
