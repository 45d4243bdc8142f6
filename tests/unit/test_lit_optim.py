"""Optimisers and schedules (models.md 7.4)."""

import io
import math

import pytest
import torch
from torch import nn

from lrexp import config
from lrexp.lit.optim import build_optimizer, build_scheduler, lr_factor, peak_lr


def cfg_of(*overrides):
    return config.load(overrides=["scale=smoke", *overrides])


def test_rsqrt_is_the_codes_schedule():
    # lr(t) = min(t, 1000)/1000 * 1/sqrt(max(t, 1000)) with the default peak 1/sqrt(1000)
    cfg = cfg_of("optim.warmup_steps=1000", "optim.lr=null")
    peak = peak_lr(cfg)
    assert peak == pytest.approx(1 / math.sqrt(1000))
    for t in (1, 10, 999, 1000, 1001, 4000, 250_000):
        expected = min(t, 1000) / 1000 / math.sqrt(max(t, 1000))
        got = peak * lr_factor(t - 1, schedule="rsqrt", warmup_steps=1000, max_steps=500_000)
        assert got == pytest.approx(expected, rel=1e-12), t


def test_cosine_warms_up_then_decays_to_zero():
    f = [lr_factor(s, schedule="cosine", warmup_steps=10, max_steps=110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[59] == pytest.approx(0.5) and f[109] == pytest.approx(0.0, abs=1e-12)


def test_adafactor_has_the_specified_settings():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(cfg_of("optim.name=adafactor"), model.named_parameters())
    assert isinstance(opt, torch.optim.Adafactor)
    group = opt.param_groups[0]
    assert (group["beta2_decay"], group["eps"], group["d"], group["weight_decay"]) == (-0.8, (None, 1e-3), 1.0, 0.0)


def test_adamw_decays_matrices_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(cfg_of("optim.name=adamw", "optim.weight_decay=0.1", "optim.lr=0.001"),
                          model.named_parameters())
    assert isinstance(opt, torch.optim.AdamW)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert all(g["lr"] == 0.001 for g in opt.param_groups)


def test_resumed_schedule_comes_from_the_config_not_the_checkpoint():
    model = nn.Linear(2, 2)
    short = cfg_of("optim.schedule=cosine", "train.max_steps=20")
    opt = build_optimizer(short, model.named_parameters())
    sched = build_scheduler(short, opt)
    for _ in range(15):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # checkpoints load with weights_only

    longer = cfg_of("optim.schedule=cosine", "train.max_steps=200")
    opt2 = build_optimizer(longer, model.named_parameters())
    sched2 = build_scheduler(longer, opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    opt2.step()
    sched2.step()
    expected = peak_lr(longer) * lr_factor(16, schedule="cosine", warmup_steps=10, max_steps=200)
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected)
