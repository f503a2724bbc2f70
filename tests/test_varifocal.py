"""Varifocal classification loss (model.loss.cls_loss=varifocal) and the matched-pair IoU."""

from __future__ import annotations

import math

import pytest
import torch

from sdetr.config import ConfigError, load_config
from sdetr.models.box_ops import box_iou, elementwise_box_iou
from sdetr.models.builder import build_criterion
from sdetr.models.criterion import SetCriterion, build_weight_dict, varifocal_loss
from sdetr.models.matcher import HungarianMatcher

F64 = torch.float64


def _bce(x: float, t: float) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _vfl_by_hand(x: float, q: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Positive (q > 0): q * BCE(x, q); negative: (1 - alpha) p^gamma BCE(x, 0)."""
    p = 1.0 / (1.0 + math.exp(-x))
    return q * _bce(x, q) if q > 0 else (1 - alpha) * p**gamma * _bce(x, 0.0)


def _criterion(cls_loss: str) -> SetCriterion:
    return SetCriterion(3, HungarianMatcher(), build_weight_dict(num_dec_aux=0, has_enc=False,
                                                                 num_enc_aux=0),
                        cls_loss=cls_loss)


def test_elementwise_iou_is_the_diagonal_of_pairwise_iou() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(6, 2, generator=gen, dtype=F64)
    b = torch.rand(6, 2, generator=gen, dtype=F64)
    x = torch.cat([a, a + torch.rand(6, 2, generator=gen, dtype=F64)], 1)
    y = torch.cat([b, b + torch.rand(6, 2, generator=gen, dtype=F64)], 1)
    torch.testing.assert_close(elementwise_box_iou(x, y), box_iou(x, y).diag())


def test_varifocal_matches_the_hand_formula_with_the_box_iou_as_target() -> None:
    logits = torch.tensor([[[0.3, -1.2, 2.0], [-0.5, 0.1, -2.5]]], dtype=F64)  # (1, 2, 3)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]], dtype=F64)
    targets = [{"labels": torch.tensor([2]),
                "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.3]], dtype=F64)}]
    losses = _criterion("varifocal")({"pred_logits": logits, "pred_boxes": boxes}, targets)
    iou = 0.03 / 0.07  # query 0 (x 0.4-0.6, y 0.4-0.6) against x 0.45-0.65, y 0.35-0.65
    expected = sum(_vfl_by_hand(logits[0, q, c].item(), iou if (q, c) == (0, 2) else 0.0)
                   for q in range(2) for c in range(3))
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-10)
    focal = _criterion("focal")({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert focal["loss_ce"].item() != pytest.approx(expected, rel=1e-3)
    for key in ("loss_bbox", "loss_giou", "class_error"):
        assert losses[key].item() == pytest.approx(focal[key].item(), rel=1e-12)


def test_varifocal_pushes_a_well_placed_box_higher_than_a_badly_placed_one() -> None:
    """Same logit, two matched queries (IoU 1 and 4/9): the gradient raises the score of the
    exact one more; at a score above its IoU a query is pushed down."""
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.72, 0.7, 0.2, 0.2]]], dtype=F64)
    targets = [{"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.3]], dtype=F64)}]
    logits = torch.full((1, 2, 3), -2.0, dtype=F64, requires_grad=True)  # p = 0.12 < both IoUs
    crit = _criterion("varifocal")
    crit.total_loss(crit({"pred_logits": logits, "pred_boxes": boxes}, targets)).backward()
    assert logits.grad[0, 0, 0] < logits.grad[0, 1, 1] < 0  # both pushed up, the exact one more
    high = torch.full((1, 2, 3), 3.0, dtype=F64, requires_grad=True)  # p = 0.95 > both IoUs
    crit.total_loss(crit({"pred_logits": high, "pred_boxes": boxes}, targets)).backward()
    assert high.grad[0, 1, 1] > 0


def test_varifocal_negatives_equal_the_focal_negatives() -> None:
    logits = torch.linspace(-4, 4, 9, dtype=F64).reshape(1, 3, 3)
    quality = torch.zeros_like(logits)
    for x, value in zip(logits.flatten().tolist(), varifocal_loss(logits, quality).flatten()):
        assert value.item() == pytest.approx(_vfl_by_hand(x, 0.0), rel=1e-10)


def test_cls_loss_is_a_validated_config_key() -> None:
    cfg = load_config("sparse_detr_tiny", ["model.loss.cls_loss=varifocal"])
    assert build_criterion(cfg.model).cls_loss == "varifocal"
    assert build_criterion(load_config("sparse_detr_r50").model).cls_loss == "focal"
    with pytest.raises(ConfigError, match="cls_loss"):
        load_config("sparse_detr_tiny", ["model.loss.cls_loss=softmax"])
    with pytest.raises(ValueError, match="cls_loss"):
        _criterion("softmax")
