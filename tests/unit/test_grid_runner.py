"""The grid runner's bookkeeping, with a stand-in for the cell process (the real one runs in
tests/integration/test_grid_e2e.py): parent and child runs, failures that never reached MLflow, progress
lines, and --resume."""

from __future__ import annotations

import io

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lrexp import config, grid, report


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('runner')}/mlflow.db"


class FakeTrain:
    """Does what `lrexp train CONFIG` does to MLflow, without training: one run, tagged from the config."""

    def __init__(self, uri: str, fail: dict):
        self.client = MlflowClient(uri)
        self.fail = fail  # cell id -> "before-run" (dies before creating its run) | "killed" (run left RUNNING)
        self.ran = []

    def __call__(self, path):
        cfg = config.load([path])
        cell = cfg.log.run_name
        self.ran.append(cell)
        if self.fail.get(cell) == "before-run":
            return 1, None, "ModuleNotFoundError: No module named 'x'"
        exp = self.client.get_experiment_by_name(cfg.log.experiment)
        run_id = self.client.create_run(exp.experiment_id, run_name=cell, tags=dict(cfg.log.tags)).info.run_id
        if self.fail.get(cell) == "killed":
            return -9, None, "killed by signal 9"
        metrics = {"final/val_bits_per_token": 3.0 + cfg.model.window / 100, "final/step_time_s": 0.1}
        for k, v in metrics.items():
            self.client.log_metric(run_id, k, v)
        self.client.set_terminated(run_id, "FINISHED")
        return 0, {"run_id": run_id, **metrics}, ""


def make_grid(tmp_path, uri, name, *overrides):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": {"scale": "smoke", "log.tracking_uri": uri},
        "axes": {"model.window": [4, 8, 16]},
    }))
    return grid.expand(str(path), list(overrides))


def children(client, parent_id):
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return {(r.data.tags["lrexp.cell"], r.info.status, r.data.tags.get("lrexp.error")) for r in runs}


def test_failures_are_recorded_and_resume_runs_only_them(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g1")
    fake = FakeTrain(uri, {"window=8": "before-run", "window=16": "killed"})
    out = io.StringIO()
    outcome = grid.run(g, runs_dir=tmp_path / "runs", out=out, run_cell_fn=fake)
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
    again = grid.run(g, resume=True, runs_dir=tmp_path / "runs", out=out, run_cell_fn=fake)
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
    first = grid.run(g, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=FakeTrain(uri, {}))
    fake = FakeTrain(uri, {})
    wider = make_grid(tmp_path, uri, "g2", "model.window=[2,4,8,16]")  # one new value
    again = grid.run(wider, resume=True, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert again.parent_id == first.parent_id and fake.ran == ["window=2"]
    fake = FakeTrain(uri, {})
    longer = make_grid(tmp_path, uri, "g2", "model.window=[4,8]", "train.max_steps=7")  # every config changed
    grid.run(longer, resume=True, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert fake.ran == ["window=4", "window=8"]


def test_resume_without_an_earlier_run_starts_a_parent(tmp_path, uri):
    g = make_grid(tmp_path, uri, "g3")
    fake = FakeTrain(uri, {})
    outcome = grid.run(g, resume=True, runs_dir=tmp_path / "runs", out=io.StringIO(), run_cell_fn=fake)
    assert len(fake.ran) == 3 and MlflowClient(uri).get_run(outcome.parent_id).info.status == "FINISHED"
