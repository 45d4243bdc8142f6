"""The identity tests of the bounded multi-state evaluation (docs/cache-policies.md#identity-tests), on tiny random models.

Every policy decodes through the model's own layers (lrexp.cache.decode); these tests pin what each policy,
the tie rule, block mode, the position knob and the resets must equal.
"""

from dataclasses import replace

import pytest
import torch

from lrexp.config.load import load
from lrexp.cache import PolicyError, build_policy
from lrexp.cache.decode import BoundedDecoder, check_model
from lrexp.cache.multistate import EMPTY, KVRows, evict
from lrexp.model.lm import build_model

from smoke import run_stream

V = 64
POLICIES = ("window", "sinks", "h2o", "tova")


def _model(row, *overrides):
    cfg = load(overrides=["scale=smoke", f"row={row}", "model.attn.backend=reference", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, V).eval(), cfg


def _tokens(lanes, length, seed=1):
    return torch.randint(0, V, (lanes, length), generator=torch.Generator().manual_seed(seed))


def _decode(model, cfg, name, budget, tokens, context, block=1, starts=None, **knobs):
    """Logits [B, T, V] and the final state of tokens [B, T] read in segments of the row's N; starts[s] [B]
    flags the lanes whose document starts at segment s (default: every lane at segment 0)."""
    policy = build_policy(name, budget, replace(cfg.policy, **knobs))
    decoder = BoundedDecoder(model, policy, context=context, block=block, positions=knobs.get("positions", "original"))
    state = decoder.initial_state(tokens.shape[0], "cpu")
    n = cfg.derived.segment_len
    out = []
    for s, segment in enumerate(tokens.split(n, 1)):
        start = torch.full((tokens.shape[0],), s == 0) if starts is None else starts[s]
        logits, _, state = decoder.run(segment, state, start)
        out.append(logits[0])  # [B, n, V]: the one setting
    return torch.cat(out, 1), state


# ---- 1. C >= T_eval is the topline -------------------------------------------------------------------


@pytest.mark.parametrize("row,overrides", [("xl512", ()), ("slide12", ()), ("full", ()),
                                           ("slide12", ("model.attn.window_includes_self=true",)),
                                           ("xl512", ("model.attn.mask_empty_cache=true",))])
def test_full_policy_at_the_default_context_is_the_native_model(row, overrides):
    model, cfg = _model(row, *overrides)
    tokens = _tokens(2, 2 * cfg.derived.segment_len)
    context = cfg.derived.segment_len if row == "full" else cfg.model.window
    with torch.no_grad():
        native = run_stream(model, tokens, cfg.derived.segment_len)[0]
    torch.testing.assert_close(_decode(model, cfg, "full", None, tokens, context)[0], native, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("row", ["full", "slide12"])
def test_every_policy_with_a_budget_of_the_context_or_more_is_bitwise_the_topline(name, row):
    model, cfg = _model(row)
    context = cfg.derived.segment_len if row == "full" else 3 * cfg.model.window
    tokens = _tokens(2, 2 * cfg.derived.segment_len)
    topline = _decode(model, cfg, "full", None, tokens, context)[0]
    for budget in (context, context + 5):
        assert torch.equal(_decode(model, cfg, name, budget, tokens, context)[0], topline)


# ---- 2. Window(W) under exclude-self is the native window ----------------------------------------------


@pytest.mark.parametrize("row", ["xl512", "slide12"])
def test_window_of_w_with_the_window_lifted_is_the_native_windowed_model(row):
    model, cfg = _model(row)
    w = cfg.model.window
    tokens = _tokens(2, 2 * cfg.derived.segment_len)
    with torch.no_grad():
        native = run_stream(model, tokens, cfg.derived.segment_len)[0]
    lifted = _decode(model, cfg, "full", None, tokens, 4 * w)[0]
    assert not torch.allclose(lifted, native, atol=1e-3)  # the lifted context sees more: the policy must cut
    torch.testing.assert_close(_decode(model, cfg, "window", w, tokens, 4 * w)[0], native, atol=2e-6, rtol=1e-5)


# ---- 3. Window+0 == Window, H2O with h = 0 == Window ---------------------------------------------------


def test_sinks_with_no_sink_and_h2o_without_heavy_hitters_are_window():
    model, cfg = _model("full")
    tokens = _tokens(2, cfg.derived.segment_len)
    n = cfg.derived.segment_len
    window = _decode(model, cfg, "window", 6, tokens, n)[0]
    assert torch.equal(_decode(model, cfg, "sinks", 6, tokens, n, sinks=0)[0], window)
    assert torch.equal(_decode(model, cfg, "h2o", 6, tokens, n, h2o_heavy=0)[0], window)
    assert not torch.equal(_decode(model, cfg, "sinks", 6, tokens, n)[0], window)  # i = 4 sinks do act
    assert not torch.equal(_decode(model, cfg, "h2o", 6, tokens, n)[0], window)


# ---- 4. the tie rule ---------------------------------------------------------------------------------


def _rows(scores):
    n = len(scores)
    return KVRows(k=torch.randn(1, 1, n, 2), v=torch.randn(1, 1, n, 2), pos=torch.arange(n).view(1, 1, n),
                  score=torch.tensor(scores, dtype=torch.float32).view(1, 1, n))


def test_equal_scores_evict_the_oldest_first_and_lower_scores_before_older_rows():
    none = torch.zeros(1, 1, 8, dtype=torch.bool)
    assert evict(_rows([0.5] * 8), 5, none).pos.flatten().tolist() == [3, 4, 5, 6, 7]
    # lowest score first, then the oldest among equals; protected rows (H2O's recent window) never go
    kept = evict(_rows([0.3, 0.1, 0.3, 0.2, 0.1, 0.3, 0.0, 0.0]), 5, torch.tensor([False] * 6 + [True] * 2).view(1, 1, 8))
    assert kept.pos.flatten().tolist() == [0, 2, 5, 6, 7]
    # scores compare exactly in fp32: a one-ulp difference decides
    tiny = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)).item()
    assert evict(_rows([tiny, 0.5, 0.5, 0.5]), 3, none[..., :4]).pos.flatten().tolist() == [0, 2, 3]


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_tova_with_every_probability_equal_evicts_oldest_first(granularity):
    """Zero queries and a zero bias table give every visible row the same probability, so TOVA's scores tie
    and the tie rule alone decides: it must keep what Window keeps. (H2O's accumulated scores never tie this
    way, old rows having been scored by more queries; its tie rule is the shared `evict`, tested above.)"""
    model, cfg = _model("full")
    with torch.no_grad():
        for layer in model.layers:
            layer.qkv.wq.weight.zero_()
            layer.rel_bias.table.zero_()
    tokens = _tokens(2, cfg.derived.segment_len)
    n = cfg.derived.segment_len
    tova = _decode(model, cfg, "tova", 6, tokens, n, granularity=granularity)
    window = _decode(model, cfg, "window", 6, tokens, n)
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(tova[1].rows, window[1].rows))
    assert torch.equal(tova[0], window[0])


