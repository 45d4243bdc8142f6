"""Faults injected into real `lrexp grid` and `lrexp train` processes at smoke scale: each loses no work
beyond the last checkpoint, leaves no process running and prints at most one line of error
(docs/grids.md#faults-and-what-survives-them).

- SIGKILL of a `--jobs 2` grid's whole process group: its MLflow server goes too, and its port is free.
- The newest checkpoint cut short: `--resume --dry-run` names the earlier one it continues from, and the
  resumed cell logs exactly what an uninterrupted cell logs.
- A disk that fills at the second checkpoint (a 1.5-checkpoint tmpfs in a user namespace): the first
  survives whole, the run ends FAILED with the one line printed.
- Two grids started at once on a new store: both finish.
- A read-only store and a read-only report folder (read-only bind mounts): one line each.
- `lrexp ui`: the printed link answers at once, and a Ctrl-C stops the server in about a second.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from corpora import word_documents
from logged import logged
from lrexp.config.load import load
from lrexp.data_modules import prepare
from lrexp.grid import runner
from lrexp.grid.expand import expand
from lrexp.lit import checkpoint as ckpt_mod
from lrexp.lit import saving
from lrexp.train import run as train
from lrexp.tracking.server import listening

# real grid and train processes, several trained to 20 steps or more, and an MLflow server started twice
pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    corpus = word_documents(root / "corpus", "a fault may kill cut fill or race but what was saved stays saved and "
                            "nothing is left running", [80 + 11 * i for i in range(16)])
    found = {"root": root, "corpus": corpus, "uri": f"sqlite:///{root}/mlflow.db", "cache": root / "data"}
    prepare(load(overrides=data(found)))  # once: cells that start at once would all prepare it
    return found


def data(env) -> list:
    return ["scale=smoke", f"data.corpus={env['corpus']}", "data.tokenizer=bytes", f"data.cache_dir={env['cache']}",
            "data.val_fraction=0.25", "data.test_fraction=0.25"]


def write_grid(env, root: Path, uri: str, name: str, **train) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": {
            "scale": "smoke",
            "data": {"corpus": str(env["corpus"]), "tokenizer": "bytes", "cache_dir": str(env["cache"]),
                     "val_fraction": 0.25, "test_fraction": 0.25},
            "train": {"max_steps": 20, "val_every": 8, "checkpoint_every": 3, "val_tokens": 256,
                      "accelerator": "cpu", "checkpoint_dir": str(root / f"ckpt-{name}"), **train},
            "log": {"tracking_uri": uri, "every_n_steps": 1, "perf_warmup_steps": 1, "progress_bar": False},
        },
        "seeds": [0, 1],
    }))
    return path


def grid(path: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lrexp.cli", "grid", str(path), *args,
                             "--runs-dir", str(path.parent / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **popen)


def wait_for(what: str, ready, proc: subprocess.Popen, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not (found := ready()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        time.sleep(0.1)
    return found


def errors(stderr: str) -> list:
    """The lines of stderr that report an error (warnings of libraries aside), and no traceback."""
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.splitlines() if ": error: " in ln]


def processes() -> list:
    """(pid, process group, command line) of every live process (zombies aside)."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,pgid=,stat=,args="], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "COLUMNS"}).stdout  # whole lines
    rows = [ln.split(None, 3) for ln in out.splitlines()]
    return [(int(r[0]), int(r[1]), r[3]) for r in rows if len(r) == 4 and not r[2].startswith("Z")]


def server(uri: str):
    """(process group, port) of the MLflow server over `uri` (the process leading its group), or None."""
    for pid, group, args in processes():
        if pid == group and f"--backend-store-uri {uri} " in args:
            return group, int(re.search(r"--port (\d+)", args).group(1))
    return None


def group(pgid: int) -> list:
    return [args for _, g, args in processes() if g == pgid]


