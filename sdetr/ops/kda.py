"""Key-aware deformable attention core (KDA, Lite-DETR; REFERENCE.md §9.4).

Shapes (B batch, N flattened tokens over all levels, M heads, D channels per head, L levels,
Q queries, P points per head and level):

* ``query`` (B, Q, M, D): per-head queries, already projected (``query_proj(content + pos)``).
* ``key``, ``value`` (B, N, M, D): per-head keys and values, levels flattened level-major then
  row-major (y, x). Lite-DETR's default ties the key to the value (the same tensor twice).
* ``spatial_shapes`` (L, 2) int64 (H_l, W_l); ``level_start_index`` (L,) int64.
* ``sampling_locations`` (B, Q, M, L, P, 2): (x, y) normalised to the padded map of level l, the
  convention of :mod:`sdetr.ops.ms_deform_attn` (pixel coordinate (x*W_l - 0.5, y*H_l - 0.5),
  bilinear, corners outside the map contribute 0).

Per (b, q, m): ``k_j``, ``v_j`` = bilinear samples of key and value at the L·P locations j;
``w = softmax_j(q · k_j / sqrt(D))`` (joint over levels and points); ``out = sum_j w_j v_j``.
A sample outside its map gets k = v = 0, so it still takes softmax mass ``exp(0)`` (as released).

Outputs: ``output`` (B, Q, M*D) head-major, and ``attention_weights`` (B, Q, M, L, P) (the
normalised w, for Sparse DETR's decoder attention map). Both are differentiable.

The op ``torch.ops.sdetr.kda`` dispatches to a backend of :mod:`sdetr.ops.backends` (op name
``"kda"``). A backend's forward has the signature of :func:`kda_pytorch`; its backward takes
``(grad_output, grad_attention_weights, query, key, value, spatial_shapes, level_start_index,
sampling_locations)`` and returns ``(grad_query, grad_key, grad_value, grad_sampling_locations)``.
Once-differentiable (no double backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from ._define import define_differentiable_op
from .ms_deform_attn import _grids, _level_maps, _sample

OP_NAME = "kda"
_QUALNAME = "sdetr::kda"
_BACKWARD_QUALNAME = "sdetr::kda_backward"


def _check_inputs(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor,
                  level_start_index: Tensor, sampling_locations: Tensor,
                  check_dtype: bool = True) -> None:
    """Shape/dtype checks without device synchronisation; raise ValueError naming the culprit."""
    if value.dim() != 4:
        raise ValueError(f"value must be (B, N, M, D), got shape {tuple(value.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} must equal value shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (B, Q, M, L, P, 2), got shape "
                         f"{tuple(sampling_locations.shape)}")
    batch, _, heads, channels = value.shape
    loc_batch, queries, loc_heads, levels, _, _ = sampling_locations.shape
    if (loc_batch, loc_heads) != (batch, heads):
        raise ValueError(f"sampling_locations (B, M) = {(loc_batch, loc_heads)} do not match "
                         f"value (B, M) = {(batch, heads)}")
    if tuple(query.shape) != (batch, queries, heads, channels):
        raise ValueError(f"query must be (B, Q, M, D) = {(batch, queries, heads, channels)}, got "
                         f"{tuple(query.shape)}")
    if spatial_shapes.shape != (levels, 2) or spatial_shapes.dtype != torch.int64:
        raise ValueError(f"spatial_shapes must be int64 of shape ({levels}, 2), got "
                         f"{spatial_shapes.dtype} {tuple(spatial_shapes.shape)}")
    if level_start_index.shape != (levels,) or level_start_index.dtype != torch.int64:
        raise ValueError(f"level_start_index must be int64 of shape ({levels},), got "
                         f"{level_start_index.dtype} {tuple(level_start_index.shape)}")
    if check_dtype and not (query.dtype == key.dtype == value.dtype == sampling_locations.dtype):
        raise ValueError("query, key, value and sampling_locations must share a dtype, got "
                         f"{query.dtype}, {key.dtype}, {value.dtype}, {sampling_locations.dtype}")


def _sample_levels(maps: list[Tensor | None], grids: Tensor, like: Tensor) -> Tensor:
    """Sample every level map (B*M, D, H_l, W_l) at grids (B*M, Q, L, P, 2) -> (B*M, D, Q, L, P)."""
    bm, queries, _, points, _ = grids.shape
    channels = like.shape[-1]
    samples = [like.new_zeros(bm, channels, queries, points) if map_l is None
               else _sample(map_l, grids[:, :, level]) for level, map_l in enumerate(maps)]
    return torch.stack(samples, dim=3)


def _heads_first(query: Tensor) -> Tensor:
    """(B, Q, M, D) -> (B*M, D, Q, 1, 1), broadcastable against (B*M, D, Q, L, P)."""
    batch, queries, heads, channels = query.shape
    return query.permute(0, 2, 3, 1).reshape(batch * heads, channels, queries, 1, 1)


def _forward_parts(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor,
                   sampling_locations: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sampled keys and values (B*M, D, Q, L, P), the query (B*M, D, Q, 1, 1), weights (B*M, Q, L, P)."""
    grids = _grids(sampling_locations)
    keys = _sample_levels(_level_maps(key, spatial_shapes), grids, key)
    values = _sample_levels(_level_maps(value, spatial_shapes), grids, value)
    q = _heads_first(query)
    logits = (keys * q).sum(1) / math.sqrt(query.shape[-1])  # (B*M, Q, L, P)
    weights = logits.flatten(-2).softmax(-1).view_as(logits)
    return keys, values, q, weights


