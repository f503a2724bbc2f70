"""CUDA kernels of sdetr._C (the "compiled" backend on CUDA tensors).

* Build test (no GPU needed): the installed sdetr._C has CUDA kernels for every sdetr_C op and
  reports its archs. Skipped, with the reason, when there is no CUDA toolkit, torch is CPU-only, or
  the extension was built CPU-only (SDETR_NO_CUDA=1); with SDETR_FORCE_CUDA=1 a CPU-only build
  fails instead. Nothing is compiled here (`make kernels` builds).
* GPU tests (marked ``gpu``): CUDA kernels against the pure-PyTorch reference (on the same GPU) and
  the CPU kernels; skipped cleanly without a CUDA device or without CUDA kernels in the build.
"""

from __future__ import annotations

import functools
import os
import re

import pytest
import torch

from sdetr import ops
from sdetr.ops.kda import _kda_pytorch_backward
from sdetr.ops.ms_deform_attn import _ms_deform_attn_pytorch_backward
from sdetr.utils.cuda_toolkit import find_cuda_home

KERNELS = ("ms_deform_attn_forward", "ms_deform_attn_backward", "dam_splat", "kda_forward", "kda_backward")
CPU_ONLY = ("stem_max_pool_forward",)  # CUDA pools the stem with F.max_pool2d (sdetr.ops.stem_max_pool)
SHAPES = [(4, 5), (1, 6), (3, 2)]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _cuda_kernels_built() -> bool:
    return ops.compiled_available() and bool(ops.compiled_build_info()["cuda"])


# ------------------------------------------------------------------------------------------ build


def test_build_has_cuda_kernels_for_every_op():
    if not ops.compiled_available():
        pytest.skip(f"sdetr._C not available: {ops.compiled_build_info()['detail']}")
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: no CUDA kernels are built")
    if find_cuda_home() is None:
        pytest.skip("no CUDA toolkit found (CUDA_HOME / CUDA_PATH, /usr/local/cuda, nvcc on PATH)")
    if _flag("SDETR_NO_CUDA"):
        pytest.skip("SDETR_NO_CUDA=1: the CUDA kernels are not built")
    info = ops.compiled_build_info()
    if not info["cuda"] and not _flag("SDETR_FORCE_CUDA"):
        pytest.skip("sdetr._C was built without CUDA kernels (SDETR_NO_CUDA=1 at build time, or an older "
                    "build): rebuild with `make kernels`")
    assert info["cuda"] is True
    assert info["cuda_archs"], "build_info lists no CUDA archs"
    for arch in info["cuda_archs"]:
        assert re.fullmatch(r"\d+\.\d+[a-z]?(\+PTX)?", arch), f"odd CUDA arch {arch!r} in build_info"
    assert set(info["kernels"]) == set(KERNELS) | set(CPU_ONLY)
    assert all(info["kernels"][kernel] == ["cpu"] for kernel in CPU_ONLY)
    for kernel in KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sdetr_C::{kernel}", "CUDA"), kernel
        assert info["kernels"][kernel] == ["cpu", "cuda"], kernel


# ---------------------------------------------------------------------------------------- helpers


def gpu(test):
    """Mark a test `gpu` and skip it without a CUDA device or without CUDA kernels in sdetr._C."""
    marks = [
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        pytest.mark.skipif(not _cuda_kernels_built(), reason="sdetr._C has no CUDA kernels (CPU-only build)"),
    ]
    return functools.reduce(lambda fn, mark: mark(fn), marks, test)


@pytest.fixture
def exact_float32():
    """No TF32 in cuDNN / cuBLAS while comparing float32 results (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _levels(shapes, device="cuda"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes.to(device), starts.to(device), int(sizes.sum())


def _inputs(shapes=SHAPES, batch=2, heads=2, channels=3, queries=5, points=2, dtype=torch.float32, seed=0,
            device="cuda"):
    """Random MSDA inputs (made on the CPU, so they do not depend on the device); locations in
    [-0.25, 1.25] so some samples are partly or fully outside."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, starts, tokens = _levels(shapes, device)
    value = torch.randn(batch, tokens, heads, channels, generator=gen, dtype=dtype)
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * 1.5 - 0.25
    attn = torch.rand(batch, queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    return value.to(device), spatial_shapes, starts, loc.to(device), attn.to(device)


def _forward_and_grads(backend, value, ss, lsi, loc, attn, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ops.ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], backend=backend)
    out.backward(grad)
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _assert_all_close(got, expected, rtol, atol, names=("output", "grad_value", "grad_loc", "grad_attn")):
    for name, g, e in zip(names, got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and g.device == e.device, name
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=name)