@pytest.mark.parametrize("attempt", range(2))
def test_sigkill_of_a_jobs_grid_group_leaves_no_server_and_frees_its_port(env, attempt):
    uri = f"sqlite:///{env['root']}/kill{attempt}.db"
    path = write_grid(env, env["root"], uri, f"kill{attempt}", max_steps=400)
    proc = grid(path, "--jobs", "2", start_new_session=True)  # as `setsid lrexp grid ... &`
    pgid, port = wait_for("server", lambda: server(uri), proc)
    wait_for("cells", lambda: len(list((env["root"] / "runs" / f"kill{attempt}").glob("*/stderr.log"))) == 2, proc)
    assert listening("127.0.0.1", port) and len(group(pgid)) >= 2  # mlflow and its worker (and a supervisor)
    cells = [pid for pid, g, args in processes() if g == proc.pid and "lrexp.cli train" in args]
    for pid in cells:  # no "View run ... at http://127.0.0.1:<port>" in their logs: a link dead with the grid
        assert b"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true" in Path(f"/proc/{pid}/environ").read_bytes()
    assert cells
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 5
    while (group(pgid) or listening("127.0.0.1", port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group(pgid) == [] and not listening("127.0.0.1", port)


@pytest.mark.parametrize("attempt", range(2))
def test_a_newest_checkpoint_cut_short_resumes_from_the_earlier_one_exactly(env, attempt):
    root, uri = env["root"], env["uri"]
    whole = expand(str(write_grid(env, root, uri, f"whole{attempt}")), ["train.seed=0"])
    outcome = runner.run(whole, runs_dir=root / "runs", out=io.StringIO())
    client = MlflowClient(uri)
    reference = logged(client, client.get_run(outcome.results[0].run_id))

    path = write_grid(env, root, uri, f"cut{attempt}")
    proc = grid(path, "train.seed=0", start_new_session=True)
    folder = root / f"ckpt-cut{attempt}"
    wait_for("second checkpoint", lambda: list(folder.glob("*/last-1.ckpt")), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    run_dir = next(folder.iterdir())
    newest, earlier = run_dir / "last.ckpt", run_dir / "last-1.ckpt"
    step = ckpt_mod.saved_step(earlier)
    assert ckpt_mod.saved_step(newest) > step
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a save cut short

    dry = subprocess.run([sys.executable, "-m", "lrexp.cli", "grid", str(path), "--resume", "--dry-run"],
                         capture_output=True, text=True, env=ENV)
    assert dry.returncode == 0, dry.stderr
    assert (f"train on from step {step} (run {run_dir.name}); resuming from last-1.ckpt (step {step}): skipped "
            f"last.ckpt (is cut short") in dry.stdout

    out = io.StringIO()
    resumed = runner.run(expand(str(path), ["train.seed=0"]), resume=True, runs_dir=root / "runs", out=out)
    assert [r.status for r in resumed.results] == ["FINISHED"], out.getvalue()
    assert f"training on from step {step} in run {run_dir.name}" in out.getvalue()
    log = (root / "runs" / f"cut{attempt}" / "seed-0" / "stderr.log").read_text()
    assert "lrexp train: resuming from last-1.ckpt" in log
    assert logged(client, client.get_run(run_dir.name)) == reference


def in_namespace(script: str, **kw) -> subprocess.CompletedProcess:
    """`script` as root of a user and mount namespace of its own: a tmpfs or a read-only bind mount without
    privileges (skipped where the kernel does not allow user namespaces)."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no user namespaces here: cannot mount a small tmpfs or a read-only folder")
    return subprocess.run(["unshare", "-rm", "sh", "-ec", script], capture_output=True, text=True, env=ENV, **kw)


@pytest.mark.parametrize("attempt", range(2))
def test_a_disk_that_fills_at_a_save_keeps_the_earlier_checkpoint_and_says_so_in_one_line(env, tmp_path, attempt):
    size = _checkpoint_bytes(env)
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    kept.mkdir()
    train = [sys.executable, "-m", "lrexp.cli", "train", *data(env), "train.accelerator=cpu", "train.max_steps=9", "train.checkpoint_every=3",
             "train.val_every=3", "train.val_tokens=256", f"train.checkpoint_dir={disk}",
             f"log.tracking_uri={env['uri']}", "log.experiment=lrexp-full", "log.progress_bar=false"]
    # room for one checkpoint and a half: the second save runs out of space
    done = in_namespace(f"mount -t tmpfs -o size={size * 3 // 2} tmpfs {disk}; "
                        f"{' '.join(train)} || echo exit=$?; cp -a {disk}/. {kept}/")
    assert "exit=2" in done.stdout, done.stderr
    [line] = errors(done.stderr)
    assert re.fullmatch(rf"lrexp train: error: cannot write a checkpoint to {disk}/\w+: No space left on device; "
                        r"free space on its disk or set train.checkpoint_dir to another folder", line)
    [run_dir] = kept.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["last.ckpt"]  # whole, and no partial file
    assert ckpt_mod.saved_step(run_dir / "last.ckpt") == 3
    run = MlflowClient(env["uri"]).get_run(run_dir.name)
    assert run.info.status == "FAILED" and run.data.tags["lrexp.error"] == "StorageError: " + line.split(": error: ")[1]


def _checkpoint_bytes(env) -> int:
    """The size of a smoke checkpoint of this corpus, from a run trained for it once."""
    folder = env["root"] / "ckpt-size"
    if not folder.exists():
        subprocess.run([sys.executable, "-m", "lrexp.cli", "train", *data(env), "train.accelerator=cpu", "train.max_steps=1",
                        "train.val_tokens=256", f"train.checkpoint_dir={folder}", f"log.tracking_uri={env['uri']}",
                        "log.progress_bar=false"], check=True, capture_output=True, env=ENV)
    return next(folder.glob("*/last.ckpt")).stat().st_size


@pytest.mark.parametrize("attempt", range(3))
def test_two_grids_started_at_once_on_a_new_store_both_finish(env, tmp_path, attempt):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    paths = [write_grid(env, tmp_path, uri, name, max_steps=2, val_every=2) for name in ("a", "b")]
    procs = [grid(p, "train.seed=0", "train.max_steps=2") for p in paths]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]


def test_a_read_only_store_and_report_folder_fail_in_one_line(env, tmp_path):
    store, reports = tmp_path / "store", tmp_path / "reports"
    store.mkdir()
    reports.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    MlflowClient(uri).search_experiments()  # the store exists, then the filesystem turns read-only
    path = write_grid(env, tmp_path, uri, "ro", max_steps=2, val_every=2)
    ro = f"mount --bind {store} {store}; mount -o remount,bind,ro {store}; "
    done = in_namespace(ro + f"{sys.executable} -m lrexp.cli grid {path} train.seed=0 || echo exit=$?")
    assert "exit=2" in done.stdout
    assert errors(done.stderr) == [f"lrexp grid: error: the MLflow store {store}/mlflow.db is read-only ({store}/mlflow.db "
                                   f"cannot be written): make it writable, or set log.tracking_uri or "
                                   f"$MLFLOW_TRACKING_URI to a store that is"]
    ro = f"mount --bind {reports} {reports}; mount -o remount,bind,ro {reports}; "
    done = in_namespace(ro + f"{sys.executable} -m lrexp.cli grid {path} train.seed=0 --out {reports}/r "
                        f"--runs-dir {tmp_path}/runs || echo exit=$?")
    assert "exit=2" in done.stdout
    [line] = errors(done.stderr)
    assert line.startswith(f"lrexp grid: error: cannot write {reports}/r") and "Read-only file system" in line


def test_ui_link_answers_when_printed_and_ctrl_c_stops_it_in_a_second(env):
    port = 5000 + os.getpid() % 1000
    proc = subprocess.Popen([sys.executable, "-m", "lrexp.cli", "ui", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "MLFLOW_TRACKING_URI": env["uri"]})
    line = proc.stdout.readline()
    assert line.startswith(f"MLflow UI: http://127.0.0.1:{port}"), proc.stderr.read() if not line else line
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert response.status == 200  # at once: the line came after the server answered
    pgid, _ = server(env["uri"])
    running = group(pgid)
    assert len(running) == 3 and sum("uvicorn" in a for a in running) == 1, running  # one worker, no job consumers
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    while (group(pgid) or listening("127.0.0.1", port)) and time.monotonic() - started < 10:
        time.sleep(0.05)
    assert group(pgid) == [] and not listening("127.0.0.1", port) and time.monotonic() - started < 3
    out, _ = proc.communicate(timeout=60)  # the interpreter's own exit (torch, MLflow) takes seconds more
    assert proc.returncode == 0 and out.strip() == "MLflow UI stopped"


def test_a_checkpoint_reaches_the_disk_after_its_steps_metrics_reach_the_store(env, monkeypatch):
    """A kill between the two must not lose the step's metric points: the resumed run starts after the step."""
    client, seen = MlflowClient(env["uri"]), []
    write = saving.AtomicCheckpointIO.write

    def checked(self):
        if self._pending is not None:
            buffer, path = self._pending
            step = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["global_step"]
            logged_steps = {m.step for m in client.get_metric_history(path.parent.name, "train/loss")}
            seen.append((step, step - 1 in logged_steps))  # the loss of update k is logged at step k - 1
        write(self)

    monkeypatch.setattr(saving.AtomicCheckpointIO, "write", checked)
    train.run(load(overrides=[*data(env), "train.accelerator=cpu", "train.max_steps=4", "train.checkpoint_every=2",
                              "train.val_every=2", "train.val_tokens=256", "log.every_n_steps=1",
                              f"train.checkpoint_dir={env['root'] / 'ckpt-order'}", f"log.tracking_uri={env['uri']}",
                              "log.progress_bar=false"]))
    assert seen == [(2, True), (4, True)]
