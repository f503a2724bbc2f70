"""BatchNorm folding (sdetr.models.fuse): a folded copy of a tiny detector gives the same eval
outputs within 1e-4 (trainable BatchNorm and FrozenBatchNorm2d backbones, with random running
statistics and affine parameters), leaves no BatchNorm in the backbone, leaves the original
untouched and cannot be trained; pairs are found by structure only."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch
from torch import nn

from helpers import micro_config
from sdetr.models import build
from sdetr.models.backbone import FrozenBatchNorm2d
from sdetr.models.fuse import FoldedBatchNorm, conv_bn_pairs, fold_batch_norm, folded_conv

BN_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (a shared 2-core machine: see tests/test_profiling.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def _randomise_batch_norms(model: nn.Module, seed: int = 0) -> int:
    """Non-trivial running stats and affine parameters in every BatchNorm; returns their count."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for m in model.modules():
        if isinstance(m, BN_TYPES):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.copy_(0.2 * torch.randn(n, generator=gen))
            count += 1
    return count


def _tensor_leaves(out: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        yield prefix, out
    elif isinstance(out, dict):
        for key, value in out.items():
            yield from _tensor_leaves(value, f"{prefix}.{key}")
    elif isinstance(out, (list, tuple)):
        for i, value in enumerate(out):
            yield from _tensor_leaves(value, f"{prefix}[{i}]")


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 128, 160, generator=gen)
    masks = torch.zeros(2, 128, 160, dtype=torch.bool)
    masks[1, :, 128:] = True
    images[1, :, :, 128:] = 0
    return images, masks


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_folded_detector_matches_within_1e4(frozen_bn):
    cfg = micro_config("sparse_detr_tiny", f"model.backbone.frozen_bn={str(frozen_bn).lower()}")
    torch.manual_seed(0)
    model = build(cfg.model).model
    assert _randomise_batch_norms(model) == 20  # ResNet-18: stem + 8 blocks x 2 + 3 downsamples
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold_batch_norm(model)
    assert len(report.folded) == 20 and report.unfolded == ()
    assert not any(isinstance(m, BN_TYPES) for m in folded.backbone.modules())
    images, masks = _inputs()
    with torch.no_grad():
        ref = dict(_tensor_leaves(model(images, masks)))
        out = dict(_tensor_leaves(folded(images, masks)))
    assert {".pred_logits", ".pred_boxes"} <= set(ref) and any("aux_outputs" in k for k in ref)
    assert set(out) == set(ref)
    for key, value in ref.items():
        assert out[key].shape == value.shape, key
        if value.is_floating_point():
            assert (out[key] - value).abs().max().item() < 1e-4, key
        else:
            assert torch.equal(out[key], value), key
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(isinstance(m, BN_TYPES) for m in model.backbone.modules()) == 20


def test_folded_model_refuses_training_and_inplace_folds_the_model_itself():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    _randomise_batch_norms(model)
    same, report = fold_batch_norm(model, inplace=True)
    assert same is model and isinstance(model[1], FoldedBatchNorm) and report.folded == ("1",)
    assert not model.training
    with pytest.raises(RuntimeError, match="training mode"):
        model.train()(torch.randn(1, 3, 5, 5))


class _Block(nn.Module):
    """conv1 → bn1 (foldable by name); proj → norm (not a conv<k>/bn<k> pair: left alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(4)
        self.proj = nn.Conv2d(4, 4, 1)
        self.norm = nn.BatchNorm2d(4)
        self.down = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.proj(self.bn1(self.conv1(x)))))


def test_pairs_are_found_by_structure_only():
    block = _Block()
    _randomise_batch_norms(block)
    assert conv_bn_pairs(block) == [("", "conv1", "bn1")]
    folded, report = fold_batch_norm(block)
    assert report.folded == ("bn1",) and report.unfolded == ("norm", "down.2")
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        assert torch.allclose(folded(x), block.eval()(x), atol=1e-5)


def test_folded_conv_with_bias_grouped_and_non_affine_bn():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True).double()
    bn = nn.BatchNorm2d(6, affine=False).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6))
        bn.running_var.copy_(0.5 + torch.rand(6))
    fused = folded_conv(conv, bn)
    assert fused.weight.dtype == torch.float64 and not fused.weight.requires_grad
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fused(x), bn(conv(x)), atol=1e-12)
