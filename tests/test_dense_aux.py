"""Dense one-to-many supervision of the encoder tokens: geometry, assignment, loss, eval."""

from __future__ import annotations

import pytest
import torch

from helpers import build_micro, refused_at_load, two_images
from sdetr.models.criterion import build_weight_dict
from sdetr.models.dense_aux import dense_assignment
from sdetr.models.proposals import token_grid
from sdetr.models.neck import FeatureSet
from sdetr.profiling.params import count_parameters

DENSE = ["model.dense_aux=true"]


def one_level_feats(height: int, width: int, valid_w: int) -> FeatureSet:
    """A single-level FeatureSet of one image whose right columns past ``valid_w`` are pad."""
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[:, :, valid_w:] = True
    n = height * width
    return FeatureSet(src=torch.zeros(1, n, 8), pos=torch.zeros(1, n, 8),
                      mask=mask.flatten(1), spatial_shapes=torch.tensor([[height, width]]),
                      level_start_index=torch.tensor([0]), valid_ratios=torch.ones(1, 1, 2))


def test_token_grid_is_normalised_to_the_valid_image():
    points, cells, levels = token_grid(one_level_feats(2, 5, valid_w=4))
    assert points.shape == (1, 10, 2) and levels.tolist() == [0] * 10
    torch.testing.assert_close(points[0, :5, 0], torch.tensor([0.125, 0.375, 0.625, 0.875, 1.125]))
    torch.testing.assert_close(points[0, ::5, 1], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(cells[0, 0], torch.tensor([0.25, 0.5]))


def grid(levels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens of square levels: level l has 2^(3-l) cells a side (8, 4, 2, 1)."""
    points, cells, ids = [], [], []
    for lvl in levels:
        side = 2 ** (3 - lvl)
        c = (torch.arange(side) + 0.5) / side
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        points.append(torch.stack((xs.flatten(), ys.flatten()), -1))
        cells.append(torch.full((side * side, 2), 1.0 / side))
        ids.append(torch.full((side * side,), lvl))
    return torch.cat(points), torch.cat(cells), torch.cat(ids)


def test_positives_sit_near_the_centre_on_the_levels_that_fit_the_size():
    points, cells, levels = grid([0, 1, 2, 3])
    invalid = torch.zeros(len(points), dtype=torch.bool)
    # 0.5 x 0.5: 4 cells of level 0, 2 of level 1 (both fit [2, 16]), 1 of level 2 (too few)
    tokens, objects = dense_assignment(points, cells, levels, invalid,
                                       torch.tensor([[0.5, 0.5, 0.5, 0.5]]), num_levels=4)
    assert objects.tolist() == [0] * len(tokens)
    by_level = levels[tokens].tolist()
    assert by_level.count(0) == 4 and by_level.count(1) == 4 and set(by_level) == {0, 1}
    centres = points[tokens[levels[tokens] == 0]]
    assert bool(((centres - 0.5).abs() <= 0.125 + 1e-6).all())  # |d| <= w/4
    # a box smaller than 2 cells of level 0 still gets the level-0 cell that holds its centre
    tokens, _ = dense_assignment(points, cells, levels, invalid,
                                 torch.tensor([[0.30, 0.30, 0.05, 0.05]]), num_levels=4)
    assert levels[tokens].tolist() == [0]
    torch.testing.assert_close(points[tokens[0]], torch.tensor([0.3125, 0.3125]))
    # the whole image spans 1 cell of level 3, too few: levels 0-2 (8, 4, 2 cells) take it
    tokens, _ = dense_assignment(points, cells, levels, invalid,
                                 torch.tensor([[0.5, 0.5, 1.0, 1.0]]), num_levels=4)
    assert set(levels[tokens].tolist()) == {0, 1, 2}
    # more than 16 cells on the coarsest level (here level 1 of 2, cells of 1/32): kept there
    points, cells, _ = grid([0])
    tokens, _ = dense_assignment(points, cells / 4, torch.ones(64, dtype=torch.int64),
                                 torch.zeros(64, dtype=torch.bool),
                                 torch.tensor([[0.5, 0.5, 1.0, 1.0]]), num_levels=2)
    assert tokens.numel() > 0
    tokens, _ = dense_assignment(points, cells / 4, torch.ones(64, dtype=torch.int64),
                                 torch.zeros(64, dtype=torch.bool),
                                 torch.tensor([[0.5, 0.5, 1.0, 1.0]]), num_levels=3)
    assert tokens.numel() == 0  # level 1 is not the coarsest of 3


def test_a_token_in_two_regions_takes_the_smaller_target_and_pad_is_never_positive():
    points, cells, levels = grid([0])
    invalid = torch.zeros(len(points), dtype=torch.bool)
    boxes = torch.tensor([[0.5, 0.5, 0.9, 0.9], [0.5625, 0.5625, 0.3, 0.3]])
    tokens, objects = dense_assignment(points, cells, levels, invalid, boxes, num_levels=1)
    shared = (points[tokens] - 0.5625).abs().amax(-1) <= 0.075
    assert bool(shared.any()) and set(objects[shared].tolist()) == {1}
    assert set(objects.tolist()) == {0, 1}
    invalid[tokens] = True
    again, _ = dense_assignment(points, cells, levels, invalid, boxes, num_levels=1)
    assert again.numel() == 0
    none, empty = dense_assignment(points, cells, levels, invalid, torch.zeros(0, 4))
    assert none.numel() == 0 and empty.numel() == 0


def test_impossible_weight_fails_at_load_naming_the_key():
    refused_at_load("sparse_detr_tiny", "model.loss.dense_coef=0", "model.loss.dense_coef")


def test_weight_dict_scales_the_dense_keys():
    weights = build_weight_dict(num_dec_aux=1, has_enc=True, num_enc_aux=0, dense_coef=0.5)
    assert weights["loss_ce_dense"] == 1.0 and weights["loss_bbox_dense"] == 2.5
    assert weights["loss_giou_dense"] == 1.0
    assert "loss_ce_dense" not in build_weight_dict(num_dec_aux=1, has_enc=True, num_enc_aux=0)


@pytest.mark.parametrize("preset", ["sparse_detr_tiny", "deformable_detr_tiny",
                                    "lite_detr_h3l1_2x3_tiny"])
def test_dense_loss_trains_the_backbone_and_eval_is_unchanged(preset):
    built = build_micro(preset, *DENSE)
    images, masks, targets = two_images()
    model = built.model.train()
    out = model(images, masks, targets=targets)
    dense = out["dense_outputs"]
    assert dense["pred_logits"].shape == (2, dense["points"].shape[1], 24)
    losses = built.criterion(out, targets)
    assert all(torch.isfinite(losses[k]) for k in ("loss_ce_dense", "loss_bbox_dense",
                                                   "loss_giou_dense"))
    assert float(losses["loss_ce_dense"]) > 0 and float(losses["loss_giou_dense"]) > 0
    built.criterion.total_loss(losses).backward()
    assert model.dense_head.class_embed.weight.grad.abs().sum() > 0
    assert next(model.backbone.parameters()).grad.abs().sum() > 0
    plain = build_micro(preset)
    assert set(model.state_dict()) - set(plain.model.state_dict()) == {
        f"dense_head.{k}" for k in model.dense_head.state_dict()}
    plain.model.load_state_dict({k: v for k, v in model.state_dict().items()
                                 if not k.startswith("dense_head.")})
    with torch.no_grad():
        got = model.eval()(images, masks)
        want = plain.model.eval()(images, masks)
    assert "dense_outputs" not in got
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"])
    assert count_parameters(model).params_inference == count_parameters(
        plain.model).params_inference


def test_padding_tokens_add_nothing_to_the_dense_loss():
    built = build_micro("sparse_detr_tiny", *DENSE)
    images, masks, targets = two_images()
    out = built.model.train()(images, masks, targets=targets)
    dense = dict(out["dense_outputs"])
    logits = dense["pred_logits"].detach().clone()
    base = built.criterion.dense_losses(dense, targets)["loss_ce_dense"]
    logits[dense["invalid"]] = 50.0  # confident, wrong scores at the pad
    dense["pred_logits"] = logits
    torch.testing.assert_close(built.criterion.dense_losses(dense, targets)["loss_ce_dense"],
                               base.detach())
