"""Running a grid (docs/design.md#a-grids-lifecycle): the pool of cells training at once, the invocation's parent run, and what a
signal does.

One parent MLflow run per invocation in experiment `lrexp-<grid>`; each cell writes its config to
`runs/<grid>/<cell>/config.yaml` and trains as its own process on it (grid/launch.py). The child run nests
under the parent through the `mlflow.parentRunId` tag the cell's config carries. `--resume` continues the
grid's latest parent (with that invocation's command-line overrides when none are given), as grid/plan.py
decides per cell.

A SIGTERM or SIGINT is passed on to the running cell, which saves a checkpoint at the end of its optimiser
step and ends its run KILLED; the grid then stops without starting another cell, marks its parent KILLED
and prints the command that resumes it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

from mlflow.tracking import MlflowClient

from lrexp.config.paths import PROJECT_ROOT
from lrexp.errors import Interrupted
from lrexp.grid import live
from lrexp.grid.expand import Cell, Grid, cell_config, write_cell
from lrexp.grid.launch import CellResult, Slots, run_cell, slots
from lrexp.grid.plan import Step, plan, plan_cell, tracking_uri_of
from lrexp.grid.spec import GRIDS_DIR
from lrexp.grid.tracker import Tracker
from lrexp.runtime import signals
from lrexp.runtime.cpus import AUTO_JOBS, CPUS_ENV, cells_at_once, usable_cpus
from lrexp.runtime.signals import StopSignals
from lrexp.tracking.names import FINAL_BPT
from lrexp.tracking.server import SERVER_ENV, artifact_root_of, serve

RUNS_DIR = PROJECT_ROOT / "runs"


@dataclass
class Outcome:
    uri: str
    parent_id: str
    results: List[CellResult]


def resume_command(grid: Grid) -> str:
    where = grid.name if grid.path.parent == GRIDS_DIR else str(grid.path)
    return f"lrexp grid {where} --resume"


@dataclass
class _Launched:
    step: Step
    path: Path
    env: Dict[str, str]
    cpus: Optional[List[int]]
    gpus: List[str]
    since_ms: int
    live: live.Running


class _Runner:
    """Trains the cells of one invocation, up to one per CPU share at once (`Slots`), in grid order, and
    prints a line as each starts and ends and the live line in between. Cells train in worker threads (each
    waits on its process); everything else, MLflow included, happens on this thread."""

    def __init__(self, grid: Grid, tracker: Tracker, parent_id: str, runs_dir: Optional[Path], out: TextIO,
                 run_cell_fn: Callable[..., Tuple[int, Optional[Dict[str, Any]], str]], stop: StopSignals,
                 shares: Slots, server: Optional[str] = None) -> None:
        self.grid, self.tracker, self.parent_id = grid, tracker, parent_id
        self.folder = (runs_dir or RUNS_DIR) / grid.name
        self.out, self.run_cell_fn, self.stop = out, run_cell_fn, stop
        self.shares, self.server = shares, server
        self.durations: List[float] = []
        self.start = time.monotonic()
        self.live = live.LiveLine(out)

    def say(self, text: str) -> None:
        self.live.clear()
        print(text, file=self.out, flush=True)

    def _prefix(self, cell: Cell) -> str:
        return f"[{cell.index + 1}/{len(self.grid.cells)}]"

    def _launch(self, step: Step, cpus: Optional[List[int]], gpus: List[str]) -> _Launched:
        cell = step.cell
        cfg = cell_config(cell, self.grid, self.parent_id)
        progress = self.folder / cell.dirname / "progress.json"
        progress.unlink(missing_ok=True)  # an earlier attempt's
        cfg.log.progress_file = str(progress)
        path = write_cell(cfg, self.folder / cell.dirname, self.grid, cell)
        env = {
            **({CPUS_ENV: ",".join(map(str, cpus))} if cpus is not None else {}),
            **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}),
            **({SERVER_ENV: self.server} if self.server else {}),
        }
        what = f"training on from step {step.from_step} in run {step.run_id}" if step.run_id else "training"
        where = (f" on CPUs {env[CPUS_ENV]}" if cpus is not None else "") + (f", GPUs {','.join(gpus)}" if gpus else "")
        self.say(f"{self._prefix(cell)} {cell.id}: {what}{where} (log: {path.parent}/stderr.log)")
        return _Launched(step, path, env, cpus, gpus, int(time.time() * 1000),
                         live.Running(self._prefix(cell), progress, time.monotonic()))

    def _finish(self, launched: _Launched, outcome: Tuple[int, Optional[Dict[str, Any]], str], later: int,
                running: Sequence[_Launched]) -> CellResult:
        """`later`: the cells still to start; `running`: those still training."""
        step, cell = launched.step, launched.step.cell
        code, metrics, error = outcome
        seconds = time.monotonic() - launched.live.started
        self.durations.append(seconds)
        if metrics is not None:
            result = CellResult(cell, "FINISHED", metrics["run_id"], seconds, metrics=metrics)
            detail = metric_note(metrics)
        else:
            status = "FAILED" if self.stop.received is None else "KILLED"
            run_id = self.tracker.record_end(self.parent_id, cell, launched.since_ms, error, status, step.run_id)
            result = CellResult(cell, status, run_id, seconds, error=error)
            detail = f"error: {error}"
        mean, now = sum(self.durations) / len(self.durations), time.monotonic()
        eta = live.grid_left([max(0.0, mean - (now - r.live.started)) for r in running], later, mean,
                             len(self.shares.cpus))
        self.say(f"{self._prefix(cell)} {cell.id}: {result.status} in {live.duration(seconds)}; {detail} | "
                 f"elapsed {live.duration(time.monotonic() - self.start)}, ETA {live.duration(eta)}")
        return result

    def run(self, steps: Sequence[Step]) -> List[CellResult]:
        """Every step in grid order, as many at once as there are shares (and GPUs); stops starting cells
        once a signal came and waits for the running ones, which got it too."""
        results: Dict[int, CellResult] = {}
        queue = list(steps)
        free_cpus = list(self.shares.cpus)
        running: Dict[Future, _Launched] = {}
        with ThreadPoolExecutor(max_workers=len(free_cpus)) as pool:
            while True:
                while queue and self.stop.received is None:
                    step = queue[0]
                    if step.action == "skip":
                        self.say(f"{self._prefix(step.cell)} {step.cell.id}: skipped, FINISHED in run {step.run_id}")
                        results[step.cell.index] = CellResult(step.cell, "SKIPPED", run_id=step.run_id)
                        queue.pop(0)
                        continue
                    need = self.shares.gpus_needed(step.cell)
                    if not free_cpus or need > len(self.shares.gpus):
                        break
                    queue.pop(0)
                    gpus, self.shares.gpus = self.shares.gpus[:need], self.shares.gpus[need:]
                    launched = self._launch(step, free_cpus.pop(0), gpus)
                    running[pool.submit(self.run_cell_fn, launched.path, step.run_id, stop=self.stop,
                                        env=launched.env)] = launched
                if not running:
                    break
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: running[f].step.cell.index):
                    launched = running.pop(future)
                    free_cpus.append(launched.cpus)
                    self.shares.gpus.extend(launched.gpus)
                    later = sum(1 for s in queue if s.action != "skip")
                    results[launched.step.cell.index] = self._finish(launched, future.result(), later,
                                                                      list(running.values()))
                mean = sum(self.durations) / len(self.durations) if self.durations else None
                self.live.show(live.status([r.live for r in sorted(running.values(), key=lambda r: r.step.cell.index)],
                                           sum(1 for s in queue if s.action != "skip"), mean, len(self.shares.cpus)))
        self.live.clear()
        return [results[i] for i in sorted(results)]


def _open(grid: Grid, out: Optional[TextIO]) -> Tuple[Tracker, TextIO]:
    # stdout read now: the default at definition time would miss a redirected stdout
    return Tracker(tracking_uri_of(grid), grid), out or sys.stdout


@contextlib.contextmanager
def shared_store(tracker: Tracker, cells_at_once: int) -> Iterator[Optional[str]]:
    """With several cells at once over a local store (sqlite), one MLflow server in front of it that the
    cells and the grid's own bookkeeping write through (tracking/server.py); None otherwise (one cell at a
    time, or a tracking server already)."""
    if cells_at_once == 1 or tracker.uri.startswith(("http://", "https://")):
        yield None
        return
    with serve(tracker.uri, artifact_root_of(tracker.uri)) as url:
        tracker.client = MlflowClient(url)
        try:
            yield url
        finally:
            tracker.client = MlflowClient(tracker.uri)


def stopped(signum: int, results: List[CellResult], total: int, command: str) -> Interrupted:
    done = sum(1 for r in results if r.status in ("FINISHED", "SKIPPED"))
    return Interrupted(signum, f"stopped by {signals.name(signum)} with {done} of {total} cell{'s' * (total != 1)} "
                               f"done; continue with: {command}")


def jobs_for(grid: Grid, jobs: Union[int, str], steps: Optional[Sequence[Step]] = None) -> int:
    """Cells at once: `jobs` as given, or for `auto` as many as the usable cores give each cell to train
    (`steps`: those a --resume trains; every cell when None) its `train.threads` (else one core), and on a
    GPU machine no more than the visible GPUs give each its `train.devices`."""
    if jobs != AUTO_JOBS:
        return int(jobs)
    cells = [s.cell for s in steps if s.action != "skip"] if steps is not None else list(grid.cells)
    threads = max((c.config.train.threads or 1 for c in cells), default=1)
    k = cells_at_once(len(cells), usable_cpus(), threads)
    if k > 1:
        shares = slots(grid, k)
        need = max(shares.gpus_needed(c) for c in cells)
        if need:
            k = max(1, min(k, len(shares.gpus) // need))
    return k


def run(
    grid: Grid,
    resume: bool = False,
    runs_dir: Optional[Path] = None,
    out: Optional[TextIO] = None,
    run_cell_fn: Callable[..., Tuple[int, Optional[Dict[str, Any]], str]] = run_cell,
    jobs: Union[int, str] = 1,
) -> Outcome:
    """Run every cell, `jobs` at once (`auto`: `jobs_for`), one result per cell in grid order. A failing cell
    is recorded and the grid goes on; a SIGTERM or SIGINT is passed on to the running cells (which save a
    checkpoint and end KILLED), then the grid stops without starting another cell, its parent run KILLED,
    and raises `Interrupted`."""
    slots(grid, jobs_for(grid, jobs))  # refused before the parent run opens
    tracker, out = _open(grid, out)
    parent_id, attempts = tracker.open_parent(resume)
    steps = plan(grid, attempts or [])
    at_once = jobs_for(grid, jobs, steps)
    shares = slots(grid, at_once)
    n = len(grid.cells)
    with StopSignals() as stop:
        with shared_store(tracker, len(shares.cpus)) as server:
            runner = _Runner(grid, tracker, parent_id, runs_dir, out, run_cell_fn, stop, shares, server)
            runner.say(f"grid {grid.name}: {n} cell{'s' * (n != 1)}, scale {grid.scale}, MLflow experiment "
                       f"lrexp-{grid.name}, parent run {parent_id}" + (" (resumed)" if attempts is not None else "")
                       + (f", {at_once} cells at once" if at_once > 1 else "")
                       + (f" (--jobs auto on {usable_cpus()} CPU cores)" if jobs == AUTO_JOBS else "")
                       + f", logs under {runner.folder}")
            results = runner.run(steps)
        tracker.close_parent(parent_id, results, interrupted=stop.received is not None)
    if stop.received is not None:
        raise stopped(stop.received, results, n, resume_command(grid))
    return Outcome(tracker.uri, parent_id, results)


def run_one(
    grid: Grid,
    cell: Cell,
    parent_id: str,
    runs_dir: Optional[Path] = None,
    out: Optional[TextIO] = None,
    run_cell_fn: Callable[..., Tuple[int, Optional[Dict[str, Any]], str]] = run_cell,
) -> CellResult:
    """`--cell`: one cell under the invocation's parent, as `--resume` would treat it (skipped when it
    FINISHED there, continued when it stopped after a checkpoint: a scheduler may simply start it again).
    The parent ends when its last cell does, whichever process that is."""
    tracker, out = _open(grid, out)
    tracker.parent(parent_id)
    step = plan_cell(cell, tracker.cell_attempts(parent_id, cell))
    tracker.client.update_run(parent_id, status="RUNNING")
    with StopSignals() as stop:
        runner = _Runner(grid, tracker, parent_id, runs_dir, out, run_cell_fn, stop, slots(grid, 1))
        runner.say(f"grid {grid.name}, cell {cell.index + 1} of {len(grid.cells)}, parent run {parent_id}")
        [result] = runner.run([step])
    tracker.close_fanned_out(parent_id)
    if stop.received is not None:
        raise stopped(stop.received, [result], 1, "the same --cell command")
    return result


def metric_note(metrics: Dict[str, Any]) -> str:
    bpt = metrics.get(FINAL_BPT)
    return f"val bits/token {bpt:.4f}" if isinstance(bpt, (int, float)) else "no val bits/token"
