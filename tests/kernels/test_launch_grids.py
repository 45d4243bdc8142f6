"""The Triton kernels' launch grids stay within CUDA's limits (2^31 - 1 programs on axis 0, 65535 on axes 1 and
2) for every paper row at the paper scale, with the paper's 32 lanes and the 256 of XL:512
(docs/design.md#launch-grids). The interpreter has no such limit, so this is computed, not launched: each row's
model is built on the meta device and run once with the `triton` backend replaced by a recorder of the
(q, k) shapes of its `attend` calls."""

import pytest
import torch

import lrexp.layers.memorizing as memorizing
from lrexp.attention import backends
from lrexp.config.load import load
from lrexp.config.paths import EXPERIMENTS
from lrexp.kernels.attention.op import GRID_LIMITS, launch_grids
from lrexp.model.lm import LongRangeLM, build_model

ROWS = sorted(p.stem for p in (EXPERIMENTS / "rows").glob("*.yaml"))
VOCAB = 32128


def _over_limits(b, h, t_q, t_k):
    """The grids of q [b, h, t_q, D] over k [b, h, t_k, D] with an axis beyond CUDA's limit."""
    return [(name, grid) for name, grids in launch_grids(b, h, t_q, t_k).items() for grid in grids
            if len(grid) > len(GRID_LIMITS) or any(n > limit for n, limit in zip(grid, GRID_LIMITS))]


def test_the_knn_memory_attention_of_the_paper_fits_with_256_lanes():
    """One query per row, heads x T folded into attend's head axis: 256 x 8 x 512 rows of 128 keys."""
    assert not _over_limits(256, 8 * 512, 1, 128)
    assert not _over_limits(256, 8, 65536, 65536 + 512)  # a dense causal segment of 64k tokens too


def _attend_shapes(row, lanes, monkeypatch):
    """The distinct (q shape, k shape) of the row's attend calls over one segment at the paper scale."""
    calls = set()

    def record(q, k, v, mask, bias, scale, dropout_p):
        calls.add((tuple(q.shape), tuple(k.shape)))
        return torch.empty_like(q)

    monkeypatch.setitem(backends.BACKENDS, "triton", backends.Backend(record, True, "triton"))
    monkeypatch.setattr(LongRangeLM, "_check_inputs", lambda self, tokens, state: None)  # reads token values
    # kNN selection autocasts, which the meta device lacks; which slots it picks changes no shape
    monkeypatch.setattr(memorizing, "select", lambda q, memory_k, count, k, backend: torch.zeros(
        *q.shape[:3], k, dtype=torch.int64, device=q.device))
    cfg = load(overrides=["scale=paper", f"row={row}", "model.attn.backend=triton"])
    with torch.device("meta"):
        model = build_model(cfg, VOCAB)
    tokens = torch.zeros(lanes, cfg.derived.segment_len, dtype=torch.int64, device="meta")
    with torch.no_grad():
        model(tokens, model.initial_state(lanes, "meta"))
    return calls


@pytest.mark.slow  # builds all 15 rows at the paper scale (on the meta device): about 15 s on 2 cores
@pytest.mark.parametrize("lanes", [32, 256])
def test_every_row_launches_within_cuda_limits_at_the_paper_scale(lanes, monkeypatch):
    over = {}
    for row in ROWS:
        shapes = _attend_shapes(row, lanes, monkeypatch)
        assert shapes, row
        for q_shape, k_shape in shapes:
            bad = _over_limits(*q_shape[:3], k_shape[2])
            if bad:
                over[(row, q_shape, k_shape)] = bad
    assert not over
