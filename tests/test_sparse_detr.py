"""Sparse DETR: token selection, sparse encoder, DAM target/loss, Corr, criteria, rho sweep,
official checkpoints, parameter counts and a two-image overfit (CPU, tiny configs)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdetr.config import load_config
from sdetr.models import CheckpointError, build, build_model, load_official_checkpoint
from sdetr.models.decoder import DecoderOutput
from sdetr.models.detector import EncoderOutput
from sdetr.models.neck import FeatureSet
from sdetr.models.official import _PREFIXES, HeadLayout
from sdetr.models.queries import QuerySet
from sdetr.models.sparse import (SparseDETR, TokenSelection, dam_loss, dam_target,
                                 decoder_attention_map, keep_counts, select_tokens)
from sdetr.models.sparse.dam import CORR_PREFIX
from sdetr.profiling import count_parameters

KEYS_FILE = Path("/work/shared/design/official_keys/r50_sparse_detr_rho_0.1_keys.txt")
H, W = 64, 96


def _batch(padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images (2, 3, 64, 96); image 1 is 48x64 padded to 64x96 unless ``padded`` is False."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, H, W, generator=gen)
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    if padded:
        masks[1, 48:] = True
        masks[1, :, 64:] = True
        images[1][masks[1].expand(3, -1, -1)] = 0.0
    return images, masks


def _targets() -> list[dict[str, torch.Tensor]]:
    return [{"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[.3, .3, .2, .2], [.7, .6, .3, .4]])},
            {"labels": torch.tensor([7]), "boxes": torch.tensor([[.5, .5, .4, .3]])}]


def _tiny(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config("sparse_detr_tiny", ["model.num_queries=30", *overrides]).model
    return build(cfg)


# ------------------------------------------------------------------------------ selection


def test_selected_count_is_floor_rho_valid_plus_one():
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[1, 25:] = True
    mask[2, 7:] = True
    scores = torch.randn(3, 40)
    scores[mask] = 100.0  # pads must never outrank valid tokens
    for rho in (0.1, 0.25, 0.5, 1.0):
        sel = select_tokens(scores, mask, rho)
        valid = [40, 25, 7]
        expected = [min(math.floor(rho * v) + 1, 40) for v in valid]
        assert sel.counts.tolist() == expected and sel.k == max(expected)
        for i, n in enumerate(expected):
            kept = sel.indices[i, :n]
            assert not mask[i, kept[:min(n, valid[i])]].any()
            best = torch.topk(scores[i, :valid[i]], min(n, valid[i])).indices
            assert set(kept.tolist()) >= set(best.tolist())


def test_encoder_selects_per_image_counts_on_padded_batch():
    model = _tiny("model.rho=0.3").model.eval()
    images, masks = _batch()
    with torch.no_grad():
        feats = model.extract(images, masks)
        sel = model.encode(feats).extras["selection"]
    valid = (~feats.mask).sum(1).tolist()
    assert valid[0] > valid[1]
    assert sel.counts.tolist() == [math.floor(0.3 * v) + 1 for v in valid]
    assert sel.k == sel.counts.max()
    assert keep_counts(feats.mask, 0.3).tolist() == sel.counts.tolist()


def test_non_selected_tokens_leave_encoder_unchanged():
    model = _tiny("model.rho=0.2").model.train()
    images, masks = _batch()
    feats = model.extract(images, masks)
    encoded = model.encode(feats)
    sel = encoded.extras["selection"]
    written = torch.zeros_like(feats.mask)
    for i, n in enumerate(sel.counts.tolist()):
        written[i, sel.indices[i, :n]] = True
    assert torch.equal(encoded.memory[~written], feats.src[~written])
    assert not torch.isclose(encoded.memory[written], feats.src[written]).all(-1).any()
    assert len(encoded.aux_outputs) == model.encoder.num_layers - 1
    aux = encoded.aux_outputs[0]
    assert aux["pred_logits"].shape[:2] == (2, sel.k) and aux["pred_boxes"].shape == (2, sel.k, 4)


def test_encoder_aux_boxes_of_selected_pads_are_exactly_one():
    model = _tiny("model.rho=1.0").model.train()
    images, masks = _batch()
    feats = model.extract(images, masks)
    encoded = model.encode(feats)
    pads = torch.gather(feats.mask, 1, encoded.extras["selection"].indices)
    assert pads[1].any() and not pads[0].any()
    boxes = encoded.aux_outputs[0]["pred_boxes"]
    assert torch.equal(boxes[pads], torch.ones_like(boxes[pads]))
    assert (boxes[~pads] < 1).all()


# ------------------------------------------------------------------------------ DAM


def _hand_dam_inputs(channels: int = 4) -> tuple[DecoderOutput, torch.Tensor, torch.Tensor]:
    """Levels 2x3 and 1x2 (N = 8); 2 decoder layers, 1 query, 1 head, 2 points per level."""
    shapes = torch.tensor([[2, 3], [1, 2]])
    starts = torch.tensor([0, 6])
    loc = torch.zeros(1, 2, 1, 1, 2, 2, 2, dtype=torch.float64)
    wts = torch.zeros(1, 2, 1, 1, 2, 2, dtype=torch.float64)
    loc[0, 0, 0, 0, 0, 0] = torch.tensor([1 / 3, 0.5])   # f = (1, 1): all on (r1, c1) = 4
    wts[0, 0, 0, 0, 0, 0] = 0.5
    loc[0, 0, 0, 0, 0, 1] = torch.tensor([0.5, 0.25])    # f = (1.5, 0.5): 1/4 on 1, 2, 4, 5
    wts[0, 0, 0, 0, 0, 1] = 0.2
    loc[0, 1, 0, 0, 1, 0] = torch.tensor([0.75, 0.5])    # level 1, f = (1.5, 0.5): 1/4 on 7, rest out
    wts[0, 1, 0, 0, 1, 0] = 0.8
    loc[0, 1, 0, 0, 1, 1] = torch.tensor([-0.9, 0.1])    # fully outside: dropped
    wts[0, 1, 0, 0, 1, 1] = 0.3
    ref = torch.full((1, 1, 4), 0.5)
    decoded = DecoderOutput(hidden_states=torch.zeros(2, 1, 1, channels), references=(ref, ref),
                            sampling_locations=loc, attention_weights=wts)
    return decoded, shapes, starts


def test_dam_of_hand_made_attention_pattern():
    decoded, shapes, starts = _hand_dam_inputs()
    dam = decoder_attention_map(decoded.sampling_locations, decoded.attention_weights, shapes,
                                starts, 8)
    expected = torch.tensor([[0.0, 0.05, 0.05, 0.0, 0.5 + 0.05, 0.05, 0.0, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(dam, expected)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5] = True  # a pad never becomes a positive, whatever its DAM
    target = dam_target(dam, mask, torch.tensor([2]))
    assert target.tolist() == [[0, 0, 0, 0, 1, 0, 0, 1]]


def test_sparse_detr_dam_loss_and_corr_from_hand_made_attention():
    """SparseDETR.assemble on a hand-made decoder output: DAM target, loss_dam and Corr by hand."""
    model = _tiny().model.train()
    decoded, shapes, starts = _hand_dam_inputs(channels=128)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5] = True
    feats = FeatureSet(src=torch.zeros(1, 8, 128), pos=torch.zeros(1, 8, 128), mask=mask,
                       spatial_shapes=shapes, level_start_index=starts,
                       valid_ratios=torch.ones(1, 2, 2))
    scores = torch.randn(1, 8, requires_grad=True)
    encoded = EncoderOutput(memory=feats.src, extras={
        "selection": TokenSelection(indices=torch.tensor([[4, 1, 7]]), counts=torch.tensor([2])),
        "scores": scores})
    queries = QuerySet(tgt=torch.zeros(1, 1, 128), query_pos=torch.zeros(1, 1, 128),
                       reference=decoded.references[0])
    out = model.assemble(decoded, queries, encoded, feats)
    target = torch.tensor([[0, 0, 0, 0, 1, 0, 0, 1]], dtype=torch.float32)
    filled = torch.where(mask, scores.min(), scores)
    expected = F.binary_cross_entropy_with_logits(filled, target)
    torch.testing.assert_close(out["extra_losses"]["loss_dam"], expected)
    metrics = out["metrics"]  # selected (all k rows): tokens 4, 1 (level 0) and 7 (level 1)
    torch.testing.assert_close(metrics[f"{CORR_PREFIX}all"].double(), torch.tensor(0.8 / 0.9, dtype=torch.float64))
    torch.testing.assert_close(metrics[f"{CORR_PREFIX}0"].double(), torch.tensor(0.6 / 0.7, dtype=torch.float64))
    torch.testing.assert_close(metrics[f"{CORR_PREFIX}1"].double(), torch.tensor(1.0, dtype=torch.float64))
    out["extra_losses"]["loss_dam"].backward()
    assert scores.grad.abs().sum() > 0


def test_dam_target_has_top_n_ones_among_valid_tokens():
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(3, 60, dtype=torch.bool)
    mask[1, 41:] = True
    mask[2, 13:] = True
    dam = torch.rand(3, 60, generator=gen, dtype=torch.float64)
    dam[mask] = 10.0
    counts = keep_counts(mask, 0.2)
    target = dam_target(dam, mask, counts)
    assert target.sum(1).tolist() == counts.tolist()
    assert not target[mask].any()
    for i in range(3):
        pos, neg = target[i] == 1, (target[i] == 0) & ~mask[i]
        assert dam[i][pos].min() >= dam[i][neg].max()


def test_dam_loss_is_mean_bce_over_all_tokens_with_pads_at_min_score():
    values = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values[0, 4] = values.min() - 1.0  # min(s), which pads take, is a valid token's score
    scores = values.requires_grad_()
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    target = torch.zeros(2, 10, dtype=torch.float64)
    target[0, :3] = 1
    target[1, 2] = 1
    loss = dam_loss(scores, target, mask)
    filled = scores.detach().clone()
    filled[mask] = scores.detach().min()
    naive = sum(F.binary_cross_entropy_with_logits(filled[i, j], target[i, j])
                for i in range(2) for j in range(10)) / 20
    torch.testing.assert_close(loss, naive)
    loss.backward()
    assert scores.grad[mask].abs().sum() == 0 and scores.grad.abs().sum() > 0
    assert scores.grad[0, 4] != 0  # the gradient of the pads' loss reaches the min token


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("selection", ["dam", "objectness", "random"])
def test_each_token_criterion_trains_one_step(selection):
    built = _tiny(f"model.token_selection={selection}")
    model, criterion = built.model.train(), built.criterion
    images, masks = _batch()
    targets = _targets()
    losses = criterion(model(images, masks, targets=targets), targets)
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    assert ("loss_dam" in losses) == (selection == "dam")
    assert ("loss_ce_backbone" in losses) == (selection == "objectness")
    assert "loss_ce_enc_0" in losses
    watched = {n: p.detach().clone() for n, p in model.named_parameters()
               if n.startswith(("encoder.scorer.", "encoder.layers.0.linear1"))}
    assert any(n.startswith("encoder.scorer.") for n in watched) == (selection != "random")
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    for name, before in watched.items():
        assert not torch.equal(before, dict(model.named_parameters())[name]), name


def test_one_model_evaluates_at_several_rhos():
    model = _tiny().model.eval()
    assert isinstance(model, SparseDETR)
    images, masks = _batch()
    for rho in (0.1, 0.3, 1.0):
        model.encoder.rho = rho
        with torch.no_grad():
            out = model(images, masks)
            feats = model.extract(images, masks)
            sel = model.encode(feats).extras["selection"]
        assert out["pred_logits"].shape == (2, 30, 24) and torch.isfinite(out["pred_boxes"]).all()
        assert "extra_losses" not in out and "enc_aux_outputs" not in out
        valid = (~feats.mask).sum(1)
        assert sel.counts.tolist() == [min(math.floor(rho * v) + 1, feats.num_tokens) for v in valid.tolist()]
        if rho == 1.0:
            for i in range(2):
                chosen = set(sel.indices[i, :sel.counts[i]].tolist())
                assert chosen >= set(torch.nonzero(~feats.mask[i]).flatten().tolist())
    with pytest.raises(ValueError, match="rho"):
        model.encoder.rho = 0.0


def test_corr_is_one_when_every_token_is_selected():
    model = _tiny("model.rho=1.0").model
    images, masks = _batch(padded=False)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            metrics = model(images, masks)["metrics"]
        assert set(metrics) == {f"{CORR_PREFIX}{s}" for s in ("all", "0", "1", "2", "3")}
        assert metrics[f"{CORR_PREFIX}all"].item() == pytest.approx(1.0, abs=1e-6)
    model.encoder.rho = 0.1
    corr = model(images, masks)["metrics"][f"{CORR_PREFIX}all"].item()
    assert 0.0 <= corr < 1.0


@pytest.mark.parametrize("aux", [True, False])
def test_twelve_layer_encoder_with_and_without_aux_loss(aux):
    built = _tiny("model.enc_layers=12", f"model.enc_aux_loss={str(aux).lower()}",
                  "model.hidden_dim=64", "model.dim_feedforward=128", "model.dec_layers=1")
    model, criterion = built.model.train(), built.criterion
    images, masks = _batch()
    out = model(images, masks)
    assert len(out.get("enc_aux_outputs", [])) == (11 if aux else 0)
    losses = criterion(out, _targets())
    assert ("loss_giou_enc_10" in losses) == aux and ("loss_giou_enc_10" in criterion.weight_dict) == aux
    criterion.total_loss(losses).backward()
    model.eval()
    with torch.no_grad():
        assert "enc_aux_outputs" not in model(images, masks)
        if aux:
            model.encoder.aux_in_eval = True
            assert len(model(images, masks)["enc_aux_outputs"]) == 11


# ------------------------------------------------------------------------------ R50: counts, checkpoints


@pytest.fixture(scope="module")
def r50_sparse():
    torch.manual_seed(0)
    return build_model(load_config("sparse_detr_r50").model)


def test_parameter_counts_match_the_paper(r50_sparse):
    counts = count_parameters(r50_sparse)
    assert round(counts.params_inference / 1e6, 2) == 40.93
    assert round(counts.params_trainable / 1e6, 2) == 41.71
    assert counts.params_training_only == 5 * (91 * 257 + 2 * 256 * 257 + 4 * 257)
    swin = count_parameters(build_model(load_config("sparse_detr_swint").model))
    assert round(swin.params_inference / 1e6, 2) == 41.40


def _official_names(key: str, layout: HeadLayout) -> list[str]:
    """Official key(s) of one of our keys: the inverse of sdetr.models.official's mapping."""
    if key.startswith("backbone."):
        return ["backbone.0." + key[len("backbone."):]]
    head = re.match(r"^(?:heads\.(class_embed|bbox_embed)\.(\d+)|query_selector\.(class_embed|bbox_embed)"
                    r"|encoder\.aux_heads\.(class_embed|bbox_embed)\.(\d+))\.(.*)$", key)
    if head:
        dec_kind, dec_n, q_kind, aux_kind, aux_i, rest = head.groups()
        kind = dec_kind or q_kind or aux_kind
        n = int(dec_n) if dec_kind else layout.dec_layers + (0 if q_kind else 1 + int(aux_i))
        names = [f"{kind}.{n}.{rest}"]
        if layout.two_stage:
            names.append(f"transformer.decoder.{kind}.{n}.{rest}")
        if aux_kind:
            names.append(f"transformer.encoder.{kind}.{aux_i}.{rest}")
        return names
    for official, ours in sorted(_PREFIXES, key=lambda p: -len(p[1])):
        if key.startswith(ours):
            return [official + key[len(ours):]]
    raise AssertionError(f"no official name for {key}")


