"""`lrexp grid NAME --status` (docs/grids.md#following-a-grid): every cell of an invocation, from its MLflow
runs and, when it was launched as jobs, from the scheduler (`sacct` for SLURM, the process for the local
launcher). Reads; writes nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from mlflow.tracking import MlflowClient

from lrexp.grid import live
from lrexp.grid.expand import Cell, Grid
from lrexp.grid.plan import Attempt, find_attempts, tracking_uri_of
from lrexp.grid.jobs import TAG_LAUNCHER, WAITING, recorded, scheduler_states
from lrexp.grid.runner import resume_command
from lrexp.grid.spec import GridError
from lrexp.tracking.names import FINAL_BPT, TAG_ERROR, latest_parent, parents, process_alive

Scheduler = Callable[[str, Sequence[str]], Dict[str, str]]  # (launcher, job ids) -> job id: state


def _running(progress_file: Path) -> str:
    """step / max_steps, loss, tokens/s and ETA from the cell's progress file (on this machine or a shared
    file system); nothing before its first one."""
    p = live.progress(progress_file)
    if p is None:
        return ""
    return p.text + (f", ETA {live.duration(p.left_s)}" if p.left_s is not None else "")


def cell_state(cell: Cell, mine: Sequence[Attempt], client, job: Optional[str], sched: Optional[str],
               progress_file: Path, resume: str) -> Tuple[str, str]:
    """(state word, detail) of one cell; `mine`: its runs under the parent, newest first; `sched`: its job's
    scheduler state (None: not launched as a job); `resume`: the command that continues the grid."""
    done = next((a for a in mine if a.status == "FINISHED" and a.config_hash == cell.config_hash), None)
    in_queue = sched in WAITING
    if done is not None:
        run = client.get_run(done.run_id)
        bpt = run.data.metrics.get(FINAL_BPT)
        if bpt is not None:
            return "finished", f"bits/token {bpt:.4f}"
        # Lightning's logger ends the run FINISHED when fit returns, before the final passes log final/*
        if sched == "RUNNING" or (sched is None and process_alive(run.data.tags)):
            return "running", "final passes over the validation and test splits"
        return "finished", "no bits/token"
    if mine and mine[0].status == "RUNNING":
        return "running", _running(progress_file)
    if mine and mine[0].status == "KILLED":
        at = f"checkpoint at step {mine[0].steps}" if mine[0].steps is not None else "no checkpoint"
        if in_queue or sched == "RUNNING":
            return "requeued", f"preempted ({at}), job {job} {sched}"
        return "preempted", f"{at}; {resume} continues it"
    if mine and mine[0].status == "FAILED":
        if in_queue:
            return "requeued", f"failed before, job {job} {sched}"
        error = client.get_run(mine[0].run_id).data.tags.get(TAG_ERROR, "")
        return "failed", error.splitlines()[0] if error else "no error recorded"
    if sched is not None and sched not in WAITING and sched not in ("RUNNING", "ENDED", "COMPLETED"):
        return "failed", f"job {job} ended {sched} before the cell started its run"
    if sched == "RUNNING":
        return "running", "starting"
    return "pending", f"job {job} {sched}" if job and sched else "not started"


def show(grid: Grid, parent, runs_dir: Path, out: Optional[TextIO] = None,
         scheduler: Scheduler = scheduler_states) -> int:
    """Print the state of every cell of `parent`'s invocation; 1 while any cell failed, else 0."""
    out = out or sys.stdout
    client = MlflowClient(tracking_uri_of(grid))
    attempts = find_attempts(client, parent.info.experiment_id, parent.info.run_id)
    kind = parent.data.tags.get(TAG_LAUNCHER)
    jobs = recorded(parent)
    states = scheduler(kind, list(jobs.values())) if kind and jobs else {}
    started = parent.info.start_time / 1000
    print(f"grid {grid.name}, parent run {parent.info.run_id} ({parent.info.status}), "
          f"{'launched through ' + kind if kind else 'run by lrexp grid'}, started "
          f"{live.duration(time.time() - started)} ago", file=out)
    rows: List[tuple] = []
    for cell in grid.cells:
        mine = [a for a in attempts if a.continue_hash == cell.continue_hash]
        job = jobs.get(str(cell.index))
        word, detail = cell_state(cell, mine, client, job, states.get(job) if job else None,
                                  runs_dir / grid.name / cell.dirname / "progress.json", resume_command(grid))
        rows.append((f"[{cell.index + 1}/{len(grid.cells)}]", cell.id, word, detail))
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, [*widths, 0])).rstrip(), file=out)
    counts = {w: sum(1 for r in rows if r[2] == w) for w in dict.fromkeys(r[2] for r in rows)}
    print(", ".join(f"{n} {w}" for w, n in counts.items()), file=out)
    return 1 if counts.get("failed") else 0


def parent_of(grid: Grid, parent_id: Optional[str]):
    """The invocation `--status` shows: `parent_id`, else the grid's latest; a grid never launched is a
    one-line error."""
    client = MlflowClient(tracking_uri_of(grid))
    exp = client.get_experiment_by_name(f"lrexp-{grid.name}")
    if parent_id is not None:
        from lrexp.grid.tracker import Tracker  # creates the experiment: only once a parent was named

        return Tracker(tracking_uri_of(grid), grid).parent(parent_id)
    parent = latest_parent(parents(client, exp.experiment_id, grid.name)) if exp is not None else None
    if parent is None:
        raise GridError(f"grid {grid.name} was never launched in {tracking_uri_of(grid)} (no parent run in "
                        f"experiment lrexp-{grid.name}); start it with lrexp grid {grid.name}")
    return parent