def _cpu(tensors):
    return [t.cpu() for t in tensors]


# ------------------------------------------------------------------------------------------- MSDA


@gpu
@pytest.mark.parametrize("channels", [32, 5, 1, 48, 256])  # lanes per row 32, 8, 1; 2 and 8 channels per lane
def test_msda_forward_and_gradients_match_reference_fp32(channels):
    value, ss, lsi, loc, attn = _inputs(channels=channels, heads=3, queries=7, points=3)
    grad = torch.randn(2, 7, 3 * channels, generator=torch.Generator().manual_seed(5)).cuda()
    expected = _forward_and_grads("reference", value, ss, lsi, loc, attn, grad)
    got = _forward_and_grads("compiled", value, ss, lsi, loc, attn, grad)
    _assert_all_close(got, expected, rtol=1e-5, atol=1e-5)


@gpu
def test_msda_encoder_sized_problem_matches_reference_fp32():
    """Many blocks and contended grad_value atomics: 4 levels, 8 heads, D = 32, 4 points."""
    shapes = [(32, 40), (16, 20), (8, 10), (4, 5)]
    value, ss, lsi, loc, attn = _inputs(shapes=shapes, batch=2, heads=8, channels=32, queries=600, points=4,
                                        seed=11)
    grad = torch.randn(2, 600, 256, generator=torch.Generator().manual_seed(12)).cuda()
    expected = _forward_and_grads("reference", value, ss, lsi, loc, attn, grad)
    got = _forward_and_grads("compiled", value, ss, lsi, loc, attn, grad)
    _assert_all_close(got, expected, rtol=1e-5, atol=2e-5)


@gpu
@pytest.mark.parametrize("channels", [32, 5, 64])
def test_msda_cuda_matches_cpu_kernels_float64(channels):
    value, ss, lsi, loc, attn = _inputs(channels=channels, queries=9, dtype=torch.float64, seed=13)
    grad = torch.randn(2, 9, 2 * channels, dtype=torch.float64).cuda()
    cuda_out = torch.ops.sdetr_C.ms_deform_attn_forward(value, ss, lsi, loc, attn)
    cpu_out = torch.ops.sdetr_C.ms_deform_attn_forward(*_cpu((value, ss, lsi, loc, attn)))
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=1e-12, atol=1e-12)
    cuda_grads = torch.ops.sdetr_C.ms_deform_attn_backward(grad, value, ss, lsi, loc, attn)
    cpu_grads = torch.ops.sdetr_C.ms_deform_attn_backward(*_cpu((grad, value, ss, lsi, loc, attn)))
    for g, e in zip(cuda_grads, cpu_grads):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-12, atol=1e-12)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [32, 5])
def test_msda_16_bit_inputs_accumulate_in_float32(dtype, channels):
    value, ss, lsi, loc, attn = _inputs(channels=channels, queries=9, seed=7)
    low = [t.to(dtype) for t in (value, loc, attn)]
    out = torch.ops.sdetr_C.ms_deform_attn_forward(low[0], ss, lsi, low[1], low[2])
    assert out.dtype == dtype
    # The same rounded inputs in float32: what is left is the rounding of the output.
    exact = ops.ms_deform_attn_pytorch(low[0].float(), ss, lsi, low[1].float(), low[2].float())
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=1e-2)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).cuda().to(dtype)
    got = torch.ops.sdetr_C.ms_deform_attn_backward(grad, low[0], ss, lsi, low[1], low[2])
    ref = _ms_deform_attn_pytorch_backward(grad.float(), low[0].float(), ss, lsi, low[1].float(), low[2].float())
    for g, e in zip(got, ref):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e, rtol=2e-2, atol=5e-2 * float(e.abs().max()))


@gpu
def test_msda_gradcheck_float64_through_the_op():
    value, ss, lsi, loc, attn = _inputs(batch=1, queries=3, dtype=torch.float64, seed=1)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    # grad_value is summed with atomicAdd: a re-run may differ in the last bits.
    assert torch.autograd.gradcheck(
        lambda v, x, a: ops.ms_deform_attn(v, ss, lsi, x, a, backend="compiled"), inputs, nondet_tol=1e-12
    )


