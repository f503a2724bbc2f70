"""Top-k query selection without near-duplicate proposals (``model.query_nms``)."""

from __future__ import annotations

import pytest
import torch

from sdetr.config import ConfigError, load_config
from sdetr.models import build
from sdetr.models.box_ops import box_cxcywh_to_xyxy, box_iou
from sdetr.models.query_nms import nms_topk, overlaps_above


def _greedy_reference(score: torch.Tensor, boxes: torch.Tensor, thr: float, m: int) -> list[int]:
    """Fast NMS written out per candidate: j is dropped if any better candidate overlaps it."""
    best = torch.argsort(score, descending=True)[:m].tolist()
    xyxy = box_cxcywh_to_xyxy(boxes)
    kept, dropped = [], []
    for rank, j in enumerate(best):
        over = [float(box_iou(xyxy[i:i + 1], xyxy[j:j + 1])) for i in best[:rank]]
        (dropped if over and max(over) > thr else kept).append(j)
    return kept + dropped


def test_overlap_test_agrees_with_box_iou():
    gen = torch.Generator().manual_seed(0)
    xyxy = box_cxcywh_to_xyxy(torch.rand(2, 40, 4, generator=gen) * 0.5 + 0.2)
    for thr in (0.3, 0.5, 0.7):
        over = overlaps_above(xyxy, thr)
        for b in range(2):
            iou = box_iou(xyxy[b], xyxy[b])
            clear = (iou - thr).abs() > 1e-6  # away from the threshold's rounding
            assert torch.equal(over[b][clear], (iou > thr)[clear])
            assert 0 < int(over[b].sum()) < 40 * 40
    empty = torch.zeros(1, 2, 4)
    assert not overlaps_above(empty, 0.5).any()


def test_duplicates_are_passed_over_and_best_first():
    # tokens 0..3: one object seen four times (scores .9 .8 .7 .6), token 4 another object
    boxes = torch.tensor([[[.30, .30, .20, .20], [.31, .30, .20, .20], [.30, .31, .21, .20],
                           [.30, .30, .19, .19], [.70, .70, .20, .20]]])
    score = torch.tensor([[.9, .8, .7, .6, .5]])
    assert nms_topk(score, boxes, 2, 0.7, candidates=5).tolist() == [[0, 4]]
    # more queries than distinct boxes: the dropped ones follow in score order
    assert nms_topk(score, boxes, 4, 0.7, candidates=5).tolist() == [[0, 4, 1, 2]]
    # without suppression the plain top-k
    assert nms_topk(score, boxes, 2, 0.999, candidates=5).tolist() == [[0, 1]]


def test_matches_the_per_candidate_rule_on_random_boxes():
    gen = torch.Generator().manual_seed(1)
    score = torch.rand(3, 60, generator=gen)
    boxes = torch.cat((torch.rand(3, 60, 2, generator=gen),
                       torch.rand(3, 60, 2, generator=gen) * 0.4 + 0.05), -1)
    got = nms_topk(score, boxes, 10, 0.5, candidates=40)
    for b in range(3):
        assert got[b].tolist() == _greedy_reference(score[b], boxes[b], 0.5, 40)[:10]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, 40:] = True
    return torch.randn(2, 3, 64, 96, generator=gen), masks


def test_the_detector_selects_through_it_in_train_and_eval():
    torch.manual_seed(0)
    cfg = load_config("sparse_detr_tiny", ["model.num_queries=10", "model.query_nms=0.2"])
    model = build(cfg.model).model
    with torch.no_grad():  # proposals 3/4 of the image wide: neighbours overlap
        model.query_selector.bbox_embed.layers[-1].bias[2:] = 4.0
    images, masks = _batch()
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            feats = model.extract(images, masks)
            encoded = model.encode(feats)
            queries = model.select_queries(encoded, feats)
        enc = queries.enc_outputs
        score = enc["pred_logits"].max(-1).values
        topk = queries.extras["topk_indices"]
        assert torch.equal(topk, nms_topk(score, enc["pred_boxes"], 10, 0.2, candidates=40))
        plain = score.topk(10, dim=1).indices
        assert torch.equal(topk[:, 0], plain[:, 0])
        assert not torch.equal(topk, plain)  # something was passed over
        torch.testing.assert_close(queries.reference, torch.gather(
            enc["pred_boxes"], 1, topk.unsqueeze(-1).expand(-1, -1, 4)))


def test_off_by_default_and_validated():
    assert load_config("sparse_detr_r50").model.query_nms is None  # the papers' plain top-k
    assert load_config("efficient_detr_tiny").model.query_nms is None
    assert load_config("sparse_detr_tiny").model.query_nms == 0.5
    for bad in ("0", "1.0", "1.5"):
        with pytest.raises(ConfigError, match="model.query_nms"):
            load_config("sparse_detr_tiny", [f"model.query_nms={bad}"])
    with pytest.raises(ConfigError, match="model.query_nms.*learned"):
        load_config("deformable_detr_tiny", ["model.query_nms=0.7"])
    cfg = load_config("deformable_detr_two_stage_tiny", ["model.query_nms=0.7"])
    assert build(cfg.model).model.query_selector.nms_iou == 0.7
