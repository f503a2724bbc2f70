"""The stem max pool op (3x3 / stride 2 / padding 1, NCHW, CPU): both backends give exactly
``nn.MaxPool2d(3, 2, 1)``'s values, indices and gradients (ties, NaN, borders, tiny maps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdetr import ops
from sdetr.config import load_config
from sdetr.models.builder import build_model
from sdetr.ops import BackendUnavailableError, backends, stem_max_pool

COMPILED = pytest.param("compiled", marks=pytest.mark.skipif(
    not ops.compiled_available(), reason=f"sdetr._C not available: {ops.compiled_build_info()['detail']}"))
BACKENDS = ["reference", COMPILED]
SHAPES = [(2, 16, 37, 52), (2, 3, 8, 6), (1, 2, 1, 1), (1, 1, 2, 3), (3, 2, 5, 1)]


def pool_and_grad(x: torch.Tensor, backend: str | None, grad: torch.Tensor):
    leaf = x.clone().requires_grad_()
    out = stem_max_pool(leaf, backend) if backend else nn.MaxPool2d(3, 2, 1)(leaf)
    out.backward(grad)
    return out.detach(), leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_equal_max_pool2d(backend, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).relu().to(dtype)  # ReLU output: many tied zeros
    out_shape = (shape[0], shape[1], (shape[2] + 1) // 2, (shape[3] + 1) // 2)
    grad = torch.randn(out_shape, generator=gen).to(dtype)
    expected, expected_grad = pool_and_grad(x, None, grad)
    out, out_grad = pool_and_grad(x, backend, grad)
    assert out.shape == out_shape and out.is_contiguous() and out_grad.is_contiguous()
    assert torch.equal(out, expected) and torch.equal(out_grad, expected_grad)
    with torch.no_grad():
        assert torch.equal(stem_max_pool(x, backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_nan_and_all_minus_inf_windows_follow_torch(backend):
    x = torch.randn(2, 3, 9, 10)
    x[0, 0, 2, 3] = x[0, 0, 3, 4] = float("nan")  # two NaNs in one window: the later one wins
    x[1, 2] = float("-inf")  # every window -inf: index of its first in-bounds position
    x[0, 1, :4, :4] = 0.5  # a plateau: ties keep the first position
    expected = torch.ops.aten.max_pool2d_with_indices(x, (3, 3), (2, 2), (1, 1))
    got = backends.get_backend("stem_max_pool", backend).forward(x)
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0].nan_to_num(7.0), expected[0].nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_non_contiguous_input(backend):
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: stem_max_pool(t, backend), (x,))
    wide = torch.randn(2, 4, 12, 10)
    view = wide[:, ::2].transpose(2, 3)  # neither NCHW- nor channels_last-contiguous
    assert torch.equal(stem_max_pool(view, backend), nn.MaxPool2d(3, 2, 1)(view))


@pytest.mark.skipif(not ops.compiled_available(), reason="sdetr._C not available")
def test_compiled_kernel_opcheck_and_thread_count():
    x = torch.randn(2, 6, 15, 11)
    torch.library.opcheck(torch.ops.sdetr_C.stem_max_pool_forward.default, (x,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = torch.ops.sdetr_C.stem_max_pool_forward(x)
    finally:
        torch.set_num_threads(threads)
    parallel = torch.ops.sdetr_C.stem_max_pool_forward(x)
    assert all(torch.equal(s, p) for s, p in zip(serial, parallel))


def test_bad_inputs_and_unknown_backend_raise():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        stem_max_pool(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="CPU tensors only"):
        stem_max_pool(torch.randn(1, 1, 4, 4, device="meta"))
    with pytest.raises(BackendUnavailableError, match="'stem_max_pool'"):
        stem_max_pool(torch.randn(1, 1, 4, 4), backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_model_config_picks_the_stem_pools_backend(backend):
    cfg = load_config("sparse_detr_tiny", [f"model.kernel_backend={backend}"])
    model = build_model(cfg.model)
    assert model.backbone.body.maxpool.backend == backend
