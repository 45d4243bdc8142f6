"""`lrexp grid NAME --launcher slurm|local` (docs/grids.md#slurm): every cell of an invocation one job of a
submitit job array, each job running exactly `lrexp grid NAME --cell ID --parent RUN_ID` (the same cell ids,
run names, config hashes, resume rules and MLflow runs), the parent run recording the job ids.

Preemption and time limits follow submitit's checkpointing protocol: SLURM signals the job's batch shell
(`--signal=B:USR2@launcher.signal_s`; the shell `exec`s Python, so the job's own process receives it),
submitit calls `CellJob.checkpoint`, which stops the `--cell` process with SIGTERM (its cell finishes the
optimiser step, writes its checkpoint and ends its run KILLED), and submitit requeues the job; the requeued
job's `--cell` continues the cell from its checkpoint in the same MLflow run. A preemption that only sends
SIGTERM reaches the `--cell` and training processes directly and ends the same way; SLURM's `--requeue` then
starts the job again.

A cell on several nodes (or GPUs) trains under `srun`, one task per device, started by the `--cell`
process inside the job's allocation (`TRAIN_PREFIX_ENV`); Lightning's SLURM environment reads the ranks from
what srun sets, and the rendezvous address from `MASTER_ADDR` / `MASTER_PORT`, which the job script exports.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lrexp.config.checks import check_launcher
from lrexp.config.errors import ConfigError
from lrexp.config.paths import PROJECT_ROOT
from lrexp.config.schema import LauncherConfig
from lrexp.errors import UserError
from lrexp.grid import live
from lrexp.grid.expand import Cell, Grid
from lrexp.grid.jobs import TAG_FOLDER, TAG_JOBS, TAG_LAUNCHER, still_queued
from lrexp.grid.launch import TRAIN_PREFIX_ENV, CellResult
from lrexp.grid.plan import Step, find_attempts, plan, tracking_uri_of
from lrexp.grid.runner import RUNS_DIR, Outcome, metric_note, shared_store, stopped, resume_command
from lrexp.grid.spec import GRIDS_DIR
from lrexp.grid.tracker import Tracker
from lrexp.runtime.signals import StopSignals
from lrexp.tracking import runs
from lrexp.tracking.names import TAG_ERROR, latest_parent, parents
from lrexp.tracking.server import SERVER_ENV

LAUNCHERS = ("slurm", "local")
PREFIX = "launcher."
INSTALL = "pip install 'lrexp[slurm]'"
POLL_S = 2.0


class LauncherError(UserError):
    """Bad `--launcher` input, refused before anything is submitted."""


def split_overrides(overrides: Sequence[str]) -> Tuple[LauncherConfig, List[str]]:
    """The `launcher.*` overrides as a typed LauncherConfig, and the others (the cells')."""
    mine = [o for o in overrides if o.startswith(PREFIX)]
    rest = [o for o in overrides if not o.startswith(PREFIX)]
    base = OmegaConf.structured(LauncherConfig)
    for item in mine:
        key, sep, value = item.partition("=")
        if not sep:
            raise LauncherError(f"override '{item}' is not of the form key=value")
        try:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([item[len(PREFIX):]]))
        except OmegaConfBaseException as exc:
            known = ", ".join(f"{PREFIX}{k}" for k in LauncherConfig.__dataclass_fields__)
            why = str(exc).splitlines()[0]
            raise LauncherError(f"'{key}': {why} (the launcher keys: {known})") from None
    return OmegaConf.to_object(base), rest


def check(kind: str, launcher: LauncherConfig, grid: Grid, submit: bool = True) -> None:
    """Every cell against the jobs it will get, before anything is submitted (`submit`: SLURM's commands
    must be here too; a dry run only writes the job script)."""
    if kind not in LAUNCHERS:
        raise LauncherError(f"unknown launcher '{kind}'; allowed: {', '.join(LAUNCHERS)}")
    for cell in grid.cells:
        try:
            check_launcher(launcher, cell.config, local=kind == "local")
        except ConfigError as exc:
            raise LauncherError(f"grid {grid.name}, cell {cell.id}: {exc}") from None
    devices = {c.config.train.devices for c in grid.cells}
    if len(devices) > 1:
        raise LauncherError(f"grid {grid.name}: cells with different train.devices ({sorted(devices)}) cannot "
                            f"share one job array; launch them as separate grids")
    submitit_module()  # installed: checked last, so a bad key is named first
    if submit and kind == "slurm" and (shutil.which("srun") is None or shutil.which("sbatch") is None):
        raise LauncherError("--launcher slurm needs SLURM's sbatch and srun on this machine (a login node); "
                            "--dry-run shows the job script anywhere")


