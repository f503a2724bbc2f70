"""Key-aware deformable attention op (REFERENCE §9.4): reference vs a naive loop, gradients, opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sdetr.ops as ops
from sdetr.ops import BackendUnavailableError

B, Q, M, D, P = 2, 3, 2, 4, 2
REF = "reference"  # this file tests the reference backend; compiled kernels have their own tests
SHAPES = [(4, 5), (2, 3), (1, 2)]


@pytest.fixture(autouse=True)
def _leave_global_rng_as_found():
    """Seeded tests here must not shift the global RNG of later test files."""
    with torch.random.fork_rng(devices=[]):
        yield


def _level_tensors(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def _inputs(shapes=SHAPES, seed=0, spread=1.5, dtype=torch.float64):
    """query, key, value, spatial_shapes, level_start_index, locations (some outside [0, 1])."""
    gen = torch.Generator().manual_seed(seed)
    ss, lsi, n = _level_tensors(shapes)
    query = torch.randn(B, Q, M, D, generator=gen, dtype=dtype)
    key = torch.randn(B, n, M, D, generator=gen, dtype=dtype)
    value = torch.randn(B, n, M, D, generator=gen, dtype=dtype)
    loc = torch.rand(B, Q, M, len(shapes), P, 2, generator=gen, dtype=dtype) * spread - (spread - 1) / 2
    return query, key, value, ss, lsi, loc


def _bilinear(tokens, start, h, w, x, y):
    """Sample tokens[start + row*w + col] (D,) at normalised (x, y): pixel (x*w-0.5, y*h-0.5)."""
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(tokens.shape[-1], dtype=tokens.dtype)
    for xx, yy, wt in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                       (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
        if 0 <= xx < w and 0 <= yy < h:
            out += wt * tokens[start + yy * w + xx]
    return out


def _naive_kda(query, key, value, shapes, loc):
    """Per-sample python loop: softmax over the L·P sampled keys of q·k/sqrt(D), then sum w·v."""
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    levels = len(shapes)
    out = torch.zeros(B, Q, M, D, dtype=value.dtype)
    attn = torch.zeros(B, Q, M, levels, P, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                ks, vs = [], []
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(P):
                        x, y = loc[b, q, m, lvl, p].tolist()
                        ks.append(_bilinear(key[b, :, m], starts[lvl], h, w, x, y))
                        vs.append(_bilinear(value[b, :, m], starts[lvl], h, w, x, y))
                logits = torch.stack([query[b, q, m] @ k for k in ks]) / math.sqrt(D)
                weights = torch.softmax(logits, 0)
                out[b, q, m] = sum(wt * v for wt, v in zip(weights, vs))
                attn[b, q, m] = weights.view(levels, P)
    return out.reshape(B, Q, M * D), attn


def test_reference_matches_naive_loop_including_outside_points():
    query, key, value, ss, lsi, loc = _inputs()
    loc[0, 0, 0, 0, 0] = torch.tensor([0.5 / 5, 1.5 / 4], dtype=loc.dtype)  # a pixel centre
    loc[1, 2, 1, 1, 1] = torch.tensor([3.0, -2.0], dtype=loc.dtype)  # far outside: k = v = 0
    out, attn = ops.kda_pytorch(query, key, value, ss, lsi, loc)
    naive_out, naive_attn = _naive_kda(query, key, value, SHAPES, loc)
    torch.testing.assert_close(out, naive_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attn, naive_attn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attn.sum((-2, -1)), torch.ones(B, Q, M, dtype=attn.dtype))
    custom_out, custom_attn = ops.kda(query, key, value, ss, lsi, loc, backend=REF)
    assert torch.equal(custom_out, out) and torch.equal(custom_attn, attn)


def test_query_orthogonal_to_keys_gives_uniform_weights():
    query, key, value, ss, lsi, loc = _inputs(seed=1)
    _, attn = ops.kda(torch.zeros_like(query), key, value, ss, lsi, loc, backend=REF)
    torch.testing.assert_close(attn, torch.full_like(attn, 1.0 / (len(SHAPES) * P)))


def test_gradcheck_through_custom_op_both_outputs():
    query, key, value, ss, lsi, loc = _inputs(seed=2, spread=0.8)
    leaves = tuple(t.requires_grad_(True) for t in (query, key, value, loc))

    def fn(q, k, v, x):
        out, attn = ops.kda(q, k, v, ss, lsi, x, backend=REF)
        return out, attn

    assert torch.autograd.gradcheck(fn, leaves)


def test_gradcheck_with_tied_key_and_value():
    query, _, value, ss, lsi, loc = _inputs(seed=3, spread=0.8)
    leaves = tuple(t.requires_grad_(True) for t in (query, value, loc))
    assert torch.autograd.gradcheck(lambda q, v, x: ops.kda(q, v, v, ss, lsi, x, backend=REF)[0],
                                   leaves)


def test_zero_size_level_samples_zeros_and_gets_no_gradient():
    shapes = [(2, 3), (0, 4), (1, 2)]
    query, key, value, ss, lsi, loc = _inputs(shapes=shapes, seed=4)
    leaves = [t.requires_grad_(True) for t in (query, key, value, loc)]
    out, attn = ops.kda(*leaves[:3], ss, lsi, leaves[3], backend=REF)
    (out.sum() + (attn * torch.arange(attn.numel()).view_as(attn)).sum()).backward()
    assert torch.equal(leaves[3].grad[:, :, :, 1], torch.zeros_like(leaves[3].grad[:, :, :, 1]))
    assert (attn[:, :, :, 1] > 0).all()  # k = 0 there: the samples keep softmax mass exp(0)


def test_opcheck_forward_and_backward_ops():
    query, key, value, ss, lsi, loc = _inputs(seed=5, spread=0.8)
    args = (query.requires_grad_(True), key.requires_grad_(True), value.requires_grad_(True),
            ss, lsi, loc.requires_grad_(True), "reference")
    torch.library.opcheck(torch.ops.sdetr.kda.default, args)
    plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    grads = (torch.randn(B, Q, M * D, dtype=torch.float64),
             torch.randn(loc.shape[:-1], dtype=torch.float64))
    torch.library.opcheck(torch.ops.sdetr.kda_backward.default, (*grads, *plain),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_runs_under_flop_counter_mode_and_autocast():
    query, key, value, ss, lsi, loc = _inputs(seed=6)
    leaves = [t.requires_grad_(True) for t in (query, key, value, loc)]
    with FlopCounterMode(display=False):
        ops.kda(*leaves[:3], ss, lsi, leaves[3], backend=REF)[0].sum().backward()
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)
    q32, k32, v32, _, _, loc32 = _inputs(seed=6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = ops.kda(q32.bfloat16(), k32.bfloat16(), v32, ss, lsi, loc32, backend=REF)
    assert out.dtype == torch.float32 and attn.dtype == torch.float32


def test_reference_backend_registered_and_bad_inputs_named():
    assert "reference" in ops.available_backends("kda")
    assert ops.backend_report()["kda"] in ops.available_backends("kda")
    query, key, value, ss, lsi, loc = _inputs()
    with pytest.raises(BackendUnavailableError, match="'nope'.*'kda'"):
        ops.kda(query, key, value, ss, lsi, loc, backend="nope")
    with pytest.raises(ValueError, match="key shape"):
        ops.kda(query, key[:, :-1], value, ss, lsi, loc)
    with pytest.raises(ValueError, match="query must be"):
        ops.kda(query[..., :-1], key, value, ss, lsi, loc)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ops.kda(query, key, value, ss.int(), lsi, loc)
