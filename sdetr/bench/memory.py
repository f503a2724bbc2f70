"""Peak CPU tensor memory of a callable, measured the same way for every backend.

Method: run the callable once under ``torch.profiler.profile(profile_memory=True)`` and read the
allocation events the profiler records from c10's CPU allocator. Each event carries the running
total of bytes allocated through that allocator (``total_allocated``); the peak is the largest total
during the call minus the total just before its first allocation. So the figure is the peak of
*additional* tensor memory (outputs, saved tensors, temporaries, gradients) above what was live when
the call started; inputs allocated before the call do not count. Memory that does not come from the
c10 CPU allocator (C++ std::vector scratch, the Python heap) is not counted; the compiled kernels
allocate all their tensors through ATen. This relies on the profiler's event tree
(``torch._C._profiler``), which torch 2.14 provides.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def _walk(nodes) -> Iterator:
    for node in nodes:
        yield node
        yield from _walk(node.children)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines on fd 2; replay them if the body raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU tensor bytes allocated while ``fn()`` runs, above the level when it started (>= 0)."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        event for event in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu"
    ]
    if not events:
        return 0
    events.sort(key=lambda event: event.start_time_ns)
    first = events[0].extra_fields
    baseline = first.total_allocated - first.alloc_size
    return max(0, max(event.extra_fields.total_allocated for event in events) - baseline)

