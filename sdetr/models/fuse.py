"""Eval-time folding of BatchNorm into the convolution before it (inference copies only).

A Conv2d (weight W (C_out, C_in/g, kh, kw), bias b or none) followed by a BatchNorm in eval mode
(running mean m, running variance v, affine γ, β, eps ε; or a
:class:`~sdetr.models.backbone.base.FrozenBatchNorm2d`, whose four tensors are buffers)
computes, per output channel c,

    y_c = (conv(x)_c - m_c) · s_c + β_c,   s_c = γ_c / sqrt(v_c + ε),

which is one Conv2d with weight ``W_c · s_c`` and bias ``(b_c - m_c) · s_c + β_c``. The fold is
done in float64 and cast back to the conv's dtype. It removes one elementwise pass over every
backbone feature map (the ResNet backbones: 20 of ResNet-18, 53 of ResNet-50). FLOPs are counted
on the unfolded model (:mod:`sdetr.profiling`): fvcore counts FrozenBatchNorm2d as 0 and a
trainable BatchNorm2d as 1 flop per element (0.3% of a ``_tiny`` preset at 128×160), so folding
would change the paper presets' count by nothing and the tiny presets' slightly.

Which pairs are folded (structure, not tracing):

* in an ``nn.Sequential``, a child Conv2d immediately followed by a BatchNorm child (a
  Sequential runs its children in order and feeds each output only to the next), e.g. timm's
  ``downsample.0`` / ``downsample.1``;
* in any other module, the sibling children ``conv<k>`` and ``bn<k>``: the naming of timm's
  ResNet (stem ``conv1``/``bn1``, BasicBlock ``conv1..2``/``bn1..2``, Bottleneck
  ``conv1..3``/``bn1..3``, timm 1.0), whose ``forward`` applies ``bn<k>`` directly to
  ``conv<k>``'s output and uses that output nowhere else.

Only exact ``nn.Conv2d`` (not subclasses such as timm's ``StdConv2d`` / ``Conv2dSame``, whose
forward differs) and exact ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` with running statistics /
``FrozenBatchNorm2d`` (not subclasses such as timm's ``BatchNormAct2d``, which also activates)
are folded. Every BatchNorm that is not folded is listed in the returned :class:`FoldReport`
and logged as a warning. The folded BatchNorm becomes a :class:`FoldedBatchNorm` (an
``nn.Identity`` that refuses to run in training mode), so a folded model cannot be trained by
mistake: training must only ever see the unfolded weights.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn

from sdetr.models.backbone.base import FrozenBatchNorm2d

logger = logging.getLogger(__name__)

BatchNorm = Union[nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d]
_BN_TYPES: tuple[type, ...] = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
_BN_NAME = re.compile(r"bn(\d*)")


class FoldedBatchNorm(nn.Identity):
    """Stands where a BatchNorm was folded into the preceding conv: identity in eval mode.

    Raises RuntimeError when run in training mode (the folded conv no longer normalises with
    batch statistics, and its weights are not the trainable ones).
    """

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) → x."""
        if self.training:
            raise RuntimeError("a BatchNorm folded for inference ran in training mode: "
                               "train the unfolded model, not a fold_batch_norm copy")
        return x


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_batch_norm` did (module names relative to the model).

    folded: names of the BatchNorm modules folded into their convolution.
    unfolded: names of the BatchNorm modules left as they were (no foldable conv before them).
    """

    folded: tuple[str, ...]
    unfolded: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"folded": len(self.folded), "unfolded": list(self.unfolded)}


def _is_foldable_bn(module: nn.Module) -> bool:
    if type(module) not in _BN_TYPES:
        return False
    return getattr(module, "running_mean", None) is not None


def _is_foldable_pair(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and _is_foldable_bn(bn)
            and conv.out_channels == bn.num_features)


def _pairs_of(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv child name, bn child name) pairs of ``parent``'s direct children."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:])
                if _is_foldable_pair(children[a], children[b])]
    pairs = []
    for name, child in children.items():
        match = _BN_NAME.fullmatch(name)
        conv_name = f"conv{match.group(1)}" if match else ""
        if match and conv_name in children and _is_foldable_pair(children[conv_name], child):
            pairs.append((conv_name, name))
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str, str]]:
    """(parent name, conv child name, bn child name) of every foldable pair of ``model``."""
    return [(parent_name, conv, bn) for parent_name, parent in model.named_modules()
            for conv, bn in _pairs_of(parent)]


@torch.no_grad()
def folded_conv(conv: nn.Conv2d, bn: BatchNorm) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` with ``bn`` in eval mode (math in float64).

    The new conv has ``conv``'s geometry, device and dtype, always a bias, and parameters
    that do not require grad (it is an inference copy).
    """
    weight = conv.weight.detach().double()
    channels = weight.shape[0]
    ones = torch.ones(channels, dtype=torch.float64, device=weight.device)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(ones)
    gamma = bn.weight.detach().double() if bn.weight is not None else ones
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(ones)
    scale = gamma * torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                      bias=True, padding_mode=conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    fused.weight.copy_((weight * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
    fused.bias.copy_(((bias - bn.running_mean.detach().double()) * scale + beta)
                     .to(conv.weight.dtype))
    fused.requires_grad_(False)
    return fused


def _fold_in_place(model: nn.Module) -> FoldReport:
    modules = dict(model.named_modules())
    folded = []
    for parent_name, conv_name, bn_name in conv_bn_pairs(model):
        parent = modules[parent_name]
        setattr(parent, conv_name, folded_conv(getattr(parent, conv_name), getattr(parent, bn_name)))
        setattr(parent, bn_name, FoldedBatchNorm())
        folded.append(f"{parent_name}.{bn_name}" if parent_name else bn_name)
    unfolded = tuple(name for name, m in model.named_modules() if isinstance(m, _BN_TYPES))
    return FoldReport(tuple(folded), unfolded)


def fold_batch_norm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """An eval-mode model with every foldable Conv2d → BatchNorm pair folded (module docstring).

    Args:
        model: any module; it is deep-copied first unless ``inplace``.
        inplace: fold ``model`` itself. Only for a model the caller owns and will never train
            (e.g. one built just to be timed); the default leaves ``model`` untouched.

    Returns:
        (the folded model in eval mode, the :class:`FoldReport`). Same outputs as ``model`` in
        eval mode, up to float rounding.
    """
    target = model if inplace else copy.deepcopy(model)
    report = _fold_in_place(target)
    target.eval()
    logger.info("folded %d BatchNorm layers into their convolutions (%s)", len(report.folded),
                "in place" if inplace else "on a copy")
    if report.unfolded:
        logger.warning("%d BatchNorm layers left unfolded (no plain Conv2d right before them): %s",
                       len(report.unfolded), ", ".join(report.unfolded))
    return target, report
