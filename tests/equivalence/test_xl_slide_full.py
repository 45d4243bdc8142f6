"""Segmented == unsegmented for the XL, Slide and Full rows (docs/models.md#identity-tests; docs/design.md#tests).

The oracle (`oracles.dense_oracle`) runs the model's weights over a whole stream in one pass, each layer one
dense masked attention over [zero cache; stream] with the reference backend: no tiles, no carried state.
"""

import pytest
import torch

from lrexp.config.load import load
from lrexp.model.lm import build_model

from oracles import dense_oracle
from smoke import run_stream

V = 64


def _model(row, *overrides):
    cfg = load(overrides=["scale=smoke", f"row={row}", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, V).eval(), cfg


@pytest.mark.parametrize("row,segments,overrides", [
    ("xl512", 3, ()), ("slide12", 2, ()), ("slide12", 2, ("model.attn.window_includes_self=true",)),
    ("xl1024", 2, ("model.attn.backend=reference",)),
])
def test_consecutive_segments_with_carried_cache_equal_one_dense_pass(row, segments, overrides):
    model, cfg = _model(row, *overrides)
    n = cfg.derived.segment_len
    tokens = torch.randint(0, V, (2, segments * n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(run_stream(model, tokens, n)[0], dense_oracle(model, tokens), atol=1e-5, rtol=1e-5)


def test_xl512_and_slide12_give_identical_logits_with_the_same_weights():
    """12.3: for a fixed W a lane's logits do not depend on N (XL:W has N = W, Slide has N = 8W)."""
    slide, cfg_slide = _model("slide12")
    xl, cfg_xl = _model("xl512")
    xl.load_state_dict(slide.state_dict())
    assert cfg_xl.model.window == cfg_slide.model.window
    assert cfg_slide.derived.segment_len == 8 * cfg_xl.derived.segment_len
    tokens = torch.randint(0, V, (2, 2 * cfg_slide.derived.segment_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(run_stream(xl, tokens, cfg_xl.derived.segment_len)[0],
                                   run_stream(slide, tokens, cfg_slide.derived.segment_len)[0], atol=1e-5, rtol=1e-5)


def test_full_is_dense_causal_over_each_segment_alone():
    model, cfg = _model("full")
    n = cfg.derived.segment_len
    tokens = torch.randint(0, V, (2, 2 * n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        segmented = run_stream(model, tokens, n)[0]
        for s in range(2):  # no carried state: each segment equals a fresh dense pass over it
            part = slice(s * n, (s + 1) * n)
            torch.testing.assert_close(segmented[:, part], dense_oracle(model, tokens[:, part]), atol=1e-5, rtol=1e-5)
