"""Multi-scale input projection and flattening (REFERENCE §2.3–§2.6).

Turns backbone maps into the flat token sequence every encoder works on:

* ``src``  (B, N, C): projected features, level-major then row-major (y, then x); no pos.
* ``pos``  (B, N, C): sine position encoding + level embedding.
* ``mask`` (B, N) bool, True = padding.
* ``spatial_shapes`` (L, 2) int64 (H_l, W_l); ``level_start_index`` (L,) int64.
* ``valid_ratios`` (B, L, 2) in (w, h) order: the unpadded fraction of each level.

Level 0 is the largest map (stride 8); the extra levels are made by 3×3 stride-2 convs, the
first one applied to the RAW last backbone map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdetr.models.position import sine_position_encoding


@dataclass
class FeatureSet:
    """Flattened multi-scale tokens shared by all seams of a detector (shapes in module doc)."""

    src: Tensor
    pos: Tensor
    mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor

    @property
    def num_tokens(self) -> int:
        return self.src.shape[1]

    def level_sizes(self) -> list[tuple[int, int]]:
        """(H_l, W_l) per level as python ints."""
        return [tuple(s) for s in self.spatial_shapes.tolist()]  # type: ignore[misc]


class InputProjection(nn.Module):
    """1×1 conv + GN per backbone level, then 3×3/2 conv + GN for each extra level.

    Args:
        in_channels: channels of the backbone maps used (C3, C4, C5 → e.g. 512/1024/2048).
        hidden_dim: C, the transformer width.
        num_levels: total levels L (>= 1). With L == 1 only the last backbone map is used.
    Submodules are ``proj.{l}.0`` (conv) and ``proj.{l}.1`` (GroupNorm), as the official
    ``input_proj.{l}.{0,1}``.
    """

    def __init__(self, in_channels: list[int], hidden_dim: int, num_levels: int) -> None:
        super().__init__()
        used = in_channels[-num_levels:] if num_levels < len(in_channels) else in_channels
        self.num_backbone_levels = len(used)
        layers = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(32, hidden_dim))
                  for c in used]
        prev = in_channels[-1]
        for _ in range(num_levels - len(used)):
            layers.append(nn.Sequential(nn.Conv2d(prev, hidden_dim, 3, stride=2, padding=1),
                                        nn.GroupNorm(32, hidden_dim)))
            prev = hidden_dim
        self.proj = nn.ModuleList(layers)
        for layer in self.proj:
            nn.init.xavier_uniform_(layer[0].weight, gain=1)
            nn.init.constant_(layer[0].bias, 0)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: backbone maps, largest first → L maps of (B, C, H_l, W_l)."""
        feats = features[-self.num_backbone_levels:]
        out = [proj(f) for proj, f in zip(self.proj, feats)]
        raw = features[-1]
        for proj in self.proj[len(feats):]:
            raw = proj(raw)
            out.append(raw)
        return out


def level_masks(mask: Tensor, maps: list[Tensor]) -> list[Tensor]:
    """Resize the image pad mask (B, H, W) to each map with nearest interpolation."""
    return [F.interpolate(mask[None].float(), size=m.shape[-2:]).to(torch.bool)[0] for m in maps]


def valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) pad mask → (B, 2) valid (w, h) fractions from the first row / first column."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def flatten_levels(maps: list[Tensor], masks: list[Tensor], level_embed: Tensor) -> FeatureSet:
    """Flatten L maps (B, C, H_l, W_l) and masks (B, H_l, W_l) into a :class:`FeatureSet`."""
    src, pos, flat_masks, shapes = [], [], [], []
    for lvl, (feat, mask) in enumerate(zip(maps, masks)):
        shapes.append(feat.shape[-2:])
        pe = sine_position_encoding(mask, num_pos_feats=feat.shape[1] // 2, dtype=feat.dtype)
        src.append(feat.flatten(2).transpose(1, 2))
        pos.append(pe.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1))
        flat_masks.append(mask.flatten(1))
    device = maps[0].device
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    return FeatureSet(
        src=torch.cat(src, 1),
        pos=torch.cat(pos, 1),
        mask=torch.cat(flat_masks, 1),
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        valid_ratios=torch.stack([valid_ratio(m) for m in masks], 1),
    )
