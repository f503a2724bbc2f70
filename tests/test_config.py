"""Typed config: presets, _base_ diffs, dotted overrides, validation, flatten round trip."""

from __future__ import annotations

import pytest

from sdetr.config import (ConfigError, ExperimentConfig, flatten, load_config, preset_names,
                          to_yaml, unflatten)


def test_every_preset_loads_and_validates():
    names = preset_names()
    for required in ("deformable_detr_r50", "deformable_detr_r50_refine",
                     "deformable_detr_r50_two_stage", "deformable_detr_swint",
                     "deformable_detr_tiny"):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, ExperimentConfig)
        assert cfg.preset == name


def test_base_diff_and_tiny_twin():
    refine = load_config("deformable_detr_r50_refine")
    assert refine.model.box_refine and refine.model.backbone.name == "resnet50"
    tiny = load_config("deformable_detr_two_stage_tiny")
    assert tiny.model.queries == "two_stage" and tiny.model.box_refine
    assert tiny.model.backbone.name == "resnet18" and not tiny.model.backbone.frozen_bn
    assert tiny.model.hidden_dim == 128 and tiny.data.synthetic
    swin = load_config("deformable_detr_swint_two_stage")
    assert swin.model.backbone.name == "swin_t" and swin.model.queries == "two_stage"


def test_dotted_overrides_are_typed():
    cfg = load_config("deformable_detr_tiny", ["model.dropout=0.0", "train.lr=1e-3",
                                               "data.train_scales=[128, 160]",
                                               "model.backbone.weights=/x/r18.pth"])
    assert cfg.model.dropout == 0.0 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.train_scales == [128, 160]
    assert cfg.model.backbone.weights == "/x/r18.pth"


@pytest.mark.parametrize("override, culprit", [
    ("model.rhoo=0.1", "model.rhoo"),
    ("model.rho=0", "model.rho"),
    ("model.rho=1.5", "model.rho"),
    ("model.hidden_dim=abc", "model.hidden_dim"),
    ("model.box_refine=3", "model.box_refine"),
    ("model.queries=magic", "model.queries"),
    ("model.hidden_dim=100", "model.hidden_dim"),
    ("train.zero_stage=3", "train.zero_stage"),
    ("train.batch_size=5", "train.batch_size"),
    ("model.backbone=resnet50", "model.backbone"),
    ("model.backbone.width=12", "model.backbone.width"),
    ("model.backbone.width=0", "model.backbone.width"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.eval_size=0", "data.eval_size"),
    ("data.crop_min=700", "data.crop_min"),
    ("nokey", "nokey"),
])
def test_bad_values_name_the_key(override, culprit):
    with pytest.raises(ConfigError) as info:
        load_config("deformable_detr_tiny", [override])
    message = str(info.value)
    assert culprit in message and "\n" not in message


def test_impossible_combination_fails_at_load():
    with pytest.raises(ConfigError, match="model.box_refine"):
        load_config("deformable_detr_r50", ["model.queries=topk"])
    with pytest.raises(ConfigError, match="model.encoder"):
        load_config("deformable_detr_r50", ["model.encoder=sparse"])
    with pytest.raises(ConfigError, match="model.backbone.width: only for ResNets"):
        load_config("deformable_detr_swint", ["model.backbone.width=32"])
    with pytest.raises(ConfigError, match="model.backbone.width: pretrained weights"):
        load_config("sparse_detr_r50", ["model.backbone.width=32",
                                        "model.backbone.weights=/x/r50.pth"])
    with pytest.raises(ConfigError, match="model.look_forward_twice: needs box_refine"):
        load_config("deformable_detr_r50", ["model.look_forward_twice=true"])
    assert load_config("sparse_detr_tiny",
                       ["model.look_forward_twice=true"]).model.look_forward_twice


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no_such_preset")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text("_base_: cyc.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyc)


def test_user_file_derives_from_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: deformable_detr_tiny\nname: mine\nmodel:\n  num_queries: 50\n")
    cfg = load_config(path)
    assert cfg.name == "mine" and cfg.preset == "deformable_detr_tiny"
    assert cfg.model.num_queries == 50 and cfg.model.hidden_dim == 128


def test_flatten_round_trip_and_yaml_reload(tmp_path):
    cfg = load_config("deformable_detr_two_stage_tiny", ["model.backbone.weights=null"])
    flat = flatten(cfg)
    assert flat["model.queries"] == "two_stage" and flat["model.hidden_dim"] == "128"
    assert all(isinstance(v, str) for v in flat.values())
    assert unflatten(flat) == cfg
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
