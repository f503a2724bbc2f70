"""Exponential moving average of the model's weights (``train.ema_decay``).

After optimizer step t (1-based) every floating-point tensor of the model's state dict
(parameters and BatchNorm running statistics) is averaged into a float32 copy,

    ema ← d_t · ema + (1 - d_t) · weights,   d_t = min(decay, (1 + t) / (10 + t)),

the warm-up of d_t keeping the first steps from being dominated by the initial weights (the
rule of timm's ModelEmaV2 / DINO's ``ema_decay`` option). Integer buffers are copied. The copy
is what a run with EMA evaluates, profiles and saves as its model weights; the optimizer keeps
training the raw weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEma:
    """An eval-mode float32 copy of ``module`` updated by :meth:`update` after every step.

    Args:
        module: the trained module (its current weights start the average).
        decay: d in (0, 1).
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).float().eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """d_t after optimizer step ``step`` (1-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Average ``module``'s current state (same architecture) in, after step ``step``."""
        weight = 1.0 - self.decay_at(step)
        current = module.state_dict()
        floats, values = [], []
        for name, average in self.module.state_dict().items():
            value = current[name].detach()
            if not average.is_floating_point():
                average.copy_(value)
            elif value.dtype == average.dtype:
                floats.append(average)
                values.append(value)
            else:  # a bf16 module (DeepSpeed's bf16 mode): average in float32
                average.lerp_(value.to(average.dtype), weight)
        if floats:
            torch._foreach_lerp_(floats, values, weight)  # one pass over all tensors

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (CPU tensors) and the decay, for a training checkpoint."""
        return {"decay": self.decay,
                "weights": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the decay of the config stays)."""
        self.module.load_state_dict(state["weights"])
