"""Gated memory slots' parts (docs/knobs.md#gated-memory-slots): config and its errors, the layer each option builds,
the carried state's kind, shapes, init, reset and gradient path, and the prefix keys of the mask."""

import pytest
import torch

from lrexp.config.errors import ConfigError
from lrexp.config.load import load, to_yaml
from lrexp.attention import MaskSpec, attend
from lrexp.layers.gates import DualUpdate, SkipUpdate
from lrexp.layers.slots import SlotLayer
from lrexp.model.state import ModelState, SlotState, XLCache

from smoke import V, smoke_model
ON = "model.slots.enabled=true"


def _model(row, *overrides):
    return smoke_model(row, ON, *overrides)


@pytest.mark.parametrize("overrides,match", [
    (["model.slots.read=kv"], "model.slots.read"),
    (["model.slots.gate=bias"], "model.slots.gate"),
    (["model.slots.token_keys=previous"], "model.slots.token_keys"),
    (["model.slots.layers=[4]"], "'model.slots.layers' index 4 is outside a stack of 4 layers"),
    (["model.slots.layers=[1,-3]"], "names a layer twice"),
    (["model.slots.layers=every"], "list of layer indices or 'all'"),
    (["model.slots.n=0"], "'model.slots.n' must be > 0"),
    (["row=full"], "layer 1 of row Full, a dense layer without a window"),
    (["row=rec_fixed_skip"], "layer 1 of row Rec:fixed:skip, a 'recurrent' layer"),
    (["model.slots.layers=all", "model.variant=feedback"], "layer 0 of row Feedback:fixed:skip, a 'feedback'"),
    (["model.slots.read=prefix_kv", "model.attn.backend=triton"], "banded 'triton' attention backend"),
])
def test_a_bad_slots_config_is_a_one_line_error_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load(overrides=["scale=smoke", ON, *overrides])
    assert "\n" not in str(info.value)


def test_the_slots_keys_are_in_the_resolved_config_and_off_by_default():
    cfg = load(overrides=["scale=smoke"])
    assert not cfg.model.slots.enabled and cfg.derived.slot_layers == []
    text = to_yaml(cfg)
    for key in ("slots:", "enabled: false", "read: cross_attn", "token_keys: prev_and_current", "self_attn: true"):
        assert key in text
    every = load(overrides=["scale=smoke", "row=xl512", ON, "model.slots.layers=all"])
    assert every.derived.slot_layers == [0, 1, 2, 3]
    assert load(overrides=["scale=smoke", "row=rec_fixed_skip", ON, "model.slots.layers=[0,-1]"]
                ).derived.slot_layers == [0, 3]  # a Rec row's attention layers may hold slots


def test_each_option_builds_its_own_parts_and_nothing_else():
    model, cfg = _model("xl512", "model.slots.layers=[-1]", "model.slots.n=5")
    d = cfg.model.d_model
    layer = model.layers[3]
    assert isinstance(layer, SlotLayer) and all(not isinstance(m, SlotLayer) for m in model.layers[:3])
    assert isinstance(layer.update, SkipUpdate) and layer.update.w_o.in_features == 2 * d  # u = [P ; R]
    assert layer.wo.in_features == 2 * d and layer.wq2 is not None  # cross_attn: [A ; B] before W_O
    assert layer.c_init.shape == (5, d) and layer.state.ids.shape == (5, d)

    model, _ = _model("xl512", "model.slots.layers=[-1]", "model.slots.ffn=true", "model.slots.self_attn=false",
                      "model.slots.read=prefix_kv", "model.slots.gate=lstm")
    layer = model.layers[3]
    assert isinstance(layer.update, DualUpdate) and layer.update.w_o.in_features == d  # u = R alone
    assert layer.update.gate1.w_f.in_features == d
    assert layer.state.wq is None and layer.state_scale is None  # no P
    assert layer.wo.in_features == d and not hasattr(layer, "wq2") and not hasattr(layer, "scale2")
    tokens = torch.randint(0, V, (2, 64))
    model(tokens, model.initial_state(2, "cpu"))[0].sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter built is used (DDP needs it)


