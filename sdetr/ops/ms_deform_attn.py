"""Multi-scale deformable attention core (MSDA sampling + weighting, REFERENCE.md §3.3-§3.4).

Shapes used throughout (B batch, N flattened tokens over all levels, M heads, D channels per head,
L levels, Q queries, P points per head and level):

* ``value`` (B, N, M, D): per-head values, levels flattened level-major then row-major (y, x).
* ``spatial_shapes`` (L, 2) int64: (H_l, W_l) of each level of the padded maps; H_l or W_l may be 0.
* ``level_start_index`` (L,) int64: offset of level l in N, the exclusive cumulative sum of H_l*W_l.
* ``sampling_locations`` (B, Q, M, L, P, 2): (x, y) normalised to the padded map of level l,
  (0, 0) = top-left outer edge, (1, 1) = bottom-right outer edge. A location maps to the continuous
  pixel coordinate (x*W_l - 0.5, y*H_l - 0.5), so (j+0.5)/W_l samples column j exactly. Bilinear
  interpolation, each corner outside the map contributes 0.
* ``attention_weights`` (B, Q, M, L, P).
* output (B, Q, M*D), head-major channels (channel k belongs to head k // D).

The op ``torch.ops.sdetr.ms_deform_attn`` dispatches to a backend of :mod:`sdetr.ops.backends`.
A backend's forward has the signature of :func:`ms_deform_attn_pytorch`; its backward takes
``(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``
and returns ``(grad_value, grad_sampling_locations, grad_attention_weights)``. The backward is
once-differentiable (no double backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from ._define import define_differentiable_op

OP_NAME = "ms_deform_attn"
_QUALNAME = "sdetr::ms_deform_attn"
_BACKWARD_QUALNAME = "sdetr::ms_deform_attn_backward"


def _check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    check_dtype: bool = True,
) -> None:
    """Shape/dtype checks that need no device synchronisation; raise ValueError naming the culprit."""
    if value.dim() != 4:
        raise ValueError(f"value must be (B, N, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (B, Q, M, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights shape {tuple(attention_weights.shape)} must equal "
            f"sampling_locations.shape[:-1] = {tuple(sampling_locations.shape[:-1])}"
        )
    batch, _, heads, _ = value.shape
    loc_batch, _, loc_heads, levels, _, _ = sampling_locations.shape
    if (loc_batch, loc_heads) != (batch, heads):
        raise ValueError(
            f"sampling_locations (B, M) = {(loc_batch, loc_heads)} do not match value (B, M) = {(batch, heads)}"
        )
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
    if check_dtype and not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise ValueError(
            f"value, sampling_locations and attention_weights must share a dtype, got "
            f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        )


def _level_maps(value: Tensor, spatial_shapes: Tensor) -> list[Tensor | None]:
    """Split value (B, N, M, D) into per-level maps (B*M, D, H_l, W_l); None for a zero-size level."""
    batch, num_tokens, heads, channels = value.shape
    shapes = spatial_shapes.tolist()
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != num_tokens:
        raise ValueError(f"spatial_shapes {shapes} cover {sum(sizes)} tokens but value has N = {num_tokens}")
    maps: list[Tensor | None] = []
    for value_l, (height, width) in zip(value.split(sizes, dim=1), shapes):
        if height == 0 or width == 0:
            maps.append(None)
            continue
        # (B, H*W, M, D) -> (B, M*D, H*W) -> (B*M, D, H, W)
        maps.append(value_l.flatten(2).transpose(1, 2).reshape(batch * heads, channels, height, width))
    return maps


def _grids(sampling_locations: Tensor) -> Tensor:
    """(B, Q, M, L, P, 2) in [0, 1] -> (B*M, Q, L, P, 2) in [-1, 1] for grid_sample(align_corners=False)."""
    return (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)


def _sample(value_l: Tensor, grid_l: Tensor) -> Tensor:
    """Bilinear, zero-padded sampling of (B*M, D, H, W) at grid (B*M, Q, P, 2) -> (B*M, D, Q, P)."""
    return F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Pure-PyTorch MSDA core with ``grid_sample`` (REFERENCE.md §3.4); shapes in the module docstring.

    Levels are split with ``spatial_shapes`` (``level_start_index`` must be its exclusive cumulative
    sum; it is not read). A level with H or W = 0 contributes nothing. Returns (B, Q, M*D).
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    grids = _grids(sampling_locations)
    sampled = [
        value.new_zeros(batch * heads, channels, queries, points) if value_l is None
        else _sample(value_l, grids[:, :, level])
        for level, value_l in enumerate(_level_maps(value, spatial_shapes))
    ]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*M, D, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1)  # (B*M, D, Q)
    return out.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


def _ms_deform_attn_pytorch_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Vector-Jacobian product of :func:`ms_deform_attn_pytorch` (reference backward).

    grad_output (B, Q, M*D) -> (grad_value (B, N, M, D), grad_sampling_locations (B, Q, M, L, P, 2),
    grad_attention_weights (B, Q, M, L, P)). Written with explicit aten ops
    (``grid_sampler_2d_backward``) rather than ``torch.func.vjp``/``autograd.grad``: inside a custom-op
    kernel the autograd key is excluded, and functorch wrappers break dispatch modes such as
    ``FlopCounterMode`` and opcheck's schema check.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    grids = _grids(sampling_locations)
    # (B, Q, M*D) -> (B, M, D, Q) -> (B*M, D, Q, 1), broadcast over P.
    grad = grad_output.reshape(batch, queries, heads, channels).permute(0, 2, 3, 1)
    grad = grad.reshape(batch * heads, channels, queries, 1)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    grad_values, grad_grids, grad_weights = [], [], []
    for level, value_l in enumerate(_level_maps(value, spatial_shapes)):
        if value_l is None:
            grad_values.append(value.new_zeros(batch, 0, heads, channels))
            grad_grids.append(grids.new_zeros(batch * heads, queries, points, 2))
            grad_weights.append(weights.new_zeros(batch * heads, queries, points))
            continue
        grid_l = grids[:, :, level]
        grad_weights.append((_sample(value_l, grid_l) * grad).sum(1))  # (B*M, Q, P)
        grad_value_l, grad_grid_l = torch.ops.aten.grid_sampler_2d_backward(
            grad * weights[:, :, :, level], value_l, grid_l, 0, 0, False, [True, True]
        )  # bilinear (0), zeros padding (0), align_corners=False
        # (B*M, D, H, W) -> (B, M, D, H*W) -> (B, H*W, M, D)
        grad_values.append(grad_value_l.reshape(batch, heads, channels, -1).permute(0, 3, 1, 2))
        grad_grids.append(grad_grid_l)
    grad_value = torch.cat(grad_values, dim=1).contiguous()
    # d grid / d loc = 2; (B*M, Q, L, P, 2) -> (B, Q, M, L, P, 2)
    grad_loc = 2 * torch.stack(grad_grids, dim=2).view(batch, heads, queries, levels, points, 2)
    grad_attn = torch.stack(grad_weights, dim=2).view(batch, heads, queries, levels, points)
    return grad_value, grad_loc.transpose(1, 2).contiguous(), grad_attn.transpose(1, 2).contiguous()


def _forward_kernel(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
) -> Tensor:
    impl = backends.get_backend(OP_NAME, backend)
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return impl.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _forward_fake(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
) -> Tensor:
    batch, _, heads, channels = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * channels)


def _backward_kernel(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.get_backend(OP_NAME, backend)
    if impl.backward is None:
        raise backends.BackendUnavailableError(f"backend {backend!r} of op {OP_NAME!r} has no backward")
    grads = impl.backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return tuple(grads)


def _backward_fake(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend = backend


def _autograd_backward(ctx, grad_output: Tensor) -> tuple:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.sdetr.ms_deform_attn_backward(
        grad_output.contiguous(),
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        ctx.backend,
    )
    return grad_value, None, None, grad_loc, grad_attn, None


def _define_ops() -> None:
    """Define the op and its backward once per process (kernels are fp32/fp64: autocast → fp32)."""
    define_differentiable_op(_QUALNAME, _forward_kernel, _forward_fake, _BACKWARD_QUALNAME,
                             _backward_kernel, _backward_fake, _autograd_backward, _setup_context)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention core: ``out[b,q,m] = sum_{l,p} A[b,q,m,l,p] * bilinear(V_l, loc)``.

    Args:
        value: (B, N, M, D) per-head values, levels flattened level-major then row-major (y, x).
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each padded level map (0 allowed: no contribution).
        level_start_index: (L,) int64, start of level l in N (exclusive cumsum of H_l*W_l).
        sampling_locations: (B, Q, M, L, P, 2), (x, y) normalised to the padded map of level l:
            (0, 0) is the top-left outer edge, (1, 1) the bottom-right outer edge; pixel coordinate is
            (x*W_l - 0.5, y*H_l - 0.5), corners outside the map contribute 0 (locations outside [0, 1]
            are allowed).
        attention_weights: (B, Q, M, L, P) (already normalised by the caller; not re-normalised).
        backend: backend name (see :mod:`sdetr.ops.backends`); None uses the default / automatic one.

    Returns:
        (B, Q, M*D), head-major channels. Differentiable w.r.t. value, sampling_locations and
        attention_weights (once-differentiable). value, sampling_locations and attention_weights must
        share a float dtype; under autocast the op runs in float32.

    Raises:
        BackendUnavailableError: the requested backend is not registered for this op.
        ValueError: inconsistent shapes or dtypes.
    """
    name = backends.resolve_backend(OP_NAME, backend)
    # dtypes are checked inside the op, after autocast has cast the inputs.
    _check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, check_dtype=False
    )
    return torch.ops.sdetr.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, name
    )


backends.register_backend(
    OP_NAME, backends.REFERENCE, ms_deform_attn_pytorch, _ms_deform_attn_pytorch_backward
)
_define_ops()
