"""Backbones: ResNet-18/34/50 and Swin-T on timm, C3/C4/C5 maps at strides 8/16/32.

``build_backbone(name, ...)`` is the entry point used by the model builder.
"""

from __future__ import annotations

import logging
from typing import Optional

from sdetr.models.backbone.base import Backbone, FrozenBatchNorm2d, LoadReport, freeze_batch_norm
from sdetr.models.backbone.resnet import (RESNET_CHANNELS, RESNET_LAYERS, RESNET_WIDTH,
                                          ResNetBackbone)
from sdetr.models.backbone.swin import SWIN_OFFICIAL_KEY_MAP, SwinBackbone, swin_official_to_ours
from sdetr.models.backbone.weights import load_backbone_weights, read_state_dict

logger = logging.getLogger(__name__)

BACKBONE_NAMES: tuple[str, ...] = ("resnet50", "resnet34", "resnet18", "resnet10", "swin_t")
_DEFAULT_FROZEN_BN: dict[str, bool] = {"resnet50": True, "resnet34": True, "resnet18": False,
                                      "resnet10": False}
_PAPER_TRAIN_LAYERS: tuple[str, ...] = ("layer2", "layer3", "layer4")


def build_backbone(name: str, *, frozen_bn: Optional[bool] = None, weights: Optional[str] = None,
                   drop_path_rate: float = 0.2, train_all: bool = False,
                   zero_init_residual: bool = False,
                   kernel_backend: Optional[str] = None,
                   channels_last: bool = False, width: int = RESNET_WIDTH) -> Backbone:
    """Build a backbone by name and optionally load a local weights file.

    Args:
        name: "resnet50", "resnet34", "resnet18", "resnet10" or "swin_t".
        frozen_bn: ResNets only. None → True for resnet50/resnet34 (paper setup), False for
            resnet18 and resnet10 (meant for from-scratch CPU presets). swin_t has no
            BatchNorm: None or True is accepted and means nothing, False raises.
        weights: local file (torchvision/timm ResNet, official or timm Swin, or a saved backbone
            state_dict); None keeps the random init. The report is ``backbone.load_report``.
        drop_path_rate: swin_t stochastic depth (ignored by ResNets).
        train_all: make every parameter trainable. False: paper freezing, i.e. ResNet stem +
            layer1 frozen, Swin patch embedding + stage 1 (with its merging) frozen.
        zero_init_residual: ResNets only: every residual block's last BatchNorm starts at
            weight 0 (the block starts as the identity).
        kernel_backend: ResNets only: backend of the stem's max pool op on the CPU (None: the
            default / automatic one).
        channels_last: ResNets only: weights and feature maps in channels_last memory.
        width: ResNets only: planes of the first stage (64 = the standard nets); every stage
            scales with it, the 7x7 stem keeps 64 channels.
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(f"build_backbone: unknown backbone {name!r}; expected one of {BACKBONE_NAMES}")
    if name == "swin_t":
        if zero_init_residual or channels_last or width != RESNET_WIDTH:
            raise ValueError("build_backbone: zero_init_residual, channels_last and width apply "
                             "to ResNets, not swin_t")
        if frozen_bn is False:
            raise ValueError("build_backbone: frozen_bn=False does not apply to swin_t (it has no BatchNorm)")
        backbone: Backbone = SwinBackbone(drop_path_rate=drop_path_rate, frozen_stages=-1 if train_all else 2)
    else:
        use_frozen_bn = _DEFAULT_FROZEN_BN[name] if frozen_bn is None else frozen_bn
        train_layers = RESNET_LAYERS if train_all else _PAPER_TRAIN_LAYERS
        backbone = ResNetBackbone(name, frozen_bn=use_frozen_bn, train_layers=train_layers,
                                  zero_init_residual=zero_init_residual,
                                  kernel_backend=kernel_backend, channels_last=channels_last,
                                  width=width)
    if weights is not None:
        backbone.load_weights(weights)
    else:
        logger.info("backbone %s: no weights file, random init", name)
    return backbone


__all__ = [
    "BACKBONE_NAMES", "Backbone", "FrozenBatchNorm2d", "LoadReport", "RESNET_CHANNELS", "RESNET_LAYERS",
    "RESNET_WIDTH",
    "ResNetBackbone", "SWIN_OFFICIAL_KEY_MAP", "SwinBackbone", "build_backbone", "freeze_batch_norm",
    "load_backbone_weights", "read_state_dict", "swin_official_to_ours",
]
