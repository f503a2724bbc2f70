"""The ``"compiled"`` backend: C++ (and, when built, CUDA) kernels of ``sdetr._C`` from ``kernels/``.

Importing this module loads ``sdetr._C`` when it was built (``setup.py``), registers fake
implementations and autograd for its ops (``torch.ops.sdetr_C.ms_deform_attn_forward``,
``ms_deform_attn_backward``, ``dam_splat``, ``kda_forward``, ``kda_backward``,
``stem_max_pool_forward``) and registers backend ``"compiled"`` for the ops ``"ms_deform_attn"``,
``"dam_splat"``, ``"kda"`` and ``"stem_max_pool"`` of :mod:`sdetr.ops.backends`.

The compiled backend dispatches on the device of its inputs: CPU tensors run the CPU kernels, CUDA
tensors the CUDA kernels when the build has them. A device without a kernel raises
:class:`~sdetr.ops.backends.BackendUnavailableError` naming the device; it never falls back to the
reference. When ``sdetr._C`` is absent (no compiler at install time, ``SDETR_NO_EXTENSION=1``) or
disabled (``SDETR_DISABLE_COMPILED=1``), nothing is registered and the automatic choice is the
reference backend; :func:`compiled_build_info` says why. An extension that exists but fails to load
(e.g. built against another torch) is logged as a warning and reported the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import backends
from .stem_max_pool import stem_max_pool_backward

logger = logging.getLogger(__name__)

DISABLE_ENV = "SDETR_DISABLE_COMPILED"
EXTENSION = "sdetr._C"
_NAMESPACE = "sdetr_C"
_KERNELS = ("ms_deform_attn_forward", "ms_deform_attn_backward", "dam_splat", "kda_forward", "kda_backward",
            "stem_max_pool_forward")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclasses.dataclass(frozen=True)
class LoadStatus:
    """Outcome of loading the extension: ``state`` is loaded / not_built / disabled / load_error."""

    state: str
    detail: str


def _load() -> tuple[ModuleType | None, LoadStatus]:
    if os.environ.get(DISABLE_ENV, "").strip() == "1":
        return None, LoadStatus("disabled", f"{DISABLE_ENV}=1 is set")
    if importlib.util.find_spec(EXTENSION) is None:
        return None, LoadStatus(
            "not_built", f"{EXTENSION} is not built (no C++ compiler at install time, or SDETR_NO_EXTENSION=1)"
        )
    try:
        module = importlib.import_module(EXTENSION)
    except ImportError as exc:  # reported by compiled_build_info() and `sdetr doctor`, never hidden
        logger.warning("%s exists but failed to load, compiled backend unavailable: %s", EXTENSION, exc)
        return None, LoadStatus("load_error", f"{EXTENSION} failed to load: {exc}")
    return module, LoadStatus("loaded", str(module.__file__))


def _kernel_devices(kernel: str) -> tuple[str, ...]:
    """Device types with a registered implementation of ``sdetr_C::<kernel>`` (none when the
    build predates the kernel)."""
    qualname = f"{_NAMESPACE}::{kernel}"
    if not hasattr(getattr(torch.ops, _NAMESPACE), kernel):
        return ()
    return tuple(
        device for device, key in _DISPATCH_KEYS.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
    )


_extension, _status = _load()
_devices: dict[str, tuple[str, ...]] = (
    {kernel: _kernel_devices(kernel) for kernel in _KERNELS} if _extension is not None else {}
)


def compiled_available() -> bool:
    """True when ``sdetr._C`` is loaded and the ``"compiled"`` backends are registered."""
    return _extension is not None


def compiled_build_info() -> dict[str, Any]:
    """Facts about the compiled extension, for ``sdetr doctor`` and run metadata.

    Always has ``available`` (bool), ``status`` (loaded / not_built / disabled / load_error) and
    ``detail`` (path of the library, or why it is unavailable). When loaded, also ``compiler``,
    ``cxx_flags`` (list), ``simd``, ``openmp`` (bool), ``cuda`` (bool: CUDA kernels built),
    ``cuda_archs`` (list, e.g. ["8.0", "9.0"]), ``torch_version`` (torch it was built against) and
    ``kernels`` ({kernel: [device types with an implementation]}).
    """
    info: dict[str, Any] = {"available": compiled_available(), "status": _status.state, "detail": _status.detail}
    if _extension is None:
        return info
    built = json.loads(torch.ops.sdetr_C.build_info())
    built["cxx_flags"] = [flag for flag in built["cxx_flags"].split(",") if flag]
    built["cuda_archs"] = [arch for arch in built["cuda_archs"].split(",") if arch]
    info.update(built)
    info["kernels"] = {kernel: list(devices) for kernel, devices in _devices.items()}
    return info


def _require_kernel(op: str, kernel: str, tensor: Tensor) -> None:
    device = tensor.device.type
    if device not in _devices.get(kernel, ()):
        built = ", ".join(_devices.get(kernel, ())) or "none"
        raise backends.BackendUnavailableError(
            f"backend 'compiled' has no {device} kernel for op {op!r} ({EXTENSION} has {kernel} for: {built}); "
            f"use backend='reference' or rebuild with the {device} toolkit"
        )


def _msda_forward(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Compiled MSDA forward; signature and shapes of :func:`sdetr.ops.ms_deform_attn_pytorch`."""
    _require_kernel("ms_deform_attn", "ms_deform_attn_forward", value)
    return torch.ops.sdetr_C.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _msda_backward(
    grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
    sampling_locations: Tensor, attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Compiled MSDA backward -> (grad_value, grad_sampling_locations, grad_attention_weights)."""
    _require_kernel("ms_deform_attn", "ms_deform_attn_backward", value)
    return torch.ops.sdetr_C.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _dam_forward(
    sampling_locations: Tensor, attention_weights: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
    num_tokens: int,
) -> Tensor:
    """Compiled DAM splat; signature and shapes of :func:`sdetr.ops.dam_splat_pytorch`."""
    _require_kernel("dam_splat", "dam_splat", attention_weights)
    return torch.ops.sdetr_C.dam_splat(
        sampling_locations, attention_weights, spatial_shapes, level_start_index, num_tokens
    )


def _kda_forward(
    query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
    sampling_locations: Tensor,
) -> tuple[Tensor, Tensor]:
    """Compiled KDA forward; signature and shapes of :func:`sdetr.ops.kda_pytorch`."""
    _require_kernel("kda", "kda_forward", value)
    return torch.ops.sdetr_C.kda_forward(query, key, value, spatial_shapes, level_start_index, sampling_locations)


def _kda_backward(
    grad_output: Tensor, grad_weights: Tensor, query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor,
    level_start_index: Tensor, sampling_locations: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compiled KDA backward -> (grad_query, grad_key, grad_value, grad_sampling_locations)."""
    _require_kernel("kda", "kda_backward", value)
    return torch.ops.sdetr_C.kda_backward(
        grad_output, grad_weights, query, key, value, spatial_shapes, level_start_index, sampling_locations
    )


def _stem_pool_forward(x: Tensor) -> tuple[Tensor, Tensor]:
    """Compiled stem max pool; signature and shapes of :func:`sdetr.ops.stem_max_pool_pytorch`."""
    _require_kernel("stem_max_pool", "stem_max_pool_forward", x)
    return torch.ops.sdetr_C.stem_max_pool_forward(x)


def _register_stem_pool_fake() -> None:
    @torch.library.register_fake("sdetr_C::stem_max_pool_forward")
    def _stem_pool_fake(x):
        shape = (x.shape[0], x.shape[1], (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2)
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def _register_kda_fake_and_autograd() -> None:
    lib = torch.ops.sdetr_C

    @torch.library.register_fake("sdetr_C::kda_forward")
    def _kda_forward_fake(query, key, value, spatial_shapes, level_start_index, sampling_locations):
        batch, queries, heads, channels = query.shape
        return query.new_empty(batch, queries, heads * channels), query.new_empty(sampling_locations.shape[:-1])

    @torch.library.register_fake("sdetr_C::kda_backward")
    def _kda_backward_fake(grad_output, grad_weights, query, key, value, spatial_shapes, level_start_index,
                           sampling_locations):
        return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
                torch.empty_like(sampling_locations))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output, grad_weights):
        query, key, value, spatial_shapes, level_start_index, sampling_locations = ctx.saved_tensors
        if grad_output is None:
            grad_output = query.new_zeros(query.shape[0], query.shape[1], query.shape[2] * query.shape[3])
        if grad_weights is None:
            grad_weights = query.new_zeros(sampling_locations.shape[:-1])
        grad_q, grad_k, grad_v, grad_loc = lib.kda_backward(
            grad_output.contiguous(), grad_weights.contiguous(), query, key, value, spatial_shapes,
            level_start_index, sampling_locations,
        )
        return grad_q, grad_k, grad_v, None, None, grad_loc

    torch.library.register_autograd("sdetr_C::kda_forward", backward, setup_context=setup_context)