def submitit_module():
    try:
        import submitit  # the optional extra lrexp[slurm]: only `--launcher` needs it
    except ImportError:
        raise LauncherError(f"--launcher needs submitit: {INSTALL}") from None
    return submitit


def train_prefix(launcher: LauncherConfig, devices: int) -> List[str]:
    """How the `--cell` process starts `lrexp train` inside a job: under srun, one task per device, when
    the cell spans several ranks; as it is otherwise."""
    if launcher.nodes * devices == 1:
        return []
    return ["srun", f"--nodes={launcher.nodes}", f"--ntasks-per-node={devices}", "--kill-on-bad-exit=1"]


def _grid_argument(grid: Grid) -> str:
    return grid.name if grid.path.parent == GRIDS_DIR else str(grid.path)


class CellJob:
    """What a job runs: `lrexp grid NAME --cell ID --parent RUN_ID` as a process of its own, which the
    checkpoint (submitit calls it on SLURM's signal) stops cleanly before the job is requeued."""

    def __init__(self, grid: str, cell: str, parent_id: str, runs_dir: Optional[str],
                 env: Dict[str, str]) -> None:
        self.grid, self.cell, self.parent_id, self.runs_dir, self.env = grid, cell, parent_id, runs_dir, env
        self._proc: Optional[subprocess.Popen] = None

    def command(self) -> List[str]:
        return [sys.executable, "-m", "lrexp.cli", "grid", self.grid, "--cell", self.cell, "--parent",
                self.parent_id, *(["--runs-dir", self.runs_dir] if self.runs_dir else [])]

    def __call__(self) -> int:
        # SIGTERM or SIGINT to the job (a preemption without the user signal, a cancelled local job) goes on
        # to the cell, which stops at a step boundary; submitit's own SIGTERM handler would only log it
        with StopSignals() as stop:
            self._proc = subprocess.Popen(self.command(), cwd=PROJECT_ROOT, env={**os.environ, **self.env})
            stop.forward(self._proc.send_signal)
            code = self._proc.wait()
        if code != 0:  # the job fails with the cell (its error is on the cell's run)
            raise RuntimeError(f"lrexp grid --cell {self.cell} exited with status {code}")
        return code

    def checkpoint(self) -> Any:
        """Stop the cell at its next step boundary (it saves its checkpoint and ends its run KILLED), then
        hand submitit the same job to requeue. Runs inside submitit's signal handler, which interrupted
        `__call__`'s wait: the process is reaped here, as Popen's own wait holds its lock."""
        from submitit.helpers import DelayedSubmission  # the optional extra: only a launched job runs this

        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                os.waitpid(proc.pid, 0)
            except ChildProcessError:  # reaped already: it had ended
                pass
        return DelayedSubmission(CellJob(self.grid, self.cell, self.parent_id, self.runs_dir, self.env))

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_proc": None}


def executor(kind: str, launcher: LauncherConfig, folder: Path, grid: Grid):
    """submitit's executor for the grid's jobs: SLURM's, or the local one (processes on this machine)."""
    submitit = submitit_module()
    if kind == "local":
        ex = submitit.LocalExecutor(folder)
        ex.update_parameters(timeout_min=launcher.time, signal_delay_s=launcher.signal_s)
        return ex
    ex = submitit.SlurmExecutor(folder, python=PYTHON)
    ex.update_parameters(**sbatch_parameters(launcher, grid))
    return ex


# exec: `--signal=B:USR2` reaches the batch shell only, which so becomes the job's Python
PYTHON = f"exec {shlex.quote(sys.executable)}"


def sbatch_parameters(launcher: LauncherConfig, grid: Grid) -> Dict[str, Any]:
    """submitit's SLURM parameters for the grid's job array."""
    devices = grid.cells[0].config.train.devices
    given = {k: getattr(launcher, k) for k in ("partition", "account", "qos", "cpus_per_task", "mem")}
    return dict(
        job_name=f"lrexp-{grid.name}",
        time=launcher.time,
        nodes=launcher.nodes,
        ntasks_per_node=devices,  # the tasks srun starts for a multi-rank cell
        **({"gpus_per_node": launcher.gpus_per_node} if launcher.gpus_per_node else {}),
        **{k: v for k, v in given.items() if v is not None},
        array_parallelism=launcher.array_parallelism or len(grid.cells),
        use_srun=False,  # the job's one process is the --cell one; it starts srun for a multi-rank cell
        stderr_to_stdout=True,
        setup=rendezvous_lines(launcher, devices),
        additional_parameters={"signal": f"B:USR2@{launcher.signal_s}", "requeue": True, **launcher.sbatch},
    )


