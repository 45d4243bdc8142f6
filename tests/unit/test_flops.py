"""Model FLOPs from the layer specs (lrexp.flops) against torch's FLOP counter, for every row."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lrexp.config.load import load
from lrexp.config.paths import EXPERIMENTS
from lrexp.model.flops import forward_flops
from lrexp.model.lm import build_model

ROWS = sorted(p.stem for p in (EXPERIMENTS / "rows").glob("*.yaml"))
VOCAB, LANES = 512, 2


def counted(row: str):
    """(model, T, FLOPs of aten.mm/addmm, of aten.bmm) of one forward; the reference backend runs every
    attention as bmm, which the counter sees (SDPA's CPU kernel it does not)."""
    cfg = load(overrides=["scale=smoke", f"row={row}", "model.attn.backend=reference"])
    model = build_model(cfg, VOCAB).eval()
    t = cfg.derived.segment_len
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, VOCAB, (LANES, t)), model.initial_state(LANES, "cpu"))
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return model, t, ops.get("aten.mm", 0) + ops.get("aten.addmm", 0), ops.get("aten.bmm", 0)


@pytest.mark.parametrize("row", ROWS)
def test_matmuls_are_exact_and_attention_is_the_band_of_what_the_tiles_compute(row):
    model, t, mm, bmm = counted(row)
    flops = forward_flops(model, LANES, t)
    assert flops.matmul == mm
    # The reference backend computes every score of its tiles: [previous block; block] (2W keys per query)
    # where the band is W, the whole T x T square where causal attention needs T (T - 1) / 2 (the query's own
    # key excluded by default). The kNN search is a bmm too.
    d = model.embed.embedding_dim
    waste = sum(4 * d * (t * layer.window if layer.window else t * t - t * (t - 1) // 2) for layer in model.layers)
    assert flops.attention + flops.search + LANES * waste == bmm