def kda_pytorch(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, sampling_locations: Tensor) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch KDA core (``grid_sample``); shapes in the module docstring.

    Levels are split with ``spatial_shapes`` (``level_start_index`` must be its exclusive
    cumulative sum; it is not read). A level with H or W = 0 samples zeros.

    Returns:
        output (B, Q, M*D) head-major; attention_weights (B, Q, M, L, P), summing to 1 over (L, P).
    """
    _check_inputs(query, key, value, spatial_shapes, level_start_index, sampling_locations)
    batch, queries, heads, channels = query.shape
    _, values, _, weights = _forward_parts(query, key, value, spatial_shapes, sampling_locations)
    out = (values * weights.unsqueeze(1)).sum((-2, -1))  # (B*M, D, Q)
    out = out.view(batch, heads * channels, queries).transpose(1, 2).contiguous()
    attn = weights.view(batch, heads, *weights.shape[1:]).transpose(1, 2).contiguous()
    return out, attn


def _kda_pytorch_backward(grad_output: Tensor, grad_weights: Tensor, query: Tensor, key: Tensor,
                          value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Vector-Jacobian product of :func:`kda_pytorch` (reference backward, analytic).

    With g = dL/dout and gw = dL/dw per (b, q, m): ``a_j = gw_j + g·v_j``,
    ``ds_j = w_j (a_j - sum_i w_i a_i)``; ``dq = sum_j ds_j k_j / sqrt(D)``; the value samples get
    ``w_j g`` and the key samples ``ds_j q / sqrt(D)``, both scattered to the maps and to the
    locations with ``aten::grid_sampler_2d_backward`` per level (no autograd inside the kernel).

    Returns (grad_query (B, Q, M, D), grad_key (B, N, M, D), grad_value (B, N, M, D),
    grad_sampling_locations (B, Q, M, L, P, 2)).
    """
    _check_inputs(query, key, value, spatial_shapes, level_start_index, sampling_locations)
    batch, queries, heads, channels = query.shape
    levels, points = sampling_locations.shape[3:5]
    scale = 1.0 / math.sqrt(channels)
    keys, values, q, weights = _forward_parts(query, key, value, spatial_shapes, sampling_locations)
    g = _heads_first(grad_output.reshape(batch, queries, heads, channels))  # (B*M, D, Q, 1, 1)
    gw = grad_weights.transpose(1, 2).reshape(weights.shape)  # (B*M, Q, L, P)
    a = gw + (values * g).sum(1)
    ds = weights * (a - (weights * a).sum((-2, -1), keepdim=True))  # (B*M, Q, L, P)
    grad_q = (keys * ds.unsqueeze(1)).sum((-2, -1)) * scale  # (B*M, D, Q)
    grad_v_samples = g * weights.unsqueeze(1)  # (B*M, D, Q, L, P)
    grad_k_samples = q * ds.unsqueeze(1) * scale
    grids = _grids(sampling_locations)
    grad_k, grad_loc_k = _scatter_levels(grad_k_samples, key, spatial_shapes, grids)
    grad_v, grad_loc_v = _scatter_levels(grad_v_samples, value, spatial_shapes, grids)
    grad_loc = 2 * (grad_loc_k + grad_loc_v).view(batch, heads, queries, levels, points, 2)
    grad_query = grad_q.view(batch, heads, channels, queries).permute(0, 3, 1, 2).contiguous()
    return grad_query, grad_k, grad_v, grad_loc.transpose(1, 2).contiguous()


