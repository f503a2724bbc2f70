"""Denoising queries (DN-DETR): noise, layout, attention mask, isolation, loss, eval."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_same_matching_outputs, build_micro, refused_at_load, two_images
from sdetr.engine.steps import forward
from sdetr.models.criterion import build_weight_dict
from sdetr.models.box_ops import box_cxcywh_to_xyxy, box_iou
from sdetr.models.denoising import DenoisingPlan, negative_boxes, noise_boxes, noise_labels
from sdetr.models.queries import QuerySet
from sdetr.profiling.params import count_parameters

DN = ["model.dn_groups=3", "model.dn_negatives=false"]  # plain DN (the preset adds negatives)


@pytest.mark.parametrize("override, key", [
    ("model.dn_groups=-1", "model.dn_groups"),
    ("model.dn_label_noise=1.5", "model.dn_label_noise"),
    ("model.dn_box_noise=-0.1", "model.dn_box_noise"),
    ("model.loss.dn_coef=0", "model.loss.dn_coef"),
    ("model.dn_negatives=true model.dn_groups=0", "model.dn_negatives"),
])
def test_impossible_settings_fail_at_load_naming_the_key(override, key):
    refused_at_load("sparse_detr_tiny", override, key)


def test_learned_queries_refuse_denoising():
    refused_at_load("deformable_detr_tiny", DN[0], "model.dn_groups: denoising queries need")


def test_plan_assigns_query_g_m_plus_j_to_target_j():
    plan = DenoisingPlan(groups=2, pad=3, counts=(2, 0, 3))
    (q0, t0), (q1, t1), (q2, t2) = plan.indices()
    assert q0.tolist() == [0, 1, 3, 4] and t0.tolist() == [0, 1, 0, 1]
    assert q1.numel() == 0 and t1.numel() == 0
    assert q2.tolist() == [0, 1, 2, 3, 4, 5] and t2.tolist() == [0, 1, 2, 0, 1, 2]
    assert plan.num_queries == 6


def test_box_noise_stays_within_its_bounds():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2000, 1)
    noised = noise_boxes(boxes, 0.4)
    shift = (noised[:, :2] - boxes[:, :2]).abs()
    assert bool((shift <= 0.4 * boxes[:, 2:] / 2 + 1e-6).all())
    ratio = noised[:, 2:] / boxes[:, 2:]
    assert bool(((ratio >= 0.6 - 1e-6) & (ratio <= 1.4 + 1e-6)).all())
    assert float(shift.max()) > 0.035 and float(ratio.min()) < 0.65, "the noise spans its range"
    assert torch.equal(noise_boxes(boxes, 0.0), boxes)
    assert bool(((noise_boxes(torch.tensor([[0.99, 0.01, 0.5, 0.5]]), 1.0) >= 0)
                 & (noise_boxes(torch.tensor([[0.99, 0.01, 0.5, 0.5]]), 1.0) <= 1)).all())


def test_label_noise_flips_about_the_given_share():
    torch.manual_seed(0)
    labels = torch.full((20000,), 7)
    flipped = (noise_labels(labels, 24, 0.2) != 7).float().mean().item()
    assert 0.2 * 23 / 24 - 0.02 < flipped < 0.2 * 23 / 24 + 0.02
    assert torch.equal(noise_labels(labels, 24, 0.0), labels)


def test_mask_isolates_groups_and_lets_denoising_see_the_matching_queries():
    plan = DenoisingPlan(groups=2, pad=1, counts=(1,))
    base = QuerySet(tgt=torch.zeros(1, 2, 8), query_pos=torch.zeros(1, 2, 8),
                    reference=torch.zeros(1, 2, 4), num_one2one=2)
    queries = base.with_denoising(torch.ones(1, 2, 8), torch.ones(1, 2, 8),
                                  torch.full((1, 2, 4), 0.5), plan)
    assert queries.one2one_size == 2 and queries.num_denoising == 2
    blocked = queries.self_attn_mask()
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 0]],
                            dtype=torch.bool)
    assert torch.equal(blocked, expected)


@pytest.mark.parametrize("preset", ["sparse_detr_tiny", "deformable_detr_two_stage_tiny"])
def test_matching_predictions_do_not_see_the_denoising_queries(preset):
    """Training outputs of the matching queries equal those of the same forward without
    targets (no denoising queries): the self-attention mask isolates them."""
    model = build_micro(preset, *DN).model.train()
    images, masks, targets = two_images()
    with_dn = model(images, masks, targets=targets)
    dn = with_dn["dn_outputs"]
    assert dn["pred_logits"].shape == (2, 3 * 2, 24) and len(dn["aux_outputs"]) == 1
    assert dn["plan"] == DenoisingPlan(groups=3, pad=2, counts=(2, 1))
    without = model(images, masks)
    assert "dn_outputs" not in without
    assert_same_matching_outputs(with_dn, without)


def test_denoising_queries_start_from_the_noised_targets():
    model = build_micro("sparse_detr_tiny", *DN, "model.dn_box_noise=0.0",
                        "model.dn_label_noise=0.0").model.train()
    images, masks, targets = two_images()
    feats = model.extract(images, masks)
    queries = model.select_queries(model.encode(feats), feats, targets)
    dn_ref = queries.reference[:, queries.tgt.shape[1] - queries.num_denoising:]
    for group in range(3):
        torch.testing.assert_close(dn_ref[0, 2 * group:2 * group + 2], targets[0]["boxes"])
        torch.testing.assert_close(dn_ref[1, 2 * group], targets[1]["boxes"][0])
    label_rows = model.denoiser.label_embed.weight
    first = queries.tgt[0, queries.tgt.shape[1] - queries.num_denoising]
    torch.testing.assert_close(first, label_rows[targets[0]["labels"][0]])


def test_denoising_loss_uses_the_fixed_assignment():
    built = build_micro("sparse_detr_tiny", *DN)
    criterion = built.criterion
    images, masks, targets = two_images()
    out = built.model.train()(images, masks, targets=targets)
    losses = criterion(out, targets)
    dn = out["dn_outputs"]
    num_boxes = torch.tensor(3.0 * 3)  # 3 targets in 3 groups
    by_hand = criterion.assigned_losses(dn, targets, dn["plan"].indices(), num_boxes, "_dn")
    for key in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"):
        torch.testing.assert_close(losses[key], by_hand[key])
    assert "loss_ce_dn_0" in losses and criterion.weight_dict["loss_bbox_dn_0"] == 5.0
    # a perfect reconstruction has zero box losses
    perfect = dict(dn)
    boxes = dn["pred_boxes"].detach().clone()
    for b, (q, t) in enumerate(dn["plan"].indices()):
        boxes[b, q] = targets[b]["boxes"][t]
    perfect["pred_boxes"] = boxes
    exact = criterion.assigned_losses(perfect, targets, dn["plan"].indices(), num_boxes, "_dn")
    assert float(exact["loss_bbox_dn"]) == 0.0 and float(exact["loss_giou_dn"]) < 1e-6
    criterion.total_loss(losses).backward()
    assert built.model.denoiser.label_embed.weight.grad.abs().sum() > 0


def test_loss_refuses_a_plan_of_other_targets():
    built = build_micro("sparse_detr_tiny", *DN)
    images, masks, targets = two_images()
    out = built.model.train()(images, masks, targets=targets)
    with pytest.raises(ValueError, match="dn_outputs were built for"):
        built.criterion(out, [targets[1], targets[0]])


def test_weight_dict_scales_the_denoising_keys():
    weights = build_weight_dict(num_dec_aux=1, has_enc=True, num_enc_aux=0, dn_coef=0.5)
    assert weights["loss_ce_dn"] == 1.0 and weights["loss_bbox_dn_0"] == 2.5
    assert "loss_ce_enc_dn" not in weights


def test_eval_has_no_denoising_queries_and_the_training_step_passes_targets():
    built = build_micro("sparse_detr_tiny", *DN)
    images, masks, targets = two_images()
    model = built.model
    with torch.no_grad():
        assert "dn_outputs" not in model.eval()(images, masks, targets=targets)
    out = forward(model.train(), images, masks, torch.bfloat16, targets)
    assert out["dn_outputs"]["pred_boxes"].dtype == torch.float32
    plain = build_micro("sparse_detr_tiny", "model.dn_groups=0",
                        "model.dn_negatives=false").model
    missing = set(model.state_dict()) - set(plain.state_dict())
    assert missing == {"denoiser.label_embed.weight"}
    inference = count_parameters(model).params_inference
    assert inference == count_parameters(plain).params_inference  # training-only


def test_denoising_trains_with_bf16_weights():
    """train.precision=bf16 keeps the weights in bf16: the float32 noised boxes must meet
    them in their dtype (a float32 x bf16 matmul was an error)."""
    model = build_micro("sparse_detr_tiny", *DN).model.train().to(torch.bfloat16)
    images, masks, targets = two_images()
    out = model(images.to(torch.bfloat16), masks, targets=targets)
    assert out["dn_outputs"]["pred_logits"].dtype == torch.bfloat16
    assert out["dn_outputs"]["pred_logits"].shape == (2, 3 * 2, 24)


def test_negative_noise_lies_between_one_and_two_times_the_scale():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(4000, 1)
    negative = negative_boxes(boxes, 0.2)
    shift = (negative[:, :2] - boxes[:, :2]).abs() / (boxes[:, 2:] / 2)
    assert bool(((shift >= 0.2 - 1e-5) & (shift <= 0.4 + 1e-5)).all())
    change = (negative[:, 2:] / boxes[:, 2:] - 1).abs()
    assert bool(((change >= 0.2 - 1e-5) & (change <= 0.4 + 1e-5)).all())
    assert bool((negative[:, :2] < boxes[:, :2]).any()) and bool((negative[:, 2:] > boxes[:, 2:]).any())
    # the positives overlap their target more than the negatives do
    iou = lambda a: box_iou(box_cxcywh_to_xyxy(a[:1]), box_cxcywh_to_xyxy(boxes[:1]))  # noqa: E731
    pos = torch.stack([box_iou(box_cxcywh_to_xyxy(p[None]), box_cxcywh_to_xyxy(boxes[:1]))[0, 0]
                       for p in noise_boxes(boxes[:500], 0.2)])
    neg = torch.stack([box_iou(box_cxcywh_to_xyxy(n[None]), box_cxcywh_to_xyxy(boxes[:1]))[0, 0]
                       for n in negative[:500]])
    assert float(pos.mean()) > float(neg.mean()) + 0.1 and float(iou(boxes)) == 1.0


def test_contrastive_negatives_double_the_groups_and_train_as_no_object():
    built = build_micro("sparse_detr_tiny", *DN, "model.dn_negatives=true",
                        "model.dn_box_noise=0.4", "model.dn_label_noise=0.0")
    model, criterion = built.model.train(), built.criterion
    images, masks, targets = two_images()
    out = model(images, masks, targets=targets)
    dn = out["dn_outputs"]
    plan = dn["plan"]
    assert plan == DenoisingPlan(groups=3, pad=4, counts=(2, 1))  # 2 positives + 2 negatives
    assert dn["pred_logits"].shape == (2, 3 * 4, 24)
    (q0, t0), (q1, _) = plan.indices()
    assert q0.tolist() == [0, 1, 4, 5, 8, 9] and t0.tolist() == [0, 1] * 3 and q1.tolist() == [0, 4, 8]
    feats = model.extract(images, masks)
    queries = model.select_queries(model.encode(feats), feats, targets)
    dn_ref = queries.reference[:, queries.tgt.shape[1] - queries.num_denoising:]
    label_rows = model.denoiser.label_embed.weight
    dn_tgt = queries.tgt[:, queries.tgt.shape[1] - queries.num_denoising:]
    for group in range(3):
        pos, neg = dn_ref[0, 4 * group:4 * group + 2], dn_ref[0, 4 * group + 2:4 * group + 4]
        truth = targets[0]["boxes"]
        assert bool(((neg[:, :2] - truth[:, :2]).abs() >= 0.4 * truth[:, 2:] / 2 - 1e-5).all())
        assert bool(((pos[:, :2] - truth[:, :2]).abs() <= 0.4 * truth[:, 2:] / 2 + 1e-5).all())
        torch.testing.assert_close(dn_tgt[0, 4 * group + 2], label_rows[targets[0]["labels"][0]])
    # negatives are in no assignment: their class target is "no object" like padding's
    losses = criterion(out, targets)
    assert torch.isfinite(criterion.total_loss(losses))
    sure = dict(dn)
    logits = torch.full_like(dn["pred_logits"], -20.0)
    for b, (q, t) in enumerate(plan.indices()):
        logits[b, q, targets[b]["labels"][t]] = 20.0
    sure["pred_logits"] = logits
    num_boxes = torch.tensor(9.0)
    ce = criterion.assigned_losses(sure, targets, plan.indices(), num_boxes, "_dn")["loss_ce_dn"]
    assert float(ce) < 1e-6  # confident on the positives, "no object" on the negatives
    logits[0, 2, targets[0]["labels"][0]] = 20.0  # a negative that claims its object
    ce = criterion.assigned_losses(sure, targets, plan.indices(), num_boxes, "_dn")["loss_ce_dn"]
    assert float(ce) > 0.1
