"""Batching of detection samples: zero-pad images bottom/right and build the pad mask."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from sdetr.data.transforms import Target


class DetectionBatch(NamedTuple):
    """images (B, 3, Hmax, Wmax) zero-padded at the bottom/right; masks (B, Hmax, Wmax) bool,
    True = padding; targets: the per-image target dicts, unchanged (boxes stay normalised to
    each image's unpadded size)."""

    images: Tensor
    masks: Tensor
    targets: list[Target]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def collate_detection(batch: Sequence[tuple[Tensor, Target]],
                      size_divisibility: int = 1) -> DetectionBatch:
    """Stack (image (3, H_i, W_i), target) pairs into a padded batch.

    Hmax/Wmax are the per-batch maxima, rounded up to a multiple of ``size_divisibility``.
    Use ``functools.partial(collate_detection, size_divisibility=32)`` as a DataLoader
    ``collate_fn`` for a non-default multiple.
    """
    if not batch:
        raise ValueError("collate_detection: empty batch")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    images = [image for image, _ in batch]
    channels = {image.shape[0] for image in images}
    if any(image.dim() != 3 for image in images) or len(channels) != 1:
        raise ValueError("collate_detection: images must all be (C, H, W) with the same C")
    h_max = _round_up(max(image.shape[1] for image in images), size_divisibility)
    w_max = _round_up(max(image.shape[2] for image in images), size_divisibility)
    padded = images[0].new_zeros((len(images), channels.pop(), h_max, w_max))
    masks = torch.ones((len(images), h_max, w_max), dtype=torch.bool)
    for i, image in enumerate(images):
        _, h, w = image.shape
        padded[i, :, :h, :w] = image
        masks[i, :h, :w] = False
    return DetectionBatch(padded, masks, [target for _, target in batch])
