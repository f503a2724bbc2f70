"""Decoder cross-Attention Map (DAM): training target of the scoring network and the Corr metric
(REFERENCE §5.2–§5.4).

Shapes: B batch, N flattened tokens over all levels, Ld decoder layers, Q queries, M heads,
L levels, P points.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sdetr.ops import dam_splat

CORR_PREFIX = "corr_mask_attn_map_dec_"
"""Metric names as the official logs: ``corr_mask_attn_map_dec_all`` and ``..._{level}``."""


def decoder_attention_map(sampling_locations: Tensor, attention_weights: Tensor,
                          spatial_shapes: Tensor, level_start_index: Tensor, num_tokens: int,
                          backend: Optional[str] = None) -> Tensor:
    """Splat every decoder cross-attention sample onto the token grid (no gradient).

    Args:
        sampling_locations: (B, Ld, Q, M, L, P, 2) (x, y) normalised to the padded maps.
        attention_weights: (B, Ld, Q, M, L, P).
        spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64.
        num_tokens: N.
        backend: ``dam_splat`` backend (None = default).

    Returns:
        DAM (B, N): bilinear splat with no −0.5 shift, summed over all layers, queries, heads,
        levels and points (§5.2).
    """
    # Accumulated in at least fp32 whatever the training precision (a target, not a feature).
    dtype = torch.promote_types(attention_weights.dtype, torch.float32)
    return dam_splat(sampling_locations.flatten(1, 2).to(dtype),
                     attention_weights.flatten(1, 2).to(dtype),
                     spatial_shapes, level_start_index, num_tokens, backend=backend)


def dam_target(dam: Tensor, mask: Tensor, counts: Tensor) -> Tensor:
    """Binarised DAM (§5.3): 1 on the top-``counts[i]`` DAM tokens of image i, 0 elsewhere.

    dam (B, N); mask (B, N) bool, True = pad; counts (B,) int64 (the encoder's n_i, <= N).
    Pads are set to ``min(DAM) − 1`` first, so they are only chosen when n_i exceeds the number of
    valid tokens. Returns (B, N) in the dtype of ``dam``, without gradient.
    """
    dam = dam.detach()
    filled = torch.where(mask, dam.min() - 1.0, dam)
    k = min(int(counts.max()), dam.shape[1])
    top = torch.topk(filled, k, dim=1).indices
    keep = torch.arange(k, device=dam.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.zeros_like(dam).scatter(1, top, keep.to(dam.dtype))


def dam_loss(scores: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean BCE-with-logits over all B·N entries, pads included (§5.3).

    scores (B, N) scorer logits; target (B, N) 0/1; mask (B, N) bool, True = pad. Pad scores are
    replaced by ``min(scores)`` (a tensor, so the gradient reaches that element), as released.
    """
    filled = torch.where(mask, scores.min(), scores)
    return F.binary_cross_entropy_with_logits(filled, target.to(filled.dtype))


@torch.no_grad()
def corr_metrics(dam: Tensor, indices: Tensor, spatial_shapes: Tensor,
                 level_start_index: Tensor) -> dict[str, Tensor]:
    """Share of the decoder attention mass that lands on selected tokens (§5.4), batch mean.

    dam (B, N); indices (B, k) all selected indices (overflow rows included). Returns scalar
    tensors ``corr_mask_attn_map_dec_all`` and ``..._{l}`` per level; an image whose DAM mass on
    a level is zero is left out of that level's mean (NaN if no image has mass there).
    """
    selected = torch.zeros_like(dam, dtype=torch.bool).scatter(1, indices, True)
    on_selected = dam * selected
    metrics = {f"{CORR_PREFIX}all": _ratio(on_selected.sum(1), dam.sum(1))}
    for lvl, ((h, w), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        part = slice(start, start + h * w)
        metrics[f"{CORR_PREFIX}{lvl}"] = _ratio(on_selected[:, part].sum(1), dam[:, part].sum(1))
    return metrics


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """Batch mean of num/den over the images with den > 0."""
    return (num / den).masked_fill(den <= 0, float("nan")).nanmean()
