"""Backbone interface and frozen BatchNorm (REFERENCE §2.1).

A backbone maps images (B, 3, H, W) to a list of NCHW feature maps, largest first
(C3, C4, C5 at strides 8 / 16 / 32). The wrapped timm network lives in ``self.body``, so the
backbone's state_dict keys read ``body.<timm key>`` (timm's ResNet keys equal torchvision's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all four are buffers).

    ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, as one fused elementwise ``addcmul`` (one pass over
    the feature map instead of two) that fvcore, by convention, counts as no flops. A
    ``num_batches_tracked`` entry in a loaded state_dict is dropped.

    Args:
        num_features: channels C of the (B, C, H, W) input.
        eps: added to the running variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) → (B, C, H, W)."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift.reshape(1, -1, 1, 1), x, scale.reshape(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` (in place) by a FrozenBatchNorm2d
    holding the same affine parameters and running statistics. Returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


@dataclass(frozen=True)
class LoadReport:
    """Outcome of loading a weights file into a backbone (keys in the backbone's naming)."""

    path: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...]


class Backbone(nn.Module):
    """Base class: ``forward(images (B, 3, H, W)) -> list of (B, C_l, H_l, W_l)``, largest first.

    Attributes:
        out_channels: C_l of each returned map.
        strides: stride of each returned map w.r.t. the input image (8, 16, 32).
        body: the wrapped timm network.
        load_report: set by :meth:`load_weights`, else None.
    """

    out_channels: list[int]
    strides: list[int]
    body: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.load_report: Optional[LoadReport] = None

    def weights_to_channels_last(self) -> None:
        """Lay the weights out in the memory format the backbone computes in best, where it
        has one (ResNets built with ``channels_last``); by default nothing."""

    def forward(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def translate_external_state_dict(
            self, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Map a foreign state_dict (timm/torchvision/official names) to this backbone's keys.

        Returns (translated, ignored keys). Keys that already start with one of this module's
        children (``body.``, ...) are taken as ours. Subclasses add their own renames/ignores.
        """
        own_roots = tuple(f"{name}." for name, _ in self.named_children())
        translated: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            translated[key if key.startswith(own_roots) else f"body.{key}"] = value
        return translated, []

    def load_weights(self, path: str) -> LoadReport:
        """Load a local weights file (see :func:`sdetr.models.backbone.weights.load_backbone_weights`)."""
        from sdetr.models.backbone.weights import load_backbone_weights
        self.load_report = load_backbone_weights(self, path)
        return self.load_report


def set_trainable(module: nn.Module, trainable_prefixes: tuple[str, ...]) -> None:
    """requires_grad = True exactly for parameters whose name is, or starts with ``p + '.'``,
    one of ``trainable_prefixes`` (names relative to ``module``)."""
    for name, param in module.named_parameters():
        param.requires_grad_(any(name == p or name.startswith(p + ".") for p in trainable_prefixes))