def test_the_carried_state_has_one_slot_state_per_enabled_layer_and_round_trips():
    model, cfg = _model("slide13", "model.slots.layers=[0,2]", "model.slots.n=6")
    h, w, dh, d = cfg.model.num_heads, cfg.model.window, cfg.derived.head_dim, cfg.model.d_model
    with torch.no_grad():
        _, state = model(torch.randint(0, V, (3, cfg.derived.segment_len)), model.initial_state(3, "cpu"))
    kinds = [type(s) for s in state.layers]
    assert kinds == [SlotState, XLCache, SlotState, XLCache, XLCache]
    for i in (0, 2):
        s = state.layers[i]
        assert s.c.shape == (3, 6, d) and s.k.shape == (3, h, w, dh) and s.v.shape == (3, h, w, dh)
        assert set(s.to_tensors()) == {"fresh", "k", "v", "c"} and not s.fresh.any()
    back = ModelState.from_tensors(state.to_tensors())
    assert [type(s) for s in back.layers] == kinds
    assert all(torch.equal(a, b) for a, b in zip(state.to_tensors().values(), back.to_tensors().values()))


def test_slots_start_at_their_learned_initial_value_with_ids_as_the_spec_says():
    model, cfg = _model("xl512", "model.slots.layers=[0]", "model.slots.n=512", "scale.d_model=64")
    layer = model.layers[0]
    assert layer.c_init.std().item() == pytest.approx(0.1, rel=0.1)
    assert layer.state.ids.std().item() == pytest.approx(1.0, rel=0.1)
    carried = layer.initial_state(3, "cpu")
    carried = SlotState(fresh=torch.zeros(3, dtype=torch.bool), k=carried.k, v=carried.v,
                        c=torch.randn(carried.c.shape))
    start = layer.begin_segment(carried.reset_rows(torch.tensor([False, True, False]))).c
    assert torch.equal(start[1], layer.c_init.detach()) and torch.equal(start[[0, 2]], carried.c[[0, 2]])


def test_the_slots_carry_gradient_within_a_segment_and_are_detached_across_segments():
    model, cfg = _model("slide12", "model.slots.layers=[2]", "model.slots.n=4")
    layer, n, w = model.layers[2], cfg.derived.segment_len, cfg.model.window
    tokens = torch.randint(0, V, (2, 2 * n))
    logits, carried = model(tokens[:, :n], model.initial_state(2, "cpu"))
    assert all(not t.requires_grad for t in carried.to_tensors().values())
    logits[:, -w:].sum().backward()  # the last block reads M_7, which the first block's tokens wrote
    assert layer.state.wk.weight.grad.abs().sum() > 0 and layer.c_init.grad.abs().sum() > 0
    model.zero_grad()
    logits, _ = model(tokens[:, n:], carried)  # a carried segment: no lane fresh
    logits.sum().backward()
    assert layer.c_init.grad is None or not layer.c_init.grad.any()


def test_prefix_keys_are_seen_by_every_query_without_position_bias():
    mask = MaskSpec(window=2, prefix=3)
    vis = mask.visible(4, 3 + 6, "cpu")[0]  # 4 queries over 3 prefix keys and 6 positioned keys
    assert vis[:, :3].all()
    assert torch.equal(vis[:, 3:], MaskSpec(window=2).visible(4, 6, "cpu")[0])
    from lrexp.attention import RelativePositionBias

    bias = RelativePositionBias(2)()
    dense = bias.dense(4, 9, prefix=3)
    assert not dense[:, :, :3].any() and torch.equal(dense[:, :, 3:], bias.dense(4, 6))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.nn.functional.normalize(torch.randn(2, 2, 4, 8, generator=g), dim=-1) for _ in range(3))
    k, v = torch.cat([k, k[:, :, :1].repeat(1, 1, 5, 1)], 2), torch.cat([v, v[:, :, :1].repeat(1, 1, 5, 1)], 2)
    ref = attend(q, k, v, mask, bias=bias, backend="reference")
    torch.testing.assert_close(attend(q, k, v, mask, bias=bias, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