def rendezvous_lines(launcher: LauncherConfig, devices: int) -> List[str]:
    """The job script's setup: the rendezvous of a multi-rank cell on the first node, and how the cell
    starts its ranks."""
    prefix = train_prefix(launcher, devices)
    if not prefix:
        return []
    return [
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        f"export {TRAIN_PREFIX_ENV}={shlex.quote(' '.join(prefix))}",
    ]


def job_script(launcher: LauncherConfig, grid: Grid, folder: Path, cells: int) -> str:
    """The sbatch script of the grid's job array of `cells` jobs, as submitit writes it."""
    from submitit.slurm.slurm import _make_sbatch_string  # the optional extra; submitit's own script writer

    submitit_module()
    command = f"{PYTHON} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=cells, **sbatch_parameters(launcher, grid))


@dataclass
class Launched:
    step: Step
    job: Any
    started: float
    running: live.Running


def _cell_result(tracker: Tracker, parent_id: str, cell: Cell, seconds: float) -> CellResult:
    """The cell's outcome from MLflow, where its `--cell` process recorded it."""
    mine = [a for a in find_attempts(tracker.client, tracker.experiment_id, parent_id)
            if a.continue_hash == cell.continue_hash]
    if not mine:
        return CellResult(cell, "FAILED", None, seconds, error="the job ended before the cell started its run")
    run = tracker.client.get_run(mine[0].run_id)
    status = "FINISHED" if mine[0].status == "FINISHED" and mine[0].config_hash == cell.config_hash else \
        mine[0].status
    return CellResult(cell, status, run.info.run_id, seconds, error=run.data.tags.get(TAG_ERROR),
                      metrics=dict(run.data.metrics))


class _Driver:
    """Submits the cells as jobs and, for the local launcher, follows them to the end with the lines of a
    `--jobs` grid."""

    def __init__(self, grid: Grid, kind: str, launcher: LauncherConfig, runs_dir: Optional[Path], out: TextIO,
                 tracker: Tracker, parent_id: str) -> None:
        self.grid, self.kind, self.launcher, self.out = grid, kind, launcher, out
        self.tracker, self.parent_id = tracker, parent_id
        self.runs_dir = runs_dir
        self.folder = (runs_dir or RUNS_DIR) / grid.name
        self.start = time.monotonic()
        self.durations: List[float] = []

    def job(self, step: Step, env: Dict[str, str]) -> CellJob:
        return CellJob(_grid_argument(self.grid), step.cell.id, self.parent_id,
                       str(self.runs_dir) if self.runs_dir else None, env)

    def prefix(self, cell: Cell) -> str:
        return f"[{cell.index + 1}/{len(self.grid.cells)}]"

    def record(self, jobs: Dict[int, str], folder: Path) -> None:
        for key, value in ((TAG_LAUNCHER, self.kind), (TAG_FOLDER, str(folder)), (TAG_JOBS, json.dumps(jobs))):
            self.tracker.client.set_tag(self.parent_id, key, value)


def launch(grid: Grid, kind: str, launcher: LauncherConfig, resume: bool = False,
           runs_dir: Optional[Path] = None, out: Optional[TextIO] = None) -> Optional[Outcome]:
    """Submit every cell that is not done as a job; with the local launcher, wait for them and return the
    outcome (one result per cell in grid order); with SLURM return None once submitted (the jobs go on)."""
    out = out or sys.stdout
    tracker = Tracker(tracking_uri_of(grid), grid)
    previous = latest_parent(parents(tracker.client, tracker.experiment_id, grid.name)) if resume else None
    queued = still_queued(previous) if previous is not None else []
    if queued:  # their cells would train twice: a cell on another machine cannot be seen alive
        raise LauncherError(f"grid {grid.name} still has jobs in the scheduler ({', '.join(queued[:3])}"
                            f"{', ...' if len(queued) > 3 else ''}); wait for them or cancel them before resuming")
    parent_id, attempts = tracker.open_parent(resume)
    steps = plan(grid, attempts or [])
    driver = _Driver(grid, kind, launcher, runs_dir, out, tracker, parent_id)
    folder = driver.folder / "launcher" / "%j"  # a folder per job (submitit fills in the id)
    n = len(grid.cells)
    print(f"grid {grid.name}: {n} cell{'s' * (n != 1)}, scale {grid.scale}, MLflow experiment lrexp-{grid.name}, "
          f"parent run {parent_id}" + (" (resumed)" if attempts is not None else "")
          + f", {kind} launcher, job files under {folder}", file=out, flush=True)
    skipped = {s.cell.index: CellResult(s.cell, "SKIPPED", run_id=s.run_id) for s in steps if s.action == "skip"}
    for s in steps:
        if s.action == "skip":
            print(f"{driver.prefix(s.cell)} {s.cell.id}: skipped, FINISHED in run {s.run_id}", file=out)
    todo = [s for s in steps if s.action != "skip"]
    if kind == "slurm" and todo:
        try:
            _submit_array(driver, folder, todo)
        except Exception as exc:  # sbatch refused: no job runs, the parent must not look like one does
            runs.end_on_error(tracker.client, parent_id, exc)
            raise
        return None
    with StopSignals() as stop:
        results = {**skipped, **_run_local(driver, folder, todo, stop)}
    ordered = [results[i] for i in sorted(results)]
    tracker.close_parent(parent_id, ordered, interrupted=stop.received is not None)
    if stop.received is not None:
        raise stopped(stop.received, ordered, n, resume_command(grid) + " --launcher local")
    return Outcome(tracker.uri, parent_id, ordered)


