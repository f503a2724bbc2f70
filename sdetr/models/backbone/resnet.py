"""ResNet backbones (REFERENCE §2.1): timm ResNet, torchvision key names, C3/C4/C5 outputs."""

from __future__ import annotations

from typing import Any, Mapping

import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor, nn
from torch.nn import functional as F

from sdetr.models.backbone.base import Backbone, freeze_batch_norm, set_trainable

RESNET_CHANNELS: dict[str, list[int]] = {
    "resnet10": [128, 256, 512],
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
}
RESNET_LAYERS: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
"""Top-level parameter groups of the body; ``train_layers=RESNET_LAYERS`` trains everything."""


_POOL_KERNEL, _POOL_STRIDE, _POOL_PADDING = (3, 3), (2, 2), (1, 1)  # the ResNet stem's max pool


class _ChannelsLastMaxPool(torch.autograd.Function):
    """3x3 / stride 2 / pad 1 max pool of an NCHW CPU tensor, computed in channels_last; the
    output and the input gradient are contiguous NCHW."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x_cl = x.contiguous(memory_format=torch.channels_last)
        y, indices = torch.ops.aten.max_pool2d_with_indices(x_cl, _POOL_KERNEL, _POOL_STRIDE,
                                                          _POOL_PADDING)
        ctx.save_for_backward(x_cl, indices)
        return y.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        x_cl, indices = ctx.saved_tensors
        grad_cl = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_cl, x_cl, _POOL_KERNEL, _POOL_STRIDE, _POOL_PADDING, (1, 1), False, indices)
        return grad_x.contiguous()


class StemMaxPool(nn.Module):
    """The ResNet stem's 3x3 / stride 2 / pad 1 max pool, (B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉).

    On the CPU, torch's NCHW max-pool forward is about 30x slower than its channels_last one
    (4 x 64 x 128 x 171, one thread: 72 against 2.4 ms, fp32 and bf16 alike), so CPU inputs
    are pooled in channels_last (in training and at eval); the output and the gradient handed
    back to the stem are contiguous NCHW, so nothing else of the network changes memory order.
    Values and gradients are exactly those of ``nn.MaxPool2d(3, 2, 1)``; no parameters.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return F.max_pool2d(x, _POOL_KERNEL, _POOL_STRIDE, _POOL_PADDING)
        if torch.is_grad_enabled() and x.requires_grad:
            return _ChannelsLastMaxPool.apply(x)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        return F.max_pool2d(x_cl, _POOL_KERNEL, _POOL_STRIDE, _POOL_PADDING).contiguous()


def create_resnet(name: str, *, zero_init_last: bool) -> nn.Module:
    """timm ResNet ``name`` without classifier or pooling; "resnet10" (not a timm model name)
    is timm's ResNet with BasicBlocks, one per stage, and the 7x7 stem of ResNet-18."""
    if name == "resnet10":
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0, global_pool="",
                      zero_init_last=zero_init_last)
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="",
                             zero_init_last=zero_init_last)


class ResNetBackbone(Backbone):
    """timm ResNet without classifier: returns the outputs of layer2, layer3, layer4.

    Output maps (B, C, ceil(H/s), ceil(W/s)) for s = 8, 16, 32, any input H, W; C = 512/1024/2048
    (resnet50) or 128/256/512 (resnet10/18/34; resnet10 is ResNet-18 with one block per stage,
    half its FLOPs, for from-scratch CPU trials). State_dict keys ``body.conv1.weight``,
    ``body.layer1.0.conv1.weight``, ``body.layer1.0.downsample.{0,1}.*``, ... (torchvision names).
    No ``fc`` / pooling parameters exist. Initialised like torchvision (last BN of each block
    starts at weight 1, not timm's zero init, so a frozen-BN net without weights is not
    degenerate) unless ``zero_init_residual``.

    Args:
        name: "resnet50", "resnet34", "resnet18" or "resnet10".
        frozen_bn: replace every BatchNorm2d by FrozenBatchNorm2d (paper setup; their affine
            parameters then are buffers, not parameters). False keeps trainable BatchNorm.
        train_layers: top-level groups (see RESNET_LAYERS) whose parameters train; all other
            parameters get requires_grad=False. Default: stem and layer1 frozen (paper).
        zero_init_residual: start the last BatchNorm of every residual block at weight 0
            (timm's ``zero_init_last``), so that each block starts as the identity.
    """

    def __init__(self, name: str = "resnet50", frozen_bn: bool = True,
                 train_layers: tuple[str, ...] = ("layer2", "layer3", "layer4"),
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"ResNetBackbone: unknown name {name!r}; "
                             f"expected one of {sorted(RESNET_CHANNELS)}")
        unknown = [layer for layer in train_layers if layer not in RESNET_LAYERS]
        if unknown:
            raise ValueError(f"ResNetBackbone: unknown train_layers {unknown}; "
                             f"expected names from {RESNET_LAYERS}")
        self.name = name
        self.body = create_resnet(name, zero_init_last=zero_init_residual)
        self.body.maxpool = StemMaxPool()
        if frozen_bn:
            freeze_batch_norm(self.body)
        set_trainable(self.body, tuple(train_layers))
        self.out_channels = list(RESNET_CHANNELS[name])
        self.strides = [8, 16, 32]

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) → [C3 (B, C, ⌈H/8⌉, ⌈W/8⌉), C4 (…/16), C5 (…/32)]."""
        body = self.body
        x = body.maxpool(body.act1(body.bn1(body.conv1(images))))
        c3 = body.layer2(body.layer1(x))
        c4 = body.layer3(c3)
        c5 = body.layer4(c4)
        return [c3, c4, c5]

    def translate_external_state_dict(
            self, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """torchvision/timm ResNet keys → ``body.<key>``; the classifier ``fc.*`` is ignored."""
        ignored = [k for k in state_dict if k.startswith("fc.")]
        kept = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        translated, more_ignored = super().translate_external_state_dict(kept)
        return translated, ignored + more_ignored
