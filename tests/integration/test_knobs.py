"""Training with the optional recurrent knobs (docs/knobs.md) at smoke scale: the window / segment curriculum
(its one-stage identity, its stages in the stream, exact resume across a stage boundary, bad schedules) and
the carried-state storage and compression in a real run (logged, resumed exactly).

Smoke scale: data.tokens_per_step = 128, Rec:fixed:skip at W = 8, N = 64 (2 lanes). The two-stage schedule
[[0, 4, 4], [3, 8, 8]] trains steps 0-2 at W = 4, N = 16 in 8 lanes, then W = 8, N = 64 in 2 lanes.
"""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from corpora import word_documents
from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.train import run as train
from lrexp.train.curriculum import stages
from lrexp.data_modules import StreamDataModule, prepare
from lrexp.data_modules.errors import DataError

TWO_STAGES = "curriculum.stages=[[0,4,4],[3,8,8]]"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("knobs")
    corpus = word_documents(
        root / "corpus", "a curriculum trains short windows first and the full window of the model last",
        [40 + 23 * i for i in range(30)], name="doc{i:02d}.txt")
    uri = f"sqlite:///{root}/mlflow.db"
    return {"root": root, "client": MlflowClient(uri), "base": [
        "scale=smoke", "row=rec_fixed_skip", f"data.corpus={corpus}", "data.tokenizer=bytes",
        "data.val_fraction=0.2", "data.test_fraction=0.2", f"data.cache_dir={root / 'data'}",
        f"log.tracking_uri={uri}", "log.experiment=lrexp-knobs", "log.every_n_steps=1", "log.progress_bar=false",
        f"train.checkpoint_dir={root / 'ckpt'}", "train.accelerator=cpu", "train.max_steps=5", "train.val_every=2",
        "train.val_tokens=256",
    ]}


def run(env, *overrides, resume=None):
    if resume is None:
        return train.run(load(overrides=[*env["base"], *overrides]))
    cfg, path = train.resume_config(resume, [], list(overrides))
    return train.run(cfg, resume=str(path))


