"""Optimizer param groups and lrs (REFERENCE §1.1), the LR schedule, and the DeepSpeed config."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import micro_config
from sdetr.config import TrainConfig
from sdetr.engine.deepspeed_engine import accumulation_steps, autocast_dtype, deepspeed_config
from sdetr.engine.optim import (build_cosine_scheduler, build_lr_schedule, build_optimizer,
                                build_scheduler, group_lrs, group_of, lr_scale, param_groups)
from sdetr.models import build_model


class Toy(nn.Module):
    """Names that exercise every rule, including a linear-proj name inside the backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 1),
                                       "sampling_offsets": nn.Linear(2, 2)})
        self.attn = nn.ModuleDict({"sampling_offsets": nn.Linear(4, 8),
                                   "reference_points": nn.Linear(4, 2),
                                   "value_proj": nn.Linear(4, 4)})
        self.head = nn.Linear(4, 3)


def _group_names(groups: list[dict]) -> dict[str, set[int]]:
    return {g["name"]: {id(p) for p in g["params"]} for g in groups}


def test_group_rules_on_names():
    assert group_of("backbone.body.layer1.0.conv1.weight") == "backbone"
    assert group_of("encoder.layers.0.self_attn.sampling_offsets.bias") == "linear_proj"
    assert group_of("query_selector.reference_points.weight") == "linear_proj"
    assert group_of("backbone.x.sampling_offsets.weight") == "linear_proj"  # proj rule wins
    assert group_of("heads.class_embed.0.weight") == "default"
    assert group_of("my_backbone.weight") == "default"  # prefix, not substring


def test_param_groups_lrs_and_membership():
    model = Toy()
    groups = param_groups(model, lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1,
                          weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["default", "backbone", "linear_proj"]
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == pytest.approx({"default": 2e-4, "backbone": 2e-5, "linear_proj": 2e-5})
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    members = _group_names(groups)
    assert members["backbone"] == {id(p) for p in model.backbone["conv"].parameters()}
    proj = [*model.attn["sampling_offsets"].parameters(),
            *model.attn["reference_points"].parameters(),
            *model.backbone["sampling_offsets"].parameters()]
    assert members["linear_proj"] == {id(p) for p in proj}
    total = sum(len(v) for v in members.values())
    assert total == len(list(model.parameters()))  # every parameter exactly once


def test_frozen_params_excluded_and_empty_groups_dropped():
    model = Toy()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1,
                          weight_decay=0.0)
    assert [g["name"] for g in groups] == ["default", "linear_proj"]
    frozen = {id(p) for p in model.backbone.parameters()}
    assert not frozen & set().union(*_group_names(groups).values())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1,
                     weight_decay=0.0)


def test_real_model_groups_cover_all_trainable_params():
    model = build_model(micro_config("sparse_detr_tiny").model)
    groups = param_groups(model, lr=1.0, lr_backbone=0.5, lr_linear_proj_mult=0.1,
                          weight_decay=1e-4)
    named = dict(model.named_parameters())
    members = _group_names(groups)
    by_id = {id(p): n for n, p in named.items()}
    assert all(by_id[i].startswith("backbone.") for i in members["backbone"])
    assert all("sampling_offsets" in by_id[i] or "reference_points" in by_id[i]
               for i in members["linear_proj"])
    assert len(members["linear_proj"]) >= 8  # 2 enc + 2 dec layers x (weight, bias)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*members.values()) == trainable


@pytest.mark.parametrize("sqrt_scaling, factor", [(False, 1.0), (True, 0.5)])
def test_build_optimizer_sqrt_lr_scaling(sqrt_scaling, factor):
    train = TrainConfig(batch_size=4, micro_batch_size=2, workers=2, lr=2e-4, lr_backbone=2e-5,
                        lr_linear_proj_mult=0.1, sqrt_lr_scaling=sqrt_scaling,
                        weight_decay=1e-4)
    opt = build_optimizer(Toy(), train)
    assert isinstance(opt, torch.optim.AdamW)
    assert group_lrs(opt) == pytest.approx({"lr/default": 2e-4 * factor,
                                            "lr/backbone": 2e-5 * factor,
                                            "lr/linear_proj": 2e-5 * factor})
    assert lr_scale(16, True) == 1.0
    assert lr_scale(32, True) == pytest.approx(math.sqrt(2))