def _as_official(model: torch.nn.Module, offset: float) -> dict[str, torch.Tensor]:
    """The model's state_dict (float tensors shifted by ``offset``) in the official layout."""
    layout = HeadLayout.of(model)
    state = {}
    for key, value in model.state_dict().items():
        value = value + offset if value.is_floating_point() else value.clone()
        for name in _official_names(key, layout):
            state[name] = value
    return state


def test_official_sparse_checkpoint_loads_exactly(r50_sparse, tmp_path):
    official = _as_official(r50_sparse, offset=0.5)
    listed = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            listed[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    assert len(listed) == 760
    assert set(official) == set(listed)
    assert {k: list(v.shape) for k, v in official.items()} == listed
    official["class_embed.0.total_ops"] = torch.zeros(1, dtype=torch.float64)
    official["transformer.encoder.layers.0.total_params"] = torch.zeros(1, dtype=torch.float64)
    path = tmp_path / "sparse_official.pth"
    torch.save({"model": official, "args": argparse.Namespace(rho=0.1)}, path)
    report = load_official_checkpoint(path, r50_sparse)
    assert report.missing == [] and report.unexpected == []
    assert "class_embed.0.total_ops" in report.ignored and report.args == {"rho": 0.1}
    ours = r50_sparse.state_dict()
    torch.testing.assert_close(ours["encoder.scorer.layer2.4.weight"],
                               official["transformer.enc_mask_predictor.layer2.4.weight"])
    torch.testing.assert_close(ours["encoder.aux_heads.class_embed.4.bias"], official["class_embed.11.bias"])
    torch.testing.assert_close(ours["query_selector.bbox_embed.layers.2.bias"],
                               official["bbox_embed.6.layers.2.bias"])


def test_plain_deformable_checkpoint_is_refused_for_sparse(tmp_path):
    torch.manual_seed(0)
    plain = build_model(load_config("deformable_detr_tiny").model)
    path = tmp_path / "plain_official.pth"
    torch.save({"model": _as_official(plain, offset=0.0)}, path)
    sparse = _tiny().model
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(path, sparse)
    message = str(info.value)
    assert "looks like Deformable DETR" in message and "missing keys" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------ overfit


def _two_synthetic_images() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Grey images with coloured rectangles; image 1 is 56x80 padded to 64x96."""
    boxes = [torch.tensor([[.25, .3, .3, .4], [.7, .65, .4, .5], [.5, .15, .6, .2]]),
             torch.tensor([[.3, .6, .4, .6], [.75, .3, .3, .4]])]
    labels = [torch.tensor([1, 2, 3]), torch.tensor([2, 4])]
    sizes = [(64, 96), (56, 80)]
    colours = {1: (2.0, -1.0, -1.0), 2: (-1.0, 2.0, -1.0), 3: (-1.0, -1.0, 2.0), 4: (2.0, 2.0, -1.0)}
    images = torch.zeros(2, 3, H, W)
    masks = torch.ones(2, H, W, dtype=torch.bool)
    for i, ((h, w), bxs, lbs) in enumerate(zip(sizes, boxes, labels)):
        masks[i, :h, :w] = False
        images[i, :, :h, :w] = -0.5
        for (cx, cy, bw, bh), lab in zip(bxs.tolist(), lbs.tolist()):
            x0, x1 = int((cx - bw / 2) * w), int((cx + bw / 2) * w)
            y0, y1 = int((cy - bh / 2) * h), int((cy + bh / 2) * h)
            images[i, :, y0:y1, x0:x1] = torch.tensor(colours[lab]).view(3, 1, 1)
    return images, masks, [{"labels": lb, "boxes": bx} for lb, bx in zip(labels, boxes)]


def test_tiny_sparse_detr_overfits_two_images():
    built = _tiny("model.dropout=0.0", "model.rho=0.2", seed=1)
    model, criterion = built.model.train(), built.criterion
    images, masks, targets = _two_synthetic_images()
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optim = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": backbone, "lr": 2e-4}],
                              weight_decay=1e-4)
    totals, dams = [], []
    for _ in range(50):
        losses = criterion(model(images, masks), targets)
        total = criterion.total_loss(losses)
        optim.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optim.step()
        totals.append(total.item())
        dams.append(losses["loss_dam"].item())
    assert all(math.isfinite(t) for t in totals)
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert sum(dams[-5:]) / 5 < sum(dams[:5]) / 5, dams
