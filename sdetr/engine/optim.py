"""Optimizer and learning-rate schedule of a run (REFERENCE §1.1).

Three parameter groups, weight decay on all of them (no exclusion of norms or biases):

* ``"linear_proj"``: names containing ``sampling_offsets`` or ``reference_points`` —
  ``lr × lr_linear_proj_mult`` (this wins over the backbone match);
* ``"backbone"``: names starting with ``backbone.`` — ``lr_backbone``;
* ``"default"``: everything else — ``lr``.

Frozen parameters (``requires_grad=False``) are left out. With ``sqrt_lr_scaling`` both
``lr`` and ``lr_backbone`` are first multiplied by ``sqrt(total_batch / 16)`` (Sparse DETR's
rule; the linear-projection group then uses the scaled ``lr``). The schedule
(``train.lr_schedule``, :func:`build_lr_schedule`) is the papers' ``StepLR(lr_drop, 0.1)``,
stepped once per epoch, or a cosine decay to 0 over the run's optimizer steps, stepped after
every step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR

from sdetr.config import TrainConfig

logger = logging.getLogger(__name__)

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")
BACKBONE_PREFIX = "backbone."
REFERENCE_BATCH = 16
GROUP_NAMES = ("default", "backbone", "linear_proj")


def group_of(name: str) -> str:
    """Group name (one of :data:`GROUP_NAMES`) of the parameter called ``name``."""
    if any(key in name for key in LINEAR_PROJ_NAMES):
        return "linear_proj"
    if name.startswith(BACKBONE_PREFIX):
        return "backbone"
    return "default"


def lr_scale(total_batch: int, sqrt_lr_scaling: bool) -> float:
    """``sqrt(total_batch / 16)`` when ``sqrt_lr_scaling``, else 1."""
    if total_batch < 1:
        raise ValueError(f"total_batch must be >= 1, got {total_batch}")
    return math.sqrt(total_batch / REFERENCE_BATCH) if sqrt_lr_scaling else 1.0


def param_groups(model: nn.Module, *, lr: float, lr_backbone: float,
                 lr_linear_proj_mult: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``model``'s trainable parameters.

    Each group is ``{"name", "params", "lr", "weight_decay"}``; groups without parameters are
    left out (e.g. a model whose backbone is fully frozen), the order is ``GROUP_NAMES``.
    """
    lrs = {"default": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    members: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        if param.requires_grad:
            members[group_of(name)].append(param)
    groups = [{"name": name, "params": members[name], "lr": lrs[name],
               "weight_decay": weight_decay} for name in GROUP_NAMES if members[name]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, train: TrainConfig) -> AdamW:
    """AdamW over :func:`param_groups` with the config's (optionally sqrt-scaled) lrs; its
    fused kernel with ``train.fused_optimizer``."""
    scale = lr_scale(train.batch_size, train.sqrt_lr_scaling)
    groups = param_groups(model, lr=train.lr * scale, lr_backbone=train.lr_backbone * scale,
                          lr_linear_proj_mult=train.lr_linear_proj_mult,
                          weight_decay=train.weight_decay)
    for group in groups:
        logger.info("param group %-11s %4d tensors %10d params lr %.3g", group["name"],
                    len(group["params"]), sum(p.numel() for p in group["params"]), group["lr"])
    return AdamW(groups, lr=train.lr * scale, weight_decay=train.weight_decay,
                 fused=train.fused_optimizer or None)


def build_scheduler(optimizer: Optimizer, lr_drop: int) -> StepLR:
    """``StepLR(step_size=lr_drop, gamma=0.1)``; call ``.step()`` once per epoch."""
    if lr_drop < 1:
        raise ValueError(f"lr_drop must be >= 1, got {lr_drop}")
    return StepLR(optimizer, step_size=lr_drop, gamma=0.1)


def build_cosine_scheduler(optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """Every group's lr × ``(1 + cos(pi * min(t, T) / T)) / 2`` after ``t`` calls of
    ``.step()`` (one per optimizer step), ``T = total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")

    def factor(done: int) -> float:  # a plain function: not saved in the state dict, so a
        return 0.5 * (1.0 + math.cos(math.pi * min(done, total_steps) / total_steps))
    return LambdaLR(optimizer, factor)  # resume with more epochs takes the new total


def build_lr_schedule(optimizer: Optimizer, train: TrainConfig,
                      steps_per_epoch: int) -> tuple[LRScheduler, bool]:
    """The scheduler ``train.lr_schedule`` asks for and whether it is stepped after every
    optimizer step (True: cosine) or once per epoch (False: step)."""
    if train.lr_schedule == "cosine":
        return build_cosine_scheduler(optimizer, train.epochs * steps_per_epoch), True
    return build_scheduler(optimizer, train.lr_drop), False


def group_lrs(optimizer: Optimizer) -> dict[str, float]:
    """Current lr of each named group: ``{"lr/<group name>": lr}``."""
    return {f"lr/{group.get('name', i)}": float(group["lr"])
            for i, group in enumerate(optimizer.param_groups)}