@gpu
def test_opcheck_on_the_cuda_kernels():
    value, ss, lsi, loc, attn = _inputs(dtype=torch.float64, seed=2)
    grad = torch.randn(2, 5, 6, dtype=torch.float64).cuda()
    torch.library.opcheck(torch.ops.sdetr_C.ms_deform_attn_forward.default,
                          (value.requires_grad_(True), ss, lsi, loc.requires_grad_(True), attn.requires_grad_(True)))
    torch.library.opcheck(torch.ops.sdetr_C.ms_deform_attn_backward.default,
                          (grad, value.detach(), ss, lsi, loc.detach(), attn.detach()))
    torch.library.opcheck(torch.ops.sdetr_C.dam_splat.default, (loc.detach(), attn.detach(), ss, lsi, 32))


@gpu
def test_msda_zero_size_level_contributes_nothing_and_gets_zero_gradient():
    shapes = [(2, 3), (0, 4), (1, 2), (3, 0)]
    value, ss, lsi, loc, attn = _inputs(shapes=shapes, seed=3, dtype=torch.float64)
    grad = torch.randn(2, 5, 6, dtype=torch.float64).cuda()
    out, g_value, g_loc, g_attn = _forward_and_grads("compiled", value, ss, lsi, loc, attn, grad)
    keep = [0, 2]
    ss2, lsi2, _ = _levels([shapes[i] for i in keep])
    without = ops.ms_deform_attn(value, ss2, lsi2, loc[:, :, :, keep], attn[:, :, :, keep], backend="compiled")
    torch.testing.assert_close(out, without, rtol=1e-12, atol=1e-12)
    assert torch.all(g_loc[:, :, :, [1, 3]] == 0) and torch.all(g_attn[:, :, :, [1, 3]] == 0)
    expected = _forward_and_grads("reference", value, ss, lsi, loc, attn, grad)
    _assert_all_close((out, g_value, g_loc, g_attn), expected, rtol=1e-10, atol=1e-10)


@gpu
def test_msda_points_outside_the_map_and_on_its_edges():
    value, ss, lsi, loc, attn = _inputs(batch=1, queries=6, dtype=torch.float64, seed=4)
    loc[0, 0] = 3.0  # every sample far outside: zero output, zero gradients
    loc[0, 1] = -2.0
    loc[0, 2, :, :, :, 0] = 0.0  # outer left edge: pixel coordinate -0.5 -> half the border column
    loc[0, 3, :, :, :, 1] = 1.0  # outer bottom edge
    loc[0, 4, 0, 0, 0] = float("nan")  # skipped like an outside sample
    grad = torch.randn(1, 6, 6, dtype=torch.float64).cuda()
    got = _forward_and_grads("compiled", value, ss, lsi, loc, attn, grad)
    assert torch.all(got[0][0, :2] == 0) and torch.all(got[2][0, :2] == 0) and torch.all(got[3][0, :2] == 0)
    assert torch.all(got[2][0, 4, 0, 0, 0] == 0) and torch.all(torch.isfinite(got[0]))
    loc[0, 4, 0, 0, 0] = 5.0  # the reference (grid_sample) would propagate the NaN: compare with "outside"
    expected = _forward_and_grads("reference", value, ss, lsi, loc, attn, grad)
    _assert_all_close(got, expected, rtol=1e-10, atol=1e-10)


@gpu
def test_msda_batch_one_matches_batch_two():
    value, ss, lsi, loc, attn = _inputs(batch=2, queries=40, seed=5)
    full = ops.ms_deform_attn(value, ss, lsi, loc, attn, backend="compiled")
    grad = torch.randn(full.shape, generator=torch.Generator().manual_seed(6)).cuda()
    full_grads = torch.ops.sdetr_C.ms_deform_attn_backward(grad, value, ss, lsi, loc, attn)
    for b in range(2):
        one = slice(b, b + 1)
        single = ops.ms_deform_attn(value[one], ss, lsi, loc[one], attn[one], backend="compiled")
        torch.testing.assert_close(single[0], full[b], rtol=0, atol=0)  # no atomics in the forward
        grads = torch.ops.sdetr_C.ms_deform_attn_backward(grad[one], value[one], ss, lsi, loc[one], attn[one])
        torch.testing.assert_close(grads[0][0], full_grads[0][b], rtol=1e-6, atol=1e-6)  # atomics
        for g, e in zip(grads[1:], full_grads[1:]):  # per-sample shuffle sums: deterministic
            torch.testing.assert_close(g[0], e[b], rtol=0, atol=0)


