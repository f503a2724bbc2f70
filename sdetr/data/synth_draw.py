"""Pixel-level drawing for the synthetic shapes dataset: backgrounds and shape masks.

Everything here is pure numpy + Pillow and deterministic given the ``numpy.random.Generator``
passed in. Arrays are (H, W, 3) float32 RGB in [0, 255] for images and (h, w) bool for masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RING_INNER = 0.5  # inner/outer diameter ratio of a ring
CROSS_ARM = 0.34  # arm thickness of a cross as a fraction of its box side


@dataclass(frozen=True)
class ShapeCategory:
    """One COCO category of the synthetic dataset.

    ``fill`` is the shape's area as a fraction of its bounding box, used to pick a box size for
    a target pixel area.
    """

    id: int
    name: str
    fill: float


# Non-contiguous ids on purpose: the model must use num_classes = max id + 1, like COCO's 91.
CATEGORIES: tuple[ShapeCategory, ...] = (
    ShapeCategory(3, "circle", math.pi / 4),
    ShapeCategory(7, "square", 1.0),
    ShapeCategory(12, "triangle", 0.5),
    ShapeCategory(18, "ring", math.pi / 4 * (1.0 - RING_INNER**2)),
    ShapeCategory(23, "cross", 2 * CROSS_ARM - CROSS_ARM**2),
)


def shape_mask(name: str, w: int, h: int, orientation: int) -> np.ndarray:
    """Rasterise one shape filling a ``w`` x ``h`` box; returns a (h, w) bool mask.

    ``orientation`` (0..3) rotates the triangle's apex (up, right, down, left); other shapes
    ignore it. Every shape touches all four sides of its box.
    """
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = w - 1, h - 1
    if name == "circle":
        draw.ellipse((0, 0, x1, y1), fill=255)
    elif name == "square":
        draw.rectangle((0, 0, x1, y1), fill=255)
    elif name == "triangle":
        apexes = [((x1 / 2, 0), (0, y1), (x1, y1)), ((x1, y1 / 2), (0, 0), (0, y1)),
                  ((x1 / 2, y1), (0, 0), (x1, 0)), ((0, y1 / 2), (x1, 0), (x1, y1))]
        draw.polygon(apexes[orientation % 4], fill=255)
    elif name == "ring":
        draw.ellipse((0, 0, x1, y1), fill=255)
        dx, dy = w * (1 - RING_INNER) / 2, h * (1 - RING_INNER) / 2
        draw.ellipse((dx, dy, x1 - dx, y1 - dy), fill=0)
    elif name == "cross":
        tw, th = max(1.0, w * CROSS_ARM), max(1.0, h * CROSS_ARM)
        draw.rectangle((0, (h - th) / 2, x1, (h + th) / 2 - 1), fill=255)
        draw.rectangle(((w - tw) / 2, 0, (w + tw) / 2 - 1, y1), fill=255)
    else:
        raise ValueError(f"unknown shape name: {name!r}")
    return np.asarray(canvas) > 0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _directional_coord(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """x·cosθ + y·sinθ for a random angle θ; (H, W) float32 in pixels."""
    theta = rng.uniform(0.0, math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs * math.cos(theta) + ys * math.sin(theta)


def _two_tone(mix: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return c0 + mix[..., None].astype(np.float32) * (c1 - c0)


def make_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background (H, W, 3) float32: smooth noise, gradient, stripes or checkers."""
    kind = int(rng.integers(4))
    if kind == 0:  # smooth colour noise: a coarse random grid upsampled bilinearly
        gh, gw = int(rng.integers(2, 7)), int(rng.integers(2, 7))
        grid = rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)
        smooth = Image.fromarray(grid, "RGB").resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(smooth, dtype=np.float32)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    if kind == 1:  # linear gradient
        t = _directional_coord(rng, h, w)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return _two_tone(t, c0, c1)
    if kind == 2:  # stripes with a random period, duty cycle and angle
        period, duty = rng.uniform(6.0, 28.0), rng.uniform(0.3, 0.7)
        t = _directional_coord(rng, h, w)
        return _two_tone((t / period) % 1.0 < duty, c0, c1)
    cell = int(rng.integers(8, 33))  # checkerboard
    ys, xs = np.mgrid[0:h, 0:w]
    return _two_tone(((ys // cell + xs // cell) % 2).astype(bool), c0, c1)


def contrasting_colour(rng: np.random.Generator, region: np.ndarray, tries: int = 20) -> np.ndarray:
    """A random RGB colour far (L1 >= 120) from the mean of ``region`` (h, w, 3), if found.

    Returns the most distant of ``tries`` candidates when none reaches the threshold.
    """
    mean = region.reshape(-1, 3).mean(axis=0)
    best, best_dist = _random_colour(rng), -1.0
    for _ in range(tries):
        colour = _random_colour(rng)
        dist = float(np.abs(colour - mean).sum())
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist >= 120.0:
            break
    return best


_TRIANGULAR_STD = 255.0 * math.sqrt(1.0 / 6.0 + 1.0 / 3.0 / 255.0)  # std of b1 + b2, bytes


def add_noise_and_quantise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Add zero-mean pixel noise with std σ ~ U(3, 18) to (H, W, 3) float32; return uint8.

    The noise is triangular (sum of two uniform random bytes, centred and scaled): as good as
    Gaussian for texture and ~4x cheaper to draw.
    """
    sigma = rng.uniform(3.0, 18.0)
    raw = np.frombuffer(rng.bytes(2 * image.size), dtype=np.uint8).reshape(2, *image.shape)
    noisy = raw[0].astype(np.float32)
    noisy += raw[1]
    noisy -= np.float32(255.0)
    noisy *= np.float32(sigma / _TRIANGULAR_STD)
    noisy += image
    noisy += np.float32(0.5)  # round half up on the truncating cast below
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)
