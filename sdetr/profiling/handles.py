"""fvcore flop handles for the ops fvcore cannot see into (REFERENCE §10.1).

A handle maps the traced op's JIT values ``(inputs, outputs)`` to a count of multiply-adds. They
are registered for the custom op NAMES (``sdetr::ms_deform_attn``, ...), so the count is the same
whichever kernel backend runs:

* ``sdetr::ms_deform_attn``: exactly what fvcore counts on the official pure-PyTorch path: one
  ``grid_sample`` per level producing (B·M, D, Q, P) at 4 flops per output element, i.e.
  ``4·B·M·D·Q·L·P``. The attention-weighted sum (mul + sum) is elementwise: not counted.
* ``sdetr::kda``: the released Lite-DETR key-aware attention is pure PyTorch and fvcore counts
  2 grid_samples (keys and values, ``8·B·M·D·Q·L·P``), the query–key product and the
  weights × values product (``B·M·Q·L·P·D`` each): ``10·B·M·D·Q·L·P``.
* ``sdetr::dam_splat``: 0. The DAM is a bilinear scatter-add; fvcore counts no scatter. It only
  runs in training or when Sparse DETR tracks its Corr metric.
* ``aten::scaled_dot_product_attention``: ``B·H·Lq·Lk·(E + Ev)``, the two batched matmuls
  (q·kᵀ and attn·v) that ``nn.MultiheadAttention`` traced to in torch 1.x, where the official
  numbers were measured; torch 2.x traces one fused op that fvcore does not know. Likewise the
  fused eval fast path ``aten::_native_multi_head_attention`` (projections + attention).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from fvcore.nn.jit_handles import get_shape

Handle = Callable[[list[Any], list[Any]], int]


def _shape(value: Any, name: str, dims: int) -> list[int]:
    shape = get_shape(value)
    if shape is None or len(shape) != dims:
        raise ValueError(f"flop handle: {name} should have {dims} dims, got shape {shape}")
    return shape


def ms_deform_attn_flops(value_shape: list[int], locations_shape: list[int]) -> int:
    """``4·B·M·D·Q·L·P`` for value (B, N, M, D) and sampling_locations (B, Q, M, L, P, 2)."""
    batch, _, heads, channels = value_shape
    _, queries, _, levels, points, _ = locations_shape
    return 4 * batch * heads * channels * queries * levels * points


def ms_deform_attn_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``sdetr::ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend)``."""
    return ms_deform_attn_flops(_shape(inputs[0], "value", 4), _shape(inputs[3], "sampling_locations", 6))


def kda_flops(value_shape: list[int], locations_shape: list[int]) -> int:
    """``10·B·M·D·Q·L·P``: 2 grid_samples (4 per output element each) + q·k + weights·v."""
    return ms_deform_attn_flops(value_shape, locations_shape) // 4 * 10


def kda_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``sdetr::kda(query, key, value, spatial_shapes, level_start_index, locations, backend)``."""
    return kda_flops(_shape(inputs[2], "value", 4), _shape(inputs[5], "sampling_locations", 6))


def zero_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """Ops that fvcore's conventions count as 0 (a scatter)."""
    return 0


def sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::scaled_dot_product_attention(q (…, Lq, E), k (…, Lk, E), v (…, Lk, Ev), …)``."""
    query, key, value = (get_shape(inputs[i]) for i in range(3))
    if not (query and key and value):
        raise ValueError("flop handle: scaled_dot_product_attention inputs without shapes")
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def native_mha_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::_native_multi_head_attention(q, k, v, E, H, qkv_w, qkv_b, proj_w, proj_b, ...)``,
    the fused fast path of ``nn.MultiheadAttention`` in eval: the in-projections of q (B, Lq, E)
    and of k, v (B, Lk, E), the two attention matmuls and the out-projection."""
    query, key = get_shape(inputs[0]), get_shape(inputs[1])
    if not (query and key):
        raise ValueError("flop handle: _native_multi_head_attention inputs without shapes")
    embed = query[-1]
    rows_q, rows_k = math.prod(query[:-1]), math.prod(key[:-1])
    attention = rows_q * key[-2] * 2 * embed
    return (2 * rows_q + 2 * rows_k) * embed * embed + attention


CUSTOM_HANDLES: dict[str, Handle] = {
    "sdetr::ms_deform_attn": ms_deform_attn_handle,
    "sdetr::kda": kda_handle,
    "sdetr::dam_splat": zero_handle,
    "aten::scaled_dot_product_attention": sdpa_handle,
    "aten::_native_multi_head_attention": native_mha_handle,
}
"""Handles added to fvcore's defaults (registering a name the graph lacks is harmless)."""

IGNORED_BY_CONVENTION: frozenset[str] = frozenset(f"aten::{op}" for op in (
    # elementwise arithmetic and math
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "pow", "sqrt",
    "rsqrt", "exp", "log", "log_", "abs", "reciprocal", "floor", "ceil", "round", "sign",
    "clamp_min", "clamp_max", "fill_", "zero_", "lerp", "addcmul", "maximum", "minimum",
    # activations and normalisations of scores
    "sigmoid", "sigmoid_", "tanh", "gelu", "silu", "softmax", "log_softmax", "hardtanh",
    "leaky_relu", "elu",
    # trigonometry (sine position encodings)
    "sin", "cos", "atan2",
    # reductions and scans
    "sum", "mean", "prod", "cumsum", "amax", "amin", "all", "any", "norm", "std", "var",
    "argmax", "argmin", "max_pool2d", "topk", "sort", "argsort",
    # comparisons and logic
    "lt", "le", "gt", "ge", "ne", "eq", "__or__", "__and__", "__xor__", "logical_not",
    "logical_and", "logical_or", "isinf", "isnan", "isfinite", "where", "masked_fill_",
    # shape, copy and indexing
    "pad", "roll", "expand_as", "meshgrid", "scatter", "scatter_", "scatter_add",
    "scatter_add_", "index_select", "index_add", "index_add_", "masked_scatter", "repeat",
    "tile", "stack", "unbind", "split", "split_with_sizes", "unflatten", "movedim", "swapaxes",
    "squeeze", "unsqueeze", "chunk", "type_as", "to", "linspace",
    "resolve_conj", "resolve_neg", "clone", "view_as", "flip", "diff", "unsqueeze_",
    "zeros_like", "ones_like", "empty_like", "rand_like", "randn_like", "rand", "randn",
    "bernoulli_", "dropout_", "feature_dropout", "alias", "lift_fresh", "item",
    "max_pool2d_with_indices", "triu", "triu_", "tril", "tril_",
)) | {"sdetr_C::stem_max_pool_forward"}  # the ResNet stem's max pool (sdetr.ops.stem_max_pool)
"""Ops fvcore has no handle for that cost 0 by the official convention (elementwise, softmax,
activations, sin/cos, scans, max-pool, topk, gather/scatter, masking: REFERENCE §10.1 "Not
counted"). They are still listed in every report under ``ignored_by_convention``; any other op
without a handle is reported under ``uncounted`` and logged as a warning."""
