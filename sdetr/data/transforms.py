"""Detection transforms of Deformable/Sparse DETR (REFERENCE §1.2), parameterised.

Every transform is a callable ``(image, target) -> (image, target)``. Until ``ToTensorNormalize``
the image is a PIL RGB image and ``target["boxes"]`` is a float32 tensor (n, 4) of absolute
x0,y0,x1,y1 pixel coordinates (continuous: a box covering pixel columns 0..w-1 has x1 = w).
``ToTensorNormalize`` returns a (3, H, W) float tensor normalised with the ImageNet mean/std and
boxes (n, 4) as cx,cy,w,h normalised by the *unpadded* transformed size, in [0, 1]; it also sets
``target["size"]`` = (H, W) int64. Randomness comes from torch's global RNG (seeded per
DataLoader worker by torch), so ``torch.manual_seed`` makes a pipeline reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch import Tensor

Target = dict[str, Tensor]
Transform = Callable[[Image.Image, Target], tuple[Image.Image, Target]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(w: int, h: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output (w, h) for "shorter side = ``size``, longer side <= ``max_size``" (§1.2).

    1. If ``max(w,h)/min(w,h) * size > max_size``: ``size = round(max_size * min / max)``.
    2. The short side becomes ``size``; the long side is ``int(size * long / short)``.
    Unchanged if the short side already equals ``size``. Example: (640, 426), 800, 1333 ->
    (1201, 800). The rounding can overshoot: (1000, 200), 800, 1333 -> (1335, 267).
    """
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def resize(image: Image.Image, target: Target, size: int,
           max_size: int | None) -> tuple[Image.Image, Target]:
    """Bilinear resize by ``resized_size``; boxes are scaled by the per-axis ratios."""
    new_w, new_h = resized_size(image.width, image.height, size, max_size)
    if (new_w, new_h) == image.size:
        return image, target
    scale = torch.tensor([new_w / image.width, new_h / image.height] * 2, dtype=torch.float32)
    out = dict(target, boxes=target["boxes"] * scale)
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR), out


def hflip(image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
    """Mirror the image; boxes become (w - x1, y0, w - x0, y1)."""
    boxes = target["boxes"]
    flipped = torch.stack([image.width - boxes[:, 2], boxes[:, 1],
                           image.width - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), dict(target, boxes=flipped)


def crop(image: Image.Image, target: Target,
         region: tuple[int, int, int, int]) -> tuple[Image.Image, Target]:
    """Crop ``region`` = (top, left, height, width); boxes are shifted, clamped to the crop,
    and boxes with zero width or height after clamping are dropped (with their labels)."""
    top, left, height, width = region
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height] * 2,
                                                           dtype=torch.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = dict(target, boxes=boxes[keep], labels=target["labels"][keep])
    return image.crop((left, top, left + width, top + height)), out


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive) from torch's global RNG."""
    return int(torch.randint(low, high + 1, (1,)).item())


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Flip with probability ``p``."""

    p: float = 0.5

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target


@dataclass(frozen=True)
class Resize:
    """Resize the shorter side to ``size`` (longer <= ``max_size``); no randomness."""

    size: int
    max_size: int | None = None

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        return resize(image, target, self.size, self.max_size)


@dataclass(frozen=True)
class RandomResize:
    """Resize the shorter side to a size drawn uniformly from ``sizes`` (longer <= max_size)."""

    sizes: tuple[int, ...]
    max_size: int | None = None

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        size = self.sizes[_randint(0, len(self.sizes) - 1)]
        return resize(image, target, size, self.max_size)


@dataclass(frozen=True)
class RandomSizeCrop:
    """Crop w_c ~ U{min_size..min(W, max_size)}, h_c likewise, at a uniform random position.

    When the image side is below ``min_size`` (impossible with the paper's values, possible
    with small CPU presets) the lower bound becomes the image side, i.e. no crop on that axis.
    """

    min_size: int
    max_size: int

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        w = _randint(min(self.min_size, image.width), min(image.width, self.max_size))
        h = _randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top, left = _randint(0, image.height - h), _randint(0, image.width - w)
        return crop(image, target, (top, left, h, w))


@dataclass(frozen=True)
class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    first: Transform
    second: Transform
    p: float = 0.5

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        if torch.rand(()).item() < self.p:
            return self.first(image, target)
        return self.second(image, target)


@dataclass(frozen=True)
class Compose:
    """Apply ``transforms`` in order."""

    transforms: tuple[Transform, ...]

    def __call__(self, image: Image.Image, target: Target) -> tuple[Any, Target]:
        """Returns whatever the last transform returns (a Tensor after ToTensorNormalize)."""
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


@dataclass(frozen=True)
class ToTensorNormalize:
    """PIL -> (3, H, W) float normalised; xyxy pixels -> cx,cy,w,h in [0, 1]; sets "size"."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: Image.Image, target: Target) -> tuple[Tensor, Target]:
        tensor = F.normalize(F.to_tensor(image), list(self.mean), list(self.std))
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
        size = torch.tensor([image.height, image.width], dtype=torch.int64)
        return tensor, dict(target, boxes=cxcywh / scale, size=size)


