"""The Rec rows against oracles: a block-by-block reference cell, segmentation invariance, wiring to Slide,
reach across segments, gradient paths and reset isolation (docs/models.md#block-recurrent-transformer, docs/models.md#identity-tests)."""

import pytest
import torch

from oracles import reference_cell
from smoke import V, random_tokens as _tokens, run_stream, smoke_model as _model

ROWS = [f"rec_{g}_{t}" for g in ("lstm", "fixed") for t in ("dual", "single", "skip")]


@pytest.mark.parametrize("row", ROWS)
def test_the_cell_equals_a_block_by_block_reference(row):
    model, cfg = _model(row)
    (index,) = cfg.derived.recurrent_layers
    cell = model.layers[index]
    x = torch.randn(2, cfg.derived.segment_len, cfg.model.d_model, generator=torch.Generator().manual_seed(2))
    state = cell.initial_state(2, "cpu")
    with torch.no_grad():
        y, new = cell(x, state)
        y_ref, c_ref = reference_cell(cell, x, cell.c_init.expand(2, -1, -1), state.k, state.v)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.c, c_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", ROWS)
def test_two_segments_with_carried_state_equal_one_segment_twice_as_long(row):
    model, cfg = _model(row)
    n = cfg.derived.segment_len
    tokens = _tokens(2, 2 * n)
    with torch.no_grad():
        two, state2 = run_stream(model, tokens, n)
        one, state1 = run_stream(model, tokens, 2 * n)
        blocks, _ = run_stream(model, tokens, cfg.model.window)  # N = W: every block its own segment
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocks, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state2.layers[1].c, state1.layers[1].c, atol=1e-5, rtol=1e-5)


def test_with_the_state_columns_of_its_output_projection_zeroed_rec_is_slide():
    rec, cfg = _model("rec_lstm_dual")
    slide, _ = _model("slide12")
    d = cfg.model.d_model
    (index,) = cfg.derived.recurrent_layers
    with torch.no_grad():
        cell = rec.layers[index]
        cell.wo.weight[:, d:] = 0.0  # W_O^v's B columns: the tokens no longer read the state
        shared = {k: v for k, v in rec.state_dict().items() if k in slide.state_dict()}
        shared[f"layers.{index}.wo.weight"] = cell.wo.weight[:, :d]
        missing = slide.load_state_dict(shared, strict=False).missing_keys
        assert not missing
        tokens = _tokens(2, 2 * cfg.derived.segment_len)
        n = cfg.derived.segment_len
        torch.testing.assert_close(run_stream(rec, tokens, n)[0], run_stream(slide, tokens, n)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", [*ROWS, "slide12"])
def test_a_token_reaches_two_segments_ahead_through_the_state_only(row):
    """Beyond the XL cache's reach (one window per layer), only the recurrent state carries information."""
    model, cfg = _model(row)
    n = cfg.derived.segment_len
    tokens = _tokens(1, 3 * n)
    changed = tokens.clone()
    changed[0, 5] = (tokens[0, 5] + 1) % V  # a token of segment 0
    with torch.no_grad():
        base = run_stream(model, tokens, n)[0][:, 2 * n:]
        other = run_stream(model, changed, n)[0][:, 2 * n:]  # segment 2's logits
    assert (row == "slide12") == torch.equal(base, other)


@pytest.mark.parametrize("row", ["rec_fixed_skip", "rec_lstm_dual", "rec_lstm_single"])
def test_gradient_flows_from_block_to_block_within_a_segment_and_not_across_segments(row):
    model, cfg = _model(row)
    (index,) = cfg.derived.recurrent_layers
    cell = model.layers[index]
    w, n = cfg.model.window, cfg.derived.segment_len
    updates = []  # c_1 .. c_nb, the states after each block of the segment

    def keep(module, inputs, out):
        if out.requires_grad:
            out.retain_grad()
        updates.append(out)

    hook = cell.update.register_forward_hook(keep)
    try:
        tokens = _tokens(2, 2 * n)
        _, carried = model(tokens[:, :n], model.initial_state(2, "cpu"))
        assert all(t.grad_fn is None and not t.requires_grad for t in carried.to_tensors().values())
        updates.clear()
        logits, _ = model(tokens[:, n:], carried)
        t = 3
        logits[:, (t + 1) * w:(t + 2) * w].sum().backward()  # the loss of block t+1 alone
    finally:
        hook.remove()
    grads = [u.grad for u in updates]
    assert all(g is not None and g.abs().sum() > 0 for g in grads[: t + 1])  # c_1 .. c_{t+1}: read by block t+1
    assert all(g is None or g.abs().sum() == 0 for g in grads[t + 1:])  # later states: not read
    assert not cell.c_init.grad.any()  # the carried state, not c_init, started this segment: no path back


@pytest.mark.parametrize("row", ["rec_fixed_skip", "rec_lstm_single"])
def test_a_document_start_isolates_the_lane_from_its_past(row):
    """Document B after document A in a lane (reset at B) == B alone in a fresh lane (docs/models.md#identity-tests)."""
    model, cfg = _model(row)
    n = cfg.derived.segment_len
    a, b = _tokens(1, 2 * n, seed=3), _tokens(1, n, seed=4)
    with torch.no_grad():
        _, after_a = run_stream(model, a, n)
        other_lane = run_stream(model, _tokens(1, n, seed=5), n)[1]
        both = type(after_a)(layers=tuple(
            type(s).from_tensors({k: torch.cat([s.to_tensors()[k], o.to_tensors()[k]]) for k in s.to_tensors()})
            for s, o in zip(after_a.layers, other_lane.layers)), batch_size=2)
        reset = both.reset_rows(torch.tensor([True, False]))
        logits, _ = model(torch.cat([b, b]), reset)
        alone, _ = model(b, model.initial_state(1, "cpu"))
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[1:], alone, atol=1e-3)  # the lane that was not reset keeps its past
