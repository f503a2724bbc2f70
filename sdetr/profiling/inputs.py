"""Inputs of the profiling protocols: random images, or COCO val images after the eval resize.

Every batch is ``(images (B, 3, H, W), masks (B, H, W) bool True = padding, label)`` where
``label`` names the input for the protocol ("random" or "coco:val2017[0]").
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor


class ProfileInput(NamedTuple):
    """images (B, 3, H, W) ImageNet-normalised; masks (B, H, W) bool True = padding; label."""

    images: Tensor
    masks: Tensor
    label: str

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def to(self, device: torch.device) -> "ProfileInput":
        return ProfileInput(self.images.to(device), self.masks.to(device), self.label)


def random_input(height: int, width: int, batch_size: int = 1, seed: int = 0) -> ProfileInput:
    """One seeded N(0, 1) image of (3, height, width), replicated ``batch_size`` times, no padding."""
    if height < 1 or width < 1 or batch_size < 1:
        raise ValueError(f"random_input: need positive sizes, got {height}x{width}, batch {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, height, width, generator=gen)
    images = image.expand(batch_size, -1, -1, -1).contiguous()
    return ProfileInput(images, torch.zeros(batch_size, height, width, dtype=torch.bool), "random")


@functools.lru_cache(maxsize=2)
def _coco_dataset(coco_root: str | Path, split: str, eval_size: int, eval_max_size: int):
    """The eval-transformed split (cached: FPS and memory ask for it once per batch size)."""
    from sdetr.data import CocoDetection, make_eval_transforms
    root = Path(coco_root)
    img_dir, ann_file = root / split, root / "annotations" / f"instances_{split}.json"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {img_dir} (--coco-root {coco_root})")
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file} (--coco-root {coco_root})")
    return CocoDetection(img_dir, ann_file, make_eval_transforms(eval_size, eval_max_size))


def coco_first_image(coco_root: str | Path, batch_size: int, *, split: str = "val2017",
                     eval_size: int = 800, eval_max_size: int = 1333) -> ProfileInput:
    """``dataset[0]`` (lowest image id) after the eval resize, replicated ``batch_size`` times
    into one batch (no real padding): the official FPS input (§10.2)."""
    image, _ = _coco_dataset(coco_root, split, eval_size, eval_max_size)[0]
    images = image.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()
    masks = torch.zeros(batch_size, *image.shape[-2:], dtype=torch.bool)
    return ProfileInput(images, masks, f"coco:{split}[0]")


def coco_images(coco_root: str | Path, num_images: int, *, split: str = "val2017",
                eval_size: int = 800, eval_max_size: int = 1333) -> Iterator[ProfileInput]:
    """The first ``num_images`` images (sorted ids) after the eval resize, one per batch: the
    official 100-image GFLOPs protocol (§10.1)."""
    dataset = _coco_dataset(coco_root, split, eval_size, eval_max_size)
    if num_images < 1 or num_images > len(dataset):
        raise ValueError(f"--num-images {num_images} must be in [1, {len(dataset)}] for {split}")
    for index in range(num_images):
        image, _ = dataset[index]
        masks = torch.zeros(1, *image.shape[-2:], dtype=torch.bool)
        yield ProfileInput(image.unsqueeze(0), masks, f"coco:{split}[{index}]")


def synthetic_targets(batch_size: int, num_classes: int, boxes_per_image: int = 4,
                      seed: int = 0, device: torch.device | str = "cpu") -> list[dict[str, Tensor]]:
    """Seeded random targets for a training step: labels (n,) in [1, num_classes), boxes (n, 4)
    cx,cy,w,h normalised to the unpadded image, inside [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch_size):
        wh = 0.05 + 0.4 * torch.rand(boxes_per_image, 2, generator=gen)
        centre = wh / 2 + (1 - wh) * torch.rand(boxes_per_image, 2, generator=gen)
        labels = torch.randint(1, max(num_classes, 2), (boxes_per_image,), generator=gen)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, wh], 1).to(device)})
    return targets
