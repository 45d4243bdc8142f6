"""Starting one cell: its own `python -m lrexp.cli train` process, so DDP, memory and crashes stay inside the
cell; and the CPU cores and GPUs each of `--jobs K` cells at once trains on.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from lrexp.config.paths import PROJECT_ROOT
from lrexp.grid.expand import Cell, Grid
from lrexp.grid.spec import GridError
from lrexp.runtime.cpus import usable_cpus
from lrexp.runtime.signals import StopSignals

# What `lrexp train` runs under, as a shell line: a SLURM job's srun for a cell on several ranks (grid/slurm.py)
TRAIN_PREFIX_ENV = "LREXP_TRAIN_PREFIX"


@dataclass
class CellResult:
    cell: Cell
    status: str  # FINISHED, FAILED, KILLED, SKIPPED
    run_id: Optional[str] = None
    seconds: float = 0.0
    error: Optional[str] = None
    metrics: Dict[str, Any] = field(default_factory=dict)


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_cell(
    config_path: Path,
    resume: Optional[str] = None,
    stop: Optional[StopSignals] = None,
    env: Optional[Dict[str, str]] = None,
) -> Tuple[int, Optional[Dict[str, Any]], str]:
    """Train one cell as its own process (continuing run `resume` if given, with `env` added to this
    process's environment); returns (exit status, final metrics or None, error line). A signal `stop` catches
    while it trains is passed on to it: the cell saves a checkpoint, ends its run KILLED and exits.

    stdout and stderr go to files beside the config; the last stdout line is the final metrics JSON.
    """
    cell_dir = config_path.parent
    out_path, err_path = cell_dir / "stdout.log", cell_dir / "stderr.log"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [*shlex.split(os.environ.get(TRAIN_PREFIX_ENV, "")), sys.executable, "-m", "lrexp.cli", "train",
             *(["--resume", resume] if resume else []), str(config_path)],
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
        unforward = stop.forward(proc.send_signal) if stop is not None else None
        try:
            returncode = proc.wait()
        finally:
            if unforward is not None:
                unforward()
    if returncode == 0:
        try:
            result = json.loads(_last_line(out_path))
            if isinstance(result, dict) and result.get("run_id"):
                return 0, result, ""
        except json.JSONDecodeError:
            pass
        return 0, None, "the train command printed no final metrics line"
    if returncode < 0:
        return returncode, None, f"killed by signal {-returncode}"
    return returncode, None, _last_line(err_path) or f"exit status {returncode}"


@dataclass
class Slots:
    """Where the cells that run at once train (`--jobs K`): K shares of this process's CPU cores, and on a
    GPU machine a pool of GPUs that each cell takes `train.devices` of. One job pins nothing."""

    cpus: List[Optional[List[int]]]  # one share per job; [None]: one job, the whole machine
    gpus: List[str]  # CUDA_VISIBLE_DEVICES ids free now (empty without GPUs, or with one job)

    def gpus_needed(self, cell: Cell) -> int:
        t = cell.config.train
        return t.devices * (len(self.cpus) > 1 and bool(self.gpus) and t.accelerator in ("auto", "gpu", "cuda"))


def _visible_gpus() -> List[str]:
    import torch  # only for --jobs K > 1: the grid itself trains nothing and starts without torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def slots(grid: Grid, jobs: int) -> Slots:
    """The shares for `jobs` cells at once, checked against every cell before anything runs."""
    if jobs < 1:
        raise GridError(f"--jobs must be at least 1 (got {jobs})")
    if jobs == 1:
        return Slots([None], [])
    cpus = sorted(os.sched_getaffinity(0))[:usable_cpus()]
    if jobs > len(cpus):
        raise GridError(f"--jobs {jobs} on {len(cpus)} CPU core{'s' * (len(cpus) != 1)}: each cell needs one of "
                        f"its own (its data loader and MLflow logging run on the CPU even when it trains on a GPU)")
    per, extra = divmod(len(cpus), jobs)
    starts = [k * per + min(k, extra) for k in range(jobs + 1)]
    found = Slots([cpus[starts[k]:starts[k + 1]] for k in range(jobs)], _visible_gpus())
    for cell in grid.cells:
        need = found.gpus_needed(cell)
        if need > len(found.gpus):
            raise GridError(f"grid {grid.name}, cell {cell.id}: train.devices={need} but {len(found.gpus)} GPU(s) "
                            f"are visible")
    return found
