"""How a training process's host (CPU) memory allocator keeps freed memory (``train.malloc_retain``).

glibc's malloc, by default, serves every allocation above a moving threshold (128 KiB at
start) with a fresh ``mmap`` and trims the heap's free top back to the kernel. A CPU training
step frees and re-allocates hundreds of activation and gradient buffers of 1-30 MB whose sizes
change with the batch's image size, so every step touches pages the kernel has to map (and zero)
again: 7-12 thousand minor page faults and 32-51 ms of kernel time per step of a ``_tiny``
model on 2 cores (measured with ``getrusage``). Retaining (``M_MMAP_THRESHOLD`` 32 MiB,
``M_TRIM_THRESHOLD`` effectively infinite, ``M_TOP_PAD`` 64 MiB) serves those buffers from a
heap that stays mapped: ~400 faults and 16-31 ms of kernel time per step. The cost is that the process keeps its peak heap
(which a training process reaches in its first steps anyway).

Only glibc has ``mallopt``; elsewhere the setting cannot be applied, which is logged as a
warning and recorded as ``unavailable`` in the run's tags (``sdetr.malloc_retain``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Literal

logger = logging.getLogger(__name__)

MallocState = Literal["off", "applied", "partial", "unavailable"]

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
"""Allocations below this come from the heap (glibc's ceiling for the threshold on 64-bit)."""
TRIM_THRESHOLD = 2**31 - 1
"""Free heap top kept before trimming (``int`` max: never, in practice)."""
TOP_PAD = 64 << 20
"""Extra heap the allocator asks the kernel for whenever the heap grows."""

_state: MallocState = "off"


def _glibc_mallopt() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's ``mallopt`` or None when the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return getattr(libc, "mallopt", None)


def configure_host_malloc(retain: bool) -> MallocState:
    """Apply ``train.malloc_retain`` to this process; returns what took effect.

    ``retain`` False changes nothing ("off"; an earlier call in the same process is not undone).
    True sets glibc's mmap threshold, trim threshold and top pad (module docstring) and returns
    "applied"; "unavailable" (with a warning) where the C library has no ``mallopt``, "partial"
    (with a warning naming them) where it refused some of the values.
    """
    global _state
    if not retain:
        return "off"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        logger.warning("train.malloc_retain: this C library has no mallopt (not glibc); the "
                       "allocator keeps its defaults")
        _state = "unavailable"
        return _state
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD))
    refused = [param for param, value in settings if mallopt(param, value) != 1]
    if refused:
        logger.warning("train.malloc_retain: mallopt refused parameter(s) %s; the allocator "
                       "keeps its defaults for them", refused)
        _state = "partial"
        return _state
    logger.info("host malloc: freed memory retained (mmap threshold %d MiB, no trimming)",
                MMAP_THRESHOLD >> 20)
    _state = "applied"
    return _state


def host_malloc_state() -> MallocState:
    """What :func:`configure_host_malloc` last applied in this process ("off" if never)."""
    return _state


__all__ = ["MMAP_THRESHOLD", "MallocState", "TOP_PAD", "TRIM_THRESHOLD", "configure_host_malloc",
           "host_malloc_state"]
