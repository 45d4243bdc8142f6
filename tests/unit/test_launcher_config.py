"""`--launcher slurm|local` and `--status` without a cluster: the typed `launcher.*` keys, every refusal in one
line before anything is submitted, the job script of a multi-node cell, the job's checkpoint (stop the cell,
hand back the same job), the scheduler's states read from `sacct` (mocked) and each cell's state word.
(tests/integration/test_launcher.py runs local jobs; tests/integration/test_multinode.py two-node DDP.)
"""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lrexp.config.load import load
from lrexp.config.schema import LauncherConfig
from lrexp.grid import jobs, slurm, status
from lrexp.grid.launch import TRAIN_PREFIX_ENV
from lrexp.grid.plan import Attempt


@pytest.fixture(scope="module")
def smoke():
    return load(overrides=["scale=smoke"])


@pytest.fixture
def gates(smoke):
    """A grid of six cells of `smoke` with `train.KEY=VALUE` set (one value, or one per cell: a list); the
    launcher reads nothing else of a grid (resolving six real configs costs seconds)."""

    def make(**train):
        cells = []
        for i in range(6):
            cfg = copy.deepcopy(smoke)
            for key, value in train.items():
                setattr(cfg.train, key, value[i] if isinstance(value, list) else value)
            cells.append(SimpleNamespace(id=f"cell{i}", index=i, config=cfg, config_hash=f"h{i}",
                                         continue_hash=f"c{i}"))
        return SimpleNamespace(name="gates", cells=cells)

    return make


def test_launcher_keys_are_typed_and_split_from_the_cells():
    cfg, rest = slurm.split_overrides(["launcher.partition=gpu", "train.max_steps=3", "launcher.nodes=2",
                                       "launcher.sbatch.constraint=a100", "launcher.time=240"])
    assert rest == ["train.max_steps=3"]
    assert (cfg.partition, cfg.nodes, cfg.time, cfg.sbatch) == ("gpu", 2, 240, {"constraint": "a100"})
    with pytest.raises(slurm.LauncherError, match=r"^'launcher.gpus': Key 'gpus' not in 'LauncherConfig'"):
        slurm.split_overrides(["launcher.gpus=2"])
    with pytest.raises(slurm.LauncherError, match=r"^'launcher.nodes': Value 'two' .* Integer"):
        slurm.split_overrides(["launcher.nodes=two"])


@pytest.mark.parametrize("kind, keys, train, message", [
    ("pbs", {}, {}, "unknown launcher 'pbs'; allowed: slurm, local"),
    ("slurm", {"nodes": 2}, {}, "cell cell0: 'train.num_nodes' is 1 but 'launcher.nodes' is 2"),
    ("slurm", {"gpus_per_node": 1}, {"accelerator": "gpu", "devices": 2},
     "'train.devices' is 2 GPUs per node but 'launcher.gpus_per_node' grants 1"),
    ("slurm", {}, {"accelerator": "gpu"}, "'train.devices' is 1 GPUs per node but 'launcher.gpus_per_node' "
                                          "grants 0"),
    ("local", {"nodes": 2}, {"num_nodes": 2}, "--launcher local runs on this one machine"),
    ("slurm", {"time": 1, "signal_s": 60}, {}, "'launcher.signal_s' \\(60\\) must be shorter"),
    ("slurm", {"array_parallelism": 0}, {}, "'launcher.array_parallelism' must be > 0"),
    ("slurm", {}, {"devices": [1, 2, 1, 2, 1, 2]}, "cells with different train.devices"),
])
def test_refused_in_one_line_before_anything_is_submitted(gates, kind, keys, train, message):
    with pytest.raises(slurm.LauncherError, match=message) as err:
        slurm.check(kind, LauncherConfig(**keys), gates(**train))
    assert "\n" not in str(err.value)


def test_without_submitit_the_launcher_says_how_to_install_it(gates, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    with pytest.raises(slurm.LauncherError, match=r"^--launcher needs submitit: pip install 'lrexp\[slurm\]'$"):
        slurm.check("local", LauncherConfig(), gates())


def test_job_script_of_a_two_node_cell(gates, tmp_path):
    """One array task per cell; srun starts the cell's ranks, one task per device, and they meet on the
    first node; SLURM's signal reaches the job's own Python (exec), which requeues."""
    pytest.importorskip("submitit")
    g = gates(num_nodes=2, accelerator="gpu")
    launcher = LauncherConfig(nodes=2, gpus_per_node=1, partition="gpu", time=240, sbatch={"constraint": "a100"})
    slurm.check("slurm", launcher, g, submit=False)
    script = slurm.job_script(launcher, g, tmp_path / "%j", len(g.cells)).splitlines()
    for line in ("#SBATCH --array=0-5%6", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --time=240",
                 "#SBATCH --signal=B:USR2@120", "#SBATCH --requeue", "#SBATCH --constraint=a100",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 f"export {TRAIN_PREFIX_ENV}='srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1'"):
        assert line in script, line
    assert script[-1].startswith(f"exec {sys.executable} -u -m submitit.core._submit ")
    assert not any(line.startswith("srun") for line in script)  # the job's one process is the --cell one
    one = slurm.job_script(LauncherConfig(), gates(), tmp_path / "%j", 6)
    assert "MASTER_ADDR" not in one and TRAIN_PREFIX_ENV not in one  # one rank: trains in the job's step


def test_checkpoint_stops_the_cell_and_hands_back_the_same_job(tmp_path):
    pytest.importorskip("submitit")
    job = slurm.CellJob("gates", "gate=lstm,topology=dual,seed=0", "parent123", str(tmp_path), {"X": "1"})
    assert job.command()[-6:] == ["--cell", "gate=lstm,topology=dual,seed=0", "--parent", "parent123",
                                  "--runs-dir", str(tmp_path)]
    mark = tmp_path / "stopped"
    job._proc = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(mark)!r}).write_text('x'), sys.exit(143)))\n"
        "print('up', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert job._proc.stdout.readline() == "up\n"
    again = job.checkpoint()
    assert mark.exists()  # the cell got SIGTERM and ended (its handler saves the checkpoint)
    assert vars(again.function) == {**vars(job), "_proc": None} and not again.args
    assert "_proc" in job.__getstate__() and job.__getstate__()["_proc"] is None


