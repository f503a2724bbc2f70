"""Tests of the Sparse DETR DAM splat (REFERENCE.md §5.2): hand-made maps, a naive loop, the custom op."""

from __future__ import annotations

import math

import pytest
import torch

import sdetr.ops as ops
from sdetr.ops import BackendUnavailableError

# Two levels: 2 x 3 (tokens 0..5) and 1 x 2 (tokens 6..7).
SHAPES = torch.tensor([[2, 3], [1, 2]], dtype=torch.int64)
STARTS = torch.tensor([0, 6], dtype=torch.int64)
N = 8


def _single_samples(samples: list[tuple[int, int, float, float, float]], batch: int = 1):
    """(b, level, x, y, weight) list -> tensors with S = len(samples), M = 1, P = 1 (other levels weight 0)."""
    s = len(samples)
    loc = torch.full((batch, s, 1, 2, 1, 2), 0.5, dtype=torch.float64)
    attn = torch.zeros(batch, s, 1, 2, 1, dtype=torch.float64)
    for i, (b, level, x, y, weight) in enumerate(samples):
        loc[b, i, 0, level, 0] = torch.tensor([x, y], dtype=torch.float64)
        attn[b, i, 0, level, 0] = weight
    return loc, attn


def test_hand_made_pattern():
    samples = [
        (0, 0, 1.5 / 3, 0.5 / 2, 0.8),  # centre of pixel (r0, c1): 0.2 onto (0,1), (0,2), (1,1), (1,2)
        (0, 0, 1.5 / 3, 0.5 / 2, 0.2),  # same place again: summed, +0.05 each
        (0, 0, 1.0, 1.0, 5.0),  # bottom-right outer corner: f = (3, 2), all 4 corners outside -> dropped
        (0, 1, 0.25, 0.0, 0.4),  # level 1, f = (0.5, 0): 0.2 onto (0,0) and (0,1) of level 1
        (0, 0, 0.9, 0.75, 1.0),  # f = (2.7, 1.5): only (r1, c2) inside, gets 0.3 * 0.5
        (0, 0, -0.1, 0.25, 1.0),  # f = (-0.3, 0.5): column -1 dropped, (0,0) and (1,0) get 0.7 * 0.5
        (1, 1, 0.75, 0.0, 2.0),  # second image, level 1, f = (1.5, 0): 1.0 onto token 7, column 2 dropped
    ]
    loc, attn = _single_samples(samples, batch=2)
    expected = torch.zeros(2, N, dtype=torch.float64)
    for token in (1, 2, 4, 5):
        expected[0, token] += 0.25
    expected[0, 6] += 0.2
    expected[0, 7] += 0.2
    expected[0, 5] += 0.15
    expected[0, 0] += 0.35
    expected[0, 3] += 0.35
    expected[1, 7] += 1.0
    got = ops.dam_splat(loc, attn, SHAPES, STARTS, N)
    assert got.shape == (2, N) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ops.dam_splat_pytorch(loc, attn, SHAPES, STARTS, N), expected, rtol=0, atol=1e-12)


def _naive_dam(loc, attn, shapes, starts, n):
    batch = loc.shape[0]
    dam = torch.zeros(batch, n, dtype=torch.float64)
    flat_loc = loc.reshape(batch, -1, loc.shape[3], loc.shape[4], 2)  # (B, S*M, L, P, 2)
    flat_attn = attn.reshape(batch, -1, attn.shape[3], attn.shape[4])
    for b in range(batch):
        for s in range(flat_loc.shape[1]):
            for level, (h, w) in enumerate(shapes):
                for p in range(flat_loc.shape[3]):
                    fx = flat_loc[b, s, level, p, 0].item() * w
                    fy = flat_loc[b, s, level, p, 1].item() * h
                    c0, r0 = math.floor(fx), math.floor(fy)
                    dx, dy = fx - c0, fy - r0
                    a = flat_attn[b, s, level, p].item()
                    for c, r, share in ((c0, r0, (1 - dx) * (1 - dy)), (c0 + 1, r0, dx * (1 - dy)),
                                        (c0, r0 + 1, (1 - dx) * dy), (c0 + 1, r0 + 1, dx * dy)):
                        if 0 <= c < w and 0 <= r < h:
                            dam[b, starts[level] + r * w + c] += a * share
    return dam


def test_matches_naive_loop_random_with_zero_size_level():
    shapes = [(3, 4), (0, 5), (1, 3), (2, 2)]
    ss = torch.tensor(shapes, dtype=torch.int64)
    sizes = [h * w for h, w in shapes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    gen = torch.Generator().manual_seed(0)
    loc = torch.rand(2, 6, 2, len(shapes), 3, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    attn = torch.rand(2, 6, 2, len(shapes), 3, generator=gen, dtype=torch.float64)
    got = ops.dam_splat(loc, attn, ss, torch.tensor(starts), sum(sizes))
    torch.testing.assert_close(got, _naive_dam(loc, attn, shapes, starts, sum(sizes)), rtol=1e-12, atol=1e-12)


def test_mass_is_conserved_for_interior_samples():
    gen = torch.Generator().manual_seed(1)
    # Keep f = (x*W, y*H) within [0, W-1) x [0, H-1) so all 4 corners are inside: level 0 is 2 x 3.
    x = torch.rand(1, 50, 2, 1, 2, generator=gen, dtype=torch.float64) * (2 / 3)
    y = torch.rand(1, 50, 2, 1, 2, generator=gen, dtype=torch.float64) * 0.5
    loc = torch.stack([x, y], dim=-1)
    attn = torch.rand(1, 50, 2, 1, 2, generator=gen, dtype=torch.float64)
    dam = ops.dam_splat(loc, attn, SHAPES[:1], STARTS[:1], 6)
    torch.testing.assert_close(dam.sum(), attn.sum(), rtol=1e-12, atol=1e-12)


def test_returns_no_gradient_and_keeps_weight_dtype():
    loc, attn = _single_samples([(0, 0, 0.5, 0.25, 1.0)])
    loc = loc.float().requires_grad_(True)
    attn = attn.float().requires_grad_(True)
    dam = ops.dam_splat(loc, attn, SHAPES, STARTS, N)
    assert not dam.requires_grad and dam.grad_fn is None and dam.dtype == torch.float32


def test_bad_inputs_and_unknown_backend_raise():
    loc, attn = _single_samples([(0, 0, 0.5, 0.25, 1.0)])
    with pytest.raises(ValueError, match="attention_weights"):
        ops.dam_splat(loc, attn[..., :0], SHAPES, STARTS, N)
    with pytest.raises(ValueError, match="level_start_index"):
        ops.dam_splat(loc, attn, SHAPES, STARTS.int(), N)
    with pytest.raises(BackendUnavailableError, match="'nope'.*'dam_splat'"):
        ops.dam_splat(loc, attn, SHAPES, STARTS, N, backend="nope")


def test_opcheck_without_autograd():
    gen = torch.Generator().manual_seed(2)
    loc = torch.rand(2, 4, 2, 2, 3, 2, generator=gen, dtype=torch.float64)
    attn = torch.rand(2, 4, 2, 2, 3, generator=gen, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sdetr.dam_splat.default, (loc, attn, SHAPES, STARTS, N, "reference"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiles_fullgraph():
    loc, attn = _single_samples([(0, 0, 0.5, 0.25, 1.0), (0, 1, 0.3, 0.6, 0.5)])
    compiled = torch.compile(lambda x, a: ops.dam_splat(x, a, SHAPES, STARTS, N), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(loc, attn), ops.dam_splat_pytorch(loc, attn, SHAPES, STARTS, N))
