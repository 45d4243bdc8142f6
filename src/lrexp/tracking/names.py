"""What lrexp writes to MLflow and reads back: one home for writers and readers (neither imports the other).
Tag names on training, grid and evaluation runs, the summary metric the grid prints, and how a grid's
invocations (its parent runs) are found.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Dict, Mapping

SEED_KEY = "train.seed"  # the seeds axis of a grid; the report pairs cells by it

# Tags the grid puts on runs (the cell's through its config's log.tags, which `lrexp train` logs).
TAG_PARENT = "mlflow.parentRunId"
TAG_GRID = "lrexp.grid"
TAG_CELL = "lrexp.cell"
TAG_GROUP = "lrexp.group"  # the cell id without the seed: the report's aggregation key
TAG_INDEX = "lrexp.cell_index"  # the cell's position in the grid: the report's row order
TAG_HASH = "lrexp.config_hash"
TAG_CONTINUE = "lrexp.continue_hash"  # the config hash without train.max_steps: a run to train further
TAG_OVERRIDES = "lrexp.overrides"  # JSON list of the invocation's command-line overrides, on the parent
TAG_ROLE = "lrexp.role"  # "parent" on the grid's own run
TAG_REFERENCE = "lrexp.reference"  # group id of the step-time reference, on the parent
TAG_INVOKED = "lrexp.invoked_at"  # ms since the epoch of the latest invocation, on the parent
TAG_ERROR = "lrexp.error"  # why a run ended FAILED or KILLED (tracking/runs.py writes it)
TAG_CELLS = "lrexp.cells"  # the number of cells, on the parent
TAG_FAILED_CELLS = "lrexp.failed_cells"  # on a parent once it ended
TAG_ROW = "lrexp.row"  # the paper row a run trained
TAG_SCALE = "lrexp.scale"
# What a training run computed with, `auto` resolved (docs/design.md#backends-and-precision)
TAG_BACKEND = "lrexp.backend"
TAG_PRECISION = "lrexp.precision"
TAG_GIT_SHA = "lrexp.git_sha"
# `lrexp train --resume`: a config value that differs from the run's (immutable) param, as TAG_RESUME + key
TAG_RESUME = "lrexp.resume."
TAG_CHECKPOINT_RUN = "lrexp.checkpoint_run"  # on an evaluation: the training run whose checkpoint it read
TAG_GRID_PARENT = "lrexp.grid_parent"  # on an evaluation a grid started: the invocation's parent run
TAG_CHECKPOINT_DIR = "lrexp.checkpoint_dir"  # on every training run: where its last.ckpt is
# On every run while its process works (`lrexp train`'s, the grid's parent): a run left RUNNING by a process
# that is gone (killed hard, its machine lost) is told apart from one still training.
TAG_PID = "lrexp.pid"
TAG_HOST = "lrexp.host"

# Tag on every run trained from a row preset (`row=NAME`, the YAML's name under experiments/rows): which.
TAG_ROW_PRESET = "lrexp.row_preset"
# The row preset whose step time is 1.00 in a grid's or single runs' report (Table 1 divides by Slide:13L);
# a grid's `reference:` names another.
REFERENCE_ROW = "slide13"

FINAL_BPT = "final/val_bits_per_token"  # logged by `lrexp train` (train.py)
# Other metric names the training command logs (src/lrexp/train/run.py, src/lrexp/lit/), read by the report.
VAL_BPT = "val/bits_per_token"
FINAL_BPB = "final/val_bits_per_byte"
FINAL_TEST_BPT = "final/test_bits_per_token"
FINAL_TARGETS = "final/val_targets"
FINAL_ANSWER = "final/val_answer_bits_per_token"  # probe corpora only
FINAL_STEP_TIME = "final/step_time_s"
FINAL_PARAMS = "final/params"
FINAL_TOKENS = "final/tokens_seen"
FINAL_STATE_BYTES = "final/state_bytes_per_lane"  # carried floats per lane in model.state_dtype (docs/knobs.md#state-storage-dtype)
# + a bucket: "0-64", "64-256", ..., "1024" (the last, open bucket: MLflow names cannot hold its "+")
FINAL_POS_PREFIX = "final/val_bits_per_token_by_pos_"
FINAL_MENTION_PREFIX = "final/val_mention_bits_per_token_"  # mention corpora only (docs/data.md#the-cast-corpus)


def parents(client, experiment_id: str, grid: str) -> list:
    """Every parent run (invocation) of the grid in its experiment."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'parent' and tags.`{TAG_GRID}` = '{grid}'",
        max_results=1000,
    )


def latest_parent(runs: list):
    """The parent of the latest invocation (a resumed parent is older than its last invocation)."""
    if not runs:
        return None
    return max(runs, key=lambda r: int(r.data.tags.get(TAG_INVOKED, r.info.start_time)))


def process_tags() -> Dict[str, str]:
    return {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}


def process_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process that tagged a run still runs. Only a process on this machine can be checked; one
    elsewhere counts as gone (resume a grid once nothing of it runs anywhere)."""
    if tags.get(TAG_HOST) != socket.gethostname() or not tags.get(TAG_PID, "").isdigit():
        return False
    pid = int(tags[TAG_PID])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    try:  # a killed process whose parent died too stays a zombie until someone reaps it: it has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux)
        return True


def latest_invocation(client):
    """The parent run of the latest grid invocation in the store, of any grid; None without one."""
    ids = [e.experiment_id for e in client.search_experiments()]
    return latest_parent(client.search_runs(ids, f"tags.`{TAG_ROLE}` = 'parent'", max_results=1000)) if ids else None
