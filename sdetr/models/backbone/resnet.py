"""ResNet backbones (REFERENCE §2.1): timm ResNet, torchvision key names, C3/C4/C5 outputs."""

from __future__ import annotations

from typing import Mapping, Optional

import timm
from timm.models.resnet import BasicBlock, ResNet
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sdetr.models.backbone.base import Backbone, freeze_batch_norm, set_trainable
from sdetr.ops import stem_max_pool

RESNET_CHANNELS: dict[str, list[int]] = {
    "resnet10": [128, 256, 512],
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
}
"""C3/C4/C5 channels at the standard width 64 (the first stage's planes)."""
RESNET_WIDTH = 64
RESNET_LAYERS: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
"""Top-level parameter groups of the body; ``train_layers=RESNET_LAYERS`` trains everything."""


class StemMaxPool(nn.Module):
    """The ResNet stem's 3x3 / stride 2 / pad 1 max pool, (B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉).

    CPU tensors go through the op :func:`sdetr.ops.stem_max_pool` with ``backend`` (None: the
    default / automatic one): torch's NCHW CPU forward of this pool is ~20-30x slower than its
    channels_last one, which the ``reference`` backend uses (converting to channels_last and
    back), while the ``compiled`` one pools NCHW directly. Output and input gradient are
    contiguous NCHW; values and gradients are exactly those of ``nn.MaxPool2d(3, 2, 1)``, which
    pools every other device and channels_last CPU tensors (the layout torch's kernel is fast
    in; the output stays channels_last). No parameters.
    """

    def __init__(self, backend: Optional[str] = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or _is_channels_last(x):
            return F.max_pool2d(x, 3, 2, 1)
        return stem_max_pool(x, self.backend)


def _is_channels_last(x: Tensor) -> bool:
    """True for a (B, C, H, W) tensor laid out channels_last (and not also plain contiguous,
    as a C = 1 or 1 x 1 map is)."""
    return (x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())


def resnet_channels(name: str, width: int = RESNET_WIDTH) -> list[int]:
    """C3/C4/C5 channels of ResNet ``name`` whose first stage has ``width`` planes (stage i has
    ``width * 2**i``)."""
    return [c * width // RESNET_WIDTH for c in RESNET_CHANNELS[name]]


def create_resnet(name: str, *, zero_init_last: bool, width: int = RESNET_WIDTH) -> nn.Module:
    """timm ResNet ``name`` without classifier or pooling; "resnet10" (not a timm model name)
    is timm's ResNet with BasicBlocks, one per stage, and the 7x7 stem of ResNet-18.
    ``width``: planes of the first stage (64 in the papers; the stages have width x 1/2/4/8).
    The 7x7 stem keeps its 64 channels (timm's), so below 64 the first block of layer1 gets a
    1x1 projection shortcut."""
    shape = dict(channels=tuple(width * 2**i for i in range(4)))
    if name == "resnet10":
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0, global_pool="",
                      zero_init_last=zero_init_last, **shape)
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="",
                             zero_init_last=zero_init_last, **shape)


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
        kernel_backend: backend of the stem's max pool op on the CPU (see :class:`StemMaxPool`).
        channels_last: convert the images to channels_last memory; the output maps are then
            channels_last too (same shapes and values up to the convolutions' summation
            order), and the stem pools with torch's channels_last kernel, not the NCHW op. The
            weights follow with :meth:`weights_to_channels_last` (the training engine calls
            it once DeepSpeed has broadcast them: its broadcast needs NCHW weights); with
            NCHW weights oneDNN converts them at every call and nothing is gained.
        width: planes of the first stage (64, the standard ResNets; a positive multiple of
            8). Every stage scales with it, so C3/C4/C5 have ``width / 64`` times the channels
            above and the stages' convolutions about ``(width / 64)**2`` times the FLOPs; the
            7x7 stem keeps 64 channels. Pretrained weights exist for 64 only.
    """

    def __init__(self, name: str = "resnet50", frozen_bn: bool = True,
                 train_layers: tuple[str, ...] = ("layer2", "layer3", "layer4"),
                 zero_init_residual: bool = False, kernel_backend: Optional[str] = None,
                 channels_last: bool = False, width: int = RESNET_WIDTH) -> None:
        super().__init__()
        if width < 8 or width % 8:
            raise ValueError(f"ResNetBackbone: width must be a positive multiple of 8, got {width}")
        if name not in RESNET_CHANNELS:
            raise ValueError(f"ResNetBackbone: unknown name {name!r}; "
                             f"expected one of {sorted(RESNET_CHANNELS)}")
        unknown = [layer for layer in train_layers if layer not in RESNET_LAYERS]
        if unknown:
            raise ValueError(f"ResNetBackbone: unknown train_layers {unknown}; "
                             f"expected names from {RESNET_LAYERS}")
        self.name = name
        self.width = width
        self.body = create_resnet(name, zero_init_last=zero_init_residual, width=width)
        self.body.maxpool = StemMaxPool(kernel_backend)
        if frozen_bn:
            freeze_batch_norm(self.body)
        set_trainable(self.body, tuple(train_layers))
        self.channels_last = channels_last
        self.out_channels = resnet_channels(name, width)
        self.strides = [8, 16, 32]

    def weights_to_channels_last(self) -> None:
        """With ``channels_last``, lay the body's weights out channels_last (in place: the
        parameter objects, and so an optimizer's references, stay the same); else nothing."""
        if self.channels_last:
            self.body.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) → [C3 (B, C, ⌈H/8⌉, ⌈W/8⌉), C4 (…/16), C5 (…/32)]."""
        body = self.body
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
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
