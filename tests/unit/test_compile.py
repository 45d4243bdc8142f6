"""`train.compile`: the compiled model is the eager one (logits, carried state, gradients) with no graph break."""

import pytest
import torch

from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.config.paths import EXPERIMENTS
from lrexp.model.lm import build_model
from lrexp.train.validate import check_run

from smoke import run_stream

ROWS = sorted(p.stem for p in (EXPERIMENTS / "rows").glob("*.yaml"))
VOCAB = 512


def two_segments(row: str, compile_backend=None):
    """Logits of two consecutive segments (the second reads the first's carried state), the state after them
    and every parameter's gradient, eager or compiled with `compile_backend`. Two blocks per segment: the
    block loops unroll while tracing, so fewer blocks trace faster and loop the same way."""
    cfg = load(overrides=["scale=smoke", f"row={row}", "model.dropout=0", "model.blocks_per_segment=2"])
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    if compile_backend is not None:
        torch._dynamo.reset()  # each model is a new `self` to guard on: earlier tests' graphs count to the limit
        model.compile(backend=compile_backend, fullgraph=True)  # fullgraph: a graph break fails the test
    lanes, n = cfg.derived.lanes_per_rank, cfg.derived.segment_len
    tokens = torch.randint(0, VOCAB, (lanes, 2 * n), generator=torch.Generator().manual_seed(1))
    logits, state = run_stream(model, tokens, n)  # [B, 2N, V]
    logits.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), state.to_tensors(), grads, list(model.state_dict())


def assert_same(eager, compiled, tol):
    (l0, s0, g0, keys0), (l1, s1, g1, keys1) = eager, compiled
    assert keys0 == keys1  # a compiled model saves and loads the eager checkpoint
    torch.testing.assert_close(l1, l0, rtol=tol, atol=tol)
    assert s0.keys() == s1.keys()
    for name in s0:
        torch.testing.assert_close(s1[name].float(), s0[name].float(), rtol=tol, atol=tol, msg=name)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.slow  # 6-8 s per row: dynamo traces the whole recurrent stack
@pytest.mark.parametrize("row", ["rec_lstm_dual", "fb_fixed_skip"])
def test_the_recurrent_scan_and_the_block_serial_stack_trace_whole_and_equal_eager(row):
    # the "eager" backend runs dynamo's captured graph as it is: the capture, in seconds; inductor's code
    # generation (AOT autograd's backward included) is the slow test below
    assert_same(two_segments(row), two_segments(row, "eager"), 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS)
def test_every_row_compiled_by_inductor_equals_eager(row):
    assert_same(two_segments(row), two_segments(row, "inductor"), 2e-4)


def test_compile_on_a_cpu_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-lrexp")
    cfg = load(overrides=["scale=smoke", "train.compile=true", "train.accelerator=cpu"])
    with pytest.raises(ConfigError, match="no-such-compiler-lrexp"):
        check_run(cfg)
    check_run(load(overrides=["scale=smoke", "train.accelerator=cpu"]))  # off: no compiler needed


@pytest.mark.slow
def test_a_compiled_run_trains_and_checkpoints_the_eager_keys(tmp_path):
    import math

    from lrexp.train import run as train

    cfg = load(overrides=[
        "scale=smoke", "row=rec_fixed_skip", "train.compile=true", "train.accelerator=cpu", "train.max_steps=4",
        "train.val_every=4", "data.corpus=passkey", "data.tokenizer=bytes", "data.probe.num_docs=96",
        f"data.cache_dir={tmp_path / 'data'}", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        f"log.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "log.progress_bar=false",
    ])
    final = train.run(cfg)
    assert math.isfinite(final["final/val_bits_per_token"]) and final["final/steps"] == 4
    keys = torch.load(final["checkpoint"], weights_only=False)["state_dict"]
    eager = {f"model.{k}" for k in build_model(cfg, 257).state_dict()}
    assert eager <= set(keys) and not any("_orig_mod" in k for k in keys)