def _scatter_levels(grad_samples: Tensor, tokens: Tensor, spatial_shapes: Tensor,
                    grids: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of :func:`_sample_levels` for one map set.

    grad_samples (B*M, D, Q, L, P); tokens (B, N, M, D); grids (B*M, Q, L, P, 2) ->
    grad_tokens (B, N, M, D), grad_grids (B*M, Q, L, P, 2) (w.r.t. the [-1, 1] grid).
    """
    batch, _, heads, channels = tokens.shape
    grad_tokens, grad_grids = [], []
    for level, map_l in enumerate(_level_maps(tokens, spatial_shapes)):
        grid_l = grids[:, :, level]
        if map_l is None:
            grad_tokens.append(tokens.new_zeros(batch, 0, heads, channels))
            grad_grids.append(torch.zeros_like(grid_l))
            continue
        grad_map, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_samples[:, :, :, level].contiguous(), map_l, grid_l, 0, 0, False, [True, True]
        )  # bilinear (0), zeros padding (0), align_corners=False
        grad_tokens.append(grad_map.reshape(batch, heads, channels, -1).permute(0, 3, 1, 2))
        grad_grids.append(grad_grid)
    return torch.cat(grad_tokens, dim=1).contiguous(), torch.stack(grad_grids, dim=2)


# --------------------------------------------------------------------------------- custom op


def _forward_kernel(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor,
                    level_start_index: Tensor, sampling_locations: Tensor,
                    backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.get_backend(OP_NAME, backend)
    _check_inputs(query, key, value, spatial_shapes, level_start_index, sampling_locations)
    out, attn = impl.forward(query, key, value, spatial_shapes, level_start_index, sampling_locations)
    return out, attn


def _forward_fake(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor,
                  level_start_index: Tensor, sampling_locations: Tensor,
                  backend: str) -> tuple[Tensor, Tensor]:
    batch, queries, heads, channels = query.shape
    return (query.new_empty(batch, queries, heads * channels),
            query.new_empty(sampling_locations.shape[:-1]))


def _backward_kernel(grad_output: Tensor, grad_weights: Tensor, query: Tensor, key: Tensor,
                     value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                     sampling_locations: Tensor,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = backends.get_backend(OP_NAME, backend)
    if impl.backward is None:
        raise backends.BackendUnavailableError(f"backend {backend!r} of op {OP_NAME!r} has no backward")
    grads = impl.backward(grad_output, grad_weights, query, key, value, spatial_shapes,
                          level_start_index, sampling_locations)
    return tuple(grads)


def _backward_fake(grad_output: Tensor, grad_weights: Tensor, query: Tensor, key: Tensor,
                   value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
            torch.empty_like(sampling_locations))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    query, key, value, spatial_shapes, level_start_index, sampling_locations, backend = inputs
    ctx.save_for_backward(query, key, value, spatial_shapes, level_start_index, sampling_locations)
    ctx.backend = backend


def _autograd_backward(ctx, grad_output: Tensor | None, grad_weights: Tensor | None) -> tuple:
    query, key, value, spatial_shapes, level_start_index, sampling_locations = ctx.saved_tensors
    if grad_output is None:  # only the weights were used downstream
        batch, queries, heads, channels = query.shape
        grad_output = query.new_zeros(batch, queries, heads * channels)
    if grad_weights is None:
        grad_weights = query.new_zeros(sampling_locations.shape[:-1])
    grad_q, grad_k, grad_v, grad_loc = torch.ops.sdetr.kda_backward(
        grad_output.contiguous(), grad_weights.contiguous(), query, key, value, spatial_shapes,
        level_start_index, sampling_locations, ctx.backend)
    return grad_q, grad_k, grad_v, None, None, grad_loc, None


def _define_ops() -> None:
    """Define the op and its backward once per process (kernels are fp32/fp64: autocast → fp32)."""
    define_differentiable_op(_QUALNAME, _forward_kernel, _forward_fake, _BACKWARD_QUALNAME,
                             _backward_kernel, _backward_fake, _autograd_backward, _setup_context)


def kda(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor,
        level_start_index: Tensor, sampling_locations: Tensor,
        backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Key-aware deformable attention core: ``out = sum_j softmax_j(q·k_j/sqrt(D)) v_j``.

    Args:
        query: (B, Q, M, D) projected per-head queries.
        key, value: (B, N, M, D) per-head keys / values (pass the same tensor to tie them).
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each padded level map (0 allowed).
        level_start_index: (L,) int64 start of level l in N.
        sampling_locations: (B, Q, M, L, P, 2) (x, y) normalised to the padded map of level l
            (see :func:`sdetr.ops.ms_deform_attn` for the exact convention).
        backend: backend name (see :mod:`sdetr.ops.backends`); None = default / automatic.

    Returns:
        output (B, Q, M*D), head-major channels; attention_weights (B, Q, M, L, P), summing to 1
        over (L, P). Both differentiable w.r.t. query, key, value and sampling_locations
        (once-differentiable). Inputs must share a float dtype; under autocast the op runs in float32.

    Raises:
        BackendUnavailableError: the requested backend is not registered for op ``"kda"``.
        ValueError: inconsistent shapes or dtypes.
    """
    name = backends.resolve_backend(OP_NAME, backend)
    _check_inputs(query, key, value, spatial_shapes, level_start_index, sampling_locations,
                  check_dtype=False)
    return torch.ops.sdetr.kda(query, key, value, spatial_shapes, level_start_index,
                               sampling_locations, name)


backends.register_backend(OP_NAME, backends.REFERENCE, kda_pytorch, _kda_pytorch_backward)
_define_ops()
