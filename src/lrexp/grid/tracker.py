"""The grid's own MLflow bookkeeping: the experiment, the parent run of each invocation, cells that died too
early (or too hard) to end their run themselves, and runs left RUNNING by processes that are gone. Runs open
and end through the one run writer (tracking/runs.py).
"""

from __future__ import annotations

import json
import time
from typing import Dict, List, Optional, Tuple


from lrexp.grid.expand import Cell, Grid, cell_config
from lrexp.grid.launch import CellResult
from lrexp.grid.plan import Attempt, find_attempts
from lrexp.grid.spec import GridError
from lrexp.tracking import runs
from lrexp.tracking.names import (
    TAG_CELLS, TAG_FAILED_CELLS, TAG_GIT_SHA, TAG_GRID, TAG_HASH, TAG_INVOKED, TAG_OVERRIDES, TAG_PARENT, TAG_PID,
    TAG_REFERENCE, TAG_ROLE, TAG_SCALE, latest_parent, parents, process_alive, process_tags,
)
from lrexp.tracking.run_names import parent_name
from lrexp.tracking.store import client as store_client, experiment_id


class Tracker:
    """One grid's bookkeeping in its experiment `lrexp-<grid>` (see the module's docstring)."""

    def __init__(self, uri: str, grid: Grid) -> None:
        self.uri = uri
        self.grid = grid
        self.client = store_client(uri)  # the first to open a new store creates it, under a lock
        self.experiment_id = experiment_id(self.client, f"lrexp-{grid.name}", uri)
        self.git_sha = runs.git_sha()

    def open_parent(self, resume: bool) -> Tuple[str, Optional[List[Attempt]]]:
        """(parent run id, its cell runs newest first when resumed, else None). Nothing is taken over while a
        process of the grid still runs; runs left RUNNING by processes that are gone end KILLED (a resume
        continues them from their checkpoints, if they have one), so none stays RUNNING."""
        previous = latest_parent(parents(self.client, self.experiment_id, self.grid.name)) if resume else None
        if previous is None:
            return self.new_parent(), None
        run_id = previous.info.run_id
        if previous.info.status == "RUNNING" and process_alive(previous.data.tags):
            raise GridError(f"grid {self.grid.name} is still running (process {previous.data.tags[TAG_PID]}, "
                            f"parent run {run_id}); stop it before resuming")
        attempts = self.settle(find_attempts(self.client, self.experiment_id, run_id))
        runs.reopen(self.client, run_id)
        for k, v in self._parent_tags().items():
            self.client.set_tag(run_id, k, v)
        return run_id, attempts

    def _parent_tags(self) -> Dict[str, str]:
        return {
            TAG_ROLE: "parent",
            TAG_GRID: self.grid.name,
            TAG_REFERENCE: self.grid.reference,
            TAG_INVOKED: str(int(time.time() * 1000)),
            TAG_CELLS: str(len(self.grid.cells)),
            TAG_SCALE: self.grid.scale,
            TAG_OVERRIDES: json.dumps(self.grid.overrides),
            TAG_GIT_SHA: self.git_sha,
            **process_tags(),
        }

    def new_parent(self) -> str:
        """A new invocation: its parent run, RUNNING, with the grid file as an artifact."""
        run_id = runs.open_run(self.client, self.experiment_id,
                               parent_name(self.grid.name, self.grid.overrides), self._parent_tags())
        self.client.log_text(run_id, self.grid.text, "grid.yaml")
        return run_id

    def parent(self, run_id: str):
        """A parent run of this grid, named by its id (`--cell` joins it)."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # mlflow raises its own exception types for an unknown id
            raise GridError(f"no MLflow run '{run_id}' in {self.uri}") from None
        if run.data.tags.get(TAG_ROLE) != "parent" or run.data.tags.get(TAG_GRID) != self.grid.name:
            raise GridError(f"run {run_id} is not a parent run of grid {self.grid.name}")
        return run

    def settle(self, attempts: List[Attempt]) -> List[Attempt]:
        """Refuse while one of the runs still trains; end those left RUNNING by a process that is gone
        KILLED, so none stays RUNNING (a resume continues them from their checkpoints, if they have one)."""
        for a in attempts:
            if a.alive:
                raise GridError(f"a cell of grid {self.grid.name} is still training (run {a.run_id}); "
                                f"stop it before resuming")
        for a in attempts:
            if a.status == "RUNNING":
                runs.kill(self.client, a.run_id, "its process ended without ending the run")
                a.status = "KILLED"
        return attempts

    def cell_attempts(self, parent_id: str, cell: Cell) -> List[Attempt]:
        """The cell's own runs under the parent, settled (others may be training right now, elsewhere)."""
        found = find_attempts(self.client, self.experiment_id, parent_id)
        return self.settle([a for a in found if a.continue_hash == cell.continue_hash])

    def record_end(self, parent_id: str, cell: Cell, since_ms: int, error: str, status: str = "FAILED",
                   run_id: Optional[str] = None) -> str:
        """Make sure a cell that did not finish is a child run with `status` (FAILED, or KILLED when a signal
        stopped it) carrying the error: the run it continued (`run_id`), else the run it started, else a new
        one. A run the cell ended itself keeps its own status and error."""
        if run_id is not None:
            run = self.client.get_run(run_id)
        else:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}' and tags.`{TAG_HASH}` = '{cell.config_hash}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            run = found[0] if found and found[0].info.start_time >= since_ms else None
        if run is not None:
            if run.info.status not in ("FAILED", "KILLED"):
                runs.end(self.client, run.info.run_id, status, error)
            return run.info.run_id
        # it died before creating its run (a crash at start-up, an import error, a kill)
        tags = dict(cell_config(cell, self.grid, parent_id).log.tags)
        run_id = runs.open_run(self.client, self.experiment_id, cell.config.log.run_name, tags)
        runs.end(self.client, run_id, status, error)
        return run_id

    def close_parent(self, parent_id: str, results: List[CellResult], interrupted: bool = False) -> None:
        failed = [r.cell.id for r in results if r.status == "FAILED"]
        self.client.set_tag(parent_id, TAG_FAILED_CELLS, str(len(failed)))
        runs.end(self.client, parent_id, "KILLED" if interrupted else ("FAILED" if failed else "FINISHED"))

    def close_fanned_out(self, parent_id: str) -> None:
        """After a `--cell`: the parent ends once every cell has ended (FINISHED when all finished, else
        FAILED); while one has not, it stays RUNNING. Cells end in any order, each on its own machine."""
        attempts = find_attempts(self.client, self.experiment_id, parent_id)
        ends = []
        for cell in self.grid.cells:
            mine = [a.status for a in attempts if a.continue_hash == cell.continue_hash]
            if any(a.status == "FINISHED" and a.config_hash == cell.config_hash for a in attempts):
                ends.append("FINISHED")
            elif not mine or mine[0] == "RUNNING":
                return
            else:
                ends.append(mine[0])
        failed = sum(1 for e in ends if e != "FINISHED")
        self.client.set_tag(parent_id, TAG_FAILED_CELLS, str(failed))
        runs.end(self.client, parent_id, "FAILED" if failed else "FINISHED")