@gpu
def test_msda_non_contiguous_inputs_give_the_contiguous_result():
    value, ss, lsi, loc, attn = _inputs(seed=6)
    expected = torch.ops.sdetr_C.ms_deform_attn_forward(value, ss, lsi, loc, attn)
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = torch.cat([loc, loc], dim=-1)[..., :2]
    attn_nc = attn.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    got = torch.ops.sdetr_C.ms_deform_attn_forward(value_nc, ss, lsi, loc_nc, attn_nc)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    grads = torch.ops.sdetr_C.ms_deform_attn_backward(torch.ones_like(got), value_nc, ss, lsi, loc_nc, attn_nc)
    grads_c = torch.ops.sdetr_C.ms_deform_attn_backward(torch.ones_like(got), value, ss, lsi, loc, attn)
    for g, e in zip(grads, grads_c):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@gpu
def test_inputs_on_another_device_raise_value_error_naming_them():
    value, ss, lsi, loc, attn = _inputs()
    with pytest.raises(ValueError, match="sampling_locations is on cpu"):
        torch.ops.sdetr_C.ms_deform_attn_forward(value, ss, lsi, loc.cpu(), attn)
    with pytest.raises(ValueError, match="spatial_shapes is on cpu"):
        torch.ops.sdetr_C.ms_deform_attn_forward(value, ss.cpu(), lsi, loc, attn)
    out = torch.ops.sdetr_C.ms_deform_attn_forward(value, ss, lsi, loc, attn)
    with pytest.raises(ValueError, match="grad_output is on cpu"):
        torch.ops.sdetr_C.ms_deform_attn_backward(out.cpu(), value, ss, lsi, loc, attn)
    with pytest.raises(ValueError, match="level_start_index is on cpu"):
        torch.ops.sdetr_C.dam_splat(loc, attn, ss, lsi.cpu(), 32)
    query = torch.randn(2, 5, 2, 3).cuda()
    with pytest.raises(ValueError, match="query is on cpu"):
        torch.ops.sdetr_C.kda_forward(query.cpu(), value, value, ss, lsi, loc)


