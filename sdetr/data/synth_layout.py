"""Object layout for one synthetic image: sample shapes, place them, paint them, annotate them.

Conventions: boxes are [x, y, w, h] in pixels of the image (COCO format); a box covers pixel
columns x .. x+w-1 and rows y .. y+h-1, so its continuous extent is [x, x+w] x [y, y+h].
``area`` is the number of *visible* pixels of the shape (like COCO's segment area), not w*h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdetr.data.synth_draw import (
    CATEGORIES,
    ShapeCategory,
    add_noise_and_quantise,
    contrasting_colour,
    make_background,
    shape_mask,
)

AREA_SMALL_MAX = 32**2  # COCO: small < 32², medium 32²..96², large > 96²
AREA_MEDIUM_MAX = 96**2
SIZE_CLASSES = ("small", "medium", "large")
# Target pixel areas per class. With MIN_VISIBLE = 0.7 the visible area of an object stays in
# its class: 0.7 * 1600 > 32² and 0.7 * 14500 > 96²; 900 and 7500 leave room for rasterisation.
# Small objects are 324..900 px² (a square of 18..30 px): small by COCO's rule but 2..4 cells of
# the stride-8 level of a model that sees the image at ~256 px (generator version 1 went down to
# 80 px², ~9 px sides, below what the CPU presets can resolve, so AP hardly rose in 30 minutes).
TARGET_AREA = {"small": (324.0, 900.0), "medium": (1600.0, 7500.0), "large": (14500.0, math.inf)}
CLASS_PROBS = (0.3, 0.45, 0.25)
MAX_OBJECTS = 6
MAX_IOU = 0.5  # a placement whose box IoU with an earlier object exceeds this is rejected
MIN_VISIBLE = 0.7  # ... and so is one that leaves an earlier object less than 70% visible
MAX_SIDE_FRAC = 0.9  # an object box spans at most 90% of the image side
PLACEMENT_TRIES = 30


@dataclass(frozen=True)
class ObjectSpec:
    """A shape to place: its category, box size (w, h) in pixels and triangle orientation."""

    category: ShapeCategory
    w: int
    h: int
    orientation: int


@dataclass(frozen=True)
class SynthAnnotation:
    """One COCO annotation: bbox [x, y, w, h] of the visible extent, area = visible pixels."""

    category_id: int
    bbox: tuple[float, float, float, float]
    area: int


def area_range(area: float) -> str:
    """COCO area range name ("small", "medium", "large") of a pixel area."""
    if area < AREA_SMALL_MAX:
        return "small"
    return "medium" if area < AREA_MEDIUM_MAX else "large"


def _area_bounds(cat: ShapeCategory, aspect: float, img_w: int, img_h: int,
                 size_class: str) -> tuple[float, float]:
    """Target-area interval for ``cat`` at box aspect w/h = ``aspect`` that fits the image."""
    lo, hi = TARGET_AREA[size_class]
    fit_w = cat.fill * (MAX_SIDE_FRAC * img_w) ** 2 / aspect
    fit_h = cat.fill * (MAX_SIDE_FRAC * img_h) ** 2 * aspect
    return lo, min(hi, fit_w, fit_h)


def sample_spec(rng: np.random.Generator, img_w: int, img_h: int, size_class: str) -> ObjectSpec:
    """Sample one shape of ``size_class`` that fits a ``img_w`` x ``img_h`` image.

    A large object that cannot fit with the sampled category/aspect becomes an upright square;
    if even that does not fit (images under ~134 px), the class drops to the next smaller one.
    """
    cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    aspect = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))
    orientation = int(rng.integers(4))
    lo, hi = _area_bounds(cat, aspect, img_w, img_h, size_class)
    if hi < lo:
        cat, aspect = next(c for c in CATEGORIES if c.name == "square"), 1.0
        lo, hi = _area_bounds(cat, aspect, img_w, img_h, size_class)
    if hi < lo:
        smaller = SIZE_CLASSES[max(SIZE_CLASSES.index(size_class) - 1, 0)]
        if smaller == size_class:
            raise ValueError(f"image {img_w}x{img_h} is too small for a {size_class} object")
        return sample_spec(rng, img_w, img_h, smaller)
    area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    w = max(3, min(round(math.sqrt(area / cat.fill * aspect)), img_w))
    h = max(3, min(round(math.sqrt(area / cat.fill / aspect)), img_h))
    return ObjectSpec(cat, w, h, orientation)


def sample_specs(rng: np.random.Generator, img_w: int, img_h: int,
                 forced_class: str | None) -> list[ObjectSpec]:
    """1..MAX_OBJECTS specs in placement order.

    With ``forced_class`` the first spec has that class and is placed first (so it always
    fits, and keeps >= 70% of its pixels, hence its area class); the others follow largest
    first, so small shapes are drawn over large ones rather than hidden under them.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    classes = [SIZE_CLASSES[int(rng.choice(3, p=CLASS_PROBS))] for _ in range(n)]
    if forced_class is not None:
        classes[0] = forced_class
    specs = [sample_spec(rng, img_w, img_h, c) for c in classes]
    head = specs[:1] if forced_class is not None else []
    rest = specs[len(head):]
    return head + sorted(rest, key=lambda s: s.w * s.h * s.category.fill, reverse=True)


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two [x, y, w, h] boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


