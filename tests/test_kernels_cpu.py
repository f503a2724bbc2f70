"""CPU kernels of sdetr._C (the "compiled" backend) against the pure-PyTorch reference.

Skipped, with the reason, when the extension is not built (CI builds it: gcc is present).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from sdetr import ops
from sdetr.ops import BackendUnavailableError, backends
from sdetr.ops.ms_deform_attn import _ms_deform_attn_pytorch_backward

pytestmark = pytest.mark.skipif(
    not ops.compiled_available(), reason=f"sdetr._C not available: {ops.compiled_build_info()['detail']}"
)

SHAPES = [(4, 5), (1, 6), (3, 2)]


def _levels(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def _inputs(shapes=SHAPES, batch=2, heads=2, channels=3, queries=5, points=2, dtype=torch.float32, seed=0):
    """Random MSDA inputs; locations in [-0.25, 1.25] so some samples are partly or fully outside."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, starts, tokens = _levels(shapes)
    value = torch.randn(batch, tokens, heads, channels, generator=gen, dtype=dtype)
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * 1.5 - 0.25
    attn = torch.rand(batch, queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    return value, spatial_shapes, starts, loc, attn


def _forward_and_grads(backend, value, ss, lsi, loc, attn, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ops.ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], backend=backend)
    out.backward(grad)
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("channels", [32, 16, 5])  # 32, 16 = the specialised kernels, 5 = the generic one
def test_forward_and_all_gradients_match_reference_fp32(channels):
    value, ss, lsi, loc, attn = _inputs(channels=channels, heads=3, queries=7, points=3)
    grad = torch.randn(2, 7, 3 * channels, generator=torch.Generator().manual_seed(5))
    expected = _forward_and_grads("reference", value, ss, lsi, loc, attn, grad)
    got = _forward_and_grads("compiled", value, ss, lsi, loc, attn, grad)
    for name, g, e in zip(["output", "grad_value", "grad_loc", "grad_attn"], got, expected):
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_gradcheck_float64_through_the_op():
    value, ss, lsi, loc, attn = _inputs(batch=1, queries=3, dtype=torch.float64, seed=1)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, x, a: ops.ms_deform_attn(v, ss, lsi, x, a, backend="compiled"), inputs
    )


def test_opcheck_on_the_sdetr_C_ops():
    value, ss, lsi, loc, attn = _inputs(dtype=torch.float64, seed=2)
    grad = torch.randn(2, 5, 6, dtype=torch.float64)
    fwd_args = (value.requires_grad_(True), ss, lsi, loc.requires_grad_(True), attn.requires_grad_(True))
    torch.library.opcheck(torch.ops.sdetr_C.ms_deform_attn_forward.default, fwd_args)
    torch.library.opcheck(torch.ops.sdetr_C.ms_deform_attn_backward.default,
                          (grad, value.detach(), ss, lsi, loc.detach(), attn.detach()))
    torch.library.opcheck(torch.ops.sdetr_C.dam_splat.default, (loc.detach(), attn.detach(), ss, lsi, 32))


