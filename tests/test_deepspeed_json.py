"""``train.deepspeed_config``: the shipped DeepSpeed JSONs merge into the engine's config, every
impossible file is refused in one line naming the file and the key, and a shipped ZeRO-2 file
drives a real (CPU, one-rank gloo) DeepSpeed engine through an optimizer step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sdetr.config import ConfigError, ExperimentConfig, TrainConfig, load_config
from sdetr.engine.deepspeed_engine import (AUTO, ENGINE_OWNED, check_deepspeed_json,
                                           deepspeed_config, import_deepspeed, initialize_engine,
                                           load_deepspeed_json)
from sdetr.engine.distributed import init_single_process_group

REPO = Path(__file__).resolve().parent.parent
DS_DIR = REPO / "orchestration" / "deepspeed"

# file -> (train.zero_stage, train.precision) of the runs it is meant for
SHIPPED = {"zero1.json": (1, "fp32"), "zero2.json": (2, "fp32"), "zero2_bf16.json": (2, "bf16")}


def _train(path: Path | str | None = None, **kw: Any) -> TrainConfig:
    """batch 16 = micro 2 × 4 workers × 2 accumulation steps, ZeRO-2, fp32 unless overridden."""
    base = dict(batch_size=16, micro_batch_size=2, workers=4, zero_stage=2, precision="fp32",
                use_gpu=False, deepspeed_config=None if path is None else str(path))
    base.update(kw)
    return TrainConfig(**base)


def _write(tmp_path: Path, content: Any, name: str = "ds.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _autos(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [a for v in value.values() for a in _autos(v)]
    return [value] if value == AUTO else []


def test_every_shipped_json_is_covered():
    assert sorted(p.name for p in DS_DIR.glob("*.json")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("world", [1, 4, 8])
def test_shipped_json_merges_over_generated_config(name, world):
    stage, precision = SHIPPED[name]
    path = DS_DIR / name
    train = _train(path, zero_stage=stage, precision=precision)
    raw = json.loads(path.read_text())
    assert load_deepspeed_json(path, train) == raw  # validated against train.workers=4
    merged = deepspeed_config(train, world)
    assert merged["train_batch_size"] == 16
    assert merged["train_micro_batch_size_per_gpu"] == 2
    assert merged["gradient_accumulation_steps"] == 16 // (2 * world)
    assert merged["zero_optimization"]["stage"] == stage
    assert merged["bf16"]["enabled"] is (precision == "bf16")
    assert merged["gradient_clipping"] == train.clip_max_norm
    assert merged["zero_allow_untested_optimizer"] is True
    assert merged["steps_per_print"] == deepspeed_config(_train(), 1)["steps_per_print"]
    for key, value in raw["zero_optimization"].items():  # the file's tuning survives
        assert merged["zero_optimization"][key] == value
    assert merged["zero_optimization"]["reduce_bucket_size"] == 25_000_000
    assert not _autos(merged)
    if name.startswith("zero2"):
        assert merged["zero_optimization"]["overlap_comm"] is True
        assert merged["zero_optimization"]["contiguous_gradients"] is True
    if precision == "bf16":
        assert merged["data_types"] == {"buffer_dtype": "bf16"}  # generated key kept
        assert merged["communication_data_type"] == "fp32"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_zero_sections_are_valid_deepspeed(name):
    import_deepspeed(use_gpu=False)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    stage, precision = SHIPPED[name]
    merged = deepspeed_config(_train(DS_DIR / name, zero_stage=stage, precision=precision), 4)
    zero = DeepSpeedZeroConfig(**merged["zero_optimization"])  # unknown keys are refused
    assert int(zero.stage) == stage


def test_no_file_keeps_generated_config():
    cfg = deepspeed_config(_train(), 4)
    assert cfg["zero_optimization"] == {"stage": 2}
    assert "communication_data_type" not in cfg


def test_relative_path_resolves_against_working_directory(tmp_path, monkeypatch):
    _write(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": True}})
    monkeypatch.chdir(tmp_path)
    merged = deepspeed_config(_train("ds.json"), 4)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}


def _bad_cases() -> list[tuple[str, Any, dict[str, Any], str, str]]:
    """(id, file content, TrainConfig overrides, key named, words in the message)."""
    return [
        ("malformed", '{"zero_optimization": {', {}, "train.deepspeed_config", "malformed JSON"),
        ("duplicate", '{"bf16": {}, "bf16": {}}', {}, "bf16", "twice"),
        ("top-level list", [1, 2], {}, "train.deepspeed_config", "JSON object, got list"),
        ("batch", {"train_batch_size": 32}, {}, "train_batch_size", "owns the batch"),
        ("micro", {"train_micro_batch_size_per_gpu": 4}, {}, "train_micro_batch_size_per_gpu",
         "× 4 workers × 2 accumulation"),
        ("accumulation", {"gradient_accumulation_steps": 1}, {}, "gradient_accumulation_steps",
         "owns the batch"),
        ("bool batch", {"train_micro_batch_size_per_gpu": True}, {"batch_size": 4,
         "micro_batch_size": 1}, "train_micro_batch_size_per_gpu", "true disagrees"),
        ("stage", {"zero_optimization": {"stage": 1}}, {}, "zero_optimization.stage",
         "train.zero_stage"),
        ("zero not object", {"zero_optimization": 2}, {}, "zero_optimization", "JSON object"),
        ("bf16 on fp32 run", {"bf16": {"enabled": True}}, {"precision": "bf16-mixed"},
         "bf16.enabled", "train.precision='bf16-mixed'"),
        ("bf16 off on bf16 run", {"bf16": {"enabled": False}}, {"precision": "bf16"},
         "bf16.enabled", "false disagrees"),
        ("fp16", {"fp16": {"enabled": True}}, {}, "fp16.enabled", "fp16 is not supported"),
        ("amp", {"amp": {"enabled": True}}, {}, "amp.enabled", "not supported"),
        ("optimizer", {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, {}, "optimizer",
         "own AdamW"),
        ("scheduler", {"scheduler": {"type": "WarmupLR"}}, {}, "scheduler", "LR schedule"),
        ("old bf16 name", {"bfloat16": {"enabled": True}}, {}, "bfloat16", "rename"),
        ("clipping", {"gradient_clipping": 1.0}, {}, "gradient_clipping", "train.clip_max_norm"),
        ("auto elsewhere", {"zero_optimization": {"reduce_bucket_size": "auto"}}, {},
         "zero_optimization.reduce_bucket_size", "only filled in for"),
    ]


@pytest.mark.parametrize("content, overrides, key, words",
                         [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()])
def test_impossible_file_is_refused_naming_file_and_key(tmp_path, content, overrides, key,
                                                        words):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_deepspeed_json(path, _train(path, **overrides))
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message and "\n" not in message


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"nope\.json: train\.deepspeed_config: no such file"):
        load_deepspeed_json(missing, _train(missing))
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"folder\.json: train\.deepspeed_config: cannot read"):
        load_deepspeed_json(folder, _train(folder))


def test_explicit_accumulation_must_fit_the_actual_world_size(tmp_path):
    path = _write(tmp_path, {"gradient_accumulation_steps": 2})
    train = _train(path)
    assert deepspeed_config(train, 4)["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: 2 disagrees with the "
                       "run's 1 "):
        deepspeed_config(train, 8)


def test_check_deepspeed_json_on_loaded_configs(tmp_path):
    check_deepspeed_json(ExperimentConfig())  # unset: nothing to check
    zero2 = str(DS_DIR / "zero2.json")
    cfg = load_config("deformable_detr_tiny", [f"train.deepspeed_config={zero2}",
                                                "train.zero_stage=2"])
    check_deepspeed_json(cfg)
    wrong = load_config("deformable_detr_tiny", [f"train.deepspeed_config={zero2}",
                                                 "train.zero_stage=1"])
    with pytest.raises(ConfigError, match=r"zero2\.json: zero_optimization\.stage: 2 disagrees"):
        check_deepspeed_json(wrong)
    with pytest.raises(ConfigError, match="train.deepspeed_config: empty path"):
        load_config("deformable_detr_tiny", ["train.deepspeed_config=''"])


def test_zero2_json_drives_a_cpu_engine_step():
    if not dist.is_initialized():  # kept for the process: DeepSpeed caches its groups
        init_single_process_group("gloo")
    assert dist.get_world_size() == 1
    train = _train(DS_DIR / "zero2.json", batch_size=4, micro_batch_size=2, workers=1)
    config = deepspeed_config(train, 1)
    assert config["gradient_accumulation_steps"] == 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), config,
                               use_gpu=False)
    assert engine.zero_optimization_stage() == 2
    assert engine.zero_overlap_comm() is True
    before = [p.detach().clone() for p in engine.module.parameters()]
    for _ in range(config["gradient_accumulation_steps"]):
        loss = engine(torch.randn(2, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == 1
    after = list(engine.module.parameters())
    assert all(not torch.equal(b, a.detach()) for b, a in zip(before, after))


def test_engine_owned_keys_are_in_the_generated_config():
    cfg = deepspeed_config(_train(precision="bf16"), 4)
    for path in ENGINE_OWNED:
        node: Any = cfg
        for key in path:
            node = node[key]
        assert node is not None


def test_channels_last_backbone_weights_follow_after_the_engine_broadcast(caplog):
    """The engine lays a channels_last ResNet's weights out channels_last once it exists (its
    start-up broadcast needs NCHW bytes), keeps them NCHW with a warning under ZeRO 2, and
    leaves other backbones alone."""
    from helpers import build_micro
    if not dist.is_initialized():
        init_single_process_group("gloo")
    for stage, want_nhwc in ((0, True), (2, False)):
        model = build_micro("sparse_detr_tiny", "model.backbone.channels_last=true").model
        config = deepspeed_config(_train(zero_stage=stage, batch_size=2, micro_batch_size=2,
                                         workers=1), 1)
        with caplog.at_level("WARNING", logger="sdetr.engine.deepspeed_engine"):
            engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-4),
                                       config, use_gpu=False)
        weight = engine.module.backbone.body.layer1[0].conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is want_nhwc
        assert ("weights stay NCHW under ZeRO stage 2" in caplog.text) is (stage == 2)
    plain = build_micro("sparse_detr_tiny", "model.backbone.channels_last=false").model
    initialize_engine(plain, torch.optim.AdamW(plain.parameters(), lr=1e-4),
                      deepspeed_config(_train(zero_stage=0, batch_size=2, micro_batch_size=2,
                                              workers=1), 1), use_gpu=False)
    assert plain.backbone.body.layer1[0].conv1.weight.is_contiguous()
