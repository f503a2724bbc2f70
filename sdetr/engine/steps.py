"""One training epoch through a DeepSpeed engine, with a non-finite-loss guard and progress.

Each optimizer step consumes ``accumulation`` micro-batches per worker; DeepSpeed scales the
loss by ``1/accumulation``, averages gradients over workers, clips and steps at the boundary.
The per-micro-batch loss terms are averaged over workers right away (one small all-reduce):
that gives every rank the same view, so a non-finite loss stops all of them together, before
the bad gradient is applied.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import Tensor

from sdetr.engine.distributed import all_reduce_mean

logger = logging.getLogger(__name__)


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


def progress_bar(total: int, desc: str, *, enabled: bool, under_ray: bool) -> Progress:
    """A tqdm bar with ETA (Ray's ``tqdm_ray`` inside a Ray worker, whose output is
    forwarded line by line), or a no-op when not ``enabled``."""
    if not enabled:
        return _NoProgress()
    if under_ray:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm
        return ray_tqdm(total=total, desc=desc, unit="step")
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


def run_epoch(engine: Any, criterion: Any, loader: Iterable, *, steps: int, accumulation: int,
              device: torch.device, epoch: int, first_step: int, bar: Progress
              ) -> dict[str, float]:
    """Train ``steps`` optimizer steps of ``accumulation`` micro-batches each.

    Returns the epoch means (over micro-batches and workers) of ``"loss"`` (the weighted total)
    and of every scalar in the criterion's loss dict. ``epoch`` (1-based) and ``first_step``
    (global optimizer steps done before) only name the place of a non-finite loss.
    """
    engine.train()
    criterion.train()
    dtype = next(engine.module.parameters()).dtype
    batches: Iterator = iter(loader)
    keys: list[str] = []
    sums: Tensor | None = None
    try:
        for step in range(steps):
            for _ in range(accumulation):
                images, masks, targets = to_device(next(batches), device, dtype)
                outputs = engine(images, masks)
                losses = criterion(outputs, targets)
                total = criterion.total_loss(losses)
                if not keys:
                    keys = ["loss", *sorted(k for k, v in losses.items() if v.dim() == 0)]
                values = torch.stack([total.detach().float()]
                                     + [losses[k].detach().float() for k in keys[1:]])
                values = all_reduce_mean(values).cpu()  # NCCL needs device tensors
                check_finite(values, keys, ["loss", *criterion.weight_dict], epoch=epoch,
                             step=first_step + step + 1)
                engine.backward(total)
                engine.step()
                sums = values if sums is None else sums + values
            bar.update(1)
    finally:
        bar.close()
    assert sums is not None  # steps >= 1
    means = sums / (steps * accumulation)
    return {k: float(means[i]) for i, k in enumerate(keys)}
