"""`lrexp grid --launcher local`: cells as submitit jobs on this machine, each running `lrexp grid --cell`; a job
interrupted mid-cell the way SLURM does it requeues and ends as if nothing happened; `--status` reads it back.

The interruption is SLURM's: `--signal=B:USR2@T` signals the job's batch shell, which `exec`ed the job's
Python, so the job process itself gets SIGUSR2. submitit's handler asks `CellJob.checkpoint`, which stops the
cell at a step boundary (checkpoint saved, run KILLED), and requeues; the requeued job continues the cell from
its checkpoint in the same MLflow run. Every metric but the timings must then equal an uninterrupted cell's.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from corpora import word_documents
from logged import logged
from lrexp.config.schema import LauncherConfig
from lrexp.grid import jobs, slurm, status
from lrexp.grid.expand import expand
from test_grid_interrupt import _saved_and_logged, write_grid  # the same one-cell grid of 20 steps

# real jobs of real cells trained to 20 steps, one of them twice: minutes on a loaded 2-core machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    corpus = word_documents(root / "corpus", "a job requeued after its signal goes on from the step its cell saved",
                            [80 + 11 * i for i in range(16)])
    uri = f"sqlite:///{root}/mlflow.db"
    return {"root": root, "corpus": corpus, "uri": uri, "client": MlflowClient(uri)}


def launch(env, path, out: io.StringIO):
    return slurm.launch(expand(str(path), ["train.seed=0"]), "local", LauncherConfig(), runs_dir=env["root"] / "runs",
                        out=out)


def cell_runs(env, name: str) -> list:
    exp = env["client"].get_experiment_by_name(f"lrexp-{name}")
    return [r for r in env["client"].search_runs([exp.experiment_id]) if "lrexp.cell" in r.data.tags]


def parent(env, name: str):
    exp = env["client"].get_experiment_by_name(f"lrexp-{name}")
    return env["client"].search_runs([exp.experiment_id], "tags.`lrexp.role` = 'parent'")[0]


@pytest.fixture(scope="module")
def uninterrupted(env):
    out = io.StringIO()
    outcome = launch(env, write_grid(env, "whole"), out)
    assert [r.status for r in outcome.results] == ["FINISHED"], out.getvalue()
    [run] = cell_runs(env, "whole")
    return logged(env["client"], run)


def job_process(env, name: str) -> int:
    """The job's own process: the one task the local controller (the job id) started."""
    controller = json.loads(parent(env, name).data.tags[jobs.TAG_JOBS])["0"]
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for step, value in a[key].items():
            assert abs(value - b[key][step]) <= tol, (key, step, value, b[key][step])


def test_a_job_signalled_mid_cell_requeues_and_ends_as_an_uninterrupted_cell(env, uninterrupted):
    path = write_grid(env, "requeued")
    signalled = []

    def signal_mid_cell():  # a thread: the launch, which installs signal handlers, runs on the main one
        deadline = time.monotonic() + 600
        while not _saved_and_logged(env, env["root"] / "ckpt-requeued") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(job_process(env, "requeued"), signal.SIGUSR2)  # SLURM's --signal=B:USR2, before the time limit
        signalled.append(True)

    watcher = threading.Thread(target=signal_mid_cell, daemon=True)
    watcher.start()
    out = io.StringIO()
    outcome = launch(env, path, out)
    watcher.join(timeout=1)
    assert signalled, "no checkpoint in 600 s"
    assert [r.status for r in outcome.results] == ["FINISHED"], out.getvalue()

    [run] = cell_runs(env, "requeued")  # one run: the requeued job continued it
    assert run.info.status == "FINISHED" and "lrexp.error" not in run.data.tags
    assert_close(logged(env["client"], run), uninterrupted)
    exp = env["client"].get_experiment_by_name("lrexp-requeued")
    assert not env["client"].search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert parent(env, "requeued").info.status == "FINISHED"
    folder = Path(parent(env, "requeued").data.tags[jobs.TAG_FOLDER].replace("%j", "*"))
    log = "".join(p.read_text() for p in folder.parent.glob(f"{folder.name}/*_log.*"))
    assert "this job is preempted" in log and "Requeued job" in log
    assert "KILLED" in log and "training on from step" in log and run.info.run_id in log


def test_status_of_a_launched_grid(env, uninterrupted, capsys):
    g = expand(str(write_grid(env, "whole")), ["train.seed=0"])
    code = status.show(g, status.parent_of(g, None), env["root"] / "runs",
                       scheduler=lambda kind, ids: {j: "COMPLETED" for j in ids})
    text = capsys.readouterr().out
    assert code == 0 and "launched through local" in text
    assert "[1/1]  seed=0  finished  bits/token" in text and "1 finished" in text


def test_launched_grid_with_a_failing_cell_reports_it_and_status_exits_non_zero(env, capsys):
    notes = env["root"] / "notes"  # documents shorter than one segment: the checks pass, the run fails
    notes.mkdir()
    for i in range(16):
        (notes / f"doc{i}.txt").write_text(f"note {i}\n")
    g = expand(str(write_grid(env, "broken")), ["train.seed=0", f"data.corpus={notes}"])
    out = io.StringIO()
    outcome = slurm.launch(g, "local", LauncherConfig(), runs_dir=env["root"] / "runs", out=out)
    assert [r.status for r in outcome.results] == ["FAILED"], out.getvalue()
    assert "seed=0: FAILED in" in out.getvalue()
    code = status.show(g, status.parent_of(g, None), env["root"] / "runs",
                       scheduler=lambda kind, ids: {j: "FAILED" for j in ids})
    text = capsys.readouterr().out
    assert code == 1 and "seed=0  failed  " in text and "1 failed" in text


def test_slurm_launch_submits_one_array_and_records_its_job_ids(env, monkeypatch, tmp_path, capsys):
    """Through submitit's SLURM executor up to sbatch, which is a stand-in here: the script it is given, the ids
    the parent records, `--status` of the queued jobs, and a resume refused while they are queued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 4242\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    g = expand(str(write_grid(env, "queued")), [])  # two cells: seeds 0 and 1
    out = io.StringIO()
    assert slurm.launch(g, "slurm", LauncherConfig(partition="cpu", time=30), runs_dir=env["root"] / "runs",
                        out=out) is None
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=cpu" in script and "#SBATCH --requeue" in script
    p = parent(env, "queued")
    assert p.data.tags[jobs.TAG_LAUNCHER] == "slurm" and jobs.recorded(p) == {"0": "4242_0", "1": "4242_1"}
    assert "[2/2] seed=1: SLURM job 4242_1" in out.getvalue()
    monkeypatch.setattr(jobs, "sacct_states", lambda ids: {"4242_0": "RUNNING", "4242_1": "PENDING"})
    assert status.show(g, status.parent_of(g, None), env["root"] / "runs") == 0
    text = capsys.readouterr().out
    assert "[1/2]  seed=0  running  starting" in text and "[2/2]  seed=1  pending  job 4242_1 PENDING" in text
    with pytest.raises(slurm.LauncherError, match=r"still has jobs in the scheduler \(4242_0 RUNNING, 4242_1 "):
        slurm.launch(g, "slurm", LauncherConfig(), resume=True, runs_dir=env["root"] / "runs", out=out)

