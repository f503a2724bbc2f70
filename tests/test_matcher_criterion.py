"""Box ops, Hungarian matcher and set criterion (REFERENCE §7.1-7.3)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist

from sdetr.models.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)
from sdetr.models.criterion import (
    SetCriterion,
    build_weight_dict,
    normalised_num_boxes,
    sigmoid_focal_loss,
)
from sdetr.models.matcher import HungarianMatcher

F64 = torch.float64
K = 7  # classes in the toy problems


def _random_targets(gen: torch.Generator, n: int, num_classes: int = K) -> dict[str, torch.Tensor]:
    centres = 0.2 + 0.6 * torch.rand(n, 2, generator=gen, dtype=F64)
    sizes = 0.05 + 0.3 * torch.rand(n, 2, generator=gen, dtype=F64)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return {"labels": labels, "boxes": torch.cat([centres, sizes], dim=1)}


def _perfect_outputs(targets: list[dict], num_queries: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions whose first n queries (shuffled) equal the targets, with confident logits."""
    batch = len(targets)
    logits = torch.full((batch, num_queries, K), -12.0, dtype=F64)
    boxes = torch.rand(batch, num_queries, 4, generator=gen, dtype=F64) * 0.3 + 0.1
    for b, t in enumerate(targets):
        slots = torch.randperm(num_queries, generator=gen)[: len(t["labels"])]
        boxes[b, slots] = t["boxes"]
        logits[b, slots, t["labels"]] = 12.0
    return logits, boxes


def _focal_by_hand(x: float, positive: bool, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    if positive:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def _criterion(weights: dict | None = None) -> SetCriterion:
    weights = weights or build_weight_dict(num_dec_aux=0, has_enc=False, num_enc_aux=0)
    return SetCriterion(K, HungarianMatcher(), weights)


# ----------------------------------------------------------------------------- box ops


def test_box_conversions_hand_values_and_round_trip() -> None:
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [1.0, 2.0, 4.0, 2.0]], dtype=F64)
    xyxy = torch.tensor([[0.4, 0.3, 0.6, 0.7], [-1.0, 1.0, 3.0, 3.0]], dtype=F64)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    batched = torch.rand(2, 3, 4, dtype=F64)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batched)), batched)


def test_iou_and_giou_hand_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]], dtype=F64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]], dtype=F64)
    iou = box_iou(a, b)
    giou = generalized_box_iou(a, b)
    assert iou.shape == giou.shape == (2, 3)
    # overlap 1, union 7, hull 9
    assert iou[0, 0].item() == pytest.approx(1 / 7)
    assert giou[0, 0].item() == pytest.approx(1 / 7 - 2 / 9)
    # disjoint: union 2, hull 3
    assert iou[1, 1].item() == 0.0
    assert giou[1, 1].item() == pytest.approx(-1 / 3)
    # identical and contained
    assert giou[0, 2].item() == pytest.approx(1.0)
    assert iou[1, 2].item() == pytest.approx(0.25)
    assert giou[1, 2].item() == pytest.approx(0.25)
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b[:2]), giou.diagonal())


def test_giou_rejects_degenerate_boxes() -> None:
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.5, 0.0, 0.4, 1.0]])
    with pytest.raises(ValueError, match="boxes2"):
        generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="boxes1"):
        elementwise_generalized_box_iou(torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), good)


# ----------------------------------------------------------------------------- matcher


def test_matcher_recovers_shuffled_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = [_random_targets(gen, 6), _random_targets(gen, 4)]
    logits, boxes = _perfect_outputs(targets, num_queries=9, gen=gen)
    indices = HungarianMatcher()(logits, boxes, targets)
    for b, ((q, t), tgt) in enumerate(zip(indices, targets)):
        assert q.dtype == t.dtype == torch.int64
        assert len(q) == len(tgt["labels"])
        assert torch.all(q[1:] > q[:-1])
        torch.testing.assert_close(boxes[b, q], tgt["boxes"][t])
        assert sorted(t.tolist()) == list(range(len(tgt["labels"])))