def test_zero_size_level_contributes_nothing_and_gets_zero_gradient():
    shapes = [(2, 3), (0, 4), (1, 2), (3, 0)]
    value, ss, lsi, loc, attn = _inputs(shapes=shapes, seed=3, dtype=torch.float64)
    grad = torch.randn(2, 5, 6, dtype=torch.float64)
    out, g_value, g_loc, g_attn = _forward_and_grads("compiled", value, ss, lsi, loc, attn, grad)
    keep = [0, 2]
    ss2, lsi2, _ = _levels([shapes[i] for i in keep])
    without = ops.ms_deform_attn(value, ss2, lsi2, loc[:, :, :, keep], attn[:, :, :, keep], backend="compiled")
    torch.testing.assert_close(out, without, rtol=1e-12, atol=1e-12)
    assert torch.all(g_loc[:, :, :, [1, 3]] == 0) and torch.all(g_attn[:, :, :, [1, 3]] == 0)
    expected = _forward_and_grads("reference", value, ss, lsi, loc, attn, grad)
    for g, e in zip((out, g_value, g_loc, g_attn), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_points_outside_the_map_and_on_its_edges():
    value, ss, lsi, loc, attn = _inputs(batch=1, queries=6, dtype=torch.float64, seed=4)
    loc[0, 0] = 3.0  # every sample far outside: zero output, zero gradients
    loc[0, 1] = -2.0
    loc[0, 2, :, :, :, 0] = 0.0  # outer left edge: pixel coordinate -0.5 -> half the border column
    loc[0, 3, :, :, :, 1] = 1.0  # outer bottom edge
    grad = torch.randn(1, 6, 6, dtype=torch.float64)
    got = _forward_and_grads("compiled", value, ss, lsi, loc, attn, grad)
    assert torch.all(got[0][0, :2] == 0) and torch.all(got[2][0, :2] == 0) and torch.all(got[3][0, :2] == 0)
    expected = _forward_and_grads("reference", value, ss, lsi, loc, attn, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_batch_one_matches_batch_two_and_thread_count_does_not_matter():
    value, ss, lsi, loc, attn = _inputs(batch=2, queries=40, seed=5)
    full = ops.ms_deform_attn(value, ss, lsi, loc, attn, backend="compiled")
    for b in range(2):
        single = ops.ms_deform_attn(value[b:b + 1], ss, lsi, loc[b:b + 1], attn[b:b + 1], backend="compiled")
        torch.testing.assert_close(single[0], full[b], rtol=0, atol=0)
    grad = torch.randn_like(full)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = torch.ops.sdetr_C.ms_deform_attn_backward(grad, value, ss, lsi, loc, attn)
    finally:
        torch.set_num_threads(threads)
    parallel = torch.ops.sdetr_C.ms_deform_attn_backward(grad, value, ss, lsi, loc, attn)
    for s, p in zip(serial, parallel):  # each thread owns whole heads: identical sums
        torch.testing.assert_close(s, p, rtol=0, atol=0)


def test_non_contiguous_inputs_give_the_contiguous_result():
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
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_bfloat16_inputs_accumulate_in_float32():
    value, ss, lsi, loc, attn = _inputs(channels=32, queries=9, seed=7)
    value_bf, loc_bf, attn_bf = (t.bfloat16() for t in (value, loc, attn))
    out = torch.ops.sdetr_C.ms_deform_attn_forward(value_bf, ss, lsi, loc_bf, attn_bf)
    assert out.dtype == torch.bfloat16
    # Same bf16-rounded inputs in float32: the only difference left is the bf16 output rounding.
    exact = ops.ms_deform_attn_pytorch(value_bf.float(), ss, lsi, loc_bf.float(), attn_bf.float())
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=1e-2)
    grad = torch.randn(out.shape)
    got = torch.ops.sdetr_C.ms_deform_attn_backward(grad.bfloat16(), value_bf, ss, lsi, loc_bf, attn_bf)
    ref = _ms_deform_attn_pytorch_backward(grad.bfloat16().float(), value_bf.float(), ss, lsi, loc_bf.float(),
                                           attn_bf.float())
    for g, e in zip(got, ref):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e, rtol=2e-2, atol=5e-2 * float(e.abs().max()))


