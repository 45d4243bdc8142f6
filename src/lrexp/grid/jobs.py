"""A launched grid's jobs (docs/grids.md#slurm): the tags the parent run records them in, and their states
from the scheduler (`sacct` for SLURM; for the local launcher, whether the job's process lives).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Sequence

TAG_LAUNCHER = "lrexp.launcher"  # on the parent: slurm or local
TAG_FOLDER = "lrexp.launcher.folder"  # on the parent: submitit's folder (job scripts, pickles, logs)
TAG_JOBS = "lrexp.launcher.jobs"  # on the parent: JSON {cell index: job id}

WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED")


def recorded(parent) -> Dict[str, str]:
    """{cell index: job id} of a launched invocation; empty for one run by `lrexp grid` itself."""
    return json.loads(parent.data.tags.get(TAG_JOBS, "{}"))


def sacct_states(job_ids: Sequence[str]) -> Dict[str, str]:
    """job id -> SLURM state (`sacct -X`): an array's pending tasks come back as one line `A_[3-5,7]`."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        text = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"lrexp grid --status: no scheduler state (sacct: {exc})", file=sys.stderr)
        return {}
    states: Dict[str, str] = {}
    for line in text.splitlines():
        job, _, state = line.partition("|")
        state = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 123"
        m = re.fullmatch(r"(\d+)_\[([\d,\-%]+)\]", job.strip())
        if m is None:
            states[job.strip()] = state
            continue
        for part in m.group(2).split("%")[0].split(","):
            lo, _, hi = part.partition("-")
            for k in range(int(lo), int(hi or lo) + 1):
                states[f"{m.group(1)}_{k}"] = state
    return states


def local_states(job_ids: Sequence[str]) -> Dict[str, str]:
    """The local launcher's jobs are processes on this machine: RUNNING while alive."""
    states = {}
    for j in job_ids:
        try:
            os.kill(int(j), 0)
            states[j] = "RUNNING"
        except (ValueError, ProcessLookupError):
            states[j] = "ENDED"
        except PermissionError:
            states[j] = "RUNNING"
    return states


def scheduler_states(kind: str, job_ids: Sequence[str]) -> Dict[str, str]:
    return sacct_states(job_ids) if kind == "slurm" else local_states(job_ids)


def still_queued(parent) -> List[str]:
    """The jobs of a launched invocation that are queued or running (`job state` each)."""
    kind, ids = parent.data.tags.get(TAG_LAUNCHER), list(recorded(parent).values())
    states = scheduler_states(kind, ids) if kind and ids else {}
    return [f"{j} {states[j]}" for j in ids if states.get(j) in (*WAITING, "RUNNING")]