def test_matcher_zero_targets_and_fewer_queries_than_targets() -> None:
    gen = torch.Generator().manual_seed(1)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=F64)},
               _random_targets(gen, 5)]
    logits = torch.randn(2, 3, K, generator=gen, dtype=F64)
    boxes = torch.rand(2, 3, 4, generator=gen, dtype=F64) * 0.3 + 0.2
    (q0, t0), (q1, t1) = HungarianMatcher()(logits, boxes, targets)
    assert q0.numel() == t0.numel() == 0 and q0.dtype == torch.int64
    assert sorted(q1.tolist()) == [0, 1, 2]
    assert len(set(t1.tolist())) == 3 and max(t1.tolist()) < 5


def test_matcher_cost_matches_hand_computation_1x1() -> None:
    x, label = 0.7, 3
    logits = torch.full((1, K), -1.0, dtype=F64)
    logits[0, label] = x
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=F64)
    tgt = torch.tensor([[0.55, 0.5, 0.2, 0.3]], dtype=F64)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(logits, pred, torch.tensor([label]), tgt)
    p = 1 / (1 + math.exp(-x))
    cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = 0.05 + 0.1
    giou = 0.03 / 0.07 - (0.075 - 0.07) / 0.075  # inter 0.15*0.2, union .04+.06-.03, hull .25*.3
    assert cost.shape == (1, 1)
    assert cost.item() == pytest.approx(5 * l1 + 2 * cls - 2 * giou, rel=1e-9)


def test_matcher_is_optimal_against_brute_force() -> None:
    gen = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher()
    for _ in range(3):
        targets = [_random_targets(gen, 3)]
        logits = torch.randn(1, 5, K, generator=gen, dtype=F64)
        boxes = torch.rand(1, 5, 4, generator=gen, dtype=F64) * 0.4 + 0.1
        cost = matcher.cost_matrix(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"])
        best = min(sum(cost[q, j].item() for j, q in enumerate(rows)) for rows in itertools.permutations(range(5), 3))
        (q, t), = matcher(logits, boxes, targets)
        assert cost[q, t].sum().item() == pytest.approx(best)


def test_matcher_rejects_bad_labels_and_batch_size() -> None:
    logits, boxes = torch.zeros(1, 2, K), torch.full((1, 2, 4), 0.5)
    bad = [{"labels": torch.tensor([K]), "boxes": torch.full((1, 4), 0.5)}]
    with pytest.raises(ValueError, match="labels"):
        HungarianMatcher()(logits, boxes, bad)
    with pytest.raises(ValueError, match="entries"):
        HungarianMatcher()(logits, boxes, bad * 2)


# ----------------------------------------------------------------------------- criterion


def test_perfect_predictions_give_zero_box_losses() -> None:
    gen = torch.Generator().manual_seed(3)
    targets = [_random_targets(gen, 4), _random_targets(gen, 2)]
    logits, boxes = _perfect_outputs(targets, num_queries=10, gen=gen)
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-12)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < losses["loss_ce"].item() < 1e-4
    assert losses["class_error"].item() == 0.0
    assert losses["cardinality_error"].item() == 0.0


def test_focal_loss_and_box_losses_match_hand_formula() -> None:
    logits = torch.tensor([[[0.3, -1.2, 2.0], [-0.5, 0.1, -2.5]]], dtype=F64)  # (1, 2, 3)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]], dtype=F64)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.3]], dtype=F64)}]
    crit = SetCriterion(3, HungarianMatcher(), build_weight_dict(num_dec_aux=0, has_enc=False, num_enc_aux=0))
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    expected_ce = sum(
        _focal_by_hand(logits[0, q, c].item(), positive=(q == 0 and c == 2)) for q in range(2) for c in range(3)
    )
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-10)
    assert losses["loss_bbox"].item() == pytest.approx(0.15, rel=1e-10)
    assert losses["loss_giou"].item() == pytest.approx(1 - (0.03 / 0.07 - 0.005 / 0.075), rel=1e-10)
    elementwise = sigmoid_focal_loss(logits, torch.zeros_like(logits))
    assert elementwise[0, 1, 2].item() == pytest.approx(_focal_by_hand(-2.5, positive=False), rel=1e-10)


def test_focal_reduction_is_sum_over_all_queries_for_large_q() -> None:
    gen = torch.Generator().manual_seed(4)
    targets = [_random_targets(gen, 3), _random_targets(gen, 2)]
    logits = torch.randn(2, 3000, K, generator=gen, dtype=F64)
    boxes = torch.rand(2, 3000, 4, generator=gen, dtype=F64) * 0.4 + 0.1
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    indices = HungarianMatcher()(logits, boxes, targets)
    onehot = torch.zeros_like(logits)
    for b, (q, t) in enumerate(indices):
        onehot[b, q, targets[b]["labels"][t]] = 1.0
    p = logits.sigmoid()
    ref = torch.where(onehot > 0, -0.25 * (1 - p) ** 2 * p.log(), -0.75 * p**2 * (1 - p).log()).sum() / 5
    assert losses["loss_ce"].item() == pytest.approx(ref.item(), rel=1e-10)


