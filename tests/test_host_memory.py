"""train.malloc_retain: glibc's malloc keeps freed memory mapped (sdetr.engine.host_memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdetr.config import load_config
from sdetr.engine.host_memory import configure_host_malloc, host_malloc_state

# Where a fresh process's first 16 MiB tensor lands: glibc serves it with its own mmap by
# default (threshold 128 KiB at start), from the heap below the program break once retained.
_PROBE = """
import ctypes, sys, torch
from sdetr.engine.host_memory import configure_host_malloc
state = configure_host_malloc(sys.argv[1] == "retain")
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
t = torch.empty(4 << 20)  # 16 MiB of float32
print(state, "heap" if t.data_ptr() < libc.sbrk(0) else "mmap")
"""


def _probe(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_process_serves_large_tensors_from_the_heap() -> None:
    assert _probe("default") == "off mmap"
    assert _probe("retain") == "applied heap"


def test_off_changes_nothing_and_presets_choose() -> None:
    before = host_malloc_state()
    assert configure_host_malloc(False) == "off"
    assert host_malloc_state() == before
    assert load_config("sparse_detr_tiny").train.malloc_retain is True
    assert load_config("sparse_detr_r50").train.malloc_retain is False
