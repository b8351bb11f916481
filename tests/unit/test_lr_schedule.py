"""Megatron's learning-rate schedule, point by point."""

import math

import pytest
import torch

from megatron.core.config import OptimizerConfig
from megatron.core.optimizer.grad_scaler import LossScaler
from megatron.core.optimizer.lr_scheduler import OptimizerParamScheduler, learning_rate


def cfg(**kw):
    base = dict(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_iters=110, lr_decay_style="linear")
    base.update(kw)
    return OptimizerConfig(**base)


def test_warmup_is_linear_from_init():
    c = cfg(lr_warmup_init=0.2)
    assert learning_rate(c, 0) == pytest.approx(0.2)
    assert learning_rate(c, 5) == pytest.approx(0.6)
    assert learning_rate(c, 10) == pytest.approx(1.0)


@pytest.mark.parametrize("style,mid", [("linear", 0.55), ("cosine", 0.55), ("constant", 1.0)])
def test_decay_styles_at_midpoint_and_end(style, mid):
    c = cfg(lr_decay_style=style)
    assert learning_rate(c, 60) == pytest.approx(mid)
    if style != "constant":
        assert learning_rate(c, 110) == pytest.approx(0.1)
        assert learning_rate(c, 500) == pytest.approx(0.1)
    assert learning_rate(cfg(lr_decay_style="cosine"), 35) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi / 4) + 1))


def test_wsd_is_constant_then_anneals():
    c = cfg(lr_decay_style="WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style="linear")
    assert learning_rate(c, 50) == pytest.approx(1.0)
    assert learning_rate(c, 90) == pytest.approx(1.0)
    assert learning_rate(c, 100) == pytest.approx(0.55)
    assert learning_rate(c, 110) == pytest.approx(0.1)
    exp = cfg(lr_decay_style="WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style="exponential")
    assert learning_rate(exp, 110) == pytest.approx(0.1)


def test_scheduler_sets_param_groups_and_round_trips():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    s = OptimizerParamScheduler(opt, cfg())
    assert opt.param_groups[0]["lr"] == 0.0
    for _ in range(5):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    s2 = OptimizerParamScheduler(opt, cfg())
    s2.load_state_dict(s.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_dynamic_loss_scaler_hysteresis_and_growth():
    s = LossScaler(1024.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024.0  # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 512.0
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024.0
    static = LossScaler(2.0**16, static_scale=8.0)
    static.update(True)
    assert static.scale == 8.0
