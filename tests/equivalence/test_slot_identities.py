"""Gated memory slots against their identities (docs/knobs.md#gated-memory-slots): off is the row itself, bit for bit;
with the read zeroed the tokens see the row whatever the write path; the docs/knobs.md#gated-memory-slots configuration with copied
weights is Rec:fixed:skip; every option against the block-by-block reference cell."""

import pytest
import torch

from lrexp.model.state import SlotState

from oracles import reference_cell
from smoke import V, random_tokens as _tokens, run_stream, smoke_model as _model

ON = "model.slots.enabled=true"


def _segments(model, tokens, n, reset_at=None):
    """Logits and carried state of each segment of length n; lane 0 starts a new document at segment
    `reset_at` (the trainer's reset_rows)."""
    state, out = model.initial_state(tokens.shape[0], "cpu"), []
    for i, segment in enumerate(tokens.split(n, dim=1)):
        if i == reset_at:
            state = state.reset_rows(torch.arange(tokens.shape[0]) == 0)
        logits, state = model(segment, state)
        out.append((logits, state))
    return out


@pytest.mark.parametrize("row", ["xl512", "slide13"])
def test_slots_off_are_the_row_bit_for_bit(row):
    """Every other slot key set, enabled=false: the same parameters, logits and state as the row."""
    base, cfg = _model(row)
    off, _ = _model(row, "model.slots.layers=all", "model.slots.n=3", "model.slots.read=prefix_kv",
                    "model.slots.gate=lstm", "model.slots.ffn=true")
    assert base.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), off.state_dict().values()))
    tokens = _tokens(2, 3 * cfg.derived.segment_len)
    with torch.no_grad():
        for (la, sa), (lb, sb) in zip(_segments(base, tokens, cfg.derived.segment_len, 1),
                                      _segments(off, tokens, cfg.derived.segment_len, 1)):
            assert torch.equal(la, lb)
            assert sa.to_tensors().keys() == sb.to_tensors().keys()
            assert all(torch.equal(sa.to_tensors()[k], sb.to_tensors()[k]) for k in sa.to_tensors())


WRITE_PATHS = [  # (gate, self_attn, ffn, token_keys)
    ("fixed", "true", "false", "prev_and_current"),
    ("lstm", "true", "true", "prev_and_current"),
    ("lstm", "false", "false", "current"),
    ("fixed", "false", "true", "current"),
]


@pytest.mark.parametrize("row", ["xl512", "slide12"])
@pytest.mark.parametrize("gate,self_attn,ffn,token_keys", WRITE_PATHS)
def test_with_the_slot_columns_of_w_o_zeroed_the_tokens_see_the_row(row, gate, self_attn, ffn, token_keys):
    slots, cfg = _model(row, ON, "model.slots.layers=[0,-1]", "model.slots.n=5", f"model.slots.gate={gate}",
                        f"model.slots.self_attn={self_attn}", f"model.slots.ffn={ffn}",
                        f"model.slots.token_keys={token_keys}")
    base, _ = _model(row, seed=1)
    d, n = cfg.model.d_model, cfg.derived.segment_len
    tokens = _tokens(2, 3 * n)
    with torch.no_grad():
        shared = {k: v for k, v in slots.state_dict().items() if k in base.state_dict()}
        for i in cfg.derived.slot_layers:
            shared[f"layers.{i}.wo.weight"] = slots.layers[i].wo.weight[:, :d]  # W_O's window (A) columns
        assert not base.load_state_dict(shared, strict=False).missing_keys
        reading = _segments(slots, tokens, n, reset_at=1)[-1][0]
        for i in cfg.derived.slot_layers:
            slots.layers[i].wo.weight[:, d:] = 0.0  # the slot (B) columns: the tokens no longer read M
        got, want = _segments(slots, tokens, n, reset_at=1), _segments(base, tokens, n, reset_at=1)
    for (lg, sg), (lw, _) in zip(got, want):
        torch.testing.assert_close(lg, lw, atol=1e-5, rtol=1e-5)
        assert all(isinstance(sg.layers[i], SlotState) for i in cfg.derived.slot_layers)  # written all the same
    assert not torch.allclose(reading, want[-1][0], atol=1e-3)  # reading the slots does change the tokens


