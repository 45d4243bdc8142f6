"""Feedback rows (docs/models.md#feedback, docs/models.md#identity-tests): block-serial reach, wiring to Rec, segmentation invariance."""

import pytest
import torch

from lrexp.config.load import load
from lrexp.layers.feedback import StateReadingLayer
from lrexp.layers.recurrent import RecurrentLayer
from lrexp.model.lm import build_model

from smoke import V, run_stream, smoke_model as _model

ROWS = ["fb_lstm_single", "fb_fixed_skip"]


def _tokens(length, seed=1):
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("row", ROWS)
def test_paper_scale_adds_a_query_and_a_wider_projection_to_every_other_layer(row):
    sizes = {}
    for name in (row, row.replace("fb_", "rec_")):
        cfg = load(overrides=["scale=paper", f"row={name}"])
        with torch.device("meta"):
            model = build_model(cfg, 32128)
        sizes[name] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))
    extra = sizes[row] - sizes[row.replace("fb_", "rec_")]
    assert extra == 11 * (2 * 1024 * 1024 + 8)  # Q2_l and W_O,l's B half (2.1M) and s2_l, 11 layers: ~ +23M
    kinds = [type(layer) for layer in model.layers]
    assert kinds.count(RecurrentLayer) == 1 and kinds[9] is RecurrentLayer


@pytest.mark.parametrize("row", ROWS)
def test_logits_do_not_depend_on_the_segment_length(row):
    model, cfg = _model(row)
    w, n = cfg.model.window, cfg.derived.segment_len
    tokens = _tokens(2 * n)
    with torch.no_grad():
        whole = run_stream(model, tokens, 2 * n)[0]
        for seg in (w, 2 * w, n):
            torch.testing.assert_close(run_stream(model, tokens, seg)[0], whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", ROWS)
def test_with_every_feedback_read_zeroed_feedback_is_rec(row):
    fb, cfg = _model(row)
    rec, _ = _model(row.replace("fb_", "rec_"))
    d = cfg.model.d_model
    with torch.no_grad():
        weights = dict(fb.state_dict())
        for i, layer in enumerate(fb.layers):
            if type(layer) is StateReadingLayer:
                weights[f"layers.{i}.wo.weight"] = layer.wo.weight[:, :d]  # drop the B half: no feedback read
        result = rec.load_state_dict({k: v for k, v in weights.items() if k in rec.state_dict()}, strict=False)
        assert not result.missing_keys
        for layer in fb.layers:
            if type(layer) is StateReadingLayer:
                layer.wo.weight[:, d:] = 0.0
        tokens = _tokens(2 * cfg.derived.segment_len)
        n = cfg.derived.segment_len
        torch.testing.assert_close(run_stream(fb, tokens, n)[0], run_stream(rec, tokens, n)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", ROWS)
def test_a_block_reaches_the_bottom_layer_of_later_blocks_only_through_feedback(row):
    """Layer 0 at block t+2 cannot see block t through its window (W keys back); the recurrent state that
    read block t can. Blocks before t never change."""
    outputs = {}
    for name in (row, row.replace("fb_", "rec_")):
        model, cfg = _model(name)
        w, n = cfg.model.window, cfg.derived.segment_len
        seen = []
        hook = model.layers[0].register_forward_hook(lambda mod, inp, out: seen.append(out[0]))
        tokens = _tokens(n)
        changed = tokens.clone()
        t = 3
        changed[:, t * w + 2] = (tokens[:, t * w + 2] + 1) % V  # a token of block t
        with torch.no_grad():
            model(tokens, model.initial_state(2, "cpu"))
            model(changed, model.initial_state(2, "cpu"))
        hook.remove()
        base, other = (torch.cat(seen[: len(seen) // 2], 1), torch.cat(seen[len(seen) // 2:], 1))  # [B, N, d]
        assert torch.equal(base[:, : t * w], other[:, : t * w])  # nothing before block t moves
        outputs[name] = torch.equal(base[:, (t + 2) * w:(t + 3) * w], other[:, (t + 2) * w:(t + 3) * w])
    assert outputs == {row: False, row.replace("fb_", "rec_"): True}


@pytest.mark.parametrize("row", ["fb_fixed_skip", "rec_fixed_skip"])
def test_always_clear_state_clears_at_the_segment_start_not_at_every_block(row):
    """A fresh lane starts from c_init either way, so the first segment must not change."""
    model, cfg = _model(row)
    cleared, _ = _model(row, "model.recurrent.always_clear_state=true")
    tokens = _tokens(2 * cfg.derived.segment_len)
    n = cfg.derived.segment_len
    with torch.no_grad():
        plain, both = run_stream(model, tokens, n)[0], run_stream(cleared, tokens, n)[0]
    torch.testing.assert_close(both[:, :n], plain[:, :n], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(both[:, n:], plain[:, n:], atol=1e-4)  # the second segment lost its carry
