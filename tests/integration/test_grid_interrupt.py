"""A grid interrupted while a cell trains, then resumed, logs exactly what an uninterrupted grid logs.

Smoke scale, real `lrexp grid` and `lrexp train` processes, a byte-level corpus built here. Each grid waits
for its first cell's first checkpoint (every 3 steps of 20), then:
- SIGKILL to the grid and its cell at once (a lost machine): both leave their runs RUNNING; `--resume` ends
  them and continues the cell from its checkpoint in its run;
- SIGTERM to the grid alone (a scheduler's preemption): the grid passes it on, the cell saves a checkpoint at
  the end of its step and ends KILLED, the grid stops before its second cell, KILLED, naming the resume.
Every metric but the timings must then equal the uninterrupted grid's, step for step.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from corpora import word_documents
from logged import logged
from lrexp.grid import runner
from lrexp.grid.expand import expand
from lrexp.lit.checkpoint import saved_step

# real grid processes trained to 20 steps, twice a test; tests/unit/test_grid_runner.py covers the bookkeeping
# of runs left RUNNING in the default tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    corpus = word_documents(root / "corpus", "a cell stopped on its way resumes from the step it saved and goes on "
                            "as if nothing happened", [80 + 11 * i for i in range(16)])
    uri = f"sqlite:///{root}/mlflow.db"
    return {"root": root, "corpus": corpus, "uri": uri, "client": MlflowClient(uri)}


def write_grid(env, name: str):
    root = env["root"]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": {
            "scale": "smoke",
            "data": {"corpus": str(env["corpus"]), "tokenizer": "bytes", "cache_dir": str(root / "data"),
                     "val_fraction": 0.25, "test_fraction": 0.25},
            # validations at 8 and 16 fall between checkpoints: a kill cannot land between the two
            "train": {"max_steps": 20, "val_every": 8, "checkpoint_every": 3, "val_tokens": 256,
                      "accelerator": "cpu", "checkpoint_dir": str(root / f"ckpt-{name}")},
            "log": {"tracking_uri": env["uri"], "every_n_steps": 1, "perf_warmup_steps": 1},
        },
        "seeds": [0, 1],
    }))
    return path


def launch_and_wait_for_a_checkpoint(env, path, *overrides):
    """`lrexp grid` in a session of its own; returns it once its first checkpoint is on disk, whole, with the
    metrics of the step it saved in the store (a checkpoint is written only after its step's metrics are logged:
    the check holds the training to that order too)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrexp.cli", "grid", str(path), *overrides, "--jobs", "1", "--runs-dir",
         str(env["root"] / "runs")],  # one cell at a time: the second has not started when the signal comes
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    folder = env["root"] / f"ckpt-{path.stem}"
    deadline = time.monotonic() + 240
    while not _saved_and_logged(env, folder):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in 240 s"
        time.sleep(0.05)
    return proc


def _saved_and_logged(env, folder) -> bool:
    found = list(folder.glob("*/last.ckpt"))
    if not found:
        return False
    try:
        step = saved_step(found[0])
    except Exception:  # still being written
        return False
    history = env["client"].get_metric_history(found[0].parent.name, "train/loss")
    return any(m.step == step - 1 for m in history)


def cell_runs(env, name: str) -> dict:
    exp = env["client"].get_experiment_by_name(f"lrexp-{name}")
    runs = env["client"].search_runs([exp.experiment_id])
    return {r.data.tags["lrexp.cell"]: r for r in runs if "lrexp.cell" in r.data.tags}


def parent(env, name: str):
    exp = env["client"].get_experiment_by_name(f"lrexp-{name}")
    return env["client"].search_runs([exp.experiment_id], "tags.`lrexp.role` = 'parent'")[0]


@pytest.fixture(scope="module")
def uninterrupted(env):
    g = expand(str(write_grid(env, "whole")), ["train.seed=0"])
    runner.run(g, runs_dir=env["root"] / "runs", out=io.StringIO())
    run = cell_runs(env, "whole")["seed=0"]
    assert run.info.status == "FINISHED"
    return logged(env["client"], run)


def resume(env, path) -> str:
    out = io.StringIO()
    outcome = runner.run(expand(str(path), ["train.seed=0"]), resume=True, runs_dir=env["root"] / "runs", out=out)
    assert [r.status for r in outcome.results] == ["FINISHED"], out.getvalue()
    return out.getvalue()


def test_sigkill_of_grid_and_cell_then_resume_equals_an_uninterrupted_grid(env, uninterrupted):
    path = write_grid(env, "killed")
    proc = launch_and_wait_for_a_checkpoint(env, path, "train.seed=0")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed = cell_runs(env, "killed")["seed=0"]
    assert killed.info.status == "RUNNING" and parent(env, "killed").info.status == "RUNNING"
    step = saved_step(env["root"] / "ckpt-killed" / killed.info.run_id / "last.ckpt")
    assert 3 <= step < 20  # killed mid-training

    out = resume(env, path)
    assert f"seed=0: training on from step {step} in run {killed.info.run_id}" in out
    after = cell_runs(env, "killed")["seed=0"]
    assert after.info.run_id == killed.info.run_id and after.info.status == "FINISHED"
    assert logged(env["client"], after) == uninterrupted
    assert parent(env, "killed").info.status == "FINISHED"


def test_sigterm_to_the_grid_stops_its_cell_at_a_checkpoint_and_resume_equals_an_uninterrupted_grid(
    env, uninterrupted
):
    path = write_grid(env, "preempted")
    proc = launch_and_wait_for_a_checkpoint(env, path)
    proc.send_signal(signal.SIGTERM)  # to the grid alone: it passes the signal on to its cell
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"continue with: lrexp grid {path} --resume" in err
    assert parent(env, "preempted").info.status == "KILLED"
    runs = cell_runs(env, "preempted")
    assert set(runs) == {"seed=0"}  # the second cell never started
    stopped = runs["seed=0"]
    assert stopped.info.status == "KILLED" and "stopped by SIGTERM at step" in stopped.data.tags["lrexp.error"]
    step = saved_step(env["root"] / "ckpt-preempted" / stopped.info.run_id / "last.ckpt")
    assert f"at step {step};" in stopped.data.tags["lrexp.error"]  # saved where it stopped

    out = resume(env, path)
    assert f"seed=0: training on from step {step} in run {stopped.info.run_id}" in out
    after = cell_runs(env, "preempted")["seed=0"]
    assert after.info.status == "FINISHED" and "lrexp.error" not in after.data.tags
    assert logged(env["client"], after) == uninterrupted
