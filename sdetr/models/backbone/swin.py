"""Swin-T backbone (REFERENCE §2.2) on timm's SwinTransformer, any input size.

Naming. The official detection Swin (microsoft / Sparse DETR) puts each patch merging at the END
of a stage (``layers.{i}.downsample``, i = 0..2); timm puts it at the START of the next stage
(``layers.{i+1}.downsample``). Official ``norm1/2/3`` (one LayerNorm per output) are our
``out_norms.0/1/2``. See SWIN_OFFICIAL_KEY_MAP / :func:`swin_official_to_ours`.

Arbitrary H, W. timm is configured with ``strict_img_size=False`` (attention masks built per
forward), ``always_partition=True`` (window 7 and shift 3 in every stage, as in the detection
Swin, instead of shrinking the window to the 224-px feature size) and a patch embedding that
pads the image right/bottom to a multiple of 4. timm's block rolls the map and THEN pads it to a
multiple of the window; the official detection block pads first and then rolls, which gives a
different (correct) shifted-window mask when a map is not a multiple of 7. The blocks are
therefore switched to :class:`_PadFirstSwinBlock`, which follows the official order.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import (
    SwinTransformer, SwinTransformerBlock, window_partition, window_reverse,
)
from torch import Tensor, nn

from sdetr.models.backbone.base import Backbone

SWIN_OFFICIAL_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^layers\.0\.downsample\.", "body.layers.1.downsample."),
    (r"^layers\.1\.downsample\.", "body.layers.2.downsample."),
    (r"^layers\.2\.downsample\.", "body.layers.3.downsample."),
    (r"^norm1\.", "out_norms.0."),
    (r"^norm2\.", "out_norms.1."),
    (r"^norm3\.", "out_norms.2."),
    (r"^", "body."),
)
"""(official regex, our key) pairs, first match wins. Official keys are relative to the Swin
module: the ImageNet checkpoint's ``model`` keys, or a detector's ``backbone.0.body.*`` keys with
that prefix removed. Ours are relative to :class:`SwinBackbone`."""

SWIN_IGNORED_KEYS: tuple[str, ...] = (r"^head\.", r"^norm\.", r"attn_mask$", r"relative_position_index$")
"""Keys of official/timm files with no counterpart here: classifier, final classification norm,
and buffers that are rebuilt (``relative_position_index`` is a non-persistent buffer in timm)."""

SWIN_T_CHANNELS: list[int] = [192, 384, 768]


def swin_official_to_ours(key: str) -> Optional[str]:
    """Official Swin key (see SWIN_OFFICIAL_KEY_MAP) → our key, or None for an ignored key."""
    if any(re.search(pattern, key) for pattern in SWIN_IGNORED_KEYS):
        return None
    for pattern, replacement in SWIN_OFFICIAL_KEY_MAP:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    raise AssertionError("SWIN_OFFICIAL_KEY_MAP ends with a catch-all")


def swin_frozen_prefixes(frozen_stages: int) -> list[str]:
    """timm parameter-name prefixes frozen by the official ``frozen_stages`` (−1 … 5).

    ≥ 0: patch embedding; ≥ 2: also official ``layers[0 … frozen_stages − 2]``, i.e. timm's
    ``layers.i.blocks`` and the merging that follows them, ``layers.{i+1}.downsample``.
    """
    prefixes = ["patch_embed"] if frozen_stages >= 0 else []
    for i in range(frozen_stages - 1):
        prefixes += [f"layers.{i}.blocks", f"layers.{i + 1}.downsample"]
    return prefixes


class _PadFirstSwinBlock(SwinTransformerBlock):
    """timm Swin block whose window attention pads to a window multiple BEFORE the cyclic shift
    (official detection Swin order); the mask is built for the padded size."""

    def _attn(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) already normalised → (B, H, W, C)."""
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (win_w - width % win_w) % win_w, 0, (win_h - height % win_h) % win_h))
        padded_h, padded_w = x.shape[1], x.shape[2]
        shift_h, shift_w = self.shift_size
        if shift_h or shift_w:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=self.get_attn_mask(x))  # mask None without shift
        x = window_reverse(windows.view(-1, win_h, win_w, channels), self.window_size, padded_h, padded_w)
        if shift_h or shift_w:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class SwinBackbone(Backbone):
    """Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, mlp 4, qkv bias, no absolute
    position embedding, patch norm, drop rate 0), outputs of stages 2, 3, 4.

    Any input H, W: output maps are (B, 192, ⌈H/8⌉, ⌈W/8⌉), (B, 384, ⌈H/16⌉, ⌈W/16⌉),
    (B, 768, ⌈H/32⌉, ⌈W/32⌉), NCHW, each through its own LayerNorm ``out_norms.{0,1,2}``
    (official ``norm1/2/3``; new, weight 1 / bias 0). No classifier head, no final norm.

    Args:
        drop_path_rate: stochastic depth, linear over the 12 blocks from 0 (0.2 in the paper).
        frozen_stages: official semantics (see :func:`swin_frozen_prefixes`); 2 freezes the
            patch embedding, stage 1 and its 96→192 merging (0.30M params); −1 freezes nothing.
            Frozen parts keep the module's train/eval mode (as in the official code after
            ``model.train()``, their drop-path stays active).
    """

    def __init__(self, drop_path_rate: float = 0.2, frozen_stages: int = 2) -> None:
        super().__init__()
        if not -1 <= frozen_stages <= 5:
            raise ValueError(f"SwinBackbone: frozen_stages={frozen_stages} must be in [-1, 5]")
        self.body = SwinTransformer(
            img_size=224, patch_size=4, in_chans=3, num_classes=0, global_pool="",
            embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
            always_partition=True, strict_img_size=False, mlp_ratio=4.0, qkv_bias=True,
            drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=drop_path_rate,
            embed_layer=partial(PatchEmbed, dynamic_img_pad=True),
        )
        self.body.norm = nn.Identity()  # classification-only final norm
        for module in self.body.modules():
            if type(module) is SwinTransformerBlock:
                module.__class__ = _PadFirstSwinBlock
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in SWIN_T_CHANNELS)
        frozen = tuple(swin_frozen_prefixes(frozen_stages))
        for name, param in self.body.named_parameters():
            param.requires_grad_(not any(name.startswith(p + ".") for p in frozen))
        self.out_channels = list(SWIN_T_CHANNELS)
        self.strides = [8, 16, 32]

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) → [(B, 192, ⌈H/8⌉, ⌈W/8⌉), (B, 384, …/16), (B, 768, …/32)]."""
        x = self.body.patch_embed(images)  # (B, ⌈H/4⌉, ⌈W/4⌉, 96), NHWC
        outs = []
        for i, stage in enumerate(self.body.layers):
            x = stage(x)
            if i >= 1:
                outs.append(self.out_norms[i - 1](x).permute(0, 3, 1, 2).contiguous())
        return outs

    def translate_external_state_dict(
            self, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Official (microsoft) keys, timm keys or our own keys → our keys.

        A file is in the official layout when it has ``layers.0.downsample.reduction.weight``
        (timm's own rule, ``checkpoint_filter_fn``); its keys go through
        :func:`swin_official_to_ours`. timm-layout keys get ``body.``; keys starting with
        ``body.`` / ``out_norms.`` are ours. head, final norm, attn_mask and
        relative_position_index entries are ignored.
        """
        official = "layers.0.downsample.reduction.weight" in state_dict
        translated: dict[str, Tensor] = {}
        ignored: list[str] = []
        for key, value in state_dict.items():
            if key.startswith(("body.", "out_norms.")):
                ours: Optional[str] = key
            elif official:
                ours = swin_official_to_ours(key)
            else:
                ignore = any(re.search(p, key) for p in SWIN_IGNORED_KEYS)
                ours = None if ignore else f"body.{key}"
            if ours is None:
                ignored.append(key)
            else:
                translated[ours] = value
        return translated, ignored
