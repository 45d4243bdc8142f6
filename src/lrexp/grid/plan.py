"""Resume planning: what `--resume` (and a `--cell` started again) does with each cell, from the runs an
invocation's parent already has in MLflow.

A cell that FINISHED there with the same config hash (`lrexp.config_hash`) is skipped; one with a run of the
same config up to `train.max_steps` (tag `lrexp.continue_hash`), that FINISHED with fewer steps or was stopped
(FAILED, KILLED, left RUNNING by a dead process) after a checkpoint, continues from its newest readable
checkpoint in the same MLflow run (the plan says which one, and why a newer one was skipped); any other trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


from lrexp.grid.expand import Cell, Grid
from lrexp.tracking.names import (
    TAG_CHECKPOINT_DIR, TAG_CONTINUE, TAG_HASH, TAG_OVERRIDES, TAG_PARENT, TAG_RESUME, latest_parent, parents,
    process_alive,
)
from lrexp.tracking.store import client as store_client, tracking_uri


@dataclass
class Attempt:
    """A cell run of a parent: what a resume skips, trains further or continues."""

    run_id: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING
    config_hash: str
    continue_hash: Optional[str]
    steps: Optional[int]  # FINISHED: the steps it trained; else the step of its last.ckpt, None without one
    alive: bool = False  # RUNNING in a process that still runs
    note: Optional[str] = None  # which checkpoint it continues from, when a newer one does not read


@dataclass
class Step:
    """What a resumed grid does with a cell: `skip` (FINISHED with this config), `continue` (a run of the same
    config, FINISHED with fewer steps or stopped after a checkpoint: train it on from there) or `train`."""

    cell: Cell
    action: str
    run_id: Optional[str] = None
    from_step: int = 0
    note: Optional[str] = None  # which checkpoint it continues from, or why a stopped run has none


def plan_cell(cell: Cell, attempts: Sequence[Attempt]) -> Step:
    """`attempts` newest first. Of the runs the cell may continue, the one furthest on does."""
    max_steps = cell.config.train.max_steps
    same = next((a for a in attempts if a.status == "FINISHED" and a.config_hash == cell.config_hash), None)
    onward = [
        a for a in attempts
        if a.continue_hash == cell.continue_hash and a.steps is not None
        and (a.steps < max_steps if a.status == "FINISHED" else a.steps <= max_steps)
    ]
    if same is not None:
        return Step(cell, "skip", same.run_id)
    if onward:
        best = max(onward, key=lambda a: a.steps)
        return Step(cell, "continue", best.run_id, best.steps, best.note)
    lost = next((a for a in attempts if a.continue_hash == cell.continue_hash and a.steps is None and a.note), None)
    return Step(cell, "train", note=f"run {lost.run_id}: {lost.note}" if lost else None)


def plan(grid: Grid, attempts: Sequence[Attempt]) -> List[Step]:
    return [plan_cell(cell, attempts) for cell in grid.cells]


def _checkpoint_step(tags: Dict[str, str]) -> Tuple[Optional[int], Optional[str]]:
    """(the step of a run's newest readable checkpoint, the line naming a newer one skipped); (None, why)
    without one: the cell then starts over."""
    if TAG_CHECKPOINT_DIR not in tags:
        return None, None
    from lrexp.lit.checkpoint import newest  # torch: only for runs that train(ed)

    found = newest(Path(tags[TAG_CHECKPOINT_DIR]))
    if found.path is None:
        return None, f"no readable checkpoint: {'; '.join(found.skipped)}" if found.skipped else None
    return found.step, found.note() if found.skipped else None


def find_attempts(client, experiment_id: str, parent_id: str) -> List[Attempt]:
    """The children of `parent_id`, newest first."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=10000,
    )
    found = []
    for r in runs:
        tags, status = r.data.tags, r.info.status
        if TAG_HASH not in tags:
            continue
        note = None
        if status == "FINISHED":  # params are immutable: a run trained on records its new steps as a tag
            steps: Optional[int] = int(tags.get(f"{TAG_RESUME}train.max_steps",
                                                r.data.params.get("train.max_steps", 0)))
        else:
            steps, note = _checkpoint_step(tags)
        found.append(Attempt(r.info.run_id, status, tags[TAG_HASH], tags.get(TAG_CONTINUE), steps,
                             alive=status == "RUNNING" and process_alive(tags), note=note))
    return found


def previous_invocation(grid: Grid) -> Tuple[Optional[Any], List[Attempt]]:
    """The parent run `--resume` would continue and its cell runs; reads the store, writes nothing."""
    client = store_client(tracking_uri_of(grid), write=False)
    exp = client.get_experiment_by_name(f"lrexp-{grid.name}")
    parent = latest_parent(parents(client, exp.experiment_id, grid.name)) if exp is not None else None
    return parent, (find_attempts(client, exp.experiment_id, parent.info.run_id) if parent is not None else [])


def invocation_overrides(parent) -> List[str]:
    """The command-line overrides a parent run was invoked with (JSON; older parents: space-separated)."""
    text = parent.data.tags.get(TAG_OVERRIDES, "")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text.split()
    return [str(v) for v in value] if isinstance(value, list) else text.split()


def tracking_uri_of(grid: Grid) -> str:
    return tracking_uri(grid.cells[0].config)