def history(env, run_id: str, key: str) -> dict:
    """step -> value, the last value logged at a step (a resumed run may validate a step again)."""
    return {m.step: m.value for m in sorted(env["client"].get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def saved(result):
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["lrexp_carried_state"]["tensors"]


def assert_same_run(env, a, b):
    for key in ("train/loss", "val/loss"):
        assert history(env, a["run_id"], key) == history(env, b["run_id"], key), key
    (wa, sa), (wb, sb) = saved(a), saved(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- curriculum (docs/knobs.md#window-curriculum) ----------------------------------------------------------------------------------


@pytest.mark.slow  # two runs; the stage switching itself is the stream test below
def test_a_one_stage_curriculum_is_no_curriculum_bitwise(env):
    """The docs/knobs.md#window-curriculum identity: the staged stream and the stage switching with the base config as its only stage."""
    one = run(env, "curriculum.stages=[[0,8,8]]", "train.max_steps=3")
    assert_same_run(env, one, run(env, "train.max_steps=3"))
    assert set(history(env, one["run_id"], "train/stage").values()) == {0.0}


def test_the_stream_switches_lanes_and_segment_length_at_the_stage_start(env):
    """Steps 0-2 read 8 lanes of 16 tokens, step 3 on 2 lanes of 64, each batch naming its stage; the last
    stage reads its own stream, not the one stage 0 began with."""
    dm = StreamDataModule(load(overrides=[*env["base"], TWO_STAGES]), world_size=1, rank=0)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    shapes = [(int(b["stage"]), tuple(b["tokens"].shape), bool(b["doc_start"].all())) for b in
              (next(batches) for _ in range(5))]
    assert shapes == [(0, (8, 16), True), (0, (8, 16), False), (0, (8, 16), False), (1, (2, 64), True),
                      (1, (2, 64), False)]
    plain = StreamDataModule(load(overrides=env["base"]), world_size=1, rank=0)
    plain.setup("fit")
    first = next(iter(plain.train_dataloader()))
    dm.load_state_dict({**dm.state_dict(), "train_batches": 3})  # resume at the stage's first step
    again = next(iter(dm.train_dataloader()))
    assert int(again["stage"]) == 1 and not torch.equal(again["doc_id"], first["doc_id"])


@pytest.mark.slow  # an uninterrupted run and three pieces of it
def test_a_curriculum_run_stopped_mid_stage_resumes_exactly_across_the_boundary(env):
    """Stopped at step 2 (inside stage 0, a validation just run at the model's own window), resumed across the
    boundary to step 4 (inside stage 1: its state is kept), resumed to step 5: the run equals the
    uninterrupted one bit for bit."""
    whole = run(env, TWO_STAGES)
    first = run(env, TWO_STAGES, "train.max_steps=2")
    run(env, "train.max_steps=4", resume=first["checkpoint"])
    resumed = run(env, "train.max_steps=5", resume=first["checkpoint"])  # last.ckpt: now step 4
    assert resumed["run_id"] == first["run_id"]
    assert_same_run(env, resumed, whole)
    assert history(env, whole["run_id"], "train/stage") == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}
    _, state = saved(whole)
    assert state["layers.0.xl.k"].shape == (1, 2, 2, 8, 16)  # [world, lanes, H, W, D]: the last stage's


@pytest.mark.parametrize("stages,message", [
    ("[[0,8,3],[3,8,8]]", "stage 0 has segments of 8 x 3 = 24 tokens, which do not make whole lanes"),
    ("[[0,4,4],[3,8,8],[3,8,8]]", "start steps must increase, stage 2 starts at 3 after 3"),
    ("[[2,4,4],[3,8,8]]", "the first stage must start at step 0"),
    ("[[0,8,8],[3,4,4]]", r"the last stage \[W, R\] = \[4, 4\] must be the model's own"),
    ("[[0]]", "stage 0 must be \\[start_step >= 0, window > 0, blocks > 0\\] or \\[start_step, window\\]"),
    ("[[0,4],[3,4]]", r"the last stage \[W, R\] = \[4, 8\] must be the model's own"),
])
def test_a_bad_schedule_fails_in_one_line_before_training(env, stages, message):
    with pytest.raises(ConfigError, match=message):
        load(overrides=[*env["base"], f"curriculum.stages={stages}"])


def test_a_stage_without_blocks_has_the_models_own():
    """[start_step, W]: one schedule for rows of any R (XL's 1, Rec's 8) that only changes the window."""
    for row, blocks in (("xl512", 1), ("rec_fixed_skip", 8)):
        cfg = load(overrides=["scale=smoke", f"row={row}", "curriculum.stages=[[0,2],[3,8]]"])
        assert [(s.window, s.segment_len, s.lanes) for s in stages(cfg)] == [
            (2, 2 * blocks, 128 // (2 * blocks)), (8, 8 * blocks, 128 // (8 * blocks))]


def test_a_stage_with_more_lanes_than_training_documents_fails_before_training(env):
    with pytest.raises(DataError, match="has 19 documents, fewer than the 32 lanes"):
        prepare(load(overrides=[*env["base"], "curriculum.stages=[[0,2,2],[3,8,8]]"]))


def test_lanes_of_a_stage_must_divide_over_the_lane_groups(env):
    with pytest.raises(ConfigError, match="over 4 rank\\(s\\) x lane group\\(s\\)"):
        load(overrides=[*env["base"], "curriculum.stages=[[0,8,16],[3,8,8]]", "data.tokens_per_step=256",
                        "train.lane_groups=4"])


# ---- carried state storage and compression (docs/knobs.md#state-storage-dtype, docs/knobs.md#rank-k-state-compression) --------------------------------------------------


@pytest.mark.slow  # four runs, one resumed, with the SVD of every state
def test_compressed_bf16_state_is_logged_checkpointed_and_resumed_exactly(env):
    knobs = ["model.state_dtype=bfloat16", "model.svd_state.rank=2", "model.svd_state.method=lowrank"]
    whole = run(env, *knobs, "train.max_steps=4")
    first = run(env, *knobs, "train.max_steps=2")
    assert_same_run(env, run(env, "train.max_steps=4", resume=first["checkpoint"]), whole)
    metrics = env["client"].get_run(whole["run_id"]).data.metrics
    fp32 = env["client"].get_run(run(env, "train.max_steps=1")["run_id"]).data.metrics
    assert metrics["final/state_bytes_per_lane"] * 2 == fp32["final/state_bytes_per_lane"]
    for key in ("recurrent_state", "xl_cache"):
        assert 0 < metrics[f"train/svd/{key}_energy"] < 1 and 0 < metrics[f"train/svd/{key}_rel_error"] < 1
    _, state = saved(whole)
    assert state["layers.1.recurrent.c"].dtype == torch.bfloat16
