"""One training epoch through a DeepSpeed engine, with a non-finite-loss guard and progress.

Each optimizer step consumes ``accumulation`` micro-batches per worker; DeepSpeed scales the
loss by ``1/accumulation``, averages gradients over workers, clips and steps at the boundary.
The per-micro-batch loss terms are averaged over workers right away (one small all-reduce):
that gives every rank the same view, so a non-finite loss stops all of them together, before
the bad gradient is applied. Non-finite model outputs are caught the same way before the loss
(the Hungarian matcher would reject NaN boxes with a less helpful error).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol

import torch
from torch import Tensor

from sdetr.engine.distributed import all_reduce_mean, barrier
from sdetr.engine.step_timing import StepTimer, loader_cpu_seconds, time_module, timed_reduction

logger = logging.getLogger(__name__)

OUTPUT_KEYS = ("pred_logits", "pred_boxes")


class TrainingError(RuntimeError):
    """A run that cannot go on (one-line message); the last checkpoint stays intact."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite."""


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


class _NoProgress:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


class LogProgress:
    """Progress as log lines with rate and ETA, at most every ``interval_s`` seconds and at
    the end: for Ray workers, whose output reaches the driver line by line (a tqdm bar's
    carriage returns would pile up into one line)."""

    def __init__(self, total: int, desc: str, interval_s: float = 15.0) -> None:
        self.total, self.desc, self.interval_s = total, desc, interval_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval_s or self.done == self.total:
            self.last = now
            rate = (now - self.start) / max(self.done, 1)
            logger.info("%s: %d/%d steps, %.2f s/step, ETA %.0f s", self.desc, self.done,
                        self.total, rate, rate * (self.total - self.done))

    def close(self) -> None:
        return None

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (not spent on steps) out of the rate and ETA."""
        self.start += seconds


def progress_bar(total: int, desc: str, *, enabled: bool, under_ray: bool) -> Progress:
    """A tqdm bar with ETA, log lines with ETA inside a Ray worker (:class:`LogProgress`), or
    nothing when not ``enabled``."""
    if not enabled:
        return _NoProgress()
    if under_ray:
        return LogProgress(total, desc)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def to_device(batch: Any, device: torch.device, dtype: torch.dtype
              ) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """(images (B,3,H,W) in ``dtype``, masks (B,H,W) bool True = pad, targets) on ``device``."""
    images, masks, targets = batch
    moved = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images.to(device, dtype), masks.to(device), moved


def check_finite(values: Tensor, keys: list[str], checked: list[str], *, epoch: int,
                 step: int) -> None:
    """Raise NonFiniteLossError naming the epoch, step and non-finite terms among ``checked``."""
    bad = [f"{k}={values[i].item():g}" for i, k in enumerate(keys)
           if k in checked and not math.isfinite(values[i].item())]
    if bad:
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, step {step}: "
                                 f"{', '.join(bad[:8])}" + (" ..." if len(bad) > 8 else ""))


def nonfinite_outputs(outputs: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Names of the ``pred_logits`` / ``pred_boxes`` tensors (at any nesting level: aux, enc,
    enc_aux outputs) that hold NaN or inf. Checked before the loss: the matcher cannot run
    on NaN boxes."""
    bad: list[str] = []
    for key, value in outputs.items():
        name = f"{prefix}{key}"
        if key in OUTPUT_KEYS and isinstance(value, Tensor):
            if not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, Mapping):
            bad += nonfinite_outputs(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    bad += nonfinite_outputs(item, f"{name}.{i}.")
    return bad


def check_outputs(outputs: Mapping[str, Any], device: torch.device, *, epoch: int,
                  step: int) -> None:
    """Raise NonFiniteLossError on EVERY rank if any rank's outputs are not finite (a
    collective: all ranks must call it for each micro-batch)."""
    bad = nonfinite_outputs(outputs)
    flag = torch.tensor([float(len(bad))], device=device)
    if float(all_reduce_mean(flag).item()) > 0:
        where = ", ".join(bad[:6]) if bad else "on another worker"
        raise NonFiniteLossError(f"non-finite model outputs at epoch {epoch}, step {step}: "
                                 f"{where}")


def float_outputs(outputs: Any) -> Any:
    """``outputs`` (nested dicts/lists of tensors) with every floating tensor in float32.

    Applied to the forward's outputs under autocast, so that the matcher and the loss run in
    fp32 whatever dtype the last layers produced.
    """
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, Mapping):
        return {k: float_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(float_outputs(v) for v in outputs)
    return outputs


def forward(engine: Any, images: Tensor, masks: Tensor, autocast: torch.dtype | None,
            targets: Optional[list[dict[str, Tensor]]] = None) -> Any:
    """The model's outputs for one micro-batch; with ``autocast`` set, the forward runs under
    ``torch.autocast`` to that dtype and the outputs come back in float32. ``targets`` go to
    the model's forward (its denoising queries, if it has them)."""
    if autocast is None:
        return engine(images, masks, targets=targets)
    with torch.autocast(images.device.type, dtype=autocast):
        outputs = engine(images, masks, targets=targets)
    return float_outputs(outputs)


def run_epoch(engine: Any, criterion: Any, loader: Iterable, *, steps: int, accumulation: int,
              device: torch.device, epoch: int, first_step: int, bar: Progress,
              autocast: torch.dtype | None = None,
              timer: Optional[StepTimer] = None,
              after_step: Optional[Callable[[int], None]] = None) -> dict[str, float]:
    """Train ``steps`` optimizer steps of ``accumulation`` micro-batches each.

    ``autocast``: run each forward under ``torch.autocast`` to this dtype (``bf16-mixed``);
    the loss and the weights stay in fp32. ``timer``: where each phase's time goes
    (:mod:`sdetr.engine.step_timing`; a fresh one when None). ``after_step(k)``: called after
    the k-th (1-based) optimizer step of this epoch, outside the step's timing (the Trainer's
    mid-epoch evaluation).

    Returns the epoch means (over micro-batches and workers) of ``"loss"`` (the weighted total)
    and of every scalar in the criterion's loss dict. ``epoch`` (1-based) and ``first_step``
    (global optimizer steps done before) only name the place of a non-finite loss.
    """
    engine.train()
    criterion.train()
    timer = timer if timer is not None else StepTimer()
    dtype = next(engine.module.parameters()).dtype
    batches: Iterator = iter(loader)
    keys: list[str] = []
    sums: Tensor | None = None
    remove_hooks = time_module(criterion.matcher, timer, "matcher")
    timer.cpu_probe = lambda: loader_cpu_seconds(batches)
    try:
        with timed_reduction(engine, timer, barrier):
            for step in range(steps):
                timer.start_step()
                for _ in range(accumulation):
                    values, keys = _micro_batch(engine, criterion, batches, timer, keys,
                                                device=device, dtype=dtype, autocast=autocast,
                                                where=(epoch, first_step + step + 1))
                    sums = values if sums is None else sums + values
                timer.end_step()
                bar.update(1)
                if after_step is not None:
                    after_step(step + 1)
        timer.finish()
    finally:
        remove_hooks()
        bar.close()
    assert sums is not None  # steps >= 1
    means = sums / (steps * accumulation)
    return {k: float(means[i]) for i, k in enumerate(keys)}


def _micro_batch(engine: Any, criterion: Any, batches: Iterator, timer: StepTimer,
                 keys: list[str], *, device: torch.device, dtype: torch.dtype,
                 autocast: torch.dtype | None, where: tuple[int, int]
                 ) -> tuple[Tensor, list[str]]:
    """Forward, loss, backward and (at the accumulation boundary) the optimizer step of one
    micro-batch; returns its loss terms averaged over workers (CPU tensor, order ``keys``)
    and ``keys`` (set from the loss dict on the first call). ``where``: (epoch, step)."""
    epoch, step = where
    with timer.phase("data"):
        images, masks, targets = to_device(next(batches), device, dtype)
    with timer.phase("forward"):
        outputs = forward(engine, images, masks, autocast, targets)
    with timer.phase("sync"):
        check_outputs(outputs, device, epoch=epoch, step=step)
    with timer.phase("loss"):
        losses = criterion(outputs, targets)
        total = criterion.total_loss(losses)
        if not keys:
            keys = ["loss", *sorted(k for k, v in losses.items() if v.dim() == 0)]
        values = torch.stack([total.detach().float()]
                             + [losses[k].detach().float() for k in keys[1:]])
    with timer.phase("sync"):
        values = all_reduce_mean(values).cpu()  # NCCL needs device tensors
    check_finite(values, keys, ["loss", *criterion.weight_dict], epoch=epoch, step=step)
    with timer.phase("backward"):
        engine.backward(total)
    with timer.phase("optimizer"):
        engine.step()
    return values, keys
