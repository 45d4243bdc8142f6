"""A row flagged segment-invariant computes the same logits whatever segments a stream is cut into, so its
evaluation may read longer segments than it trains on (`derived.eval_segment_len`); the rows that are not
(Full attends within its segment, Memorizing stores a segment's keys after it) keep their own N."""

from __future__ import annotations

import pytest
import torch

from lrexp.config.load import load
from lrexp.config.paths import EXPERIMENTS
from lrexp.model.lm import build_model
from lrexp.model.variants import get_variant

from smoke import run_stream

ROWS = sorted(p.stem for p in (EXPERIMENTS / "rows").glob("*.yaml"))
V = 64


@pytest.mark.parametrize("row", ROWS)
def test_evaluation_segments_keep_the_logits(row):
    cfg = load(overrides=["scale=smoke", f"row={row}", "model.dropout=0"])
    torch.manual_seed(0)
    model = build_model(cfg, V).eval()
    n = cfg.derived.segment_len
    long = 8 * cfg.scale.window if 8 * cfg.scale.window != n else 2 * n  # another cut of the same stream
    tokens = torch.randint(0, V, (2, 3 * max(n, long)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        short, _ = run_stream(model, tokens, n)
        longer, _ = run_stream(model, tokens, long)
    if get_variant(cfg.model.variant).segment_invariant:
        assert cfg.derived.eval_segment_len == max(n, 8 * cfg.scale.window)
        torch.testing.assert_close(longer, short, rtol=1e-4, atol=1e-5)
    else:  # the flag is needed: other segments give other logits, so evaluation keeps N
        assert cfg.derived.eval_segment_len == n
        assert not torch.allclose(longer, short, rtol=1e-4, atol=1e-5)
    assert cfg.derived.eval_lanes_per_rank * cfg.derived.eval_segment_len <= cfg.data.tokens_per_step
