"""Synthetic kernel problems at the sizes of Deformable DETR R50 on an 850x1040 image (REFERENCE.md §3).

Levels (107, 130), (54, 65), (27, 33), (14, 17): N = 18,549 flattened tokens; M = 8 heads, D = 32
channels per head, L = 4 levels, P = 4 points, batch 1. The encoder problem has one query per token
(Q = N), the decoder problem Q = 300.

Sampling locations imitate a trained model rather than uniform noise (which would only measure
cache misses): encoder queries sit at their own pixel centre, decoder queries at uniform random
points, and every (head, level, point) adds the grid-init offset (p+1)*d_m pixels of that level
(§3.2) plus N(0, 2^2) pixels of noise, so some samples fall outside the map. Attention weights are a
softmax over the L*P samples of each head, values are N(0, 1).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

R50_850x1040_LEVELS = ((107, 130), (54, 65), (27, 33), (14, 17))
DECODER_QUERIES = 300
DECODER_LAYERS = 6


@dataclasses.dataclass
class MsdaProblem:
    """Inputs of one ms_deform_attn call; shapes as in :mod:`sdetr.ops.ms_deform_attn`."""

    name: str
    value: Tensor  # (B, N, M, D)
    spatial_shapes: Tensor  # (L, 2) int64
    level_start_index: Tensor  # (L,) int64
    sampling_locations: Tensor  # (B, Q, M, L, P, 2), x, y normalised to the padded map
    attention_weights: Tensor  # (B, Q, M, L, P)

    @property
    def queries(self) -> int:
        return int(self.sampling_locations.shape[1])

    def inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (self.value, self.spatial_shapes, self.level_start_index, self.sampling_locations,
                self.attention_weights)


def level_tensors(levels: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor, int]:
    """spatial_shapes (L, 2), level_start_index (L,) and N for a list of (H, W)."""
    spatial_shapes = torch.tensor(levels, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def pixel_centres(levels: tuple[tuple[int, int], ...]) -> Tensor:
    """(N, 2) normalised (x, y) centres of every token, level-major then row-major."""
    centres = []
    for height, width in levels:
        ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                                indexing="ij")
        centres.append(torch.stack([xs.flatten(), ys.flatten()], dim=-1))
    return torch.cat(centres)


def grid_offsets(heads: int, levels: int, points: int) -> Tensor:
    """(M, L, P, 2) grid-init offsets in pixels: (p+1) * d_m with d_m = (cos, sin)/max(|cos|, |sin|)."""
    theta = torch.arange(heads, dtype=torch.float64) * (2 * math.pi / heads)
    direction = torch.stack([theta.cos(), theta.sin()], dim=-1)
    direction = direction / direction.abs().max(-1, keepdim=True).values
    scale = torch.arange(1, points + 1, dtype=torch.float64).view(1, 1, points, 1)
    return (direction.view(heads, 1, 1, 2) * scale).expand(heads, levels, points, 2).float()


def make_locations(references: Tensor, levels: tuple[tuple[int, int], ...], heads: int, points: int,
                   generator: torch.Generator) -> Tensor:
    """(1, Q, M, L, P, 2) locations = reference (Q, 2) + (grid offset + N(0, 2^2) px) / (W_l, H_l)."""
    queries = references.shape[0]
    offsets = grid_offsets(heads, len(levels), points).unsqueeze(0)
    offsets = offsets + 2.0 * torch.randn(queries, heads, len(levels), points, 2, generator=generator)
    sizes = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32).view(1, 1, len(levels), 1, 2)
    return (references.view(queries, 1, 1, 1, 2) + offsets / sizes).unsqueeze(0)


def msda_problem(kind: str, heads: int = 8, channels: int = 32, points: int = 4, seed: int = 0,
                 levels: tuple[tuple[int, int], ...] = R50_850x1040_LEVELS) -> MsdaProblem:
    """The ``"encoder"`` (Q = N) or ``"decoder"`` (Q = 300) MSDA problem, float32, batch 1."""
    if kind not in ("encoder", "decoder"):
        raise ValueError(f"problem kind must be 'encoder' or 'decoder', got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, tokens = level_tensors(levels)
    refs = pixel_centres(levels) if kind == "encoder" else torch.rand(DECODER_QUERIES, 2, generator=gen)
    locations = make_locations(refs, levels, heads, points, gen)
    logits = torch.randn(1, refs.shape[0], heads, len(levels) * points, generator=gen)
    weights = logits.softmax(-1).view(1, refs.shape[0], heads, len(levels), points)
    value = torch.randn(1, tokens, heads, channels, generator=gen)
    return MsdaProblem(kind, value, spatial_shapes, level_start_index, locations, weights)


def dam_problem(problem: MsdaProblem, layers: int = DECODER_LAYERS) -> tuple[Tensor, Tensor]:
    """DAM splat inputs from a decoder problem: the same samples repeated for ``layers`` layers.

    Returns sampling_locations (1, layers*Q, M, L, P, 2) and attention_weights (1, layers*Q, M, L, P).
    """
    locations = problem.sampling_locations.repeat(1, layers, 1, 1, 1, 1)
    return locations, problem.attention_weights.repeat(1, layers, 1, 1, 1)