def make_train_transforms(scales: Sequence[int], max_size: int,
                          crop_scales: Sequence[int] | None, crop_min: int,
                          crop_max: int) -> Compose:
    """Train pipeline of §1.2: hflip(0.5) -> RandomSelect(resize(scales, max_size),
    [resize(crop_scales, no max) -> crop(crop_min..crop_max) -> resize(scales, max_size)])
    -> ToTensorNormalize. With ``crop_scales=None`` the crop branch is left out."""
    if not scales:
        raise ValueError("scales must not be empty")
    if crop_min > crop_max:
        raise ValueError(f"crop_min {crop_min} > crop_max {crop_max}")
    final = RandomResize(tuple(scales), max_size)
    if crop_scales is None:
        return Compose((RandomHorizontalFlip(0.5), final, ToTensorNormalize()))
    crop_branch = Compose((RandomResize(tuple(crop_scales), None),
                           RandomSizeCrop(crop_min, crop_max), final))
    return Compose((RandomHorizontalFlip(0.5), RandomSelect(final, crop_branch, 0.5),
                    ToTensorNormalize()))


class EpochSchedule:
    """Train transforms that change with the epoch: ``early`` in the first ``early_epochs``
    epochs (0-based epoch < ``early_epochs``), ``late`` from then on.

    The training loop calls :meth:`set_epoch` before each epoch (through
    :func:`sdetr.engine.data.set_loader_epoch`); the loader's workers are started per epoch
    and take a copy of the dataset, transforms included, when it begins.
    """

    def __init__(self, early: Compose, late: Compose, early_epochs: int) -> None:
        if early_epochs < 1:
            raise ValueError(f"early_epochs must be >= 1, got {early_epochs}")
        self.early, self.late, self.early_epochs = early, late, early_epochs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: Image.Image, target: Target) -> tuple[Tensor, Target]:
        stage = self.early if self.epoch < self.early_epochs else self.late
        return stage(image, target)


def make_eval_transforms(size: int, max_size: int) -> Compose:
    """Eval pipeline: resize shorter side to ``size`` (longer <= ``max_size``), normalise.
    Deterministic: it draws nothing from torch's RNG."""
    return Compose((Resize(size, max_size), ToTensorNormalize()))


@dataclass(frozen=True)
class AugmentParams:
    """Resize/crop sizes of the train and eval pipelines (pixels)."""

    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    crop_scales: list[int] | None = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    eval_size: int = 800
    eval_max_size: int = 1333

    def train_transforms(self) -> Compose:
        return make_train_transforms(self.scales, self.max_size, self.crop_scales,
                                     self.crop_min, self.crop_max)

    def eval_transforms(self) -> Compose:
        return make_eval_transforms(self.eval_size, self.eval_max_size)


def coco_paper_defaults() -> AugmentParams:
    """The paper's values: scales 480..800 step 32, max 1333, crop [400,500,600] then
    384..600, eval 800 / 1333."""
    return AugmentParams()
