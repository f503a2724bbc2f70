"""Deformable-DETR encoder layer and dense encoder (REFERENCE §3.5, §4.1)."""

from __future__ import annotations

import torch
from torch import nn

from sdetr.models.attention import MSDeformAttn
from sdetr.models.layers import get_clones

__all__ = ["encoder_reference_points", "DeformableEncoderLayer", "DeformableEncoder"]


def encoder_reference_points(
    spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor, device: torch.device | str
) -> torch.Tensor:
    """Reference point of every token for every level (§3.5, encoder).

    Cell (i, j) of level l is first normalised by that level's VALID extent,
    ``r = ((j + 0.5) / (vr_w[l] * W_l), (i + 0.5) / (vr_h[l] * H_l))`` (pad cells get values > 1),
    then multiplied by the valid ratio of each target level l'.

    Args:
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        valid_ratios: (B, L, 2) in (w, h) order.
        device: device of the result.

    Returns:
        (B, N, L, 2) as (x, y), normalised to the padded map of each target level; dtype of valid_ratios.
    """
    valid_ratios = valid_ratios.to(device)
    dtype = valid_ratios.dtype
    per_level = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ys = torch.arange(h, dtype=dtype, device=device) + 0.5
        xs = torch.arange(w, dtype=dtype, device=device) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(1, -1) / (valid_ratios[:, lvl, 1:2] * h)
        ref_x = ref_x.reshape(1, -1) / (valid_ratios[:, lvl, 0:1] * w)
        per_level.append(torch.stack((ref_x, ref_y), dim=-1))  # (B, H*W, 2)
    reference_points = torch.cat(per_level, dim=1)
    return reference_points[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: MSDA self-attention then FFN (§4.1).

    The queries may be a subset of the tokens (Sparse DETR, Lite-DETR): attention samples from
    ``value`` (all N tokens) while the residual and FFN act on ``query`` only.

    Args:
        d_model: channels C.
        d_ffn: hidden channels of the FFN.
        dropout: dropout probability (after attention, inside and after the FFN).
        n_levels, n_heads, n_points: MSDA sizes (L, M, P).
        backend: MSDA op backend (see ``MSDeformAttn``).
        attn: a prebuilt self-attention module with ``MSDeformAttn``'s forward signature and
            returns (e.g. Lite-DETR's ``KeyAwareDeformAttn``); None builds an ``MSDeformAttn``
            from the sizes above. Registered as ``self_attn`` either way.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        backend: str | None = None,
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = attn if attn is not None else MSDeformAttn(
            d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward_ffn(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> norm2(x + dropout3(linear2(dropout2(relu(linear1(x))))))."""
        y = self.linear2(self.dropout2(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout3(y))

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One encoder layer.

        Args:
            query: (B, Q, C) token features being updated (Q = N for the dense encoder).
            query_pos: (B, Q, C) positional + level embedding of those tokens.
            reference_points: (B, Q, L, 2) (x, y) normalised to the padded maps.
            value: (B, N, C) all tokens, without pos (the same tensor as ``query`` when dense).
            spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64.
            padding_mask: (B, N) bool, True = padding, or None.

        Returns:
            (B, Q, C) updated queries.
        """
        attn, _, _ = self.self_attn(
            query + query_pos, reference_points, value, spatial_shapes, level_start_index, padding_mask
        )
        x = self.norm1(query + self.dropout1(attn))
        return self.forward_ffn(x)


class DeformableEncoder(nn.Module):
    """Dense Deformable-DETR encoder: ``num_layers`` deep copies of ``layer``, no final norm.

    Args:
        layer: template layer (deep-copied; the template itself is not registered).
        num_layers: number of layers.
    """

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = get_clones(layer, num_layers)
        self.num_layers = num_layers

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Encode all tokens.

        Args:
            src: (B, N, C) flattened features (no pos). pos: (B, N, C) pos + level embedding.
            spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64.
            valid_ratios: (B, L, 2) (w, h). padding_mask: (B, N) bool, True = padding, or None.

        Returns:
            memory (B, N, C), the output of the last layer.
        """
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios, src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, output, spatial_shapes, level_start_index, padding_mask)
        return output