@gpu
def test_more_than_256_channels_per_head_is_a_value_error():
    value, ss, lsi, loc, attn = _inputs(channels=257, heads=1)
    with pytest.raises(ValueError, match="at most 256 channels per head"):
        torch.ops.sdetr_C.ms_deform_attn_forward(value, ss, lsi, loc, attn)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_device_of_their_inputs():
    value, ss, lsi, loc, attn = _inputs(seed=9)
    on_first = torch.ops.sdetr_C.ms_deform_attn_forward(value, ss, lsi, loc, attn)
    second = [t.to("cuda:1") for t in (value, ss, lsi, loc, attn)]
    with torch.cuda.device(0):
        on_second = torch.ops.sdetr_C.ms_deform_attn_forward(*second)
    assert on_second.device == torch.device("cuda:1")
    torch.testing.assert_close(on_second.cpu(), on_first.cpu(), rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- DAM


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dam_splat_matches_reference(dtype):
    shapes = [(4, 5), (0, 3), (3, 2)]
    ss, lsi, tokens = _levels(shapes)
    gen = torch.Generator().manual_seed(8)
    loc = torch.rand(2, 50, 2, 3, 4, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    loc[0, 0] = 1.0  # exactly on the bottom-right outer edge: all corners dropped
    loc[1, 0] = 0.0  # top-left outer corner: pixel (0, 0) gets the whole weight
    attn = torch.rand(2, 50, 2, 3, 4, generator=gen, dtype=torch.float64)
    loc, attn = loc.to(dtype).cuda(), attn.to(dtype).cuda()
    got = ops.dam_splat(loc, attn, ss, lsi, tokens, backend="compiled")
    assert got.dtype == dtype and got.shape == (2, tokens)
    # Reference on the same (rounded) inputs in float64; the 16-bit outputs are rounded once.
    expected = ops.dam_splat(loc.double(), attn.double(), ss, lsi, tokens, backend="reference")
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    single = ops.dam_splat(loc[1:], attn[1:], ss, lsi, tokens, backend="compiled")
    torch.testing.assert_close(single[0], got[1], rtol=tol, atol=tol * float(expected.abs().max()))


@gpu
def test_dam_splat_cuda_matches_cpu_kernel():
    ss, lsi, tokens = _levels(SHAPES)
    gen = torch.Generator().manual_seed(10)
    loc = torch.rand(3, 40, 4, 3, 4, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    attn = torch.rand(3, 40, 4, 3, 4, generator=gen, dtype=torch.float64)
    got = torch.ops.sdetr_C.dam_splat(loc.cuda(), attn.cuda(), ss, lsi, tokens)
    expected = torch.ops.sdetr_C.dam_splat(loc, attn, ss.cpu(), lsi.cpu(), tokens)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------------- KDA


def _kda_inputs(channels, dtype=torch.float64, seed=9, tied=False, batch=2, queries=6, shapes=(*SHAPES, (0, 4))):
    """KDA inputs (2 heads, 3 points) on the GPU, by default on SHAPES plus a zero-size level."""
    gen = torch.Generator().manual_seed(seed)
    ss, lsi, tokens = _levels(list(shapes))
    query = torch.randn(batch, queries, 2, channels, generator=gen, dtype=dtype)
    value = torch.randn(batch, tokens, 2, channels, generator=gen, dtype=dtype)
    key = value if tied else torch.randn(batch, tokens, 2, channels, generator=gen, dtype=dtype)
    loc = torch.rand(batch, queries, 2, len(shapes), 3, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    loc[0, 0] = 4.0  # every sample outside: uniform weights over the L*P samples, zero output
    query, value, loc = query.cuda(), value.cuda(), loc.cuda()
    return query, value if tied else key.cuda(), value, ss, lsi, loc


def _kda_outputs_and_grads(backend, query, key, value, ss, lsi, loc, tied):
    q, v, x = (t.detach().clone().requires_grad_(True) for t in (query, value, loc))
    k = v if tied else key.detach().clone().requires_grad_(True)
    out, weights = ops.kda(q, k, v, ss, lsi, x, backend=backend)
    gen = torch.Generator().manual_seed(3)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype).cuda()).sum()
    loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=out.dtype).cuda()).sum()
    leaves = [q, v, x] if tied else [q, k, v, x]
    return [out.detach(), weights.detach(), *torch.autograd.grad(loss, leaves)]


@gpu
@pytest.mark.parametrize("channels, tied", [(32, False), (5, True), (64, False), (1, False)])
def test_kda_outputs_and_gradients_match_reference_fp32(channels, tied):
    query, key, value, ss, lsi, loc = _kda_inputs(channels, dtype=torch.float32, tied=tied)
    expected = _kda_outputs_and_grads("reference", query, key, value, ss, lsi, loc, tied)
    got = _kda_outputs_and_grads("compiled", query, key, value, ss, lsi, loc, tied)
    torch.testing.assert_close(got[1][0, 0], torch.full((2, 4, 3), 1 / 12, device="cuda"))
    assert torch.all(got[0][0, 0] == 0)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"output/gradient {i}")


@gpu
@pytest.mark.parametrize("channels", [32, 3])
def test_kda_cuda_matches_cpu_kernels_float64(channels):
    query, key, value, ss, lsi, loc = _kda_inputs(channels, seed=14)
    out, weights = torch.ops.sdetr_C.kda_forward(query, key, value, ss, lsi, loc)
    cpu_out, cpu_weights = torch.ops.sdetr_C.kda_forward(*_cpu((query, key, value, ss, lsi, loc)))
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights.cpu(), cpu_weights, rtol=1e-12, atol=1e-12)
    g, gw = torch.randn_like(out), torch.randn_like(weights)
    grads = torch.ops.sdetr_C.kda_backward(g, gw, query, key, value, ss, lsi, loc)
    cpu_grads = torch.ops.sdetr_C.kda_backward(*_cpu((g, gw, query, key, value, ss, lsi, loc)))
    for name, a, e in zip(("query", "key", "value", "loc"), grads, cpu_grads):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-11, atol=1e-11, msg=f"grad_{name}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kda_16_bit_inputs_accumulate_in_float32(dtype):
    query, key, value, ss, lsi, loc = _kda_inputs(32, dtype=torch.float32, seed=15)
    low = [t.to(dtype) for t in (query, key, value, loc)]
    out, weights = torch.ops.sdetr_C.kda_forward(low[0], low[1], low[2], ss, lsi, low[3])
    assert out.dtype == weights.dtype == dtype
    exact = ops.kda_pytorch(*(t.float() for t in low[:3]), ss, lsi, low[3].float())
    torch.testing.assert_close(out.float(), exact[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weights.float(), exact[1], rtol=2e-2, atol=1e-2)
    gen = torch.Generator().manual_seed(16)
    g = torch.randn(out.shape, generator=gen).cuda().to(dtype)
    gw = torch.randn(weights.shape, generator=gen).cuda().to(dtype)
    got = torch.ops.sdetr_C.kda_backward(g, gw, low[0], low[1], low[2], ss, lsi, low[3])
    ref = _kda_pytorch_backward(g.float(), gw.float(), *(t.float() for t in low[:3]), ss, lsi, low[3].float())
    for name, a, e in zip(("query", "key", "value", "loc"), got, ref):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e, rtol=3e-2, atol=5e-2 * float(e.abs().max()), msg=f"grad_{name}")


