"""End-to-end training runs at smoke scale on a tiny byte-level corpus, logged to one shared sqlite store.

Exact resume, validation isolation with the real model, accumulation, the MLflow contract (on three rows:
what a run logs does not depend on the row; each row's mechanics are the equivalence tests'), failures
recorded on the run, and the bad-input errors. The uninterrupted runs that the resume tests compare against
are trained once per session (`uninterrupted`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from corpora import word_documents
from lrexp.config.load import flatten, load as load_config
from lrexp.config.paths import EXPERIMENTS
from lrexp.train import run as train
from lrexp.data_modules import prepare
from lrexp.errors import Interrupted
from lrexp.lit import checkpoint as ckpt_mod
from lrexp.lit import saving
from lrexp.tracking import store as tracking
from lrexp.model.variants import row_name

ROWS = sorted(p.stem for p in (EXPERIMENTS / "rows").glob("*.yaml"))


def _row_named(prefix: str) -> str:
    for row in ROWS:
        if row_name(load_config(overrides=["scale=smoke", f"row={row}"])).startswith(prefix):
            return row
    raise LookupError(f"no {prefix} row in experiments/rows")


# the rows the resume tests train too (their runs are shared), and the one with a kNN memory
CONTRACT_ROWS = [_row_named("XL"), _row_named("Rec"), _row_named("Memorizing")]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """One sqlite store (creating one runs migrations: seconds), one corpus, one data cache."""
    root = tmp_path_factory.mktemp("train")
    corpus = word_documents(  # documents of different lengths, several segments each
        root / "corpus", "the quick brown fox jumps over the lazy dog and then some more words follow here",
        [40 + 23 * i for i in range(30)], name="doc{i:02d}.txt")
    uri = f"sqlite:///{root}/mlflow.db"
    return {
        "root": root,
        "uri": uri,
        "client": MlflowClient(uri),
        "base": [
            "scale=smoke",
            f"data.corpus={corpus}",
            "data.tokenizer=bytes",
            "data.val_fraction=0.2",  # a few documents in every split
            "data.test_fraction=0.2",
            f"data.cache_dir={root / 'data'}",
            f"log.tracking_uri={uri}",
            "log.experiment=lrexp-tests",
            "log.every_n_steps=1",
            "log.progress_bar=false",
            f"train.checkpoint_dir={root / 'ckpt'}",
            "train.accelerator=cpu",
            "train.max_steps=4",
            "train.val_every=2",
            "train.val_tokens=256",
        ],
    }


@pytest.fixture(scope="session")
def uninterrupted(env):
    """(row, *overrides) -> (config, result) of its run on the base config (4 steps, validations at 2 and 4),
    tagged as a grid tags its cells, trained the first time a test asks for it."""
    runs = {}

    def trained(row, *overrides):
        if (row, *overrides) not in runs:
            tags = env["root"] / f"tags-{row}.yaml"  # as a grid passes them: dotted tag names, so a file
            tags.write_text(json.dumps({"log": {"tags": {"lrexp.grid": "tests", "lrexp.cell": f"row={row}"}}}))
            cfg = load_config([tags], [*env["base"], f"row={row}", *overrides])
            runs[(row, *overrides)] = cfg, train.run(cfg)
        return runs[(row, *overrides)]

    return trained


def load(env, *overrides):
    return load_config(overrides=[*env["base"], *overrides])


def history(env, run_id: str, key: str) -> dict:
    """step -> value, the last value logged at a step (a resumed run may validate a step again)."""
    return {m.step: m.value for m in sorted(env["client"].get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def weights(result: dict) -> dict:
    return torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("row", CONTRACT_ROWS)
def test_a_row_runs_and_its_mlflow_run_holds_the_contract(env, uninterrupted, row):
    cfg, result = uninterrupted(row)
    run = env["client"].get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert run.info.run_name.startswith(f"{tags['lrexp.row']} · 20")  # the row's name and the time, not random
    flat = flatten(cfg)
    for key in ("model.variant", "model.d_model", "derived.segment_len", "derived.lanes", "train.max_steps"):
        assert params[key] == str(flat[key])
    for key in ("train/loss", "val/loss", "val/bits_per_token", "val/bits_per_byte", "val/ppl",
                "perf/step_time_s", "perf/tokens_per_s", "perf/peak_mem_mb",
                "final/val_bits_per_token", "final/val_bits_per_byte", "final/params", "final/tokens_seen",
                "final/step_time_s", "final/val_targets", "final/test_bits_per_token", "final/test_targets",
                "val/targets"):
        assert key in metrics, key
    for split in ("val", "test", "val_budget"):
        assert tags[f"lrexp.eval.{split}_docs_hash"] and int(tags[f"lrexp.eval.{split}_targets"]) > 0
    assert metrics["final/val_targets"] == int(tags["lrexp.eval.val_targets"])
    assert metrics["val/targets"] == int(tags["lrexp.eval.val_budget_targets"]) == 256
    assert any(k.startswith("val/bits_per_token_by_pos/") for k in metrics)
    assert "val/answer_bits_per_token" not in metrics  # a text corpus has no probe answers
    assert metrics["final/tokens_seen"] == 4 * cfg.data.tokens_per_step
    assert tags["lrexp.row"] == row_name(cfg)
    assert tags["lrexp.scale"] == "smoke" and tags["lrexp.git_sha"]
    kind = env["client"].get_experiment_by_name("lrexp-tests").tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI's runs table, not the GenAI overview
    assert (tags["lrexp.backend"], tags["lrexp.precision"]) == ("sdpa", "32-true")  # auto on the CPU
    assert params["train.precision"] == "32-true" and params["model.attn.backend"] == "sdpa"
    assert tags["lrexp.threads"] == os.environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())  # conftest's
    assert tags["lrexp.grid"] == "tests" and tags["lrexp.cell"] == f"row={row}"
    artifacts = {a.path for a in env["client"].list_artifacts(result["run_id"])}
    assert {"config.yaml", "data_meta.json"} <= artifacts
    assert result["final/val_bits_per_token"] == metrics["final/val_bits_per_token"]
    assert Path(result["checkpoint"]).is_file()


def test_rows_of_a_grid_are_scored_on_the_same_targets(env):
    """docs/models.md#evaluation: XL (N = W, 16 lanes) and Slide (N = 8W, 2 lanes) score the same targets in the final passes
    (every target of every document but its first) and in the validations during training."""
    runs = {row: train.run(load(env, f"row={row}", "train.max_steps=2", "train.val_every=2")) for row in ("xl512", "slide13")}
    metrics = {row: env["client"].get_run(r["run_id"]).data for row, r in runs.items()}
    xl, slide = metrics["xl512"], metrics["slide13"]
    assert xl.params["derived.segment_len"] != slide.params["derived.segment_len"]
    prepared = prepare(load(env))
    for split, key in (("validation", "val"), ("test", "test")):
        lengths = prepared.split(split).doc_lengths()
        expected = int(lengths.sum() - len(lengths))  # the split's tokens minus one per document
        assert xl.metrics[f"final/{key}_targets"] == slide.metrics[f"final/{key}_targets"] == expected
        assert xl.tags[f"lrexp.eval.{key}_docs_hash"] == slide.tags[f"lrexp.eval.{key}_docs_hash"]
    assert xl.metrics["val/targets"] == slide.metrics["val/targets"] == 256
    assert xl.tags["lrexp.eval.val_budget_docs_hash"] == slide.tags["lrexp.eval.val_budget_docs_hash"]
    assert {k for k in xl.metrics if "_by_pos" in k} == {k for k in slide.metrics if "_by_pos" in k}


def test_validations_are_logged_at_their_optimiser_step_and_the_last_loss_too(env):
    result = train.run(load(env, "train.max_steps=5", "train.val_every=2", "log.every_n_steps=50"))
    assert sorted(history(env, result["run_id"], "val/loss")) == [2, 4]
    # the loss of update k is logged at step k - 1 (the updates before it), the last one too in a run shorter
    # than log.every_n_steps
    assert max(history(env, result["run_id"], "train/loss")) == 4


# XL in the slow tier: 13 s, its 256 lanes per step at smoke (Slide and Rec cover resume in the default tier)
@pytest.mark.parametrize("kind", [pytest.param("XL", marks=pytest.mark.slow), "Slide", "Rec"])
def test_resume_is_exact(env, uninterrupted, kind):
    """2k steps == k steps, then resumed to 2k, metric for metric (CPU, deterministic, dropout on)."""
    row = _row_named(kind)
    _, whole = uninterrupted(row)
    first = train.run(load(env, f"row={row}", "train.max_steps=2"))
    if kind == "XL":  # through the command line, by run id, with the step count raised by an override
        out = subprocess.run(
            [sys.executable, "-m", "lrexp.cli", "train", "--resume", first["run_id"],
             f"train.checkpoint_dir={env['root'] / 'ckpt'}", "train.max_steps=4"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        resumed = json.loads(out.stdout.strip().splitlines()[-1])
    else:
        cfg, _ = train.resume_config(first["checkpoint"], [], ["train.max_steps=4"])
        resumed = train.run(cfg, resume=first["checkpoint"])
    assert resumed["run_id"] == first["run_id"]  # the same MLflow run continues
    assert env["client"].get_run(first["run_id"]).info.status == "FINISHED"
    for key in ("train/loss", "val/loss", "val/bits_per_byte"):
        assert history(env, first["run_id"], key) == history(env, whole["run_id"], key), key
    assert len(history(env, whole["run_id"], "train/loss")) == 4
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three runs of two forked ranks
def test_resume_is_exact_under_ddp(env, uninterrupted):
    """Two CPU ranks (ddp_fork): the gathered per-rank carried state is restored rank by rank."""
    row, ddp = _row_named("XL"), ["train.devices=2", "train.strategy=ddp_fork"]
    _, whole = uninterrupted(row, *ddp)
    first = train.run(load(env, f"row={row}", *ddp, "train.max_steps=2"))
    cfg, _ = train.resume_config(first["checkpoint"], [], ["train.max_steps=4"])
    resumed = train.run(cfg, resume=first["checkpoint"])
    assert history(env, first["run_id"], "train/loss") == history(env, whole["run_id"], "train/loss")
    a = torch.load(whole["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["lrexp_carried_state"]["tensors"], b["lrexp_carried_state"]["tensors"]
    assert all(v.shape[0] == 2 for v in sa.values())  # [world, ...]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["XL", "Rec"])
def test_validation_mid_epoch_leaves_training_bit_identical(env, kind):
    row = _row_named(kind)
    often = train.run(load(env, f"row={row}", "train.max_steps=3", "train.val_every=1"))
    never = train.run(load(env, f"row={row}", "train.max_steps=3", "train.val_every=3"))
    assert len(history(env, often["run_id"], "val/loss")) == 3
    assert history(env, often["run_id"], "train/loss") == history(env, never["run_id"], "train/loss")
    a, b = weights(often), weights(never)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(often["checkpoint"], weights_only=True)["lrexp_carried_state"]["tensors"]
    sb = torch.load(never["checkpoint"], weights_only=True)["lrexp_carried_state"]["tensors"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_failed_run_is_marked_failed_with_the_error(env, monkeypatch):
    def broken(cfg):
        raise ValueError("the data module broke")

    monkeypatch.setattr(train, "StreamDataModule", broken)
    cfg = load(env, "log.run_name=doomed")
    with pytest.raises(ValueError, match="broke"):
        train.run(cfg)
    runs = env["client"].search_runs(
        [env["client"].get_experiment_by_name("lrexp-tests").experiment_id],
        filter_string="tags.`mlflow.runName` = 'doomed'",
    )
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["lrexp.error"] == "ValueError: the data module broke"


def test_a_probe_run_logs_the_loss_on_its_answers(env):
    cfg = load(env, "data.corpus=passkey", "data.probe.num_docs=40", "data.probe.distance=1", "train.val_tokens=2048")
    result = train.run(cfg)
    metrics = env["client"].get_run(result["run_id"]).data.metrics
    assert len(history(env, result["run_id"], "val/answer_bits_per_token")) == 2  # both validations
    assert 0 < metrics["final/val_answer_bits_per_token"] < 20  # 5 digits over a 256-byte vocabulary
    assert metrics["final/val_answer_bits_per_token"] != metrics["final/val_bits_per_token"]


def test_unwritable_store_fails_before_any_work(env, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "prepare", lambda cfg: pytest.fail("prepared data before checking the store"))
    (tmp_path / "file").write_text("")
    cfg = load(env, f"log.tracking_uri=sqlite:///{tmp_path / 'file'}/mlflow.db")
    with pytest.raises(tracking.TrackingError, match="cannot open a run in the MLflow tracking store"):
        train.run(cfg)


def test_checkpoint_from_another_model_config_is_refused(env):
    first = train.run(load(env, "train.max_steps=1", "train.val_every=1"))
    other = load(env, "model.d_ff=96", "model.num_layers=3")
    with pytest.raises(ckpt_mod.CheckpointError, match=r"model\.d_ff=64 there, 96 here.*model\.num_layers=4"):
        train.run(other, resume=first["run_id"])


class SignalAt(pl.Callback):
    """Sends the process a signal as micro-batch `batch` starts: with two lane groups, inside optimiser step 2."""

    def __init__(self, batch: int, signum: int) -> None:
        self.batch, self.signum = batch, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


# SIGTERM end to end, through a grid: test_grid_interrupt.py
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT])
def test_a_signal_saves_at_the_end_of_the_step_marks_the_run_killed_and_resume_is_exact(
    env, uninterrupted, monkeypatch, signum
):
    row, overrides = _row_named("Rec"), ["train.lane_groups=2", "train.checkpoint_every=100"]
    _, whole = uninterrupted(row, *overrides)
    build = train.build_trainer
    with monkeypatch.context() as m:
        m.setattr(train, "build_trainer",
                  lambda cfg, logger, last, cbs: build(cfg, logger, last, [*cbs, SignalAt(2, signum)]))
        with pytest.raises(Interrupted, match=f"stopped by {signal.Signals(signum).name} at step 2") as stopped:
            train.run(load(env, f"row={row}", *overrides, "log.run_name=stopped"))
    assert stopped.value.exit_code == 128 + signum and "continue with: lrexp train --resume" in str(stopped.value)
    run = env["client"].search_runs(
        [env["client"].get_experiment_by_name("lrexp-tests").experiment_id],
        filter_string="tags.`mlflow.runName` = 'stopped'", order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "KILLED" and "at step 2" in run.data.tags["lrexp.error"]
    run_id = run.info.run_id
    assert ckpt_mod.saved_step(ckpt_mod.locate(run_id, env["root"] / "ckpt")) == 2  # the step's end, not mid-step
    cfg, _ = train.resume_config(run_id, [], [f"train.checkpoint_dir={env['root'] / 'ckpt'}"])
    resumed = train.run(cfg, resume=run_id)
    after = env["client"].get_run(run_id)
    assert after.info.status == "FINISHED" and "lrexp.error" not in after.data.tags
    for key in ("train/loss", "val/loss", "val/bits_per_byte"):
        assert history(env, run_id, key) == history(env, whole["run_id"], key), key
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, steps", [
    pytest.param(["train.checkpoint_every=3"], [3, 4], marks=pytest.mark.slow),  # and at the end
    (["train.checkpoint_every=100", "train.checkpoint_minutes=1e-9"], [1, 2, 3, 4]),  # minutes: every step here
])
def test_checkpoint_cadence_has_its_own_keys(env, monkeypatch, overrides, steps):
    saved = []
    save = saving.LastCheckpoint._save_last_checkpoint

    def counted(self, trainer, candidates):
        saved.append(trainer.global_step)
        save(self, trainer, candidates)

    monkeypatch.setattr(saving.LastCheckpoint, "_save_last_checkpoint", counted)
    train.run(load(env, *overrides))  # 4 steps, validations every 2
    assert saved == steps
