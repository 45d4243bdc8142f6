"""The token step (lrexp.cache.step, docs/cache-policies.md#token-step) equals the reference token mode
(`BoundedDecoder`, b = 1): the same NLL to 1e-6 and the same kept rows, for every policy, knob and row kind,
with several policies and budgets in one pass and lanes whose documents reset at different steps."""

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from lrexp.cache import build_policy
from lrexp.cache.decode import BoundedDecoder
from lrexp.cache.step import SlotDecoder
from lrexp.config.load import load
from lrexp.model.lm import build_model

V = 64
POLICIES = ("window", "sinks", "h2o", "tova")
LENGTH = 12  # tokens per segment: two segments, a context of 10 and budgets of 6 and 8 evict from step 7


def _model(row, *overrides):
    cfg = load(overrides=["scale=smoke", f"row={row}", "model.attn.backend=reference", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, V).eval(), cfg


def _compare(model, cfg, names=POLICIES, budgets=(6, 8), context=10, compile=False, **knobs):
    """Every (policy, budget) through one SlotDecoder pass and through BoundedDecoder one policy at a time,
    over two segments of three lanes, lane 1 starting a new document at the second."""
    policy = replace(cfg.policy, **knobs)
    tokens = torch.randint(0, V, (3, 2 * LENGTH), generator=torch.Generator().manual_seed(1))
    labels, mask = tokens.roll(-1, 1), torch.ones_like(tokens, dtype=torch.bool)
    mask[2, 3] = False
    starts = [torch.tensor([True, True, True]), torch.tensor([False, True, False])]
    settings = [build_policy(name, c, policy) for name in names for c in budgets]
    step = SlotDecoder(model, settings, context, positions=policy.positions, compile=compile)
    state, got = step.initial_state(3, "cpu"), []
    for s, start in enumerate(starts):
        at = slice(s * LENGTH, (s + 1) * LENGTH)
        nll, qpos, state = step.score(tokens[:, at], labels[:, at], mask[:, at], state, start)
        got.append(nll)
    got = torch.cat(got, 2)  # [G, B, T]
    for i, name in enumerate(names):
        group = settings[i * len(budgets):(i + 1) * len(budgets)]
        reference = BoundedDecoder(model, group, context, positions=policy.positions)
        ref_state, want = reference.initial_state(3, "cpu"), []
        for s, start in enumerate(starts):
            at = slice(s * LENGTH, (s + 1) * LENGTH)
            nll, ref_qpos, ref_state = reference.score(tokens[:, at], labels[:, at], mask[:, at], ref_state, start)
            want.append(nll)
        assert torch.equal(qpos, ref_qpos)
        torch.testing.assert_close(got[i * len(budgets):(i + 1) * len(budgets)], torch.cat(want, 2), atol=1e-6, rtol=1e-6)
        for j in range(len(budgets)):
            for layer, rows in enumerate(ref_state.rows):  # the same rows kept, in any slot order
                kept, ref = step.kept(state, i * len(budgets) + j, layer), rows.pos[j * 3:(j + 1) * 3]
                both = min(kept.shape[-1], ref.shape[-1])
                assert torch.equal(kept[..., -both:], ref[..., -both:]), (name, layer)
                assert bool((kept[..., :-both] == -1).all()) and bool((ref[..., :-both] == -1).all())
    return got


CASES = [  # (row, overrides, knobs): every knob and row kind at least once
    ("full", (), {}),
    ("slide12", (), {"positions": "cache_relative", "granularity": "head"}),
    ("xl512", (), {"granularity": "layer", "protect_first_i": 1, "h2o_heavy": 1}),
    ("xl512", ("model.attn.mask_empty_cache=true",), {}),
    ("slide12", ("model.attn.window_includes_self=true",), {"protect_newest": True, "positions": "cache_relative"}),
]


@pytest.mark.parametrize("row,overrides,knobs", CASES)
def test_the_token_step_equals_the_reference_token_mode(row, overrides, knobs):
    model, cfg = _model(row, *overrides)
    _compare(model, cfg, **knobs)


@pytest.mark.slow  # the product of every knob and row kind: about a minute
@pytest.mark.parametrize("row,overrides", [("full", ()), ("xl512", ()), ("xl512", ("model.attn.mask_empty_cache=true",)),
                                           ("slide12", ()), ("slide12", ("model.attn.window_includes_self=true",))])
@pytest.mark.parametrize("granularity", ["head", "layer"])
@pytest.mark.parametrize("positions", ["original", "cache_relative"])
@pytest.mark.parametrize("extra", [{}, {"protect_first_i": 2}, {"protect_newest": True}, {"h2o_heavy": 2}])
def test_the_token_step_equals_the_reference_for_every_knob(row, overrides, granularity, positions, extra):
    model, cfg = _model(row, *overrides)
    _compare(model, cfg, granularity=granularity, positions=positions, budgets=(7, 9, 12), **extra)


def test_tied_scores_follow_the_tie_rule():
    """Zero queries and a zero bias table give every visible row the same probability: TOVA's scores tie
    and H2O's tie wherever two rows saw the same queries, so the order among equals (the oldest first)
    decides which row goes, as in the reference's sort (H2O per head, TOVA per layer: their defaults)."""
    model, cfg = _model("full")
    with torch.no_grad():
        for layer in model.layers:
            layer.qkv.wq.weight.zero_()
            layer.rel_bias.table.zero_()
    _compare(model, cfg, names=("h2o", "tova"))


@pytest.mark.slow  # compiling the step takes tens of seconds
def test_the_compiled_token_step_equals_the_eager_one():
    model, cfg = _model("slide12")
    eager = _compare(model, cfg)
    counters.clear()
    compiled = _compare(model, cfg, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo's tally: the step compiled, no fallback to eager
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