class _Canvas:
    """An image under construction: pixels (H, W, 3) float32 and a label map (H, W) int16."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.labels = np.full(pixels.shape[:2], -1, dtype=np.int16)
        self.boxes: list[tuple[int, int, int, int]] = []
        self.full_area: list[int] = []
        self.visible: list[int] = []
        self.category_ids: list[int] = []

    def try_place(self, box: tuple[int, int, int, int], mask: np.ndarray) -> bool:
        """Check the IoU and visibility rules for ``mask`` at ``box``; commit the labels if OK."""
        if any(_box_iou(box, other) > MAX_IOU for other in self.boxes):
            return False
        x, y, w, h = box
        region = self.labels[y:y + h, x:x + w]
        covered = region[mask]
        lost = np.bincount(covered[covered >= 0], minlength=len(self.boxes))
        if any(v - c < MIN_VISIBLE * f for v, c, f in zip(self.visible, lost, self.full_area)):
            return False
        self.visible = [v - int(c) for v, c in zip(self.visible, lost)]
        region[mask] = len(self.boxes)
        self.boxes.append(box)
        self.full_area.append(int(mask.sum()))
        self.visible.append(int(mask.sum()))
        return True

    def annotations(self) -> list[SynthAnnotation]:
        """Visible-extent boxes and visible pixel areas, in placement order."""
        anns = []
        for k, (x, y, w, h) in enumerate(self.boxes):
            vis = self.labels[y:y + h, x:x + w] == k
            rows, cols = np.flatnonzero(vis.any(axis=1)), np.flatnonzero(vis.any(axis=0))
            bbox = (float(x + cols[0]), float(y + rows[0]),
                    float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))
            anns.append(SynthAnnotation(self.category_ids[k], bbox, int(vis.sum())))
        return anns


def render_image(rng: np.random.Generator, img_w: int, img_h: int,
                 forced_class: str | None) -> tuple[np.ndarray, list[SynthAnnotation]]:
    """Draw one image (H, W, 3) uint8 with 1..6 shapes and return it with its annotations.

    Objects are placed in ``sample_specs`` order; each placement is retried up to
    PLACEMENT_TRIES times and the object is skipped if no position satisfies the IoU and
    visibility rules. The first object always fits, so every image has at least one annotation.
    """
    canvas = _Canvas(make_background(rng, img_h, img_w))
    for spec in sample_specs(rng, img_w, img_h, forced_class):
        mask = shape_mask(spec.category.name, spec.w, spec.h, spec.orientation)
        for _ in range(PLACEMENT_TRIES):
            x = int(rng.integers(0, img_w - spec.w + 1))
            y = int(rng.integers(0, img_h - spec.h + 1))
            if canvas.try_place((x, y, spec.w, spec.h), mask):
                region = canvas.pixels[y:y + spec.h, x:x + spec.w]
                region[mask] = contrasting_colour(rng, region)
                canvas.category_ids.append(spec.category.id)
                break
    return add_noise_and_quantise(rng, canvas.pixels), canvas.annotations()