def _register_fake_and_autograd() -> None:
    """Fake kernels (torch.compile / opcheck) and autograd for the sdetr_C ops, once per process."""
    lib = torch.ops.sdetr_C

    @torch.library.register_fake("sdetr_C::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, channels = value.shape
        return value.new_empty(batch, sampling_locations.shape[1], heads * channels)

    @torch.library.register_fake("sdetr_C::ms_deform_attn_backward")
    def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    @torch.library.register_fake("sdetr_C::dam_splat")
    def _splat_fake(sampling_locations, attention_weights, spatial_shapes, level_start_index, num_tokens):
        return attention_weights.new_empty(attention_weights.shape[0], num_tokens)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = lib.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights,
        )
        return grad_value, None, None, grad_loc, grad_attn

    torch.library.register_autograd("sdetr_C::ms_deform_attn_forward", backward, setup_context=setup_context)


if _extension is not None:
    if not getattr(_extension, "_sdetr_registered", False):  # a module reload keeps the first registration
        _register_fake_and_autograd()
        _register_kda_fake_and_autograd()
        if _devices["stem_max_pool_forward"]:
            _register_stem_pool_fake()
        _extension._sdetr_registered = True
    backends.register_backend("ms_deform_attn", backends.COMPILED, _msda_forward, _msda_backward)
    backends.register_backend("dam_splat", backends.COMPILED, _dam_forward, None)
    backends.register_backend("kda", backends.COMPILED, _kda_forward, _kda_backward)
    if _devices["stem_max_pool_forward"]:  # an extension built before this kernel lacks it
        backends.register_backend("stem_max_pool", backends.COMPILED, _stem_pool_forward,
                                  stem_max_pool_backward)
    logger.debug("compiled backend registered from %s (kernels: %s)", _status.detail, _devices)
