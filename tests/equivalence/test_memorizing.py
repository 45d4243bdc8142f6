"""The Memorizing row (docs/models.md#memorizing-transformer, docs/models.md#identity-tests): gate 0 == XL:W, retrieval before the write, the ring's
contents, reset isolation, reduced-precision storage and the logged statistics.

Smoke scale: N = W = 8, memory 128 entries (16 segments), k = 8; the memory layer is layer 0 of 4.
"""

import pytest
import torch

from lrexp.config.load import load
from lrexp.attention import MaskSpec, attend
from lrexp.layers.common import merge_heads
from lrexp.layers.memorizing import MemorizingLayer
from lrexp.model.lm import build_model
from lrexp.model.state import KNNMemory, StateError

from smoke import run_stream

V = 64


def _model(*overrides, row="mem64k"):
    cfg = load(overrides=["scale=smoke", f"row={row}", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, V).eval(), cfg


def _tokens(lanes, length, seed=1):
    return torch.randint(0, V, (lanes, length), generator=torch.Generator().manual_seed(seed))


def _memory_layer(model):
    (index,) = [i for i, layer in enumerate(model.layers) if isinstance(layer, MemorizingLayer)]
    return index, model.layers[index]


def test_gate_forced_to_zero_equals_xl_with_the_same_weights():
    """12.6: g_h = sigma(-inf) = 0 leaves Y = Y_local, so the row is XL:W, over segments that fill the memory."""
    mem, cfg = _model()
    xl, _ = _model(row="xl512")
    missing = mem.load_state_dict(xl.state_dict(), strict=False)
    index, layer = _memory_layer(mem)
    assert missing.missing_keys == [f"layers.{index}.gate_bias"] and not missing.unexpected_keys
    tokens = _tokens(2, 6 * cfg.derived.segment_len)
    with torch.no_grad():
        layer.gate_bias.fill_(float("-inf"))
        gated_off, state = run_stream(mem, tokens, cfg.derived.segment_len)
        assert state.layers[index].count.tolist() == [48, 48]  # the memory was read, just not mixed in
        torch.testing.assert_close(gated_off, run_stream(xl, tokens, cfg.derived.segment_len)[0], rtol=0, atol=0)
        layer.gate_bias.zero_()
        assert not torch.allclose(run_stream(mem, tokens, cfg.derived.segment_len)[0], gated_off)


def test_a_segment_retrieves_exactly_the_earlier_segments_never_its_own():
    """Under stop_forward the attention sublayer outputs Y_mem alone: 0 for a document's first segment (nothing
    of its own is visible), then, with k = N and exact search, attention over exactly the first segment."""
    model, cfg = _model("model.knn.combine=stop_forward", "model.knn.backend=exact")
    index, layer = _memory_layer(model)
    n = cfg.derived.segment_len
    assert layer.k == n
    x1, x2 = torch.randn(2, 2, n, cfg.model.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y1, state = layer(x1, layer.initial_state(2, "cpu"))
        torch.testing.assert_close(y1, layer.ffn(x1), rtol=0, atol=0)  # Y_mem = 0: no NaN, no own keys
        assert state.count.tolist() == [n, n] and state.memory_k.requires_grad is False
        y2, _ = layer(x2, state)
        q, _, _ = layer.qkv(x2)  # [B, H, N, D]
        k1, v1 = state.memory_k[:, :, :n], state.memory_v[:, :, :n]  # the first segment's entries
        torch.testing.assert_close(k1, state.k)  # N = W: they are also the XL cache
        y_mem = attend(q, k1, v1, MaskSpec(causal=False), scale=layer.scale(), backend="reference")
        torch.testing.assert_close(y2, layer.ffn(x2 + layer.wo(merge_heads(y_mem))), rtol=1e-5, atol=1e-5)


def test_the_memory_holds_the_newest_segments_in_ring_order():
    model, cfg = _model()
    index, layer = _memory_layer(model)
    n, size = cfg.derived.segment_len, layer.memory_size
    segments = size // n + 4  # 20 segments into a ring of 16
    state, caches = model.initial_state(2, "cpu"), []
    with torch.no_grad():
        for segment in _tokens(2, segments * n).split(n, dim=1):
            _, state = model(segment, state)
            caches.append(state.layers[index].k)  # N = W: the XL cache is the segment's keys
    memory = state.layers[index]
    assert memory.pointer.tolist() == [segments * n % size] * 2 and memory.count.tolist() == [size] * 2
    for s in range(segments - size // n, segments):  # the newest 16 segments, at slot (s * N) mod K_mem
        start = s * n % size
        assert torch.equal(memory.memory_k[:, :, start:start + n], caches[s]), s


def test_reset_isolation():
    """12.5: a lane reset at a document start equals a fresh lane; the other lanes are untouched."""
    model, cfg = _model()
    n = cfg.derived.segment_len
    index, _ = _memory_layer(model)
    history, nxt = _tokens(3, 5 * n), _tokens(3, 2 * n, seed=3)
    with torch.no_grad():
        _, carried = run_stream(model, history, n)
        reset = carried.reset_rows(torch.tensor([False, True, False]))
        assert reset.layers[index].count.tolist() == [5 * n, 0, 5 * n]
        logits, _ = run_stream(model, nxt, n, reset)
        kept, _ = run_stream(model, nxt, n, carried)
        fresh, _ = run_stream(model, nxt[1:2], n)
    torch.testing.assert_close(logits[1:2], fresh, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[[0, 2]], kept[[0, 2]])
    assert not torch.allclose(kept[1:2], fresh, atol=1e-3)  # the carried memory did matter in lane 1


def test_training_gradients_reach_the_query_scale_and_gate_but_not_the_memory():
    model, cfg = _model()
    model.train()
    n = cfg.derived.segment_len
    index, layer = _memory_layer(model)
    with torch.no_grad():
        _, state = run_stream(model, _tokens(2, 3 * n), n)  # a non-empty memory
    logits, new_state = model(_tokens(2, n, seed=4), state)
    logits.square().mean().backward()
    for p in (layer.gate_bias, layer.scale.weight, layer.qkv.wq.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert not any(t.requires_grad for t in new_state.layers[index].to_tensors().values())


def test_bfloat16_storage_halves_the_bytes_and_stays_close():
    full, cfg = _model()
    half, _ = _model("model.knn.state_dtype=bfloat16")
    index, layer = _memory_layer(half)
    n = cfg.derived.segment_len
    tokens = _tokens(2, 4 * n)
    with torch.no_grad():
        a, sa = run_stream(full, tokens, n)
        b, sb = run_stream(half, tokens, n)
    ma, mb = sa.layers[index], sb.layers[index]
    assert mb.memory_k.dtype == torch.bfloat16 and mb.memory_k.element_size() * 2 == ma.memory_k.element_size()
    filled = ma.memory_v[:, :, : 4 * n]
    assert ((mb.memory_v[:, :, : 4 * n].float() - filled).abs() <= filled.abs() * 2 ** -8).all()  # docs/knobs.md#state-storage-dtype test 2
    torch.testing.assert_close(a, b, rtol=0, atol=0.05)
    with pytest.raises(StateError, match="overflows float16"):
        _model("model.knn.state_dtype=float16")[0].layers[index]._store(torch.full((1, 1, 1, 2), 1e6))


def test_local_position_bias_off_drops_the_bias_table():
    model, cfg = _model("model.knn.local_position_bias=false", "model.knn.combine=add")
    index, layer = _memory_layer(model)
    assert layer.rel_bias is None and layer.gate_bias is None
    assert not any(name.startswith(f"layers.{index}.rel_bias") for name, _ in model.named_parameters())
    with torch.no_grad():
        logits, state = run_stream(model, _tokens(2, 2 * cfg.derived.segment_len), cfg.derived.segment_len)
    assert torch.isfinite(logits).all() and isinstance(state.layers[index], KNNMemory)


def test_statistics_are_computed_when_asked_and_only_then():
    model, cfg = _model()
    n = cfg.derived.segment_len
    index, _ = _memory_layer(model)
    state = model.initial_state(2, "cpu")
    with torch.no_grad():
        _, state = model(_tokens(2, n), state, measure=True)
        assert state.stats == {}  # every memory was empty: nothing to measure
        for segment in _tokens(2, 3 * n, seed=5).split(n, dim=1):
            _, state = model(segment, state, measure=True)
        stats = state.stats
        assert set(stats) == {f"knn{index}/recall_at_k", f"knn{index}/age_steps"}
        assert 0.0 < stats[f"knn{index}/recall_at_k"] <= 1.0 and 1.0 <= stats[f"knn{index}/age_steps"] <= 3.0
        measured_logits, _ = model(_tokens(2, n, seed=6), state, measure=True)
        logits, state = model(_tokens(2, n, seed=6), state)
        assert state.stats == {}  # not asked: nothing measured
        torch.testing.assert_close(logits, measured_logits, rtol=0, atol=0)  # measuring changes no output