def test_dam_splat_matches_reference():
    shapes = [(4, 5), (0, 3), (3, 2)]
    ss, lsi, tokens = _levels(shapes)
    for dtype in (torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(8)
        loc = torch.rand(2, 50, 2, 3, 4, 2, generator=gen, dtype=dtype) * 1.4 - 0.2
        loc[0, 0] = 1.0  # exactly on the bottom-right outer edge: all corners dropped
        loc[1, 0] = 0.0  # top-left outer corner: pixel (0, 0) gets the whole weight
        attn = torch.rand(2, 50, 2, 3, 4, generator=gen, dtype=dtype)
        expected = ops.dam_splat(loc, attn, ss, lsi, tokens, backend="reference")
        got = ops.dam_splat(loc, attn, ss, lsi, tokens, backend="compiled")
        assert got.dtype == dtype and got.shape == (2, tokens)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    single = ops.dam_splat(loc[1:], attn[1:], ss, lsi, tokens, backend="compiled")
    torch.testing.assert_close(single[0], got[1], rtol=1e-12, atol=1e-12)


def test_compiled_backend_names_a_device_without_kernel():
    value, ss, lsi, loc, attn = (t.to("meta") for t in _inputs())
    forward = backends.get_backend("ms_deform_attn", "compiled").forward
    with pytest.raises(BackendUnavailableError, match="no meta kernel for op 'ms_deform_attn'"):
        forward(value, ss, lsi, loc, attn)
    splat = backends.get_backend("dam_splat", "compiled").forward
    with pytest.raises(BackendUnavailableError, match="no meta kernel for op 'dam_splat'"):
        splat(loc, attn, ss, lsi, 32)


def test_bad_level_table_raises_value_error_naming_it():
    value, ss, lsi, loc, attn = _inputs()
    with pytest.raises(ValueError, match="level_start_index"):
        torch.ops.sdetr_C.ms_deform_attn_forward(value, ss, lsi + 1, loc, attn)
    with pytest.raises(ValueError, match="spatial_shapes cover"):
        torch.ops.sdetr_C.ms_deform_attn_forward(value[:, 1:], ss, lsi, loc, attn)


def test_build_info_describes_the_cpu_build():
    info = ops.compiled_build_info()
    assert info["available"] and info["status"] == "loaded"
    assert "-O3" in info["cxx_flags"] and info["openmp"] is True
    assert info["cpu_capability"] in ("avx2", "default")
    assert all("cpu" in devices for devices in info["kernels"].values())
    assert set(info["kernels"]) == {"ms_deform_attn_forward", "ms_deform_attn_backward", "dam_splat",
                                    "kda_forward", "kda_backward", "stem_max_pool_forward"}
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert ops.resolve_backend("ms_deform_attn") == "compiled"  # automatic choice when present


def _kda_inputs(channels, dtype=torch.float64, seed=9, tied=False, batch=2, queries=6, shapes=(*SHAPES, (0, 4))):
    """KDA inputs (2 heads, 3 points), by default on SHAPES plus a zero-size level; locations partly outside."""
    gen = torch.Generator().manual_seed(seed)
    ss, lsi, tokens = _levels(list(shapes))
    query = torch.randn(batch, queries, 2, channels, generator=gen, dtype=dtype)
    value = torch.randn(batch, tokens, 2, channels, generator=gen, dtype=dtype)
    key = value if tied else torch.randn(batch, tokens, 2, channels, generator=gen, dtype=dtype)
    loc = torch.rand(batch, queries, 2, len(shapes), 3, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    loc[0, 0] = 4.0  # every sample outside: uniform weights over the L*P samples, zero output
    return query, key, value, ss, lsi, loc


def _kda_outputs_and_grads(backend, query, key, value, ss, lsi, loc, tied):
    q, v, x = (t.detach().clone().requires_grad_(True) for t in (query, value, loc))
    k = v if tied else key.detach().clone().requires_grad_(True)
    out, weights = ops.kda(q, k, v, ss, lsi, x, backend=backend)
    gen = torch.Generator().manual_seed(3)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=out.dtype)).sum()
    leaves = [q, v, x] if tied else [q, k, v, x]
    return [out.detach(), weights.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("channels, tied", [(32, False), (5, True)])
def test_kda_outputs_and_gradients_match_reference(channels, tied):
    query, key, value, ss, lsi, loc = _kda_inputs(channels, dtype=torch.float32, tied=tied)
    expected = _kda_outputs_and_grads("reference", query, key, value, ss, lsi, loc, tied)
    got = _kda_outputs_and_grads("compiled", query, key, value, ss, lsi, loc, tied)
    torch.testing.assert_close(got[1][0, 0], torch.full((2, 4, 3), 1 / 12))
    assert torch.all(got[0][0, 0] == 0)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"output/gradient {i}")


