"""Forward latency and FPS, as the official benchmark (REFERENCE §10.2).

Protocol: eval mode (the caller sets it, see :mod:`sdetr.profiling.modes`), ``torch.no_grad``,
model forward only (no postprocessing, no loss); ``warmup`` untimed forwards, then ``iters``
timed ones. On CUDA every forward is bracketed by ``torch.cuda.synchronize()`` and timed with
CUDA events; on CPU with ``time.perf_counter``. FPS = batch / median time (``fps_mean`` = batch /
mean time, the official formula). On CPU the process CPU time of each forward (all threads,
``time.process_time``) is recorded too: on a shared machine it is far less disturbed by other
processes than wall time (``cpu_median_ms``; about threads × wall time on an idle machine).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from sdetr.profiling.inputs import ProfileInput


@dataclass(frozen=True)
class TimingStats:
    """Per-forward wall times (milliseconds) of ``iterations`` timed forwards of ``batch_size``."""

    batch_size: int
    iterations: int
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    cpu_median_ms: Optional[float] = None

    @classmethod
    def from_times(cls, batch_size: int, times_ms: list[float],
                   cpu_ms: Optional[list[float]] = None) -> "TimingStats":
        if not times_ms:
            raise ValueError("TimingStats: no timed iterations")
        std = statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0
        return cls(batch_size, len(times_ms), statistics.median(times_ms),
                   statistics.fmean(times_ms), min(times_ms), max(times_ms), std,
                   statistics.median(cpu_ms) if cpu_ms else None)

    @property
    def fps(self) -> float:
        return self.batch_size / (self.median_ms / 1e3)

    @property
    def fps_mean(self) -> float:
        return self.batch_size / (self.mean_ms / 1e3)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fps": self.fps, "fps_mean": self.fps_mean}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_forward(model: nn.Module, inp: ProfileInput, device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one ``model(images, masks)``, device synchronised around it;
    on CUDA the wall time comes from CUDA events."""
    _synchronize(device)
    cpu_begin = time.process_time()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(inp.images, inp.masks)
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end)), (time.process_time() - cpu_begin) * 1e3
    begin = time.perf_counter()
    model(inp.images, inp.masks)
    return (time.perf_counter() - begin) * 1e3, (time.process_time() - cpu_begin) * 1e3


def measure_latency(model: nn.Module, inp: ProfileInput, *, iters: int, warmup: int,
                    device: torch.device) -> TimingStats:
    """``warmup`` untimed then ``iters`` timed forwards of ``inp`` (already on ``device``)."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    with torch.no_grad():
        for _ in range(warmup):
            model(inp.images, inp.masks)
        wall, cpu = zip(*(timed_forward(model, inp, device) for _ in range(iters)))
    return TimingStats.from_times(inp.images.shape[0], list(wall), list(cpu))


def measure_fps(model: nn.Module, make_input: Callable[[int], ProfileInput],
                batch_sizes: list[int], *, iters: int, warmup: int,
                device: torch.device) -> dict[int, tuple[TimingStats, ProfileInput]]:
    """:func:`measure_latency` for each batch size; ``make_input(b)`` builds the batch (CPU)."""
    out: dict[int, tuple[TimingStats, ProfileInput]] = {}
    for batch in batch_sizes:
        inp = make_input(batch).to(device)
        out[batch] = (measure_latency(model, inp, iters=iters, warmup=warmup, device=device), inp)
    return out


def interleaved_latency(models: Mapping[str, nn.Module], inp: ProfileInput, *, iters: int,
                        warmup: int, device: torch.device) -> dict[str, TimingStats]:
    """Latency of several models on the same input, measured round-robin in one process.

    Each model gets ``warmup`` untimed forwards first; then every round times one forward of
    each model in turn, so slow drifts of the machine (thermal, other load) hit all alike.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model(inp.images, inp.masks)
        for _ in range(iters):
            for name, model in models.items():
                times[name].append(timed_forward(model, inp, device))
    return {name: TimingStats.from_times(inp.images.shape[0], [w for w, _ in t], [c for _, c in t])
            for name, t in times.items()}
