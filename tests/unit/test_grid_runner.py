"""The grid runner's bookkeeping, with a stand-in for the cell process (the real one runs in
tests/integration/test_grid_e2e.py): parent and child runs, failures that never reached MLflow, progress
lines, and --resume."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lrexp.config.load import load

from lrexp.grid import launch, runner
from lrexp.grid.expand import expand
from lrexp.grid.plan import plan, previous_invocation
from lrexp.grid.spec import GridError

from lrexp.report import collect as report
from lrexp.tracking import server
from lrexp.errors import Interrupted
from lrexp.tracking.view import link


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('runner')}/mlflow.db"


class FakeTrain:
    """Does what `lrexp train CONFIG` does to MLflow, without training: one run, tagged from the config."""

    def __init__(self, uri: str, fail: dict):
        self.client = MlflowClient(uri)
        # cell id -> "before-run" (dies before creating its run) | "killed" (run left RUNNING) | "signal" (the
        # grid gets a SIGTERM while the cell trains: it saves a checkpoint at step 2 and ends its run KILLED)
        self.fail = fail
        self.ran = []
        self.resumed = {}  # cell id -> the run it continued

    def __call__(self, path, resume=None, stop=None, env=None):
        cfg = load([path])
        cell = cfg.log.tags["lrexp.cell"]
        self.ran.append(cell)
        if self.fail.get(cell) == "before-run":
            return 1, None, "ModuleNotFoundError: No module named 'x'"
        exp = self.client.get_experiment_by_name(cfg.log.experiment)
        if resume:  # as `lrexp train --resume`: the same run, its tags updated
            self.resumed[cell] = resume
            run_id = resume
            self.client.update_run(run_id, status="RUNNING")
            for k, v in cfg.log.tags.items():
                self.client.set_tag(run_id, k, v)
        else:
            run_id = self.client.create_run(exp.experiment_id, run_name=cfg.log.run_name,
                                            tags=dict(cfg.log.tags)).info.run_id
            self.client.log_param(run_id, "train.max_steps", str(cfg.train.max_steps))
        if self.fail.get(cell) == "killed":
            return -9, None, "killed by signal 9"
        if self.fail.get(cell) == "signal":
            save_checkpoint(self.client, run_id, cfg.train.checkpoint_dir, 2)
            os.kill(os.getpid(), signal.SIGTERM)
            self.client.set_terminated(run_id, "KILLED")
            return 143, None, "stopped by SIGTERM at step 2"
        metrics = {"final/val_bits_per_token": 3.0 + cfg.model.window / 100, "final/step_time_s": 0.1}
        for k, v in metrics.items():
            self.client.log_metric(run_id, k, v)
        self.client.set_terminated(run_id, "FINISHED")
        return 0, {"run_id": run_id, **metrics}, ""


def save_checkpoint(client, run_id, checkpoint_dir, step):
    """What `lrexp train` leaves for a resume: the run's checkpoint folder as a tag, last.ckpt in it."""
    folder = Path(checkpoint_dir) / run_id
    folder.mkdir(parents=True)
    torch.save({"global_step": step}, folder / "last.ckpt")
    client.set_tag(run_id, "lrexp.checkpoint_dir", str(folder))


def make_grid(tmp_path, uri, name, *overrides):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": {"scale": "smoke", "log.tracking_uri": uri, "train.checkpoint_dir": str(tmp_path / "ckpt")},
        "axes": {"model.window": [4, 8, 16]},
    }))
    return expand(str(path), list(overrides))


def children(client, parent_id):
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return {(r.data.tags["lrexp.cell"], r.info.status, r.data.tags.get("lrexp.error")) for r in runs}