def test_step_lr_drops_by_ten_every_lr_drop_epochs():
    opt = torch.optim.AdamW(Toy().parameters(), lr=1.0)
    sched = build_scheduler(opt, lr_drop=2)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op, keeps the scheduler's call-order check quiet
        sched.step()
    assert seen == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="lr_drop"):
        build_scheduler(opt, lr_drop=0)


def test_cosine_schedule_decays_every_group_to_zero_over_the_run():
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0},
              {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}]
    opt = torch.optim.AdamW(groups)
    sched = build_cosine_scheduler(opt, total_steps=4)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    half = 0.5 * (1 + math.cos(math.pi / 4))
    assert [s[0] for s in seen] == pytest.approx([1.0, half, 0.5, 1 - half, 0.0, 0.0])
    assert [s[1] for s in seen] == pytest.approx([0.1 * s[0] for s in seen])
    assert "lr_lambdas" not in sched.state_dict() or not any(sched.state_dict()["lr_lambdas"])
    with pytest.raises(ValueError, match="total_steps"):
        build_cosine_scheduler(opt, total_steps=0)


@pytest.mark.parametrize("kind,per_step", [("step", False), ("cosine", True)])
def test_lr_schedule_choice(kind, per_step):
    opt = torch.optim.AdamW(Toy().parameters(), lr=1.0)
    train = TrainConfig(epochs=3, lr_drop=2, lr_schedule=kind)
    sched, stepped = build_lr_schedule(opt, train, steps_per_epoch=5)
    assert stepped is per_step
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR if per_step
                      else torch.optim.lr_scheduler.StepLR)


def test_deepspeed_config_keeps_total_batch_across_worker_counts():
    train = TrainConfig(batch_size=8, micro_batch_size=2, workers=2, clip_max_norm=0.1,
                        zero_stage=2, precision="bf16")
    one, two, four = (deepspeed_config(train, n) for n in (1, 2, 4))
    for cfg, n in ((one, 1), (two, 2), (four, 4)):
        assert cfg["train_batch_size"] == 8
        assert cfg["train_micro_batch_size_per_gpu"] == 2
        assert 2 * n * cfg["gradient_accumulation_steps"] == 8
    assert [c["gradient_accumulation_steps"] for c in (one, two, four)] == [4, 2, 1]
    assert one["gradient_clipping"] == 0.1
    assert one["zero_optimization"]["stage"] == 2
    assert one["bf16"]["enabled"] is True
    assert one["data_types"] == {"buffer_dtype": "bf16"}  # BatchNorm buffers follow the params
    fp32 = deepspeed_config(TrainConfig(), 8)
    assert fp32["bf16"]["enabled"] is False and "data_types" not in fp32


def test_bf16_mixed_autocasts_with_fp32_deepspeed_weights():
    mixed = TrainConfig(precision="bf16-mixed")
    cfg = deepspeed_config(mixed, 8)
    assert cfg["bf16"]["enabled"] is False and "data_types" not in cfg
    assert autocast_dtype(mixed) == torch.bfloat16
    assert autocast_dtype(TrainConfig(precision="bf16")) is None  # the model itself is bf16
    assert autocast_dtype(TrainConfig()) is None


def test_accumulation_rejects_batch_that_does_not_split():
    assert accumulation_steps(16, 2, 8) == 1
    with pytest.raises(ValueError, match="batch_size 8 is not a multiple .* 3 workers"):
        accumulation_steps(8, 2, 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        accumulation_steps(8, 2, 0)
