"""Ops shared by all models: multi-scale deformable attention, the Sparse DETR DAM splat, key-aware
deformable attention and the ResNet stem's max pool (CPU).

Importing this package registers the ``"reference"`` (pure PyTorch) backends and the torch.library
custom ops ``sdetr::ms_deform_attn``, ``sdetr::ms_deform_attn_backward`` and ``sdetr::dam_splat``
(idempotent), and the ``"compiled"`` backends when the extension ``sdetr._C`` is built (see
:mod:`sdetr.ops.compiled`). The backend that runs is explicit: see :mod:`sdetr.ops.backends` and
:func:`backend_report` (log it with every result). This package is a leaf: it imports nothing
else from ``sdetr``.
"""

from .backends import (
    BackendUnavailableError,
    available_backends,
    backend_report,
    resolve_backend,
    set_default_backend,
    use_backend,
)
from .dam_splat import dam_splat, dam_splat_pytorch
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch
from .kda import kda, kda_pytorch
from .stem_max_pool import stem_max_pool, stem_max_pool_pytorch
from .compiled import compiled_available, compiled_build_info  # registers "compiled" when sdetr._C is built

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_report",
    "compiled_available",
    "compiled_build_info",
    "dam_splat",
    "dam_splat_pytorch",
    "kda",
    "kda_pytorch",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "resolve_backend",
    "set_default_backend",
    "stem_max_pool",
    "stem_max_pool_pytorch",
    "use_backend",
]