def test_failures_are_recorded_and_resume_runs_only_them(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g1")
    fake = FakeTrain(uri, {"window=8": "before-run", "window=16": "killed"})
    out = io.StringIO()
    outcome = runner.run(g, runs_dir=tmp_path / "runs", out=out, run_cell_fn=fake)
    client = MlflowClient(uri)

    assert [r.status for r in outcome.results] == ["FINISHED", "FAILED", "FAILED"]
    parent = client.get_run(outcome.parent_id)
    assert parent.info.status == "FAILED" and parent.data.tags["lrexp.role"] == "parent"
    assert parent.data.tags["lrexp.failed_cells"] == "2" and parent.data.tags["lrexp.reference"] == "window=4"
    assert children(client, outcome.parent_id) == {
        ("window=4", "FINISHED", None),
        ("window=8", "FAILED", "ModuleNotFoundError: No module named 'x'"),  # created by the grid
        ("window=16", "FAILED", "killed by signal 9"),  # left RUNNING by the cell, closed by the grid
    }
    lines = out.getvalue().splitlines()
    done = [ln for ln in lines if ": FINISHED in " in ln or ": FAILED in " in ln]
    assert [ln.split()[0] for ln in done] == ["[1/3]", "[2/3]", "[3/3]"]
    assert all("elapsed" in ln and "ETA" in ln for ln in done)
    assert "error: ModuleNotFoundError" in done[1]
    assert (tmp_path / "runs" / "g1" / "window-8" / "config.yaml").is_file()

    fake = FakeTrain(uri, {})
    out = io.StringIO()
    again = runner.run(g, resume=True, runs_dir=tmp_path / "runs", out=out, run_cell_fn=fake)
    assert fake.ran == ["window=8", "window=16"]
    assert again.parent_id == outcome.parent_id and "(resumed)" in out.getvalue()
    assert [r.status for r in again.results] == ["SKIPPED", "FINISHED", "FINISHED"]
    assert client.get_run(outcome.parent_id).info.status == "FINISHED"
    rep = report.build("g1", tmp_path / "report", uri=uri)
    assert [(r.group, r.status) for r in rep.rows] == [
        ("window=4", "FINISHED"), ("window=8", "FINISHED"), ("window=16", "FINISHED"),
    ]


def test_resume_runs_new_and_changed_cells(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g2")
    first = runner.run(g, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=FakeTrain(uri, {}))
    fake = FakeTrain(uri, {})
    wider = make_grid(tmp_path, uri, "g2", "model.window=[2,4,8,16]")  # one new value
    again = runner.run(wider, resume=True, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert again.parent_id == first.parent_id and fake.ran == ["window=2"]
    fake = FakeTrain(uri, {})
    changed = make_grid(tmp_path, uri, "g2", "model.window=[4,8]", "model.dropout=0.1")  # every config changed
    runner.run(changed, resume=True, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert fake.ran == ["window=4", "window=8"] and fake.resumed == {}


def test_resume_with_more_steps_trains_finished_cells_on_in_their_runs(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g4", "train.max_steps=5")
    first = runner.run(g, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=FakeTrain(uri, {}))
    runs = {r.cell.id: r.run_id for r in first.results}
    fake = FakeTrain(uri, {})
    out = io.StringIO()
    longer = make_grid(tmp_path, uri, "g4", "train.max_steps=9", "model.window=[4,8,2]")
    again = runner.run(longer, resume=True, runs_dir=tmp_path / "runs", out=out, run_cell_fn=fake)
    assert fake.resumed == {"window=4": runs["window=4"], "window=8": runs["window=8"]}
    assert fake.ran == ["window=4", "window=8", "window=2"]  # the new value trains from scratch
    assert "window=4: training on from step 5 in run" in out.getvalue()
    assert [r.run_id for r in again.results[:2]] == [runs["window=4"], runs["window=8"]]
    attempts = previous_invocation(longer)[1]
    steps = plan(longer, attempts)
    assert [s.action for s in steps] == ["skip", "skip", "skip"], attempts  # now FINISHED at 9 steps
    shorter = make_grid(tmp_path, uri, "g4", "train.max_steps=3")
    assert [s.action for s in plan(shorter, previous_invocation(shorter)[1])] == ["train"] * 3


def test_resume_dry_run_lists_the_resumed_invocations_cells(tmp_path, uri, capsys, monkeypatch):
    from lrexp.cli import main

    g = make_grid(tmp_path, uri, "g5", "model.window=[4,8]", "train.max_steps=5")
    runner.run(g, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=FakeTrain(uri, {"window=8": "killed"}))
    capsys.readouterr()
    assert main(["grid", str(tmp_path / "g5.yaml"), "--resume", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "with its overrides: model.window=[4,8] train.max_steps=5" in out
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln[:1].isdigit()}
    assert set(lines) == {"window=4", "window=8"}  # not the file's three windows
    assert "skip (FINISHED in run" in lines["window=4"] and lines["window=8"].rstrip().endswith("train")
    assert main(["grid", str(tmp_path / "g5.yaml"), "--resume", "--dry-run", "train.max_steps=8"]) == 0
    out = capsys.readouterr().out
    assert "with its overrides: model.window=[4,8] train.max_steps=5, then train.max_steps=8" in out
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln[:1].isdigit()}
    assert "train on from step 5" in lines["window=4"] and lines["window=8"].rstrip().endswith("train")


def test_resume_without_an_earlier_run_starts_a_parent(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g3")
    fake = FakeTrain(uri, {})
    outcome = runner.run(g, resume=True, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert len(fake.ran) == 3 and MlflowClient(uri).get_run(outcome.parent_id).info.status == "FINISHED"


def test_a_signal_stops_the_grid_after_its_cell_and_resume_continues_that_cell_from_its_checkpoint(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g6")
    fake = FakeTrain(uri, {"window=8": "signal"})
    out = io.StringIO()
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM with 1 of 3 cells done; continue with: lrexp grid "
                                          r"\S+g6.yaml --resume") as stopped:
        runner.run(g, runs_dir=tmp_path / "runs", out=out, run_cell_fn=fake)
    assert stopped.value.exit_code == 143
    assert fake.ran == ["window=4", "window=8"]  # the third cell never started
    client = MlflowClient(uri)
    parent = previous_invocation(g)[0]
    assert parent.info.status == "KILLED"
    assert children(client, parent.info.run_id) == {("window=4", "FINISHED", None), ("window=8", "KILLED", None)}
    assert "[2/3] window=8: KILLED" in out.getvalue()
    stopped_run = next(r.run_id for r in previous_invocation(g)[1] if r.status == "KILLED")

    steps = plan(g, previous_invocation(g)[1])
    assert [(s.action, s.run_id, s.from_step) for s in steps[1:]] == [("continue", stopped_run, 2), ("train", None, 0)]
    fake = FakeTrain(uri, {})
    out = io.StringIO()
    runner.run(g, resume=True, runs_dir=tmp_path / "runs", out=out, run_cell_fn=fake)
    assert fake.ran == ["window=8", "window=16"] and fake.resumed == {"window=8": stopped_run}
    assert "window=8: training on from step 2 in run" in out.getvalue()
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_runs_left_running_by_dead_processes_are_taken_over_or_killed(tmp_path, uri):
    """The grid and its cell killed hard (SIGKILL, a lost machine): parent and cells stay RUNNING."""
    g = make_grid(tmp_path, uri, "g7")
    first = runner.run(g, runs_dir=tmp_path / "runs", out=io.StringIO(),
                     run_cell_fn=FakeTrain(uri, {"window=8": "killed", "window=16": "killed"}))
    client = MlflowClient(uri)
    runs = {r.cell.id: r.run_id for r in first.results}
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = {"lrexp.pid": str(dead.pid), "lrexp.host": socket.gethostname()}
    for run_id in (first.parent_id, runs["window=8"], runs["window=16"]):
        client.update_run(run_id, status="RUNNING")
        for k, v in gone.items():
            client.set_tag(run_id, k, v)
    save_checkpoint(client, runs["window=8"], tmp_path / "ckpt", 3)

    client.set_tag(runs["window=16"], "lrexp.pid", str(os.getpid()))  # as if it still trained
    with pytest.raises(GridError, match=f"still training \\(run {runs['window=16']}\\)"):
        runner.run(g, resume=True, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=FakeTrain(uri, {}))
    client.set_tag(runs["window=16"], "lrexp.pid", str(dead.pid))

    fake = FakeTrain(uri, {})
    again = runner.run(g, resume=True, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert again.parent_id == first.parent_id
    assert fake.resumed == {"window=8": runs["window=8"]}  # from its checkpoint, in its run
    assert fake.ran == ["window=8", "window=16"]  # no checkpoint: trained again, in a new run
    stale = client.get_run(runs["window=16"])
    assert stale.info.status == "KILLED" and "ended without ending the run" in stale.data.tags["lrexp.error"]
    assert client.get_run(runs["window=8"]).info.status == "FINISHED"


def test_experiments_are_tagged_as_model_training_and_make_ui_names_the_latest_grids_runs(
    tmp_path, uri, capsys, monkeypatch
):
    from lrexp.cli import main

    client = MlflowClient(uri)
    client.create_experiment("lrexp-g8")  # made by an older lrexp: no kind yet
    g = make_grid(tmp_path, uri, "g8")
    outcome = runner.run(g, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=FakeTrain(uri, {}))
    exp = client.get_experiment_by_name("lrexp-g8")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table

    served = []

    @contextlib.contextmanager
    def serve(uri, root, host, port, workers, app_name):
        served.append((host, port, workers, app_name))
        yield f"http://{host}:{port}"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(server, "serve", serve)
    monkeypatch.setattr(server, "serve_until_stopped", lambda url: served.append(url))
    main(["ui", "--port", "5123"])
    line = capsys.readouterr().out
    # the link opens the invocation's view, which the command has just written (tracking/view.py)
    opens = link("http://127.0.0.1:5123", exp.experiment_id, outcome.parent_id)
    assert f"the latest grid (g8), its comparison: {opens}" in line
    assert f"mlflow.sharedViewState.lrexp-{outcome.parent_id}" in client.get_experiment(exp.experiment_id).tags
    assert served == [("127.0.0.1", 5123, 1, "lrexp"), "http://127.0.0.1:5123"]  # the link printed once it answers


def test_cells_fanned_out_to_a_scheduler_join_one_parent_which_ends_with_the_last(tmp_path, uri, capsys, monkeypatch):
    from lrexp.cli import main

    g = make_grid(tmp_path, uri, "g9", "train.max_steps=5")
    path = str(tmp_path / "g9.yaml")
    monkeypatch.delenv("LREXP_GRID_PARENT", raising=False)
    assert main(["grid", path, "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["window=4", "window=8", "window=16"]
    assert main(["grid", path, "--cell", "2"]) == 2
    assert main(["grid", path, "--cell", "2", "--dry-run"]) == 2
    assert "--cell needs the invocation's parent run: --parent RUN_ID or $LREXP_GRID_PARENT" in capsys.readouterr().err
    assert main(["grid", path, "--new-parent", "train.max_steps=5"]) == 0
    parent_id = capsys.readouterr().out.strip()
    monkeypatch.setenv("LREXP_GRID_PARENT", parent_id)
    assert main(["grid", path, "--list"]) == 0  # with the parent's overrides
    assert capsys.readouterr().out.splitlines() == ["window=4", "window=8", "window=16"]
    assert main(["grid", path, "--cell", "window=3"]) == 2
    assert "grid g9 has no cell 'window=3'" in capsys.readouterr().err

    client = MlflowClient(uri)
    fake = FakeTrain(uri, {"window=8": "signal"})  # a preempted job of the array...
    with pytest.raises(Interrupted, match="continue with: the same --cell command"):
        runner.run_one(g, g.cells[1], parent_id, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    fake = FakeTrain(uri, {})
    for cell in (g.cells[1], g.cells[0]):  # ...started again by the scheduler, and another job
        assert runner.run_one(g, cell, parent_id, runs_dir=tmp_path / "runs", out=io.StringIO(),
                            run_cell_fn=fake).status == "FINISHED"
        assert client.get_run(parent_id).info.status == "RUNNING"  # window=16 has not run yet
    assert list(fake.resumed) == ["window=8"]  # from its checkpoint
    runner.run_one(g, g.cells[2], parent_id, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert client.get_run(parent_id).info.status == "FINISHED"
    again = runner.run_one(g, g.cells[2], parent_id, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert again.status == "SKIPPED" and len(fake.ran) == 3
    rep = report.build("g9", tmp_path / "report", uri=uri)
    assert rep.parent_id == parent_id and [r.status for r in rep.rows] == ["FINISHED"] * 3


class AtOnce(FakeTrain):
    """FakeTrain as K cells at once: each logs through the server the grid hands it, and the first two wait
    for each other (a barrier), which only two cells training at the same time pass."""

    def __init__(self, uri, fail, parties=2):
        super().__init__(uri, fail)
        self.barrier = threading.Barrier(parties, timeout=60)
        self.envs = {}
        self.forwarded = {}  # cell -> the signal the grid passed on to it

    def __call__(self, path, resume=None, stop=None, env=None):
        cell = load([path]).log.tags["lrexp.cell"]
        self.envs[cell] = dict(env)
        self.client = MlflowClient(env["LREXP_TRACKING_SERVER"])
        if len(self.envs) <= self.barrier.parties:
            self.barrier.wait()
        if self.fail.get(cell) == "wait-for-signal":  # as a real cell: stop at a step end once signalled
            got = threading.Event()
            unforward = stop.forward(lambda s: (self.forwarded.__setitem__(cell, s), got.set()))
            if cell == "window=4":  # a scheduler preempts the grid while both cells train
                os.kill(os.getpid(), signal.SIGTERM)
            assert got.wait(60)
            unforward()
            return 143, None, "stopped by SIGTERM at step 2"
        return super().__call__(path, resume, stop, env)


@pytest.mark.slow  # two cells trained at once through a started MLflow server: over 10 s
def test_jobs_train_cells_at_once_on_their_own_cpus_through_one_server(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g10")
    fake = AtOnce(uri, {})
    out = io.StringIO()
    outcome = runner.run(g, runs_dir=tmp_path / "runs", out=out, run_cell_fn=fake, jobs=2)
    assert [r.status for r in outcome.results] == ["FINISHED"] * 3  # in grid order
    assert [r.cell.id for r in outcome.results] == ["window=4", "window=8", "window=16"]
    cpus = [set(fake.envs[c]["LREXP_CPUS"].split(",")) for c in ("window=4", "window=8")]
    assert cpus[0] and cpus[1] and not cpus[0] & cpus[1]  # the two at once share no core
    assert fake.envs["window=16"]["LREXP_CPUS"] in (fake.envs["window=4"]["LREXP_CPUS"],
                                                    fake.envs["window=8"]["LREXP_CPUS"])
    assert {e["LREXP_TRACKING_SERVER"] for e in fake.envs.values()} == {fake.envs["window=4"]["LREXP_TRACKING_SERVER"]}
    client = MlflowClient(uri)  # the store itself, the server gone
    assert client.get_run(outcome.parent_id).info.status == "FINISHED"
    assert children(client, outcome.parent_id) == {(c, "FINISHED", None) for c in ("window=4", "window=8", "window=16")}
    assert "3 cells, scale smoke" in out.getvalue() and "2 cells at once" in out.getvalue()
    assert "on CPUs " + fake.envs["window=8"]["LREXP_CPUS"] in out.getvalue()


@pytest.mark.slow  # 8 s: two cells train in processes of their own until the signal
def test_a_signal_reaches_every_cell_training_at_once_and_no_other_starts(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g11")
    fake = AtOnce(uri, {"window=4": "wait-for-signal", "window=8": "wait-for-signal"})
    with pytest.raises(Interrupted, match="stopped by SIGTERM with 0 of 3 cells done"):
        runner.run(g, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake, jobs=2)
    assert fake.forwarded == {"window=4": signal.SIGTERM, "window=8": signal.SIGTERM}
    assert set(fake.envs) == {"window=4", "window=8"}  # window=16 never started
    client = MlflowClient(uri)
    parent = previous_invocation(g)[0]
    assert parent.info.status == "KILLED"
    assert children(client, parent.info.run_id) == {("window=4", "KILLED", "stopped by SIGTERM at step 2"),
                                                    ("window=8", "KILLED", "stopped by SIGTERM at step 2")}


def test_more_jobs_than_cores_or_gpus_is_refused_before_anything_runs(tmp_path, uri, monkeypatch):
    g = make_grid(tmp_path, uri, "g12")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(GridError, match="--jobs 3 on 2 CPU cores: each cell needs one of its own"):
        runner.run(g, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=FakeTrain(uri, {}), jobs=3)
    with pytest.raises(GridError, match="--jobs must be at least 1"):
        launch.slots(g, 0)
    monkeypatch.setattr(launch, "_visible_gpus", lambda: ["3", "5"])
    assert launch.slots(g, 2).gpus == ["3", "5"]
    monkeypatch.setattr(launch, "_visible_gpus", lambda: ["3"])
    wide = make_grid(tmp_path, uri, "g12", "train.devices=2", "train.accelerator=gpu", "model.window=[4,8]")
    with pytest.raises(GridError, match="cell window=4: train.devices=2 but 1 GPU\\(s\\) are visible"):
        launch.slots(wide, 2)
    assert MlflowClient(uri).get_experiment_by_name("lrexp-g12") is None  # nothing was logged


def test_jobs_0_after_the_grid_name_is_refused_not_read_as_absent(tmp_path, uri, capsys):
    from lrexp.cli import main

    make_grid(tmp_path, uri, "g13")
    assert main(["grid", str(tmp_path / "g13.yaml"), "--dry-run", "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_jobs_auto_trains_a_cell_per_core_and_yields_to_explicit_threads(tmp_path, uri, monkeypatch):
    """`--jobs auto`: as many cells at once as cores (one each), never more than there are cells to train;
    a cell's `train.threads` takes that many cores; `--jobs K` is taken as given."""
    g = make_grid(tmp_path, uri, "g14")  # three cells
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(runner, "usable_cpus", lambda: 2)
    assert runner.jobs_for(g, "auto") == 2
    monkeypatch.setattr(runner, "usable_cpus", lambda: 8)
    assert runner.jobs_for(g, "auto") == 3
    assert runner.jobs_for(make_grid(tmp_path, uri, "g14", "train.threads=3"), "auto") == 2
    assert runner.jobs_for(g, 1) == 1
    resumed = [type("S", (), {"cell": c, "action": a})() for c, a in zip(g.cells, ("skip", "skip", "train"))]
    assert runner.jobs_for(g, "auto", resumed) == 1  # only the cell a --resume trains
    monkeypatch.setattr(launch, "_visible_gpus", lambda: ["0", "1"])
    on_gpus = make_grid(tmp_path, uri, "g14", "train.accelerator=gpu")
    assert runner.jobs_for(on_gpus, "auto") == 2  # a GPU each