# ---- 5. block mode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("full", *POLICIES))
def test_block_mode_with_blocks_of_one_token_is_token_mode(name):
    model, cfg = _model("slide12")
    tokens = _tokens(2, cfg.derived.segment_len)
    budget = None if name == "full" else 6
    token = _decode(model, cfg, name, budget, tokens, 2 * cfg.model.window)[0]
    assert torch.equal(_decode(model, cfg, name, budget, tokens, 2 * cfg.model.window, block=1,
                               tova_score_query="mean_block")[0], token)


@pytest.mark.parametrize("name,knobs", [("window", {}), ("sinks", {}), ("sinks", {"sinks": 2}),
                                        ("window", {"protect_first_i": 1}),
                                        ("sinks", {"positions": "cache_relative"})])
@pytest.mark.parametrize("block", [3, 8])
def test_fifo_policies_in_block_mode_equal_token_mode_for_any_block(name, knobs, block):
    model, cfg = _model("slide12")
    tokens = _tokens(2, cfg.derived.segment_len)
    context = 2 * cfg.model.window
    token = _decode(model, cfg, name, 6, tokens, context, **knobs)[0]
    torch.testing.assert_close(_decode(model, cfg, name, 6, tokens, context, block=block, **knobs)[0], token,
                               atol=1e-6, rtol=1e-6)


# ---- 6. lanes are independent ------------------------------------------------------------------------


@pytest.mark.parametrize("name,granularity", [("h2o", "head"), ("h2o", "layer"), ("tova", "layer"), ("tova", "head")])
def test_lane_zero_alone_equals_lane_zero_in_a_batch_of_three(name, granularity):
    model, cfg = _model("slide12")
    n = cfg.derived.segment_len
    tokens = _tokens(3, 2 * n)
    starts = [torch.tensor([True, True, True]), torch.tensor([False, True, False])]  # lane 1 starts a new document
    batch = _decode(model, cfg, name, 6, tokens, 2 * cfg.model.window, starts=starts, granularity=granularity)
    alone = _decode(model, cfg, name, 6, tokens[:1], 2 * cfg.model.window, starts=[s[:1] for s in starts],
                    granularity=granularity)
    torch.testing.assert_close(batch[0][:1], alone[0], atol=1e-6, rtol=1e-6)
    for mixed, single in zip(batch[1].rows, alone[1].rows):
        assert torch.equal(mixed.pos[:1], single.pos)  # the same rows kept: scores are per lane