@gpu
def test_kda_gradcheck_and_opcheck_float64():
    query, key, value, ss, lsi, loc = _kda_inputs(3, seed=10, batch=1, queries=3, shapes=[(3, 4), (0, 2), (2, 2)])
    inputs = tuple(t.requires_grad_(True) for t in (query, key, value, loc))
    assert torch.autograd.gradcheck(lambda q, k, v, x: ops.kda(q, k, v, ss, lsi, x, backend="compiled"), inputs,
                                    nondet_tol=1e-12)  # dK, dV use atomicAdd
    torch.library.opcheck(torch.ops.sdetr_C.kda_forward.default, (query, key, value, ss, lsi, loc))
    out, weights = torch.ops.sdetr_C.kda_forward(*(t.detach() for t in (query, key, value)), ss, lsi, loc.detach())
    torch.library.opcheck(torch.ops.sdetr_C.kda_backward.default,
                          (torch.randn_like(out), torch.randn_like(weights),
                           *(t.detach() for t in (query, key, value)), ss, lsi, loc.detach()))


@gpu
def test_kda_batch_one_matches_batch_two():
    query, key, value, ss, lsi, loc = _kda_inputs(32, dtype=torch.float32, seed=17)
    out, weights = torch.ops.sdetr_C.kda_forward(query, key, value, ss, lsi, loc)
    for b in range(2):
        one = slice(b, b + 1)
        single = torch.ops.sdetr_C.kda_forward(query[one], key[one], value[one], ss, lsi, loc[one])
        torch.testing.assert_close(single[0][0], out[b], rtol=0, atol=0)
        torch.testing.assert_close(single[1][0], weights[b], rtol=0, atol=0)


# ----------------------------------------------------------------------------------- whole models


@gpu
@pytest.mark.parametrize("preset", ["deformable_detr_tiny", "lite_detr_h2l2_2x3_tiny"])  # MSDA; KDA + MSDA
def test_tiny_model_gives_the_same_outputs_with_cuda_kernels_and_reference(exact_float32, preset):
    from helpers import micro_config, two_images

    from sdetr.models import build

    torch.manual_seed(0)
    ref = build(micro_config(preset, "model.kernel_backend=reference").model)
    comp = build(micro_config(preset, "model.kernel_backend=compiled").model)
    assert (ref.kernel_backend, comp.kernel_backend) == ("reference", "compiled")
    # Move the grid-init offsets off the bilinear knots, where d(out)/d(loc) is one-sided and the
    # two backends may pick different sides (see tests/test_kernels_cpu.py).
    with torch.no_grad():
        for name, param in ref.model.named_parameters():
            if name.endswith("sampling_offsets.bias"):
                param.add_(0.1 * torch.randn_like(param))
    comp.model.load_state_dict(ref.model.state_dict())
    images, masks, _ = two_images()
    images, masks = images.cuda(), masks.cuda()
    outputs = [built.model.cuda().eval()(images, masks) for built in (ref, comp)]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[1][key], outputs[0][key], rtol=1e-4, atol=1e-4)
    grads = []
    for built, out in zip((ref, comp), outputs):
        (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
        grads.append({n: p.grad for n, p in built.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("sampling_offsets" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()) + 1e-6,
                                   msg=name)
