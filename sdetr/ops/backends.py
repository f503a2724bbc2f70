"""Explicit backend registry for the attention ops of :mod:`sdetr.ops`.

Every op (``"ms_deform_attn"``, ``"dam_splat"``) has one or more named backends. ``"reference"``
(pure PyTorch) is always registered by :mod:`sdetr.ops`; a compiled extension adds ``"compiled"``
by calling :func:`register_backend` for the same op names.

Resolution order (:func:`resolve_backend`): an explicit backend argument, then the process-wide
default set with :func:`set_default_backend` / :func:`use_backend`, then the automatic choice
(``"compiled"`` when registered for the op, else ``"reference"``). A backend that is not
registered for the op raises :class:`BackendUnavailableError`; there is never a silent fallback.

The default is process-global (not thread-local): Ray and DeepSpeed workers are separate processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

AUTO = "auto"
"""Backend name that asks for the automatic choice (same as ``None``)."""
REFERENCE = "reference"
COMPILED = "compiled"


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend is not registered for an op (or the op is unknown)."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One registered implementation of an op.

    ``forward`` takes the op's tensor arguments (no ``backend`` argument) and returns its output.
    ``backward`` (None for ops without autograd) takes ``grad_output`` followed by the forward's
    tensor arguments and returns the input gradients; see the op's module for the exact signature.
    """

    op: str
    name: str
    forward: Callable
    backward: Callable | None


_REGISTRY: dict[str, dict[str, Backend]] = {}
_default: str | None = None


def register_backend(op: str, name: str, forward: Callable, backward: Callable | None) -> None:
    """Register (or replace) backend ``name`` of ``op``.

    Re-registering the same ``(op, name)`` replaces the previous entry, which keeps module reloads
    idempotent. ``"auto"`` is reserved and cannot be registered.
    """
    if not name or name == AUTO:
        raise ValueError(f"invalid backend name {name!r} for op {op!r}")
    if not callable(forward):
        raise TypeError(f"forward of backend {name!r} for op {op!r} is not callable: {forward!r}")
    if backward is not None and not callable(backward):
        raise TypeError(f"backward of backend {name!r} for op {op!r} is not callable: {backward!r}")
    _REGISTRY.setdefault(op, {})[name] = Backend(op, name, forward, backward)
    logger.debug("registered backend %r for op %r", name, op)


def registered_ops() -> list[str]:
    """Names of all ops that have at least one backend, in registration order."""
    return list(_REGISTRY)


def available_backends(op: str) -> list[str]:
    """Sorted names of the backends registered for ``op`` (empty list for an unknown op)."""
    return sorted(_REGISTRY.get(op, {}))


def _all_backend_names() -> set[str]:
    return {name for backends in _REGISTRY.values() for name in backends}


def set_default_backend(name: str | None) -> None:
    """Set the process-wide default backend; ``None`` or ``"auto"`` restores the automatic choice.

    The name must be registered for at least one op. An op that lacks it raises
    :class:`BackendUnavailableError` when it is resolved (no fallback).
    """
    global _default
    if name is None or name == AUTO:
        _default = None
    elif name in _all_backend_names():
        _default = name
    else:
        raise BackendUnavailableError(
            f"cannot set default backend {name!r}: no op registers it "
            f"(registered: {sorted(_all_backend_names())})"
        )
    logger.info("default ops backend set to %r", _default or AUTO)


def get_default_backend() -> str | None:
    """The default set by :func:`set_default_backend` (``None`` means automatic)."""
    return _default


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager: set the default backend inside the block, restore the previous one after."""
    previous = _default
    set_default_backend(name)
    try:
        yield
    finally:
        set_default_backend(previous)


def _backends_of(op: str) -> dict[str, Backend]:
    backends = _REGISTRY.get(op)
    if not backends:
        raise BackendUnavailableError(f"unknown op {op!r}; registered ops: {registered_ops()}")
    return backends


def resolve_backend(op: str, requested: str | None = None) -> str:
    """Name of the backend that ``op`` runs with.

    ``requested`` (explicit argument) wins; ``None`` defers to the default set with
    :func:`set_default_backend`; ``"auto"`` (explicit or as the default) picks ``"compiled"`` when
    it is registered for ``op``, else ``"reference"``.

    Raises:
        BackendUnavailableError: the chosen backend is not registered for ``op``.
    """
    backends = _backends_of(op)
    name = _default if requested is None else requested
    if name is None or name == AUTO:
        name = COMPILED if COMPILED in backends else REFERENCE
    if name not in backends:
        raise BackendUnavailableError(
            f"backend {name!r} is not available for op {op!r}; available: {sorted(backends)}"
        )
    return name


def get_backend(op: str, name: str) -> Backend:
    """The registered :class:`Backend` ``name`` of ``op`` (no resolution; ``"auto"`` is invalid)."""
    backends = _backends_of(op)
    if name not in backends:
        raise BackendUnavailableError(
            f"backend {name!r} is not available for op {op!r}; available: {sorted(backends)}"
        )
    return backends[name]


def backend_report() -> dict[str, str]:
    """For every registered op, the backend :func:`resolve_backend` gives now (for run metadata).

    Example: ``{"ms_deform_attn": "reference", "dam_splat": "reference"}``. Raises
    :class:`BackendUnavailableError` when the default names a backend that some op lacks.
    """
    return {op: resolve_backend(op) for op in registered_ops()}