@pytest.mark.parametrize("name,block", [("window", 1), ("sinks", 3), ("h2o", 1), ("tova", 4)])
def test_budgets_decoded_together_equal_each_decoded_alone(name, block):
    """One policy at several budgets in one pass (lane groups, a cap each), shrinking the batch on the way as
    an evaluation does, gives every setting what it gives alone."""
    model, cfg = _model("slide12")
    n = cfg.derived.segment_len
    tokens = _tokens(3, 2 * n)
    context = 2 * cfg.model.window
    policies = [build_policy(name, c, cfg.policy) for c in (6, 9, 40)]  # 40 > the context: capped there
    together = BoundedDecoder(model, policies, context=context, block=block)
    state = together.initial_state(3, "cpu")
    first, _, state = together.run(tokens[:, :n], state, torch.tensor([True, True, True]))
    second, _, state = together.run(tokens[:2, n:], state.narrow(2, 3), torch.tensor([False, True]))
    for g, policy in enumerate(policies):
        alone = BoundedDecoder(model, policy, context=context, block=block)
        mine = alone.initial_state(3, "cpu")
        head, _, mine = alone.run(tokens[:, :n], mine, torch.tensor([True, True, True]))
        tail, _, mine = alone.run(tokens[:2, n:], mine.narrow(2, 1), torch.tensor([False, True]))
        torch.testing.assert_close(first[g], head[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(second[g], tail[0], atol=1e-6, rtol=1e-6)
        for rows, own in zip(state.rows, mine.rows):  # the same rows kept, however many empty slots
            got = rows.pos[g * 2:(g + 1) * 2]
            assert torch.equal(got[..., got.shape[-1] - own.pos.shape[-1]:], own.pos)
            assert bool((got[..., :got.shape[-1] - own.pos.shape[-1]] == EMPTY).all())


# ---- 7. cache_relative == original before any eviction ------------------------------------------------


def test_cache_relative_positions_equal_original_ones_until_a_row_is_evicted():
    model, cfg = _model("full")
    n = cfg.derived.segment_len
    tokens = _tokens(2, n)
    for name in POLICIES:
        original = _decode(model, cfg, name, n, tokens, n)[0]
        assert torch.equal(_decode(model, cfg, name, n, tokens, n, positions="cache_relative")[0], original)
    # once rows are evicted the distances differ, and so do the logits (the knob is live)
    evicted = _decode(model, cfg, "tova", 6, tokens, n)[0]
    relative = _decode(model, cfg, "tova", 6, tokens, n, positions="cache_relative")[0]
    assert torch.equal(relative[:, :7], evicted[:, :7]) and not torch.allclose(relative, evicted, atol=1e-4)


# ---- 8. a document reset clears rows, sinks and scores --------------------------------------------------


@pytest.mark.parametrize("name", ["sinks", "h2o", "tova"])
def test_a_document_reset_clears_every_row_sink_and_score(name):
    model, cfg = _model("slide12")
    n = cfg.derived.segment_len
    tokens = _tokens(2, 2 * n)
    policy = build_policy(name, 6, cfg.policy)
    decoder = BoundedDecoder(model, policy, context=2 * cfg.model.window)
    state = decoder.initial_state(2, "cpu")
    _, _, state = decoder.run(tokens[:, :n], state, torch.tensor([True, True]))
    assert all(bool(r.valid[0].any()) and (name == "sinks" or bool(r.score[0].any())) for r in state.rows)
    cleared = state.reset_rows(torch.tensor([True, False]))
    for before, after in zip(state.rows, cleared.rows):
        assert bool((after.pos[0] == EMPTY).all()) and not after.score[0].any()
        assert not after.k[0].any() and not after.v[0].any()
        assert torch.equal(after.pos[1], before.pos[1]) and torch.equal(after.score[1], before.score[1])
    # lane 0 then reads its second segment as a new document: exactly what a fresh decoder gives it
    logits, _, _ = decoder.run(tokens[:, n:], state, torch.tensor([True, False]))
    fresh, _, _ = decoder.run(tokens[:1, n:], decoder.initial_state(1, "cpu"), torch.tensor([True]))
    carried, _, _ = decoder.run(tokens[1:, n:], state.lanes(slice(1, 2)), torch.tensor([False]))
    torch.testing.assert_close(logits[0, :1], fresh[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits[0, 1:], carried[0], atol=1e-6, rtol=1e-6)


# ---- what the policies refuse ------------------------------------------------------------------------


@pytest.mark.parametrize("row", ["rec_fixed_skip", "fb_fixed_skip", "mem64k"])
def test_rows_without_plain_kv_caches_are_refused_naming_why(row):
    model, _ = _model(row, "model.knn.memory_size=128") if row == "mem64k" else _model(row)
    with pytest.raises(PolicyError, match="plain KV caches"):
        check_model(model)


def test_bad_policies_and_budgets_are_one_line_errors():
    knobs = load(overrides=["scale=smoke"]).policy
    with pytest.raises(PolicyError, match="unknown cache policy 'lru'"):
        build_policy("lru", 8, knobs)
    with pytest.raises(PolicyError, match="budget C > 4"):
        build_policy("sinks", 4, knobs)
    with pytest.raises(PolicyError, match="needs a budget"):
        build_policy("tova", None, knobs)
    with pytest.raises(PolicyError, match="takes no budget"):
        build_policy("full", 8, knobs)
