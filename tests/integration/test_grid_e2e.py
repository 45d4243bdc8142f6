"""`lrexp grid` end to end at smoke scale: every cell a real `lrexp train` process, logged under one parent
run; a cell that fails leaves the others alone and `--resume` then runs only that cell. And `--dry-run` of
every grid in experiments/grids validates every cell.

One grid of two cells, three steps each, on a byte-level corpus: the cell `file_suffix=.md` passes the
checks before the grid runs but fails in its run (its .md documents are all shorter than one segment), and
succeeds on resume once they are long enough.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from corpora import word_documents
from logged import logged
from lrexp.grid import runner
from lrexp.grid.expand import expand
from lrexp.grid.spec import GRIDS_DIR
from lrexp.tracking.names import latest_parent
from lrexp.tracking.view import FINAL_DELTA
from lrexp.commands import grid as grid_cmd


def _args(name, *overrides, **kw):
    ns = argparse.Namespace(name=name, overrides=list(overrides), dry_run=False, resume=False, runs_dir=None, out=None,
                            list=False, new_parent=False, cell=None, parent=None, jobs=1, launcher=None,
                            status=False)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    corpus = word_documents(root / "corpus", "a long range model reads every document from its start to its end "
                            "one segment at a time", [60 + 9 * i for i in range(16)])
    for i in range(16):
        (corpus / f"doc{i}.md").write_text(f"note {i}\n")
    uri = f"sqlite:///{root}/mlflow.db"
    path = root / "smoke_grid.yaml"
    path.write_text(yaml.safe_dump({
        "base": {
            "scale": "smoke",
            "data": {"corpus": str(corpus), "tokenizer": "bytes", "cache_dir": str(root / "data"),
                     "val_fraction": 0.25, "test_fraction": 0.25},
            "train": {"max_steps": 3, "val_every": 3, "val_tokens": 256, "accelerator": "cpu",
                      "checkpoint_dir": str(root / "ckpt")},
            "log": {"tracking_uri": uri, "every_n_steps": 1, "perf_warmup_steps": 1},
        },
        "axes": {"data.file_suffix": [".txt", ".md"]},
    }))
    return {"root": root, "corpus": corpus, "uri": uri, "grid": str(path), "client": MlflowClient(uri)}


@pytest.mark.slow  # two grid invocations of real processes: over a minute on 2 CPU cores
def test_failing_cell_then_resume(env, capsys):
    root, client = env["root"], env["client"]
    common = dict(runs_dir=root / "runs", out=root / "report")

    code = grid_cmd.run(_args(env["grid"], **common))
    out = capsys.readouterr()
    assert code == 1, out.out + out.err
    assert "1 of 2 cells failed: file_suffix=.md" in out.err
    assert "[1/2] file_suffix=.txt: FINISHED" in out.out and "[2/2] file_suffix=.md: FAILED" in out.out

    exp = client.get_experiment_by_name("lrexp-smoke_grid")
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("lrexp.role") == "parent"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    pid = parent[0].info.run_id
    kids = {r.data.tags["lrexp.cell"]: r
            for r in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'")}
    assert set(kids) == {"file_suffix=.txt", "file_suffix=.md"}
    ok, bad = kids["file_suffix=.txt"], kids["file_suffix=.md"]
    assert ok.info.run_name == "Slide:4L file_suffix=.txt"  # the row's name and the axis value that varies
    assert parent[0].info.run_name.startswith("smoke_grid · ")
    assert ok.info.status == "FINISHED" and ok.data.metrics["final/steps"] == 3
    assert ok.data.tags["lrexp.cell"] == "file_suffix=.txt" and ok.data.tags["lrexp.grid"] == "smoke_grid"
    assert bad.info.status == "FAILED" and "larger than every document" in bad.data.tags["lrexp.error"]
    progress = json.loads((root / "runs" / "smoke_grid" / "file_suffix-.txt" / "progress.json").read_text())
    assert progress["step"] == progress["max_steps"] == 3 and progress["tokens_per_s"] > 0  # what the live line shows

    for doc in env["corpus"].glob("*.txt"):  # now the failed cell's documents are long enough
        shutil.copy(doc, doc.with_suffix(".md"))
    code = grid_cmd.run(_args(env["grid"], resume=True, **common))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "[1/2] file_suffix=.txt: skipped" in out.out and "[2/2] file_suffix=.md: FINISHED" in out.out
    assert client.get_run(pid).info.status == "FINISHED"
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'")
    assert sorted((r.data.tags["lrexp.cell"], r.info.status) for r in runs) == [
        ("file_suffix=.md", "FAILED"), ("file_suffix=.md", "FINISHED"), ("file_suffix=.txt", "FINISHED"),
    ]

    table = [ln for ln in (root / "report" / "table.md").read_text().splitlines() if ln.startswith("| `")]
    assert len(table) == 2 and all(ln.rstrip(" |").endswith("FINISHED") for ln in table)
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    assert cols[:5] == ["`file_suffix=.txt`", "Slide:4L", "64", "8", "1.00"]  # the first cell is the reference
    assert all(c != "–" for c in cols)  # every column of the paper's table has a value
    assert {a.path for a in client.list_artifacts(pid, "report")} >= {"report/table.md", "report/table.csv"}

    # trained longer: both cells continue from their checkpoints, in their runs (the real `train --resume`)
    code = grid_cmd.run(_args(env["grid"], "train.max_steps=5", resume=True, **common))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert out.out.count("training on from step 3 in run") == 2, out.out
    finished = {r.data.tags["lrexp.cell"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}' and attributes.status = 'FINISHED'")}
    assert finished["file_suffix=.txt"].info.run_id == ok.info.run_id
    assert all(r.data.metrics["final/steps"] == 5 for r in finished.values())
    steps = {m.step for m in client.get_metric_history(ok.info.run_id, "train/loss")}
    assert steps == set(range(5))  # steps 0-2 from the first training, 3-4 from the continuation


@pytest.mark.slow  # a grid process, its cell process and two forked ranks
def test_a_cell_on_two_ranks_finishes_and_reports(env, capsys):
    """A grid cell with train.devices=2 (DDP, two CPU ranks): one child run, every rank's steps, a table."""
    root, client = env["root"], env["client"]
    code = grid_cmd.run(_args(env["grid"], "data.file_suffix=.txt", "train.devices=2", "train.strategy=ddp_fork",
                              runs_dir=root / "runs2", out=root / "report2"))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    exp = client.get_experiment_by_name("lrexp-smoke_grid")
    parent = latest_parent(client.search_runs([exp.experiment_id], "tags.`lrexp.role` = 'parent'"))
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kids) == 1 and kids[0].info.status == "FINISHED"
    assert kids[0].data.params["train.devices"] == "2" and kids[0].data.metrics["final/steps"] == 3
    assert kids[0].data.metrics["final/val_targets"] > 0
    table = [ln for ln in (root / "report2" / "table.md").read_text().splitlines() if ln.startswith("| `")]
    assert len(table) == 1 and table[0].rstrip(" |").endswith("FINISHED")


