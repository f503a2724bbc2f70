"""Detector family: parameter counts, every tiny preset trains a step, overfitting, checkpoints."""

from __future__ import annotations

import argparse

import pytest
import torch

from helpers import micro_config, two_images
from sdetr.config import load_config, preset_names
from sdetr.models import (CheckpointError, build, build_model, load_model_weights,
                          load_official_checkpoint, save_model_weights)
from sdetr.models.official import export_official_state_dict
from sdetr.profiling import count_parameters

OFFICIAL_KEYS = "tests/data/official_keys/r50_deformable_detr_keys.txt"


@pytest.mark.parametrize("preset, millions", [
    ("deformable_detr_r50", 39.85), ("deformable_detr_r50_refine", 40.63),
    ("deformable_detr_r50_two_stage", 40.96), ("deformable_detr_swint", 40.31),
])
def test_paper_parameter_counts(preset, millions):
    counts = count_parameters(build_model(load_config(preset).model))
    assert counts.params_trainable / 1e6 == pytest.approx(millions, abs=0.005)
    assert counts.params_inference == counts.params_trainable  # no training-only heads


def _step(preset: str) -> dict:
    cfg = micro_config(preset)
    built = build(cfg.model)
    images, masks, targets = two_images()
    out = built.model(images, masks, targets=targets)  # as the training step calls it
    losses = built.criterion(out, targets)
    total = built.criterion.total_loss(losses)
    total.backward()
    assert torch.isfinite(total)
    grads = [p.grad for p in built.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every trainable parameter gets a gradient"
    return {"out": out, "losses": losses, "cfg": cfg}


@pytest.mark.parametrize("preset", [n for n in preset_names() if n.endswith("_tiny")])
def test_every_tiny_preset_trains_a_step(preset):
    result = _step(preset)
    out, cfg = result["out"], result["cfg"]
    assert out["pred_logits"].shape == (2, cfg.model.num_queries, cfg.model.num_classes)
    assert out["pred_boxes"].shape == (2, cfg.model.num_queries, 4)
    assert len(out["aux_outputs"]) == cfg.model.dec_layers - 1
    assert ("enc_outputs" in out) == cfg.model.two_stage
    assert ("loss_ce_enc" in result["losses"]) == cfg.model.two_stage


def test_overfitting_two_images_drives_the_loss_down():
    torch.manual_seed(0)
    built = build(micro_config("deformable_detr_refine_tiny").model)
    images, masks, targets = two_images()
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    history = []
    for _ in range(15):
        loss = built.criterion.total_loss(built.criterion(built.model(images, masks), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.6 * history[0], history


def test_eval_is_deterministic_and_postprocess_scales_boxes():
    torch.manual_seed(0)
    built = build(micro_config("deformable_detr_two_stage_tiny").model)
    built.model.eval()
    images, masks, _ = two_images()
    with torch.no_grad():
        a = built.model(images, masks)
        b = built.model(images, masks)
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])
    sizes = torch.tensor([[480, 640], [300, 400]])
    results = built.postprocess(a["pred_logits"], a["pred_boxes"], sizes)
    assert results[0]["boxes"].shape == (100, 4)
    num_classes = a["pred_logits"].shape[-1]
    for i, (h, w) in enumerate(sizes.tolist()):
        top = a["pred_logits"][i].sigmoid().flatten().argmax()
        cx, cy, bw, bh = a["pred_boxes"][i, top // num_classes].tolist()
        expected = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h,
                                 (cx + bw / 2) * w, (cy + bh / 2) * h])
        torch.testing.assert_close(results[i]["boxes"][0], expected, rtol=1e-5, atol=1e-3)


def test_checkpoint_round_trip_and_refusal(tmp_path):
    cfg = micro_config("deformable_detr_refine_tiny")
    torch.manual_seed(1)
    model = build_model(cfg.model).eval()
    path = save_model_weights(tmp_path / "w.pth", model, cfg.model)
    torch.manual_seed(2)
    fresh = build_model(cfg.model).eval()
    load_model_weights(path, fresh, cfg.model)
    images, masks, _ = two_images()
    with torch.no_grad():
        assert torch.equal(model(images, masks)["pred_boxes"], fresh(images, masks)["pred_boxes"])
    other = micro_config("deformable_detr_two_stage_tiny")
    with pytest.raises(CheckpointError, match="queries='learned' in the file vs 'two_stage'"):
        load_model_weights(path, build_model(other.model), other.model)
    with pytest.raises(CheckpointError, match="not found"):
        load_model_weights(tmp_path / "nope.pth", fresh, cfg.model)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_model_weights(junk, fresh, cfg.model)


def _official_key_shapes() -> dict[str, list[int]]:
    shapes = {}
    for line in open(OFFICIAL_KEYS):
        if not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            shapes[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return shapes


def test_export_matches_the_official_key_layout():
    model = build_model(load_config("deformable_detr_r50").model)
    exported = {k: list(v.shape) for k, v in export_official_state_dict(model).items()}
    assert exported == _official_key_shapes()


def test_crafted_official_checkpoint_loads_with_zero_missing_keys(tmp_path):
    cfg = micro_config("deformable_detr_two_stage_tiny")
    torch.manual_seed(3)
    source = build_model(cfg.model).eval()
    state = export_official_state_dict(source)
    assert any(k.startswith("transformer.decoder.class_embed.") for k in state)  # aliases
    state["backbone.0.body.conv1.total_ops"] = torch.zeros(1)  # thop leftovers
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 49,
                "args": argparse.Namespace(lr=2e-4, two_stage=True, backbone="resnet18")}, path)
    target = build_model(cfg.model).eval()
    report = load_official_checkpoint(path, target)
    assert report.missing == [] and report.unexpected == []
    assert report.args["two_stage"] is True
    images, masks, _ = two_images()
    with torch.no_grad():
        assert torch.equal(source(images, masks)["pred_logits"], target(images, masks)["pred_logits"])


def test_official_checkpoint_of_another_architecture_is_refused(tmp_path):
    plain = micro_config("deformable_detr_tiny")
    path = tmp_path / "plain.pth"
    torch.save({"model": export_official_state_dict(build_model(plain.model))}, path)
    two_stage = micro_config("deformable_detr_two_stage_tiny")
    with pytest.raises(CheckpointError, match=r"Deformable DETR \(learned queries\)"):
        load_official_checkpoint(path, build_model(two_stage.model))


def test_official_loader_never_executes_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Evil()}, path)
    model = build_model(micro_config("deformable_detr_tiny").model)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_official_checkpoint(path, model)