def _submit_array(driver: _Driver, folder: Path, todo: Sequence[Step]) -> None:
    ex = executor("slurm", driver.launcher, folder, driver.grid)
    with ex.batch():  # one job array; a multi-rank cell's srun comes from the job script's export
        jobs = [ex.submit(driver.job(s, {})) for s in todo]
    ids = {s.cell.index: j.job_id for s, j in zip(todo, jobs)}
    driver.record(ids, folder)
    for s in todo:
        print(f"{driver.prefix(s.cell)} {s.cell.id}: SLURM job {ids[s.cell.index]}", file=driver.out)
    where = _grid_argument(driver.grid)
    print(f"submitted {len(todo)} job{'s' * (len(todo) != 1)}; follow them with: lrexp grid {where} --status; "
          f"the table: lrexp report {where}", file=driver.out, flush=True)


def _run_local(driver: _Driver, folder: Path, todo: Sequence[Step], stop: StopSignals) -> Dict[int, CellResult]:
    """The local launcher: `launcher.array_parallelism` jobs at once (default one), in grid order. Once
    `stop` caught a signal no job starts, and the running ones get SIGTERM, which their controller passes on
    to the job and the job to its cell (which stops at a step boundary, checkpointed, KILLED)."""
    at_once = driver.launcher.array_parallelism or 1
    ex = executor("local", driver.launcher, folder, driver.grid)
    queue, running, ids = list(todo), [], {}
    results: Dict[int, CellResult] = {}
    line = live.LiveLine(driver.out)
    with shared_store(driver.tracker, at_once) as server:
        env = {SERVER_ENV: server} if server else {}
        stop.forward(lambda signum: [os.kill(int(r.job.job_id), signal.SIGTERM) for r in running])
        while (queue and stop.received is None) or running:
            while queue and len(running) < at_once and stop.received is None:
                step = queue.pop(0)
                progress = driver.folder / step.cell.dirname / "progress.json"
                progress.unlink(missing_ok=True)
                job = ex.submit(driver.job(step, env))
                ids[step.cell.index] = job.job_id
                driver.record(ids, folder)
                what = f"training on from step {step.from_step} in run {step.run_id}" if step.run_id else "training"
                line.clear()
                print(f"{driver.prefix(step.cell)} {step.cell.id}: {what} as local job {job.job_id} "
                      f"(log: {job.paths.stdout})", file=driver.out, flush=True)
                running.append(Launched(step, job, time.monotonic(),
                                        live.Running(driver.prefix(step.cell), progress, time.monotonic())))
            time.sleep(POLL_S)
            for launched in [r for r in running if r.job.done()]:
                running.remove(launched)
                results[launched.step.cell.index] = _finished(driver, launched, running, queue, at_once, line)
            mean = sum(driver.durations) / len(driver.durations) if driver.durations else None
            line.show(live.status([r.running for r in running], len(queue), mean, at_once))
    line.clear()
    return results


def _finished(driver: _Driver, launched: Launched, running: Sequence[Launched], queue: Sequence[Step],
              at_once: int, line: live.LiveLine) -> CellResult:
    cell = launched.step.cell
    seconds = time.monotonic() - launched.started
    driver.durations.append(seconds)
    result = _cell_result(driver.tracker, driver.parent_id, cell, seconds)
    detail = metric_note(result.metrics) if result.status == "FINISHED" else f"error: {result.error}"
    mean, now = sum(driver.durations) / len(driver.durations), time.monotonic()
    eta = live.grid_left([max(0.0, mean - (now - r.started)) for r in running], len(queue), mean, at_once)
    line.clear()
    print(f"{driver.prefix(cell)} {cell.id}: {result.status} in {live.duration(seconds)}; {detail} | elapsed "
          f"{live.duration(now - driver.start)}, ETA {live.duration(eta)}", file=driver.out, flush=True)
    return result