@pytest.mark.slow  # two grids of two cells, each cell a process
def test_two_cells_at_once_log_what_they_log_one_at_a_time(env, capsys):
    """`--jobs` not given (auto) on two CPU cores: each cell on a core of its own, both logging through the
    grid's MLflow server into the sqlite store at the same time; every metric but the timings equals, bit for
    bit, a cell trained alone on as many threads (one: pinned, so that a machine of more cores compares the
    same arithmetic)."""
    root, client = env["root"], env["client"]
    code = grid_cmd.run(_args(env["grid"], "data.file_suffix=.txt", "train.seed=[0,1]", "train.threads=1",
                              jobs=None, runs_dir=root / "runs3", out=root / "report3"))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "2 cells at once" in out.out and out.out.count(" on CPUs ") == 2
    exp = client.get_experiment_by_name("lrexp-smoke_grid")
    parent = latest_parent(client.search_runs([exp.experiment_id], "tags.`lrexp.role` = 'parent'"))
    kids = {r.data.tags["lrexp.cell"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    zero, one = "file_suffix=.txt,seed=0", "file_suffix=.txt,seed=1"
    assert set(kids) == {zero, one} and all(r.info.status == "FINISHED" for r in kids.values())
    # Both cell processes were started before either ended. (Not the runs' MLflow times: a run opens after
    # its process's start-up, and under load one cell's start-up can outlast the other's whole smoke run.)
    lines = out.out.splitlines()
    started = [i for i, ln in enumerate(lines) if " on CPUs " in ln]
    ended = [i for i, ln in enumerate(lines) if ": FINISHED in " in ln]
    assert len(started) == len(ended) == 2 and max(started) < min(ended), out.out
    assert parent.info.status == "FINISHED"
    [row] = [ln for ln in (root / "report3" / "table.md").read_text().splitlines() if ln.startswith("| `")]
    assert row.rstrip(" |").endswith("2/2 | FINISHED")  # the seeds of one group

    alone = runner.run(expand(env["grid"], ["data.file_suffix=.txt", "train.seed=0", "train.threads=1"]),
                     runs_dir=root / "runs4", out=io.StringIO())
    [result] = alone.results
    assert result.status == "FINISHED"
    # the grid's report adds the cell's difference to the reference row, which a cell run alone has no report for
    in_grid = {k: v for k, v in logged(client, kids[zero]).items() if k != FINAL_DELTA}
    assert in_grid == logged(client, client.get_run(result.run_id))


@pytest.mark.parametrize("name", sorted(p.stem for p in GRIDS_DIR.glob("*.yaml")))
def test_dry_run_validates_every_cell(name, capsys):
    assert grid_cmd.run(_args(name, dry_run=True)) == 0
    out = capsys.readouterr().out
    g = expand(name)
    assert f"{len(g.cells)} cell" in out and all(c.id in out for c in g.cells)  # "1 cell", "6 cells"
    assert "every cell's config is valid" in out


def test_bad_grid_name_is_one_line():
    out = subprocess.run([sys.executable, "-m", "lrexp.cli", "grid", "gatez", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "unknown grid 'gatez'; available: " in out.stderr and "gates" in out.stderr
    assert "Traceback" not in out.stderr
