"""Tests of sdetr.ops: the MSDA reference, the custom op (autograd, opcheck) and backend resolution."""

from __future__ import annotations

import ast
import math
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sdetr.ops as ops
from sdetr.ops import BackendUnavailableError, backends

SHAPES = [(4, 5), (1, 6), (3, 2)]  # includes a 1 x k level
B, M, D, Q, P = 2, 2, 3, 5, 2


def _level_tensors(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def _random_inputs(shapes, batch=B, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, n = _level_tensors(shapes)
    levels = len(shapes)
    value = torch.randn(batch, n, M, D, generator=gen, dtype=dtype)
    # Locations in [-0.25, 1.25]: some fall partly or fully outside the map.
    loc = torch.rand(batch, Q, M, levels, P, 2, generator=gen, dtype=dtype) * 1.5 - 0.25
    attn = torch.rand(batch, Q, M, levels, P, generator=gen, dtype=dtype)
    return value, spatial_shapes, level_start_index, loc, attn


def _naive_msda(value, shapes, starts, loc, attn):
    """Per-sample python loop: pixel coordinate (x*W - 0.5, y*H - 0.5), zero outside."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = loc.shape
    out = torch.zeros(batch, queries, heads, channels, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl in range(levels):
                    h, w = shapes[lvl]
                    for p in range(points):
                        x = loc[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = loc[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(channels, dtype=value.dtype)
                        for xx, yy, wt in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                                           (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
                            if 0 <= xx < w and 0 <= yy < h:
                                sample += wt * value[b, starts[lvl] + yy * w + xx, m]
                        out[b, q, m] += attn[b, q, m, lvl, p] * sample
    return out.reshape(batch, queries, heads * channels)


def test_reference_matches_naive_loop_with_outside_and_centre_points():
    value, ss, lsi, loc, attn = _random_inputs(SHAPES)
    # Put some points exactly on pixel centres, one on the outer corner and one far outside.
    for lvl, (h, w) in enumerate(SHAPES):
        loc[0, 1, 0, lvl, 0] = torch.tensor([(w - 1 + 0.5) / w, (h - 1 + 0.5) / h], dtype=loc.dtype)
        loc[1, 2, 1, lvl, 1] = torch.tensor([0.5 / w, 0.5 / h], dtype=loc.dtype)
    loc[0, 3, 1, 0, 0] = torch.tensor([0.0, 0.0], dtype=loc.dtype)
    loc[1, 4, 0, 2, 1] = torch.tensor([1.7, -0.6], dtype=loc.dtype)
    expected = _naive_msda(value, SHAPES, lsi.tolist(), loc, attn)
    got = ops.ms_deform_attn_pytorch(value, ss, lsi, loc, attn)
    assert got.shape == (B, Q, M * D)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.ms_deform_attn(value, ss, lsi, loc, attn, backend="reference"), expected,
                               rtol=1e-12, atol=1e-12)


def test_pixel_centre_samples_exactly_and_corner_quarter_weight():
    shapes = [(3, 4)]
    ss, lsi, n = _level_tensors(shapes)
    value = torch.randn(1, n, 1, 2, dtype=torch.float64)
    loc = torch.tensor([[(2 + 0.5) / 4, (1 + 0.5) / 3], [0.0, 0.0]], dtype=torch.float64)  # pixel (r1,c2); edge
    loc = loc.view(1, 2, 1, 1, 1, 2)
    attn = torch.ones(1, 2, 1, 1, 1, dtype=torch.float64)
    out = ops.ms_deform_attn(value, ss, lsi, loc, attn)
    torch.testing.assert_close(out[0, 0], value[0, 1 * 4 + 2, 0], rtol=1e-12, atol=1e-12)
    # (0, 0) is the outer corner: pixel coordinate (-0.5, -0.5) -> only pixel (0, 0) with weight 1/4.
    torch.testing.assert_close(out[0, 1], 0.25 * value[0, 0, 0], rtol=1e-12, atol=1e-12)


def test_batch_one_matches_batch_two():
    value, ss, lsi, loc, attn = _random_inputs(SHAPES, seed=1)
    full = ops.ms_deform_attn(value, ss, lsi, loc, attn)
    for b in range(B):
        single = ops.ms_deform_attn(value[b:b + 1], ss, lsi, loc[b:b + 1], attn[b:b + 1])
        torch.testing.assert_close(single[0], full[b], rtol=1e-12, atol=1e-12)


def test_zero_size_level_contributes_nothing_and_gets_zero_gradient():
    shapes = [(2, 3), (0, 4), (1, 2)]
    value, ss, lsi, loc, attn = _random_inputs(shapes, seed=2)
    out = ops.ms_deform_attn_pytorch(value, ss, lsi, loc, attn)
    torch.testing.assert_close(out, _naive_msda(value, shapes, lsi.tolist(), loc, attn), rtol=1e-12, atol=1e-12)
    keep = [0, 2]
    ss2, lsi2, _ = _level_tensors([shapes[i] for i in keep])
    without = ops.ms_deform_attn_pytorch(value, ss2, lsi2, loc[:, :, :, keep], attn[:, :, :, keep])
    torch.testing.assert_close(out, without, rtol=1e-12, atol=1e-12)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    ops.ms_deform_attn(value, ss, lsi, loc, attn).sum().backward()
    assert torch.all(loc.grad[:, :, :, 1] == 0) and torch.all(attn.grad[:, :, :, 1] == 0)


def test_bad_inputs_raise_naming_the_culprit():
    value, ss, lsi, loc, attn = _random_inputs(SHAPES)
    with pytest.raises(ValueError, match="attention_weights"):
        ops.ms_deform_attn(value, ss, lsi, loc, attn[..., :1])
    with pytest.raises(ValueError, match="spatial_shapes"):
        ops.ms_deform_attn(value, ss.int(), lsi, loc, attn)
    with pytest.raises(ValueError, match="share a dtype"):
        ops.ms_deform_attn(value.float(), ss, lsi, loc, attn)
    with pytest.raises(ValueError, match="N = 31"):
        ops.ms_deform_attn_pytorch(value[:, 1:], ss, lsi, loc, attn)


def _smooth_inputs(seed: int = 3):
    """Float64 inputs whose pixel coordinates stay >= 0.2 px away from integers (no bilinear kinks)."""
    shapes = [(2, 3), (3, 2)]
    gen = torch.Generator().manual_seed(seed)
    ss, lsi, n = _level_tensors(shapes)
    batch, queries, levels = 2, 3, len(shapes)
    value = torch.randn(batch, n, M, 2, generator=gen, dtype=torch.float64)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(1, 1, 1, levels, 1, 2)
    cell = torch.randint(-1, 3, (batch, queries, M, levels, P, 2), generator=gen).to(torch.float64)
    frac = 0.2 + 0.6 * torch.rand(batch, queries, M, levels, P, 2, generator=gen, dtype=torch.float64)
    loc = (cell + frac + 0.5) / size  # pixel coordinate x*W - 0.5 = cell + frac
    attn = torch.rand(batch, queries, M, levels, P, generator=gen, dtype=torch.float64)
    return value, ss, lsi, loc, attn


def test_gradcheck_through_custom_op():
    value, ss, lsi, loc, attn = _smooth_inputs()
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    assert torch.autograd.gradcheck(lambda v, x, a: ops.ms_deform_attn(v, ss, lsi, x, a), inputs)


def test_custom_op_gradient_equals_autograd_of_reference():
    value, ss, lsi, loc, attn = _random_inputs(SHAPES, seed=4)
    grad_out = torch.randn(B, Q, M * D, dtype=torch.float64)
    op_leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    ops.ms_deform_attn(op_leaves[0], ss, lsi, op_leaves[1], op_leaves[2]).backward(grad_out)
    ref_leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    ref_out = ops.ms_deform_attn_pytorch(ref_leaves[0], ss, lsi, ref_leaves[1], ref_leaves[2])
    expected = torch.autograd.grad(ref_out, ref_leaves, grad_out)
    for leaf, exp in zip(op_leaves, expected):
        torch.testing.assert_close(leaf.grad, exp, rtol=1e-12, atol=1e-12)


def test_opcheck_forward_and_backward_ops():
    value, ss, lsi, loc, attn = _smooth_inputs(seed=5)
    args = (value.requires_grad_(True), ss, lsi, loc.requires_grad_(True), attn.requires_grad_(True), "reference")
    torch.library.opcheck(torch.ops.sdetr.ms_deform_attn.default, args)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64)
    plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(torch.ops.sdetr.ms_deform_attn_backward.default, (grad_out, *plain),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_forward_and_backward_run_under_flop_counter_mode():
    value, ss, lsi, loc, attn = _random_inputs(SHAPES, seed=6)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    with FlopCounterMode(display=False):
        ops.ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2]).sum().backward()
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)


def test_autocast_runs_op_in_float32():
    value, ss, lsi, loc, attn = _random_inputs(SHAPES, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.ms_deform_attn(value.bfloat16(), ss, lsi, loc, attn.bfloat16())
    assert out.dtype == torch.float32


def test_compiles_fullgraph():
    value, ss, lsi, loc, attn = _random_inputs(SHAPES, seed=7)
    compiled = torch.compile(lambda v, x, a: ops.ms_deform_attn(v, ss, lsi, x, a), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(value, loc, attn), ops.ms_deform_attn_pytorch(value, ss, lsi, loc, attn))


# ----------------------------------------------------------------------------- backend resolution


@pytest.fixture
def registry(monkeypatch):
    """Isolate registry changes made by a test (restored afterwards)."""
    monkeypatch.setattr(backends, "_REGISTRY", {op: dict(impls) for op, impls in backends._REGISTRY.items()})
    monkeypatch.setattr(backends, "_default", None)
    return backends._REGISTRY


def test_reference_backends_registered_and_reported(registry):
    assert "reference" in ops.available_backends("ms_deform_attn")
    assert "reference" in ops.available_backends("dam_splat")
    assert ops.available_backends("no_such_op") == []
    with ops.use_backend("reference"):
        assert ops.backend_report() == {"ms_deform_attn": "reference", "dam_splat": "reference",
                                        "kda": "reference", "stem_max_pool": "reference"}
    registry.pop("dam_splat")
    registry.pop("kda")
    registry.pop("stem_max_pool")
    registry["ms_deform_attn"].pop("compiled", None)
    assert ops.backend_report() == {"ms_deform_attn": "reference"}


def test_automatic_choice_prefers_compiled_when_registered(registry):
    for op in ("ms_deform_attn", "dam_splat", "kda", "stem_max_pool"):
        registry[op].pop("compiled", None)
    assert ops.resolve_backend("ms_deform_attn") == "reference"
    backends.register_backend("ms_deform_attn", "compiled", ops.ms_deform_attn_pytorch, None)
    assert ops.resolve_backend("ms_deform_attn") == "compiled"
    assert ops.resolve_backend("ms_deform_attn", "auto") == "compiled"
    assert ops.backend_report() == {"ms_deform_attn": "compiled", "dam_splat": "reference",
                                    "kda": "reference", "stem_max_pool": "reference"}
    with ops.use_backend("compiled"):  # dam_splat has no compiled backend: raise, never fall back
        with pytest.raises(BackendUnavailableError, match="'compiled'.*'dam_splat'"):
            ops.resolve_backend("dam_splat")


def test_unknown_backend_raises_naming_op_backend_and_available(registry):
    with pytest.raises(BackendUnavailableError) as err:
        ops.resolve_backend("ms_deform_attn", "nope")
    message = str(err.value)
    assert "'nope'" in message and "'ms_deform_attn'" in message and "'reference'" in message
    assert "\n" not in message and isinstance(err.value, RuntimeError)
    value, ss, lsi, loc, attn = _random_inputs(SHAPES)
    with pytest.raises(BackendUnavailableError, match="nope"):
        ops.ms_deform_attn(value, ss, lsi, loc, attn, backend="nope")
    with pytest.raises(BackendUnavailableError, match="nope"):
        ops.set_default_backend("nope")
    with pytest.raises(BackendUnavailableError, match="unknown op 'no_such_op'"):
        ops.resolve_backend("no_such_op")


def test_use_backend_restores_default_and_explicit_argument_wins(registry):
    calls = []

    def spy_forward(*args):
        calls.append(len(args))
        return ops.ms_deform_attn_pytorch(*args)

    backends.register_backend("ms_deform_attn", "spy", spy_forward, None)
    value, ss, lsi, loc, attn = _random_inputs(SHAPES)
    ops.set_default_backend("reference")
    with ops.use_backend("spy"):
        assert ops.resolve_backend("ms_deform_attn") == "spy"
        out = ops.ms_deform_attn(value, ss, lsi, loc, attn)  # dispatched through the registry
        assert calls == [5]
        ops.ms_deform_attn(value, ss, lsi, loc, attn, backend="reference")  # explicit argument wins
        assert calls == [5]
    assert backends.get_default_backend() == "reference"
    with pytest.raises(KeyError):
        with ops.use_backend("spy"):
            raise KeyError("boom")
    assert backends.get_default_backend() == "reference"
    ops.set_default_backend("auto")
    assert backends.get_default_backend() is None
    torch.testing.assert_close(out, ops.ms_deform_attn_pytorch(value, ss, lsi, loc, attn))


def test_backend_without_backward_raises_on_backward(registry):
    backends.register_backend("ms_deform_attn", "fwd_only", ops.ms_deform_attn_pytorch, None)
    value, ss, lsi, loc, attn = _random_inputs(SHAPES)
    out = ops.ms_deform_attn(value.requires_grad_(True), ss, lsi, loc, attn, backend="fwd_only")
    with pytest.raises(BackendUnavailableError, match="'fwd_only'.*no backward"):
        out.sum().backward()


# ----------------------------------------------------------------------------- packaging


def test_ops_import_nothing_else_from_sdetr():
    ops_dir = pathlib.Path(ops.__file__).parent
    for path in ops_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from a parent package"
                module = node.module or ""
                assert node.level == 1 or not module.startswith("sdetr") or module.startswith(
                    ("sdetr.ops", "sdetr._C")), f"{path.name} imports {module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("sdetr") or alias.name.startswith(
                        ("sdetr.ops", "sdetr._C")), f"{path.name} imports {alias.name}"


def test_reimport_and_reload_are_idempotent():
    script = (
        "import importlib, torch, sdetr.ops\n"
        "names = ['sdetr.ops.backends', 'sdetr.ops.ms_deform_attn', 'sdetr.ops.dam_splat', 'sdetr.ops']\n"
        "for name in names: importlib.reload(importlib.import_module(name))\n"
        "import sdetr.ops as o\n"
        "assert o.available_backends('ms_deform_attn') == ['reference'], o.available_backends('ms_deform_attn')\n"
        "ss = torch.tensor([[2, 2]]); lsi = torch.tensor([0])\n"
        "v = torch.randn(1, 4, 1, 2, requires_grad=True); loc = torch.rand(1, 3, 1, 1, 1, 2)\n"
        "a = torch.rand(1, 3, 1, 1, 1)\n"
        "o.ms_deform_attn(v, ss, lsi, loc, a).sum().backward(); assert v.grad is not None\n"
        "assert o.dam_splat(loc, a, ss, lsi, 4).shape == (1, 4)\n"
    )
    root = pathlib.Path(ops.__file__).parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