def test_the_b1_configuration_with_copied_weights_is_rec_fixed_skip():
    """Slots at L-3 of Slide:12L with n = S, cross_attn, self_attn, fixed, no FFN, previous and current
    block: the Rec:fixed:skip cell, parameter for parameter, over segments with a document reset inside."""
    rec, cfg = _model("rec_fixed_skip")
    s = cfg.model.recurrent.num_states
    slots, slot_cfg = _model("slide12", ON, "model.slots.layers=[-3]", f"model.slots.n={s}", "model.slots.read=cross_attn",
                             "model.slots.self_attn=true", "model.slots.gate=fixed", "model.slots.ffn=false",
                             "model.slots.token_keys=prev_and_current", seed=1)
    assert slot_cfg.derived.slot_layers == cfg.derived.recurrent_layers
    slots.load_state_dict(rec.state_dict())  # strict: the same parameters under the same names
    n = cfg.derived.segment_len
    tokens = _tokens(2, 4 * n)
    with torch.no_grad():
        got, want = _segments(slots, tokens, n, reset_at=2), _segments(rec, tokens, n, reset_at=2)
    (index,) = cfg.derived.recurrent_layers
    for (lg, sg), (lw, sw) in zip(got, want):
        torch.testing.assert_close(lg, lw, atol=1e-6, rtol=1e-6)
        assert sg.layers[index].kind == "slots" and sw.layers[index].kind == "recurrent"
        for a, b in zip(sg.layers, sw.layers):
            for name, t in b.to_tensors().items():
                torch.testing.assert_close(a.to_tensors()[name], t, atol=1e-6, rtol=1e-6)


OPTIONS = [  # (read, self_attn, ffn, token_keys, gate)
    ("cross_attn", "false", "false", "current", "lstm"),
    ("prefix_kv", "true", "false", "prev_and_current", "fixed"),
    ("prefix_kv", "false", "true", "current", "lstm"),
]


@pytest.mark.parametrize("read,self_attn,ffn,token_keys,gate", OPTIONS)
def test_a_slot_layer_equals_the_block_by_block_reference(read, self_attn, ffn, token_keys, gate):
    model, cfg = _model("xl512", ON, "model.slots.n=5", f"model.slots.read={read}", f"model.slots.gate={gate}",
                        f"model.slots.self_attn={self_attn}", f"model.slots.ffn={ffn}",
                        f"model.slots.token_keys={token_keys}", "model.segment_len=32")
    (index,) = cfg.derived.slot_layers
    layer = model.layers[index]
    x = torch.randn(2, cfg.derived.segment_len, cfg.model.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        state = layer.initial_state(2, "cpu")  # fresh lanes (c_init) with a cache of random keys
        state = SlotState(fresh=state.fresh, k=torch.randn(state.k.shape), v=torch.randn(state.v.shape), c=state.c)
        y, new = layer(x, state)
        y_ref, c_ref = reference_cell(layer, x, layer.c_init.expand(2, -1, -1), state.k, state.v)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.c, c_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("read", ["cross_attn", "prefix_kv"])
def test_slots_carry_a_token_beyond_the_window_and_a_document_start_cuts_it(read):
    """XL:W sees one window back per layer; the slots carry segment 0 to segment 3, unless lane 0 starts a
    new document in between, which makes it the same as a fresh lane."""
    model, cfg = _model("xl512", ON, "model.slots.layers=[1]", "model.slots.n=4", f"model.slots.read={read}")
    n = cfg.derived.segment_len
    tokens = _tokens(2, 4 * n)
    changed = tokens.clone()
    changed[:, 2] = (tokens[:, 2] + 1) % V  # a token of segment 0
    with torch.no_grad():
        base = _segments(model, tokens, n, reset_at=2)[-1][0]
        other = _segments(model, changed, n, reset_at=2)[-1][0]
        fresh = _segments(model, tokens[:1, 2 * n:], n)[-1][0]
    assert not torch.allclose(base[1], other[1], atol=1e-6)  # lane 1: no reset, segment 0 still matters
    assert torch.equal(base[0], other[0])  # lane 0 was reset at segment 2
    torch.testing.assert_close(base[:1], fresh, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("read", ["cross_attn", "prefix_kv"])
def test_slots_keep_xl_segment_invariant(read):
    """XL is evaluated in segments of 8W (variants: segment_invariant): with slots, whose carry is exact,
    its logits must still not depend on where the stream is cut."""
    model, cfg = _model("xl512", ON, "model.slots.layers=[0,2]", "model.slots.n=4", f"model.slots.read={read}")
    w = cfg.model.window
    tokens = _tokens(2, 16 * w)
    with torch.no_grad():
        by_block, state_w = run_stream(model, tokens, w)
        by_8w, state_8w = run_stream(model, tokens, 8 * w)
    torch.testing.assert_close(by_block, by_8w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_w.layers[2].c, state_8w.layers[2].c, atol=1e-5, rtol=1e-5)
