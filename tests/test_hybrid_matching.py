"""Hybrid matching (H-DETR): training-only one-to-many queries, their mask and their loss."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_same_matching_outputs, build_micro, refused_at_load, two_images
from sdetr.models.criterion import build_weight_dict, repeat_targets
from sdetr.models.queries import QuerySet

O2M = ["model.one2many_queries=12", "model.one2many_repeats=3", "model.dn_groups=0",
       "model.dn_negatives=false"]


@pytest.mark.parametrize("override, key", [
    ("model.one2many_queries=-1", "model.one2many_queries"),
    ("model.one2many_repeats=0", "model.one2many_repeats"),
    ("model.loss.one2many_coef=0", "model.loss.one2many_coef"),
])
def test_impossible_settings_fail_at_load_naming_the_key(override, key):
    refused_at_load("sparse_detr_tiny", override, key)


def test_query_set_mask_blocks_the_two_sets_from_each_other():
    queries = QuerySet(tgt=torch.zeros(1, 5, 8), query_pos=torch.zeros(1, 5, 8),
                       reference=torch.zeros(1, 5, 4), num_one2one=2)
    blocked = queries.self_attn_mask()
    expected = torch.tensor([[0, 0, 1, 1, 1]] * 2 + [[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    assert torch.equal(blocked, expected)
    assert QuerySet(tgt=torch.zeros(1, 2, 8), query_pos=torch.zeros(1, 2, 8),
                    reference=torch.zeros(1, 2, 4), num_one2one=2).self_attn_mask() is None


@pytest.mark.parametrize("preset", ["sparse_detr_tiny", "sparse_lite_detr_tiny",
                                    "deformable_detr_refine_tiny"])
def test_one2one_predictions_do_not_see_the_one2many_queries(preset):
    """Training outputs of the first Q queries equal those of the same weights without the
    branch: the self-attention mask isolates them (and the DAM uses them alone)."""
    built = build_micro(preset, *O2M)
    model = built.model.train()
    images, masks, _ = two_images()
    with_branch = model(images, masks)
    assert with_branch["one2many_outputs"]["pred_logits"].shape == (2, 12, 24)
    assert len(with_branch["one2many_outputs"]["aux_outputs"]) == 1
    model.query_selector.num_one2many = 0
    without = model(images, masks)
    assert "one2many_outputs" not in without
    assert_same_matching_outputs(with_branch, without)


def test_topk_one2many_queries_are_the_next_ranked_tokens():
    model = build_micro("sparse_detr_tiny", *O2M).model.train()
    images, masks, _ = two_images()
    feats = model.extract(images, masks)
    encoded = model.encode(feats)
    queries = model.select_queries(encoded, feats)
    topk = queries.extras["topk_indices"]
    assert topk.shape == (2, 20 + 12) and queries.one2one_size == 20
    scores = queries.enc_outputs["pred_logits"].max(-1).values
    ranked = scores.gather(1, topk)
    assert bool((ranked[:, :-1] >= ranked[:, 1:]).all()), "best first: one-to-one, then one-to-many"


def test_eval_is_the_model_without_the_branch():
    """In eval the branch does not exist: same outputs and, for top-k queries, the same
    parameters as the detector built without it (a hybrid-trained checkpoint loads there)."""
    hybrid = build_micro("sparse_detr_tiny", *O2M).model.eval()
    plain = build_micro("sparse_detr_tiny", "model.dn_groups=0",
                        "model.dn_negatives=false").model.eval()
    plain.load_state_dict(hybrid.state_dict())
    images, masks, _ = two_images()
    with torch.no_grad():
        a, b = hybrid(images, masks), plain(images, masks)
    assert "one2many_outputs" not in a
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


def test_learned_queries_add_training_only_rows():
    built = build_micro("deformable_detr_tiny", *O2M)
    assert built.model.query_selector.query_embed.weight.shape == (20 + 12, 2 * 64)
    images, masks, _ = two_images()
    with torch.no_grad():
        out = built.model.eval()(images, masks)
    assert out["pred_logits"].shape == (2, 20, 24) and "one2many_outputs" not in out


def test_one2many_loss_matches_the_repeated_targets_by_hand():
    built = build_micro("sparse_detr_tiny", *O2M)
    criterion = built.criterion
    images, masks, targets = two_images()
    out = built.model.train()(images, masks)
    losses = criterion(out, targets)
    o2m = out["one2many_outputs"]
    repeated = repeat_targets(targets, 3)
    assert [len(t["labels"]) for t in repeated] == [6, 3]
    num_boxes = torch.tensor(3.0 * 3)  # 3 targets, each seen 3 times
    by_hand = criterion.set_losses(o2m, repeated, num_boxes, "_o2m")
    by_hand.update(criterion.set_losses(o2m["aux_outputs"][0], repeated, num_boxes, "_o2m_0"))
    for key, value in by_hand.items():
        torch.testing.assert_close(losses[key], value)
    indices = criterion.matcher(o2m["pred_logits"], o2m["pred_boxes"], repeated)
    assert [len(q) for q, _ in indices] == [6, 3], "every repeated target gets its own query"
    assert criterion.weight_dict["loss_bbox_o2m_0"] == 5.0
    total = criterion.total_loss(losses)
    total.backward()
    grads = [p.grad for p in built.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_weight_dict_scales_the_one2many_keys():
    weights = build_weight_dict(num_dec_aux=1, has_enc=True, num_enc_aux=0, one2many_coef=0.5)
    assert weights["loss_ce_o2m"] == 1.0 and weights["loss_giou_o2m_0"] == 1.0
    assert "loss_ce_enc_o2m" not in weights and "loss_ce_o2m_enc" not in weights
    assert not any("o2m" in k for k in build_weight_dict(num_dec_aux=1, has_enc=True,
                                                          num_enc_aux=0))


def test_criterion_without_repeats_refuses_one2many_outputs():
    hybrid = build_micro("sparse_detr_tiny", *O2M)
    plain = build_micro("sparse_detr_tiny", "model.dn_groups=0", "model.dn_negatives=false")
    images, masks, targets = two_images()
    out = hybrid.model.train()(images, masks)
    with pytest.raises(ValueError, match="one2many_repeats=0"):
        plain.criterion(out, targets)