def test_loss_keys_have_suffixes_and_total_loss_weights_them() -> None:
    gen = torch.Generator().manual_seed(5)
    targets = [_random_targets(gen, 3), _random_targets(gen, 1)]

    def head(q: int) -> dict:
        return {"pred_logits": torch.randn(2, q, K, generator=gen, dtype=F64),
                "pred_boxes": torch.rand(2, q, 4, generator=gen, dtype=F64) * 0.4 + 0.1}

    outputs = {**head(6), "aux_outputs": [head(6), head(6)],
               "enc_outputs": {**head(40), "class_specific": False},
               "enc_aux_outputs": [head(8) for _ in range(3)],
               "extra_losses": {"loss_dam": torch.tensor(0.7, dtype=F64)}}
    weights = build_weight_dict(num_dec_aux=2, has_enc=True, num_enc_aux=3, extra={"loss_dam": 1.0})
    crit = _criterion(weights)
    losses = crit(outputs, targets)
    assert set(losses) == set(weights) | {"class_error", "cardinality_error"}
    assert {"loss_ce_1", "loss_giou_enc", "loss_bbox_enc_2", "loss_dam"} <= set(weights)
    assert "loss_ce_enc_3" not in weights and "loss_ce_2" not in weights
    expected = sum(weights[k] * losses[k] for k in weights)
    torch.testing.assert_close(crit.total_loss(losses), expected)
    # 12-set Sparse DETR layout: 6 dec + enc + 5 enc-aux sets, 3 losses each, plus the DAM loss
    assert len(build_weight_dict(num_dec_aux=5, has_enc=True, num_enc_aux=5, extra={"loss_dam": 1.0})) == 37