def test_sacct_states_expand_array_ranges(monkeypatch):
    text = "77_0|COMPLETED\n77_1|RUNNING\n77_[2-3,5%2]|PENDING\n77_4|CANCELLED by 1000\n"
    seen = {}

    def run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout=text)

    monkeypatch.setattr(jobs.subprocess, "run", run)
    states = jobs.sacct_states(["77_0", "77_1", "77_2"])
    assert seen["cmd"][-2:] == ["-j", "77"]
    assert states == {"77_0": "COMPLETED", "77_1": "RUNNING", "77_2": "PENDING", "77_3": "PENDING",
                      "77_5": "PENDING", "77_4": "CANCELLED"}


class _Client:
    """The two reads `cell_state` makes: a run's final metrics and its error tag."""

    def __init__(self, metrics=None, tags=None):
        self.run = type("R", (), {"data": type("D", (), {"metrics": metrics or {}, "tags": tags or {}})()})()

    def get_run(self, run_id):
        return self.run


def test_cell_states_from_mlflow_and_the_scheduler(gates, tmp_path):
    cell = gates().cells[0]

    def state(mine, sched=None, client=None, progress=tmp_path / "none.json"):
        return status.cell_state(cell, mine, client or _Client(), "77_0", sched, progress, "lrexp grid gates --resume")

    def attempt(s, steps=None, h=cell.config_hash):
        return Attempt("r1", s, h, cell.continue_hash, steps)

    assert state([attempt("FINISHED", 20)], client=_Client({"final/val_bits_per_token": 2.5})) == \
        ("finished", "bits/token 2.5000")
    # FINISHED by Lightning when fit returned, its final passes still running
    assert state([attempt("FINISHED", 20)], "RUNNING") == ("running", "final passes over the validation and test "
                                                                      "splits")
    assert state([attempt("FINISHED", 20)], "COMPLETED") == ("finished", "no bits/token")
    (tmp_path / "p.json").write_text('{"step": 5, "max_steps": 20, "start_step": 0, "seconds": 10.0, '
                                     '"loss": 2.25, "tokens_per_s": 100.0}')
    assert state([attempt("RUNNING")], "RUNNING", progress=tmp_path / "p.json") == \
        ("running", "step 5/20, loss 2.250, 100 tok/s, ETA 30s")
    assert state([attempt("KILLED", 6)], "PENDING") == ("requeued", "preempted (checkpoint at step 6), job 77_0 "
                                                                    "PENDING")
    assert state([attempt("KILLED", 6)], "PREEMPTED")[0] == "preempted"
    assert state([attempt("FAILED")], "FAILED", _Client(tags={"lrexp.error": "ValueError: bad\nmore"})) == \
        ("failed", "ValueError: bad")
    assert state([], "PENDING") == ("pending", "job 77_0 PENDING")
    assert state([], "OUT_OF_MEMORY") == ("failed", "job 77_0 ended OUT_OF_MEMORY before the cell started its run")
    assert state([], None) == ("pending", "not started")
    # a cell that finished with another config (fewer steps) is not this cell's result
    assert state([attempt("FINISHED", 10, h="other")], None)[0] == "pending"


def test_status_of_a_grid_never_launched(gates, monkeypatch):
    class NoExperiment:
        def __init__(self, uri):
            pass

        def get_experiment_by_name(self, name):
            return None

    monkeypatch.setattr(status, "MlflowClient", NoExperiment)
    with pytest.raises(status.GridError, match=r"^grid gates was never launched in .* \(no parent run in experiment "
                                               r"lrexp-gates\); start it with lrexp grid gates$"):
        status.parent_of(gates(), None)


def test_a_launched_grid_with_jobs_in_the_scheduler_is_not_resumed(monkeypatch):
    parent = SimpleNamespace(data=SimpleNamespace(tags={jobs.TAG_LAUNCHER: "slurm",
                                                         jobs.TAG_JOBS: '{"0": "77_0", "1": "77_1", "2": "77_2"}'}))
    monkeypatch.setattr(jobs, "sacct_states", lambda ids: {"77_0": "COMPLETED", "77_1": "PENDING", "77_2": "RUNNING"})
    assert jobs.still_queued(parent) == ["77_1 PENDING", "77_2 RUNNING"]
    assert jobs.still_queued(SimpleNamespace(data=SimpleNamespace(tags={}))) == []  # run by lrexp grid itself


def test_slurm_without_sbatch_is_refused_but_its_dry_run_is_not(gates, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    with pytest.raises(slurm.LauncherError, match=r"^--launcher slurm needs SLURM's sbatch and srun on this machine"):
        slurm.check("slurm", LauncherConfig(), gates())
    slurm.check("slurm", LauncherConfig(), gates(), submit=False)
    slurm.check("local", LauncherConfig(), gates())
