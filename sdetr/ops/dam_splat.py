"""Decoder cross-Attention Map (DAM) of Sparse DETR: bilinear splat of attention weights (REFERENCE.md §5.2).

Shapes (B batch, S samples = anything the caller flattened, e.g. decoder layers x queries, M heads,
L levels, P points, N = ``num_tokens`` flattened tokens over all levels):

* ``sampling_locations`` (B, S, M, L, P, 2): (x, y) normalised to the padded map of level l.
* ``attention_weights`` (B, S, M, L, P).
* ``spatial_shapes`` (L, 2) int64 (H_l, W_l); ``level_start_index`` (L,) int64 offsets into N.
* output (B, N): DAM, in the dtype of ``attention_weights``.

Splat convention (reproduces the released targets, NOT the attention's sampling convention): the
continuous position is f = (x*W_l, y*H_l) with **no** -0.5 shift; with (c0, r0) = floor(f) and
(dx, dy) = f - (c0, r0), corner (c0, r0) gets a(1-dx)(1-dy), (c0+1, r0) a*dx(1-dy), (c0, r0+1)
a(1-dx)dy and (c0+1, r0+1) a*dx*dy, at flat index level_start_index[l] + r*W_l + c. Corners outside
level l are dropped. Everything is summed over S, M, L and P.

The DAM is a training target only used through its top-k indices: the op has no autograd and the
public :func:`dam_splat` returns a tensor without gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends

OP_NAME = "dam_splat"
_QUALNAME = "sdetr::dam_splat"


def _check_inputs(
    sampling_locations: Tensor, attention_weights: Tensor, spatial_shapes: Tensor, level_start_index: Tensor
) -> None:
    """Shape checks that need no device synchronisation; raise ValueError naming the culprit."""
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (B, S, M, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights shape {tuple(attention_weights.shape)} must equal "
            f"sampling_locations.shape[:-1] = {tuple(sampling_locations.shape[:-1])}"
        )
    levels = sampling_locations.shape[3]
    if spatial_shapes.shape != (levels, 2) or spatial_shapes.dtype != torch.int64:
        raise ValueError(
            f"spatial_shapes must be int64 of shape ({levels}, 2), got {spatial_shapes.dtype} "
            f"{tuple(spatial_shapes.shape)}"
        )
    if level_start_index.shape != (levels,) or level_start_index.dtype != torch.int64:
        raise ValueError(
            f"level_start_index must be int64 of shape ({levels},), got {level_start_index.dtype} "
            f"{tuple(level_start_index.shape)}"
        )


def dam_splat_pytorch(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    num_tokens: int,
) -> Tensor:
    """Reference DAM splat (no -0.5 shift, corners outside a level dropped); shapes in the module docstring.

    Vectorised over all samples and levels (one ``scatter_add_``), no host synchronisation.
    Returns (B, num_tokens) in the dtype of ``attention_weights``.
    """
    _check_inputs(sampling_locations, attention_weights, spatial_shapes, level_start_index)
    batch = sampling_locations.shape[0]
    heights = spatial_shapes[:, 0].view(1, 1, 1, -1, 1)  # broadcast over (B, S, M, L, P)
    widths = spatial_shapes[:, 1].view(1, 1, 1, -1, 1)
    starts = level_start_index.view(1, 1, 1, -1, 1)
    compute_dtype = torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    locations = sampling_locations.to(compute_dtype)
    fx = locations[..., 0] * widths
    fy = locations[..., 1] * heights
    c0 = fx.floor()
    r0 = fy.floor()
    dx = fx - c0
    dy = fy - r0
    c0 = c0.long()
    r0 = r0.long()
    weights = attention_weights.to(compute_dtype)
    corners = ((0, 0, (1 - dx) * (1 - dy)), (1, 0, dx * (1 - dy)), (0, 1, (1 - dx) * dy), (1, 1, dx * dy))
    indices, values = [], []
    for dc, dr, share in corners:
        col = c0 + dc
        row = r0 + dr
        inside = (col >= 0) & (col < widths) & (row >= 0) & (row < heights)
        flat = starts + row * widths + col
        # A dropped corner scatters exactly 0 onto index 0.
        indices.append(torch.where(inside, flat, 0).reshape(batch, -1))
        values.append(torch.where(inside, weights * share, 0).reshape(batch, -1))
    dam = weights.new_zeros(batch, num_tokens)
    dam.scatter_add_(1, torch.cat(indices, dim=1), torch.cat(values, dim=1))
    return dam.to(attention_weights.dtype)


def _splat_kernel(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    num_tokens: int,
    backend: str,
) -> Tensor:
    impl = backends.get_backend(OP_NAME, backend)
    return impl.forward(sampling_locations, attention_weights, spatial_shapes, level_start_index, num_tokens)


def _splat_fake(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    num_tokens: int,
    backend: str,
) -> Tensor:
    return attention_weights.new_empty(attention_weights.shape[0], num_tokens)


def _define_op() -> None:
    """Define the custom op once per process (a module reload keeps the first definition)."""
    if hasattr(torch.ops.sdetr, "dam_splat"):
        return
    op = torch.library.custom_op(_QUALNAME, mutates_args=())(_splat_kernel)
    op.register_fake(_splat_fake)


def dam_splat(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    num_tokens: int,
    backend: str | None = None,
) -> Tensor:
    """Decoder cross-Attention Map: splat every attention weight onto the flat multi-scale grid.

    Args:
        sampling_locations: (B, S, M, L, P, 2), (x, y) normalised to the padded map of level l
            (S = any flattening of decoder layers x queries).
        attention_weights: (B, S, M, L, P).
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        level_start_index: (L,) int64, start of level l in the flat grid.
        num_tokens: N, length of the flat grid (sum of H_l*W_l).
        backend: backend name (see :mod:`sdetr.ops.backends`); None uses the default / automatic one.

    Returns:
        (B, N) DAM in the dtype of ``attention_weights``, **without gradient** (inputs are detached;
        the DAM is only used through top-k indices). Convention: f = (x*W_l, y*H_l) with no -0.5
        shift, bilinear weights onto the 4 integer corners, corners outside the level dropped, summed
        over S, M, L, P (REFERENCE.md §5.2).

    Raises:
        BackendUnavailableError: the requested backend is not registered for this op.
        ValueError: inconsistent shapes.
    """
    name = backends.resolve_backend(OP_NAME, backend)
    _check_inputs(sampling_locations, attention_weights, spatial_shapes, level_start_index)
    return torch.ops.sdetr.dam_splat(
        sampling_locations.detach(),
        attention_weights.detach(),
        spatial_shapes,
        level_start_index,
        num_tokens,
        name,
    )


backends.register_backend(OP_NAME, backends.REFERENCE, dam_splat_pytorch, None)
_define_op()