def test_enc_outputs_class_specific_flag_binarises_labels() -> None:
    targets = [{"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=F64)}]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]], dtype=F64)
    logit0_high = torch.full((1, 2, K), -8.0, dtype=F64)
    logit0_high[0, 0, 0] = 8.0
    class5_high = torch.full((1, 2, K), -8.0, dtype=F64)
    class5_high[0, 0, 5] = 8.0
    weights = build_weight_dict(num_dec_aux=0, has_enc=True, num_enc_aux=0)
    crit = _criterion(weights)

    def enc_loss(logits: torch.Tensor, class_specific: bool) -> float:
        outputs = {"pred_logits": class5_high, "pred_boxes": boxes,
                   "enc_outputs": {"pred_logits": logits, "pred_boxes": boxes, "class_specific": class_specific}}
        return crit(outputs, targets)["loss_ce_enc"].item()

    assert enc_loss(logit0_high, False) < 1e-3 < enc_loss(class5_high, False)
    assert enc_loss(class5_high, True) < 1e-3 < enc_loss(logit0_high, True)
    zero_targets = [{"labels": torch.tensor([0]), "boxes": targets[0]["boxes"]}]
    plain = crit({"pred_logits": class5_high, "pred_boxes": boxes}, zero_targets)["loss_ce"].item()
    assert enc_loss(class5_high, False) == pytest.approx(plain, rel=1e-12)


def test_enc_aux_outputs_use_real_labels() -> None:
    targets = [{"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=F64)}]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]], dtype=F64)
    class5_high = torch.full((1, 1, K), -8.0, dtype=F64)
    class5_high[0, 0, 5] = 8.0
    outputs = {"pred_logits": class5_high, "pred_boxes": boxes,
               "enc_aux_outputs": [{"pred_logits": class5_high, "pred_boxes": boxes}]}
    losses = _criterion()(outputs, targets)
    assert losses["loss_ce_enc_0"].item() == pytest.approx(losses["loss_ce"].item(), rel=1e-12)


def test_enc_outputs_without_class_specific_flag_is_rejected() -> None:
    targets = [{"labels": torch.tensor([1]), "boxes": torch.full((1, 4), 0.3, dtype=F64)}]
    head = {"pred_logits": torch.zeros(1, 2, K, dtype=F64), "pred_boxes": torch.full((1, 2, 4), 0.3, dtype=F64)}
    with pytest.raises(ValueError, match="class_specific"):
        _criterion()({**head, "enc_outputs": dict(head)}, targets)


def test_doubling_the_batch_keeps_the_losses() -> None:
    gen = torch.Generator().manual_seed(6)
    targets = [_random_targets(gen, 3), _random_targets(gen, 5)]
    logits = torch.randn(2, 12, K, generator=gen, dtype=F64)
    boxes = torch.rand(2, 12, 4, generator=gen, dtype=F64) * 0.4 + 0.1
    crit = _criterion()
    single = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    double = crit({"pred_logits": torch.cat([logits, logits]), "pred_boxes": torch.cat([boxes, boxes])}, targets * 2)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"):
        assert double[key].item() == pytest.approx(single[key].item(), rel=1e-12), key


def test_empty_targets_in_one_image_and_in_whole_batch() -> None:
    gen = torch.Generator().manual_seed(7)
    full, empty = _random_targets(gen, 2), {"labels": torch.zeros(0, dtype=torch.int64),
                                             "boxes": torch.zeros(0, 4, dtype=F64)}
    logits = torch.randn(2, 8, K, generator=gen, dtype=F64)
    boxes = torch.rand(2, 8, 4, generator=gen, dtype=F64) * 0.4 + 0.1
    crit = _criterion()
    both = crit({"pred_logits": logits, "pred_boxes": boxes}, [full, empty])
    first = crit({"pred_logits": logits[:1], "pred_boxes": boxes[:1]}, [full])
    second = crit({"pred_logits": logits[1:], "pred_boxes": boxes[1:]}, [empty])
    # sums add; num_boxes is 2 for the pair and for the first image, clamped to 1 for the empty one
    assert both["loss_ce"].item() == pytest.approx(first["loss_ce"].item() + second["loss_ce"].item() / 2)
    assert both["loss_bbox"].item() == pytest.approx(first["loss_bbox"].item())
    assert second["loss_bbox"].item() == 0.0 and second["loss_giou"].item() == 0.0
    logits.requires_grad_(True)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    crit.total_loss(losses).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_gradients_flow_to_every_output_set() -> None:
    gen = torch.Generator().manual_seed(8)
    targets = [_random_targets(gen, 3), _random_targets(gen, 2)]
    params = [torch.randn(2, 6, K + 4, generator=gen, dtype=F64, requires_grad=True) for _ in range(3)]

    def head(p: torch.Tensor) -> dict:
        return {"pred_logits": p[..., :K], "pred_boxes": p[..., K:].sigmoid()}

    outputs = {**head(params[0]), "aux_outputs": [head(params[1])],
               "enc_outputs": {**head(params[2]), "class_specific": True}}
    crit = _criterion(build_weight_dict(num_dec_aux=1, has_enc=True, num_enc_aux=0))
    crit.total_loss(crit(outputs, targets)).backward()
    for p in params:
        assert torch.isfinite(p.grad).all()
        assert p.grad[..., :K].abs().sum() > 0 and p.grad[..., K:].abs().sum() > 0


def test_class_error_counts_wrong_matched_labels() -> None:
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]],
                                                                       dtype=F64)}]
    boxes = targets[0]["boxes"][None].clone()
    logits = torch.full((1, 2, K), -5.0, dtype=F64)
    logits[0, 0, 1] = 5.0  # right class
    logits[0, 1, 4] = 1.0  # wrong class
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["class_error"].item() == pytest.approx(50.0)


def test_build_weight_dict_rejects_clashing_extra() -> None:
    with pytest.raises(ValueError, match="loss_ce"):
        build_weight_dict(num_dec_aux=0, has_enc=False, num_enc_aux=0, extra={"loss_ce": 1.0})


def test_num_boxes_single_process_and_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert normalised_num_boxes([{"labels": torch.zeros(0)}], cpu).item() == 1.0
    assert normalised_num_boxes([{"labels": torch.zeros(3)}, {"labels": torch.zeros(2)}], cpu).item() == 5.0
    # simulate a 2-rank job whose other rank holds 7 boxes: (1 + 7) / 2 = 4
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(7.0))
    assert normalised_num_boxes([{"labels": torch.zeros(1)}], cpu).item() == 4.0
