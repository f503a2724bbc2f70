"""Where a training step's wall time goes: a per-phase stopwatch for :func:`run_epoch`.

On a CPU nothing runs asynchronously, so ``time.perf_counter()`` around each phase is its
cost. The phases of one optimizer step (``accumulation`` micro-batches each):

* ``data``: waiting for the next batch from the DataLoader, plus moving it to the device;
* ``forward``: the model's forward (under autocast for ``bf16-mixed``);
* ``matcher``: the Hungarian matching inside the criterion (every decoder layer and the
  encoder heads); ``loss``: the rest of the criterion;
* ``sync``: the two small collectives per micro-batch (non-finite check of the outputs, the
  mean of the loss terms). Their payload is a few floats, so their time is almost all
  waiting for the slowest worker to finish its forward and loss;
* ``backward``: autograd through the model (DeepSpeed's ``backward`` without the reduction);
* ``wait``: a barrier before the gradient all-reduce, i.e. waiting for the slowest worker's
  backward; ``allreduce``: the gradient all-reduce itself (gloo / NCCL);
* ``optimizer``: DeepSpeed's ``step`` (clipping, AdamW, zeroing the gradients).

``step`` is each optimizer step's wall time measured on its own (from the request for its
first batch to the end of its ``optimizer`` phase), so "components add up to the step" is a
check, not a definition. ``data_cpu`` is the CPU time the DataLoader worker processes used
per step: on a 2-core host it is taken from the training processes even when ``data`` is 0.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

PHASES = ("data", "forward", "matcher", "loss", "sync", "backward", "wait", "allreduce",
          "optimizer")
"""The components of a step, in the order they happen."""


@dataclass
class StepTimer:
    """Sums of each phase's seconds over the steps timed, and each step's own wall time.

    The first ``warmup`` steps are run but not counted. ``totals[phase]``: seconds summed over
    every micro-batch of the counted steps; ``steps``: the wall time of each counted step, in
    order; ``data_cpu``: loader CPU seconds over the counted steps (read through
    ``cpu_probe``, a callable returning the loader's CPU seconds so far, when one is set).
    """

    warmup: int = 0
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: list[float] = field(default_factory=list)
    data_cpu: float = 0.0
    cpu_probe: Optional[Callable[[], float]] = None
    _current: dict[str, float] = field(default_factory=dict)
    _seen: int = 0
    _cpu_base: Optional[float] = None
    _step_start: Optional[float] = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent inside to phase ``name`` of the current step."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self._current[name] = self._current.get(name, 0.0) + seconds

    def start_step(self) -> None:
        if self._seen == self.warmup and self.cpu_probe is not None and self._cpu_base is None:
            self._cpu_base = self.cpu_probe()
        self._current = {}
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        if self._step_start is None:
            return
        seconds = time.perf_counter() - self._step_start
        self._step_start = None
        self._seen += 1
        if self._seen <= self.warmup:
            return
        self.steps.append(seconds)
        for name, value in self._current.items():
            self.totals[name] = self.totals.get(name, 0.0) + value

    def finish(self) -> None:
        """Close the loader-CPU reading (call while the loader's workers still live)."""
        if self.cpu_probe is not None and self._cpu_base is not None:
            self.data_cpu += self.cpu_probe() - self._cpu_base
        self._cpu_base = None

    def per_step(self) -> dict[str, float]:
        """Mean seconds per step of every phase, ``step`` (the measured mean step time) and
        ``data_cpu``; empty before the first counted step."""
        n = len(self.steps)
        if n == 0:
            return {}
        out = {name: total / n for name, total in self.totals.items()}
        out["step"] = sum(self.steps) / n
        out["data_cpu"] = self.data_cpu / n
        return out

    def summary(self) -> dict[str, Any]:
        """:meth:`per_step` plus the median step, the first and last quarter's mean step
        (drift within the run) and the number of steps: what ``sdetr bench train`` prints."""
        n = len(self.steps)
        if n == 0:
            return {"steps": 0}
        quarter = max(n // 4, 1)
        return {"steps": n, "per_step": self.per_step(),
                "median_step": statistics.median(self.steps),
                "first_quarter_step": sum(self.steps[:quarter]) / quarter,
                "last_quarter_step": sum(self.steps[-quarter:]) / quarter}


def step_breakdown(timer: StepTimer, device: torch.device) -> dict[str, float]:
    """``{"time/<phase>_s": seconds per step}`` of ``timer`` averaged over the workers (a
    collective: every rank calls it; ``device``: where NCCL wants the tensor), plus ``time/step_wall_s`` (the timer's own mean step)
    and ``time/data_cpu_s``."""
    from sdetr.engine.distributed import all_reduce_mean

    per_step = timer.per_step()
    names = sorted(per_step)
    if not names:
        return {}
    values = torch.tensor([per_step[n] for n in names], dtype=torch.float64, device=device)
    means = all_reduce_mean(values).cpu()  # NCCL needs device tensors
    rename = {"step": "step_wall"}
    return {f"time/{rename.get(n, n)}_s": float(v) for n, v in zip(names, means)}


def time_module(module: nn.Module, timer: StepTimer, name: str) -> Callable[[], None]:
    """Time every call of ``module`` into ``timer`` phase ``name``, and subtract it from the
    phase it runs inside (the matcher runs inside ``loss``); returns the hooks' remover."""
    starts: list[float] = []

    def before(*_: Any) -> None:
        starts.append(time.perf_counter())

    def after(*_: Any) -> None:
        seconds = time.perf_counter() - starts.pop()
        timer.add(name, seconds)
        timer.add("loss", -seconds)

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


@contextlib.contextmanager
def timed_reduction(engine: Any, timer: StepTimer, barrier: Callable[[], None]
                    ) -> Iterator[None]:
    """While inside, DeepSpeed's gradient reduction (``engine.allreduce_gradients``, called
    at the end of ``engine.backward``) is timed as ``wait`` (a barrier first) + ``allreduce``,
    and that time is not counted in ``backward``. With one rank there is nothing to wait for
    and the barrier is skipped."""
    original = engine.allreduce_gradients
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def reduce(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        if world > 1 and engine.is_gradient_accumulation_boundary():
            barrier()
        mid = time.perf_counter()
        result = original(*args, **kwargs)
        end = time.perf_counter()
        timer.add("wait", mid - start)
        timer.add("allreduce", end - mid)
        timer.add("backward", -(end - start))
        return result

    engine.allreduce_gradients = reduce
    try:
        yield
    finally:
        del engine.allreduce_gradients  # the instance attribute; the method shows again


def loader_cpu_seconds(batches: Any) -> float:
    """CPU seconds (user + system) used so far by the worker processes of ``batches`` (the
    iterator of a torch DataLoader; 0 when it loads in this process)."""
    import psutil

    workers = getattr(batches, "_workers", None) or []
    total = 0.0
    for worker in workers:
        pid = getattr(worker, "pid", None)
        if pid is None:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that just exited
            cpu = psutil.Process(pid).cpu_times()
            total += cpu.user + cpu.system
    return total


__all__ = ["PHASES", "StepTimer", "loader_cpu_seconds", "step_breakdown", "time_module",
           "timed_reduction"]
