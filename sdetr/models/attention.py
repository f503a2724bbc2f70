"""Multi-scale deformable attention module (REFERENCE §3.1–§3.3).

The sampling/aggregation itself is ``sdetr.ops.ms_deform_attn``; this module owns the four
projections, the grid initialisation and the reference-point arithmetic.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from sdetr.ops import ms_deform_attn

__all__ = ["MSDeformAttn"]

logger = logging.getLogger(__name__)



def grid_init_(sampling_offsets: nn.Linear, n_heads: int, n_levels: int, n_points: int) -> None:
    """The MSDA "grid init" (§3.2): weight 0; bias of (m, l, p) = (p + 1)·d_m, where d_m is head
    m's direction (cos, sin)(2πm/M) scaled so its largest component is ±1."""
    nn.init.zeros_(sampling_offsets.weight)
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], dim=-1)  # (M, 2) as (x, y)
    grid = grid / grid.abs().max(dim=-1, keepdim=True).values
    grid = grid.view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
    grid = grid * torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, n_points, 1)
    with torch.no_grad():
        sampling_offsets.bias.copy_(grid.reshape(-1))

class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels C of query, value and output.
        n_levels: feature levels L.
        n_heads: heads M; ``d_model`` must be divisible by it (D = C / M channels per head).
        n_points: sampling points P per head and level.
        backend: passed verbatim to ``sdetr.ops.ms_deform_attn`` (None = the op's default).

    Parameters (official names and output layouts):
        sampling_offsets: Linear(C, M*L*P*2), output viewed as (M, L, P, 2), last axis (x, y).
        attention_weights: Linear(C, M*L*P), output viewed as (M, L*P) for a joint softmax.
        value_proj, output_proj: Linear(C, C); channel k belongs to head k // D.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            logger.warning("MSDeformAttn head dim %d is not a power of 2; CUDA kernels are slower", head_dim)
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Grid init (§3.2). Public so a parent can re-run it after a global xavier init."""
        grid_init_(self.sampling_offsets, self.n_heads, self.n_levels, self.n_points)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def _sampling_locations(
        self, reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """reference_points (B, Q, L, 2|4), offsets (B, Q, M, L, P, 2) -> locations (B, Q, M, L, P, 2)."""
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l).
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], dim=-1).to(offsets.dtype)
            return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        # 4-d (cx, cy, w, h): offsets relative to the half box size, divided by P.
        ref_xy = reference_points[:, :, None, :, None, :2]
        ref_wh = reference_points[:, :, None, :, None, 2:]
        return ref_xy + offsets / self.n_points * ref_wh * 0.5

    def _check_inputs(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor) -> None:
        b, q, c = query.shape
        if c != self.d_model or value_input.shape[-1] != self.d_model:
            raise ValueError(f"query/value_input channels must be d_model={self.d_model}")
        if value_input.shape[0] != b:
            raise ValueError(f"value_input batch {value_input.shape[0]} != query batch {b}")
        expected = (b, q, self.n_levels)
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != expected or \
                reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must be (B, Q, L, 2|4) = {expected + ('2|4',)}, got {tuple(reference_points.shape)}"
            )

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
            reference_points: (B, Q, L, 2) as (x, y) or (B, Q, L, 4) as (cx, cy, w, h), normalised to
                the PADDED map of each level ((0, 0) top-left, (1, 1) bottom-right).
            value_input: (B, N, C) flattened multi-level features, without pos.
            spatial_shapes: (L, 2) int64 (H_l, W_l).
            level_start_index: (L,) int64 start of each level in N.
            padding_mask: (B, N) bool, True = padding (value zeroed there), or None.

        Returns:
            output (B, Q, C); sampling_locations (B, Q, M, L, P, 2) as (x, y) in [0, 1] of the padded
            map (may fall outside); attention_weights (B, Q, M, L, P), summing to 1 over (L, P).
        """
        self._check_inputs(query, reference_points, value_input)
        b, q, _ = query.shape
        n = value_input.shape[1]
        m, l_, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, n, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, q, m, l_, p, 2)
        weights = self.attention_weights(query).view(b, q, m, l_ * p).softmax(-1).view(b, q, m, l_, p)
        locations = self._sampling_locations(reference_points, offsets, spatial_shapes)
        # Reference points are kept in fp32; the op wants one dtype (bf16 runs in bf16 here).
        out = ms_deform_attn(value, spatial_shapes, level_start_index,
                             locations.to(value.dtype), weights.to(value.dtype),
                             backend=self.backend)
        return self.output_proj(out), locations, weights
