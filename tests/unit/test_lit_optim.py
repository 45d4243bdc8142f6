"""Optimisers and schedules (docs/models.md#optimiser-and-schedule)."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrexp.config.load import load
from lrexp.lit.optim import build_optimizer, build_scheduler, lr_factor, peak_lr


def cfg_of(*overrides):
    return load(overrides=["scale=smoke", *overrides])


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


def flax_adafactor(params, grads_per_step, lrs, beta1, eps1=1e-30, eps2=1e-3, decay=0.8, min_dim=128):
    """An independent numpy (float64) re-derivation of the reference code's Flax Adafactor update
    (flax.optim.Adafactor with multiply_by_parameter_scale and clipping_threshold 1): the oracle."""
    xs = [np.array(x, dtype=np.float64) for x in params]
    states = [dict() for _ in xs]
    for i, (grads, lr) in enumerate(zip(grads_per_step, lrs)):
        decay_rate = 1.0 - (i + 1.0) ** -decay
        for x, g, st in zip(xs, grads, states):
            g = np.array(g, dtype=np.float64)
            g2 = g * g + eps1
            dims = np.argsort(x.shape, kind="stable")
            if x.ndim >= 2 and x.shape[dims[-2]] >= min_dim:
                d1, d0 = int(dims[-2]), int(dims[-1])
                st["r"] = decay_rate * st.get("r", 0.0) + (1 - decay_rate) * g2.mean(axis=d0)
                st["c"] = decay_rate * st.get("c", 0.0) + (1 - decay_rate) * g2.mean(axis=d1)
                rd1 = d1 - 1 if d1 > d0 else d1
                row = (st["r"] / st["r"].mean(axis=rd1, keepdims=True)) ** -0.5
                y = g * np.expand_dims(row, d0) * np.expand_dims(st["c"] ** -0.5, d1)
            else:
                st["v"] = decay_rate * st.get("v", 0.0) + (1 - decay_rate) * g2
                y = g * st["v"] ** -0.5
            y = y / max(1.0, np.sqrt(np.mean(y * y)))
            sub = lr * max(np.sqrt(np.mean(x * x)), eps2) * y
            if beta1 is not None:
                st["m"] = beta1 * st.get("m", 0.0) + (1 - beta1) * sub
                sub = st["m"]
            x -= sub
    return xs


SHAPES = [(256, 130), (130, 256), (64, 300), (3, 200, 150), (130,), (128, 128)]


def adafactor_run(params, steps, lrs, beta1):
    torch_params = [nn.Parameter(p.clone()) for p in params]
    opt = build_optimizer(cfg_of("optim.name=adafactor", f"optim.beta1={'null' if beta1 is None else beta1}"),
                          [(str(i), p) for i, p in enumerate(torch_params)])
    for grads, lr in zip(steps, lrs):
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
    return torch_params


@pytest.mark.parametrize("grad_scale", [1.0, 1 / 4096])
@pytest.mark.parametrize("beta1", [0.9, None])
def test_adafactor_steps_as_the_reference_code(grad_scale, beta1):
    """Factored and full second moments (Flax factorises only when the two largest dims are >= 128),
    3-d tensors, the first moment and small gradients, over several steps with a changing lr."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) * 0.05 for s in SHAPES]
    steps = [[torch.randn(s, generator=gen) * grad_scale for s in SHAPES] for _ in range(4)]
    lrs = [0.01, 0.02, 0.03, 0.025]
    got = adafactor_run(params, steps, lrs, beta1)
    want = flax_adafactor([p.double().numpy() for p in params], [[g.double().numpy() for g in gs] for gs in steps],
                          lrs, beta1)
    for p, w, shape in zip(got, want, SHAPES):
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=1e-5, atol=1e-8, err_msg=str(shape))


def test_small_gradients_take_steps_below_the_clipping_bound():
    """A gradient scaled by 1/4096 with a mean g^2 far below float32's epsilon: the step of a factored
    matrix shrinks below lr * RMS(x) on its second update (u's RMS < 1), where an eps1 clamped at machine
    epsilon inflates u and clips it to exactly that bound on every step."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 130, generator=gen) * 0.05
    g1 = torch.randn(256, 130, generator=gen) / 4096
    g2 = g1 * torch.linspace(0.01, 1.0, 130)  # a second gradient whose columns differ: RMS(u) < 1
    before = x.clone()
    (p,) = adafactor_run([x], [[g1], [g2]], [0.0, 0.01], beta1=None)
    rms_step = (p.detach() - before).square().mean().sqrt().item()
    bound = 0.01 * before.square().mean().sqrt().item()
    assert rms_step < 0.9 * bound
    want = flax_adafactor([before.double().numpy()], [[g1.double().numpy()], [g2.double().numpy()]], [0.0, 0.01], None)
    np.testing.assert_allclose(p.detach().double().numpy(), want[0], rtol=1e-5, atol=1e-9)


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
