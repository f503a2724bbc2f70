"""WeightEma: the warm-up rule, the average, integer buffers, bf16 modules, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdetr.config import ConfigError, load_config
from sdetr.engine.ema import WeightEma


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_decay_warms_up_to_its_value():
    ema = WeightEma(_net(), 0.99)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(100) == pytest.approx(101 / 110)
    assert ema.decay_at(10_000) == 0.99


def test_update_averages_floats_and_copies_integer_buffers():
    net = _net()
    ema = WeightEma(net, 0.9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(8, 3))  # BN running stats and num_batches_tracked move
    ema.update(net, step=1000)  # d = 0.9
    now = net.state_dict()
    for key, average in ema.module.state_dict().items():
        if average.is_floating_point():
            torch.testing.assert_close(average, 0.9 * start[key] + 0.1 * now[key])
        else:
            assert torch.equal(average, now[key])
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_bf16_module_is_averaged_in_float32():
    net = _net().to(torch.bfloat16)
    ema = WeightEma(net, 0.5)
    assert all(v.dtype == torch.float32 for v in ema.module.state_dict().values()
               if v.is_floating_point())
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net, step=1000)
    torch.testing.assert_close(ema.module[0].weight,
                               0.5 * before + 0.5 * net[0].weight.float())


def test_state_round_trip_and_bad_decay():
    net = _net()
    ema = WeightEma(net, 0.9)
    with torch.no_grad():
        net[0].bias.add_(3.0)
    ema.update(net, step=5)
    other = WeightEma(_net(), 0.9)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(ema.module.state_dict().values(), other.module.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decay"):
        WeightEma(net, 1.0)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_config_refuses_a_decay_outside_0_1(value):
    with pytest.raises(ConfigError, match=r"train\.ema_decay"):
        load_config("sparse_detr_tiny", [f"train.ema_decay={value}"])