def test_kda_gradcheck_and_opcheck_float64():
    query, key, value, ss, lsi, loc = _kda_inputs(3, seed=10, batch=1, queries=3, shapes=[(3, 4), (0, 2), (2, 2)])
    inputs = tuple(t.requires_grad_(True) for t in (query, key, value, loc))
    assert torch.autograd.gradcheck(lambda q, k, v, x: ops.kda(q, k, v, ss, lsi, x, backend="compiled"), inputs)
    torch.library.opcheck(torch.ops.sdetr_C.kda_forward.default, (query, key, value, ss, lsi, loc))
    out, weights = torch.ops.sdetr_C.kda_forward(*(t.detach() for t in (query, key, value)), ss, lsi, loc.detach())
    torch.library.opcheck(torch.ops.sdetr_C.kda_backward.default,
                          (torch.randn_like(out), torch.randn_like(weights),
                           *(t.detach() for t in (query, key, value)), ss, lsi, loc.detach()))


def test_baseline_cpu_kernels_match_reference_in_a_subprocess():
    """SDETR_CPU_CAPABILITY=default forces the non-AVX2 kernels, which this machine would not pick."""
    script = (
        "import torch, sdetr.ops as o\n"
        "assert o.compiled_build_info()['cpu_capability'] == 'default'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "ss = torch.tensor([[5, 6], [3, 2]]); lsi = torch.tensor([0, 30])\n"
        "for d in (32, 3):\n"
        "    v = torch.randn(2, 36, 2, d, generator=g, dtype=torch.float64, requires_grad=True)\n"
        "    x = (torch.rand(2, 4, 2, 2, 3, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()\n"
        "    a = torch.rand(2, 4, 2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)\n"
        "    r = o.ms_deform_attn(v, ss, lsi, x, a, backend='reference')\n"
        "    c = o.ms_deform_attn(v, ss, lsi, x, a, backend='compiled')\n"
        "    torch.testing.assert_close(c, r, rtol=1e-10, atol=1e-10)\n"
        "    gr = torch.autograd.grad(r.sum(), (v, x, a)); gc = torch.autograd.grad(c.sum(), (v, x, a))\n"
        "    for p, q in zip(gc, gr): torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)\n"
    )
    root = pathlib.Path(ops.__file__).parents[2]
    env = {**os.environ, "SDETR_CPU_CAPABILITY": "default", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def one_thread():
    """Numerics-only tests of whole models: one thread keeps them fast on a busy 2-core runner
    (every small parallel region otherwise waits for a second core); threads are tested above."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", ["deformable_detr_tiny", "lite_detr_h2l2_2x3_tiny"])  # MSDA; KDA + MSDA
def test_tiny_model_gives_the_same_outputs_with_compiled_and_reference(one_thread, preset):
    from helpers import micro_config, two_images

    from sdetr.models import build

    torch.manual_seed(0)
    ref = build(micro_config(preset, "model.kernel_backend=reference").model)
    comp = build(micro_config(preset, "model.kernel_backend=compiled").model)
    assert (ref.kernel_backend, comp.kernel_backend) == ("reference", "compiled")
    # Grid-init offsets are whole pixels and encoder references pixel centres, so at init every
    # encoder sample sits on a bilinear knot, where d(out)/d(loc) is one-sided and the two backends
    # legitimately pick different sides (the compiled one uses x*W - 0.5 like the official kernel).
    # Move the offsets off the knots to compare gradients.
    with torch.no_grad():
        for name, param in ref.model.named_parameters():
            if name.endswith("sampling_offsets.bias"):
                param.add_(0.1 * torch.randn_like(param))
    comp.model.load_state_dict(ref.model.state_dict())
    images, masks, _ = two_images()
    outputs = [built.model.eval()(images, masks) for built in (ref, comp)]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[1][key], outputs[0][key], rtol=1e-5, atol=1e-5)
    grads = []
    for built, out in zip((ref, comp), outputs):
        (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
        grads.append({n: p.grad for n, p in built.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("sampling_offsets" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()) + 1e-6)
