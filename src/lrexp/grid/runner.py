"""Ablation grids: a grid file expands into cells, each cell trains as its own process (DESIGN.md 2.9).

A grid file (`experiments/grids/NAME.yaml`) has:

- `base:` selectors (`scale: tiny`, `row: slide13`) and config values (nested or dotted keys) shared by
  every cell;
- `axes:` dotted config key (or `row`/`scale`) -> list of values; the cells are their product. A value list
  may instead be a mapping scale name -> list, for sizes that only make sense at one scale;
- `seeds:` optional list of `train.seed` values, the innermost axis; the report averages over it;
- `reference:` optional axis values (same forms) of the cell whose step time is 1.00 in the report;
  default: the first `row=slide13` cell (the paper's normaliser), else the first cell;
- `evaluate:` optional `policy.*` keys (values, or mappings scale name -> value): once a cell has trained,
  `lrexp eval` reads its checkpoint with them (bounded-cache evaluation, lrexp.evaluate; the `cache` grid).

A cell is a complete resolved config with a stable id built from its axis values, sorted by name, the seed
last (`gate=lstm,topology=dual,seed=0`), so ids never depend on the order of keys in a file. Overrides
given on the command line apply to every cell, except that `key=[a,b]` (a list, on a key whose own type is
not a list) makes `key` an axis with these values and `key=v` on an axis key pins it to one value;
`train.seed` is the seeds axis.

Running: one parent MLflow run per invocation in experiment `lrexp-<grid>`; each cell writes its config to
`runs/<grid>/<cell>/config.yaml` and runs `python -m lrexp.cli train` on it, so DDP, memory and crashes stay
inside the cell. The child run nests under the parent through the `mlflow.parentRunId` tag the cell's
config carries. `--resume` continues the grid's latest parent (with that invocation's command-line
overrides when none are given): a cell that FINISHED there with the same config hash (`lrexp.config_hash`)
is skipped; one with a run of the same config up to `train.max_steps` (tag `lrexp.continue_hash`), that
FINISHED with fewer steps or was stopped (FAILED, KILLED, left RUNNING by a dead process) after a checkpoint,
continues from that checkpoint in the same MLflow run; any other trains.

A SIGTERM or SIGINT is passed on to the running cell, which saves a checkpoint at the end of its optimiser
step and ends its run KILLED; the grid then stops without starting another cell, marks its parent KILLED
and prints the command that resumes it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, get_origin

import yaml

from lrexp.config.errors import ConfigError
from lrexp.config.load import SELECTORS, compose, load, suggest_key, to_dict
from lrexp.config.paths import EXPERIMENTS, PROJECT_ROOT
from lrexp.config.schema import SCHEMA_PATHS, RunConfig
from lrexp.errors import Interrupted, UserError
from lrexp.tracking.names import (
    FINAL_BPT, SEED_KEY, TAG_CELL, TAG_CHECKPOINT_DIR, TAG_CONTINUE, TAG_ERROR, TAG_GRID, TAG_GROUP, TAG_HASH,
    TAG_INDEX, TAG_INVOKED, TAG_OVERRIDES, TAG_PARENT, TAG_PID, TAG_REFERENCE, TAG_ROLE, latest_parent, parents,
    process_alive, process_tags,
)
from lrexp.cli import CPUS_ENV
from lrexp.grid.live import LiveLine, Running, duration
from lrexp.grid.live import grid_left as live_grid_left
from lrexp.grid.live import status as live_status
from lrexp.tracking.server import SERVER_ENV
from lrexp.runtime.signals import StopSignals
from lrexp.runtime.signals import name as signal_name

GRIDS_DIR = EXPERIMENTS / "grids"
RUNS_DIR = PROJECT_ROOT / "runs"
REFERENCE_ROW = "slide13"  # Table 1 normalises step time by Slide:13L
_FILE_KEYS = ("description", "base", "axes", "seeds", "reference", "evaluate")



class GridError(ConfigError):
    """A bad grid file or grid argument; one line naming the problem."""


@dataclass
class Cell:
    index: int
    id: str  # "gate=lstm,topology=dual,seed=0"
    group: str  # the id without the seed part
    values: Dict[str, Any]  # axis key -> value
    overrides: List[str]  # what config.load received, in order
    config: RunConfig
    config_hash: str
    continue_hash: str

    @property
    def dirname(self) -> str:
        """The id made safe as one folder name: values may hold paths, and `lrexp train` reads an
        argument holding '=' as an override, so `gate=lstm,topology=dual` -> `gate-lstm,topology-dual`."""
        name = re.sub(r"[^A-Za-z0-9._,+-]", "_", self.id.replace("=", "-"))
        if len(name) > 120:
            name = name[:100] + "-" + hashlib.sha256(self.id.encode()).hexdigest()[:12]
        return name


@dataclass
class Grid:
    name: str
    path: Path
    text: str  # the grid file as written
    scale: str
    cells: List[Cell]
    reference: str  # group id
    overrides: List[str] = field(default_factory=list)  # the command line's
    evaluate: List[str] = field(default_factory=list)  # `lrexp eval` overrides for every trained cell


# --------------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------------


def available() -> List[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def grid_path(name: str) -> Path:
    """A name in experiments/grids, or a path to a grid file (anything ending in .yaml or holding a '/')."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise GridError(f"grid file not found: {name}")
        return path.resolve()
    path = GRIDS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GridError(f"unknown grid '{name}'; available: {', '.join(available()) or 'none'}")
    return path


def _is_list_field(key: str) -> bool:
    return get_origin(SCHEMA_PATHS.get(key)) is list


def _check_key(key: str, where: str) -> None:
    """A key a grid may set: a selector, a config value (not a section), or an entry of log.tags."""
    if key in SELECTORS or key.startswith("log.tags."):
        return
    if key == "derived" or key.startswith("derived."):
        raise GridError(f"{where}: '{key}' is computed by lrexp and cannot be set")
    kind = SCHEMA_PATHS.get(key)
    if kind is None:
        hint = suggest_key(key)
        raise GridError(f"{where}: unknown config key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))
    if is_dataclass(kind):
        raise GridError(f"{where}: '{key}' is a config section; name one of its keys ('{key}.<name>')")


def _flatten_base(node: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested and dotted keys alike -> dotted key -> value (sections are walked, open sections kept)."""
    out: Dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and is_dataclass(SCHEMA_PATHS.get(path)):
            out.update(_flatten_base(value, path + "."))
        else:
            out[path] = value
    return out


def _dotlist_value(value: Any) -> str:
    """A value as the right-hand side of a `key=value` override that parses back to the same value."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


def _id_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _per_scale(value: Any, scale: Optional[str], where: str) -> Any:
    """A value, or a mapping scale name -> value picked by the grid's scale (None: the scale is an axis)."""
    if not isinstance(value, dict):
        return value
    if scale is None:
        raise GridError(f"{where} gives values per scale, but the scale is itself an axis")
    if scale not in value:
        raise GridError(
            f"{where} has no value for scale '{scale}' (it has {', '.join(map(str, value))}); "
            f"give one on the command line"
        )
    return value[scale]


def config_hash(cfg: RunConfig, steps: bool = True) -> str:
    """Identity of a cell's training: the resolved config without what the grid sets per invocation (and
    without train.max_steps when `steps` is False: the runs that training longer continues)."""
    data = to_dict(cfg)
    data["log"] = {k: v for k, v in data["log"].items() if k not in ("tags", "run_name", "progress_file")}
    data.pop("policy")  # evaluation-only keys (`lrexp eval`): they never change what a cell trains
    if not steps:
        data["train"] = {k: v for k, v in data["train"].items() if k != "max_steps"}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_file(path: Path) -> Tuple[str, Dict[str, Any]]:
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid file is a mapping with {', '.join(_FILE_KEYS)}")
    unknown = [k for k in data if k not in _FILE_KEYS]
    if unknown:
        raise GridError(f"{path}: unknown grid key '{unknown[0]}'; a grid file has {', '.join(_FILE_KEYS)}")
    for key in ("base", "axes", "reference", "evaluate"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise GridError(f"{path}: '{key}' must be a mapping")
    return text, data


def _short_names(keys: Sequence[str]) -> Dict[str, str]:
    """The last component of each key (`model.recurrent.gate` -> `gate`), the full key where two clash."""
    last = {k: k.rsplit(".", 1)[-1] for k in keys}
    clashes = {n for n in last.values() if list(last.values()).count(n) > 1}
    return {k: (k if n in clashes else n) for k, n in last.items()}


def _split_overrides(overrides: Sequence[str], axes: Dict[str, Any]) -> List[str]:
    """Command-line overrides: `key=[a,b]` (on a key whose own type is not a list) or any value for an axis
    key sets that axis in `axes`; the rest are returned, to apply to every cell."""
    plain: List[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GridError(f"override '{item}' is not of the form key=value")
        _check_key(key, "override")
        parsed = _parse_value(value)
        if key in axes or (isinstance(parsed, list) and not _is_list_field(key)):
            axes[key] = parsed if isinstance(parsed, list) else [parsed]
        else:
            plain.append(item)
    return plain


def _axis_values(raw: Dict[str, Any], scale: Optional[str], where: str) -> Dict[str, List[Any]]:
    axes: Dict[str, List[Any]] = {}
    for key, values in raw.items():
        label = "seeds" if key == SEED_KEY else f"axis '{key}'"
        values = _per_scale(values, scale, f"{where}: {label}")
        if not isinstance(values, list):
            raise GridError(f"{where}: {label} must be a list of values, got {values!r}")
        if not values:
            raise GridError(f"{where}: {label} is empty")
        axes[key] = values
    if not axes:
        raise GridError(f"{where}: no axes and no seeds; a grid needs at least one")
    return axes


def expand(name: str, overrides: Sequence[str] = ()) -> Grid:
    """Read, expand and validate a grid: every cell's config is loaded and checked here, before any work."""
    path = grid_path(name)
    grid_name = path.stem
    where = f"grid {grid_name}"
    text, data = _read_file(path)

    base = _flatten_base(data.get("base") or {})
    for key in base:
        _check_key(key, f"{where}, base")
    raw: Dict[str, Any] = dict(data.get("axes") or {})
    for key in raw:
        _check_key(key, f"{where}, axes")
    if SEED_KEY in base or SEED_KEY in raw:
        raise GridError(f"{where}: set '{SEED_KEY}' with 'seeds:'")
    if data.get("seeds") is not None:
        raw[SEED_KEY] = data["seeds"]
    plain = _split_overrides(overrides, raw)

    # The scale picks per-scale value lists; compose() also checks every base and plain key right here.
    base_items = [f"{k}={_dotlist_value(v)}" for k, v in base.items()]
    try:
        scale = None if "scale" in raw else str(compose(overrides=[*base_items, *plain]).scale.name)
    except ConfigError as exc:
        raise GridError(f"{where}: {exc}") from None
    axes = _axis_values(raw, scale, where)

    names = _short_names(list(axes))
    seed = [SEED_KEY] if SEED_KEY in axes else []
    # ids name the axes sorted, the seed last, so they never depend on the order of keys in the file;
    # cells run in the file's axis order, the seed innermost so that a group's seeds are adjacent
    id_order = sorted((k for k in axes if k != SEED_KEY), key=lambda k: names[k]) + seed
    combos: List[Dict[str, Any]] = [{}]
    for key in [k for k in axes if k != SEED_KEY] + seed:
        combos = [{**c, key: v} for c in combos for v in axes[key]]

    cells: List[Cell] = []
    for index, values in enumerate(combos):
        parts = [f"{names[k]}={_id_value(values[k])}" for k in id_order]
        cell_id = ",".join(parts)
        if any(c.id == cell_id for c in cells):
            raise GridError(f"{where}: two cells have the id '{cell_id}' (a value listed twice?)")
        cell_overrides = [
            "log.progress_bar=false",  # the cell's output goes to a log file
            *base_items,
            *[f"{k}={_dotlist_value(values[k])}" for k in id_order],
            *plain,
        ]
        try:
            cfg = load(overrides=cell_overrides)
        except ConfigError as exc:
            raise GridError(f"{where}, cell {cell_id}: {exc}") from None
        cfg.log.experiment = f"lrexp-{grid_name}"
        cfg.log.run_name = cell_id
        group = ",".join(p for k, p in zip(id_order, parts) if k != SEED_KEY) or "base"
        cells.append(Cell(index, cell_id, group, values, cell_overrides, cfg, config_hash(cfg),
                          config_hash(cfg, steps=False)))

    dirnames = [c.dirname for c in cells]
    for c in cells:
        if dirnames.count(c.dirname) > 1:
            raise GridError(f"{where}: two cells share the folder name '{c.dirname}'")

    reference = _reference(data.get("reference"), cells, id_order, names, scale, where)
    evaluate = _evaluate(data.get("evaluate") or {}, cells, scale, where)
    return Grid(grid_name, path, text, scale or "per cell", cells, reference, list(overrides), evaluate)


def _evaluate(raw: Dict[str, Any], cells: List[Cell], scale: Optional[str], where: str) -> List[str]:
    """The `evaluate:` section as `lrexp eval` overrides, checked against every cell now (policy names,
    budgets and knobs), so a bad one fails before any cell trains."""
    items = []
    for key, value in raw.items():
        if not key.startswith("policy."):
            raise GridError(f"{where}, evaluate: '{key}' is not a policy.* key (lrexp eval sets only those)")
        _check_key(key, f"{where}, evaluate")
        items.append(f"{key}={_dotlist_value(_per_scale(value, scale, f'{where}: evaluate {key}'))}")
    if items:
        from lrexp.eval.run import settings

        for cell in cells:
            try:
                settings(load(overrides=[*cell.overrides, *items]))
            except UserError as exc:  # a config error, or a policy that refuses a budget
                raise GridError(f"{where}, evaluate (cell {cell.id}): {exc}") from None
    return items


def _reference(
    selector: Optional[Dict[str, Any]],
    cells: List[Cell],
    order: List[str],
    names: Dict[str, str],
    scale: Optional[str],
    where: str,
) -> str:
    """The group id of the step-time reference. A selector that matches no cell (an axis overridden, no
    value given for this scale) falls back to the default; the dry run and the report name the result."""
    by_name = {names[k]: k for k in order}
    want: Dict[str, Any] = {}
    for key, value in (selector or {}).items():
        axis = key if key in order else by_name.get(key)
        if axis is None or axis == SEED_KEY:
            raise GridError(f"{where}: reference names '{key}', which is not an axis of the grid")
        want[axis] = value.get(scale) if isinstance(value, dict) else value
    if want:
        for cell in cells:
            if all(_id_value(cell.values[k]) == _id_value(v) for k, v in want.items()):
                return cell.group
    for cell in cells:
        if f"row={REFERENCE_ROW}" in cell.overrides:
            return cell.group
    return cells[0].group


# --------------------------------------------------------------------------------------------------
# Cell files
# --------------------------------------------------------------------------------------------------


def cell_config(cell: Cell, grid: Grid, parent_id: str) -> RunConfig:
    """The cell's config with the tags that nest its run under the parent and identify it."""
    cfg = copy.deepcopy(cell.config)
    cfg.log.tags = {
        **cfg.log.tags,
        TAG_PARENT: parent_id,
        TAG_GRID: grid.name,
        TAG_CELL: cell.id,
        TAG_GROUP: cell.group,
        TAG_INDEX: str(cell.index),
        TAG_HASH: cell.config_hash,
        TAG_CONTINUE: cell.continue_hash,
    }
    return cfg


def write_cell(cfg: RunConfig, cell_dir: Path, grid: Grid, cell: Cell) -> Path:
    """`<cell_dir>/config.yaml`, the file `lrexp train` reads (`derived` left out: it is recomputed)."""
    data = to_dict(cfg)
    data.pop("derived")
    cell_dir.mkdir(parents=True, exist_ok=True)
    path = cell_dir / "config.yaml"
    header = f"# lrexp grid {grid.name}, cell {cell.id} ({cell.index + 1}/{len(grid.cells)}); written by lrexp grid\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """A cell run of a parent: what a resume skips, trains further or continues."""

    run_id: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING
    config_hash: str
    continue_hash: Optional[str]
    steps: Optional[int]  # FINISHED: the steps it trained; else the step of its last.ckpt, None without one
    alive: bool = False  # RUNNING in a process that still runs


@dataclass
class Step:
    """What a resumed grid does with a cell: `skip` (FINISHED with this config), `continue` (a run of the same
    config, FINISHED with fewer steps or stopped after a checkpoint: train it on from there) or `train`."""

    cell: Cell
    action: str
    run_id: Optional[str] = None
    from_step: int = 0


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
        return Step(cell, "continue", best.run_id, best.steps)
    return Step(cell, "train")


def plan(grid: Grid, attempts: Sequence[Attempt]) -> List[Step]:
    return [plan_cell(cell, attempts) for cell in grid.cells]


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
            [sys.executable, "-m", "lrexp.cli", "train", *(["--resume", resume] if resume else []), str(config_path)],
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
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def slots(grid: Grid, jobs: int) -> Slots:
    """The shares for `jobs` cells at once, checked against every cell before anything runs."""
    if jobs < 1:
        raise GridError(f"--jobs must be at least 1 (got {jobs})")
    if jobs == 1:
        return Slots([None], [])
    from lrexp.runtime.cpus import usable_cpus

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


class Tracker:
    """The grid's own MLflow bookkeeping: the experiment, the parent run, cells that died too early (or too
    hard) to end their run themselves, and runs left RUNNING by processes that are gone."""

    def __init__(self, uri: str, grid: Grid) -> None:
        from mlflow.tracking import MlflowClient

        from lrexp.tracking import store as tracking

        self.uri = uri
        self.grid = grid
        self.client = MlflowClient(uri)
        self.experiment_id = tracking.experiment_id(self.client, f"lrexp-{grid.name}", uri)
        self.git_sha = tracking.git_sha()

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
        attempts = self.settle(_attempts(self.client, self.experiment_id, run_id))
        self.client.update_run(run_id, status="RUNNING")
        for k, v in self._parent_tags().items():
            self.client.set_tag(run_id, k, v)
        return run_id, attempts

    def _parent_tags(self) -> Dict[str, str]:
        return {
            TAG_ROLE: "parent",
            TAG_GRID: self.grid.name,
            TAG_REFERENCE: self.grid.reference,
            TAG_INVOKED: str(int(time.time() * 1000)),
            "lrexp.cells": str(len(self.grid.cells)),
            "lrexp.scale": self.grid.scale,
            TAG_OVERRIDES: json.dumps(self.grid.overrides),
            "lrexp.git_sha": self.git_sha,
            **process_tags(),
        }

    def new_parent(self) -> str:
        """A new invocation: its parent run, RUNNING, with the grid file as an artifact."""
        run = self.client.create_run(self.experiment_id, run_name=f"grid:{self.grid.name}", tags=self._parent_tags())
        self.client.log_text(run.info.run_id, self.grid.text, "grid.yaml")
        return run.info.run_id

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
                self.client.set_tag(a.run_id, TAG_ERROR, "its process ended without ending the run")
                self.client.set_terminated(a.run_id, "KILLED")
                a.status = "KILLED"
        return attempts

    def cell_attempts(self, parent_id: str, cell: Cell) -> List[Attempt]:
        """The cell's own runs under the parent, settled (others may be training right now, elsewhere)."""
        found = _attempts(self.client, self.experiment_id, parent_id)
        return self.settle([a for a in found if a.continue_hash == cell.continue_hash])

    def record_end(self, parent_id: str, cell: Cell, since_ms: int, error: str, status: str = "FAILED",
                   run_id: Optional[str] = None) -> str:
        """Make sure a cell that did not finish is a child run with `status` (FAILED, or KILLED when a signal
        stopped it) carrying the error: the run it continued (`run_id`), else the run it started, else a new
        one. A run the cell ended itself keeps its own status and error."""
        if run_id is not None:
            run = self.client.get_run(run_id)
        else:
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}' and tags.`{TAG_HASH}` = '{cell.config_hash}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            run = runs[0] if runs and runs[0].info.start_time >= since_ms else None
        if run is not None:
            if run.info.status not in ("FAILED", "KILLED"):
                self.client.set_tag(run.info.run_id, TAG_ERROR, error[:5000])
                self.client.set_terminated(run.info.run_id, status)
            return run.info.run_id
        # it died before creating its run (a crash at start-up, an import error, a kill)
        tags = dict(cell_config(cell, self.grid, parent_id).log.tags)
        run = self.client.create_run(self.experiment_id, run_name=cell.id, tags={**tags, TAG_ERROR: error[:5000]})
        self.client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    def close_parent(self, parent_id: str, results: List[CellResult], interrupted: bool = False) -> None:
        failed = [r.cell.id for r in results if r.status == "FAILED"]
        self.client.set_tag(parent_id, "lrexp.failed_cells", str(len(failed)))
        status = "KILLED" if interrupted else ("FAILED" if failed else "FINISHED")
        self.client.set_terminated(parent_id, status)

    def close_fanned_out(self, parent_id: str) -> None:
        """After a `--cell`: the parent ends once every cell has ended (FINISHED when all finished, else
        FAILED); while one has not, it stays RUNNING. Cells end in any order, each on its own machine."""
        attempts = _attempts(self.client, self.experiment_id, parent_id)
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
        self.client.set_tag(parent_id, "lrexp.failed_cells", str(failed))
        self.client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")


@dataclass
class Outcome:
    uri: str
    parent_id: str
    results: List[CellResult]


def _checkpoint_step(tags: Dict[str, str]) -> Optional[int]:
    """The step of a run's last.ckpt; None without a readable one (the cell then starts over)."""
    if TAG_CHECKPOINT_DIR not in tags:
        return None
    from lrexp.lit.checkpoint import LAST, saved_step  # torch: only for runs that train(ed)

    path = Path(tags[TAG_CHECKPOINT_DIR]) / LAST
    if not path.is_file():
        return None
    try:
        return saved_step(path)
    except Exception:  # torch and zip errors alike: a file cut short by a kill is no checkpoint
        return None


def _attempts(client, experiment_id: str, parent_id: str) -> List[Attempt]:
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
        if status == "FINISHED":  # params are immutable: a run trained on records its new steps as a tag
            steps: Optional[int] = int(tags.get("lrexp.resume.train.max_steps",
                                                r.data.params.get("train.max_steps", 0)))
        else:
            steps = _checkpoint_step(tags)
        found.append(Attempt(r.info.run_id, status, tags[TAG_HASH], tags.get(TAG_CONTINUE), steps,
                             alive=status == "RUNNING" and process_alive(tags)))
    return found


def previous_invocation(grid: Grid) -> Tuple[Optional[Any], List[Attempt]]:
    """The parent run `--resume` would continue and its cell runs; reads the store, writes nothing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri_of(grid))
    exp = client.get_experiment_by_name(f"lrexp-{grid.name}")
    parent = latest_parent(parents(client, exp.experiment_id, grid.name)) if exp is not None else None
    return parent, (_attempts(client, exp.experiment_id, parent.info.run_id) if parent is not None else [])


def invocation_overrides(parent) -> List[str]:
    """The command-line overrides a parent run was invoked with (JSON; older parents: space-separated)."""
    text = parent.data.tags.get(TAG_OVERRIDES, "")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text.split()
    return [str(v) for v in value] if isinstance(value, list) else text.split()


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
    live: Running


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
        self.live = LiveLine(out)

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
                         Running(self._prefix(cell), progress, time.monotonic()))

    def _finish(self, launched: _Launched, outcome: Tuple[int, Optional[Dict[str, Any]], str], later: int,
                running: Sequence[_Launched]) -> CellResult:
        """`later`: the cells still to start; `running`: those still training."""
        step, cell = launched.step, launched.step.cell
        code, metrics, error = outcome
        seconds = time.monotonic() - launched.live.started
        self.durations.append(seconds)
        if metrics is not None:
            result = CellResult(cell, "FINISHED", metrics["run_id"], seconds, metrics=metrics)
            detail = _metric_note(metrics)
        else:
            status = "FAILED" if self.stop.received is None else "KILLED"
            run_id = self.tracker.record_end(self.parent_id, cell, launched.since_ms, error, status, step.run_id)
            result = CellResult(cell, status, run_id, seconds, error=error)
            detail = f"error: {error}"
        mean, now = sum(self.durations) / len(self.durations), time.monotonic()
        eta = live_grid_left([max(0.0, mean - (now - r.live.started)) for r in running], later, mean,
                             len(self.shares.cpus))
        self.say(f"{self._prefix(cell)} {cell.id}: {result.status} in {duration(seconds)}; {detail} | "
                 f"elapsed {duration(time.monotonic() - self.start)}, ETA {duration(eta)}")
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
                self.live.show(live_status([r.live for r in sorted(running.values(), key=lambda r: r.step.cell.index)],
                                           sum(1 for s in queue if s.action != "skip"), mean, len(self.shares.cpus)))
        self.live.clear()
        return [results[i] for i in sorted(results)]


def tracking_uri_of(grid: Grid) -> str:
    from lrexp.tracking import store as tracking

    return tracking.tracking_uri(grid.cells[0].config)


def _open(grid: Grid, out: Optional[TextIO]) -> Tuple[Tracker, TextIO]:
    # stdout read now: the default at definition time would miss a redirected stdout
    return Tracker(tracking_uri_of(grid), grid), out or sys.stdout


@contextlib.contextmanager
def _shared_store(tracker: Tracker, cells_at_once: int) -> Iterator[Optional[str]]:
    """With several cells at once over a local store (sqlite), one MLflow server in front of it that the
    cells and the grid's own bookkeeping write through (store_server.py); None otherwise (one cell at a
    time, or a tracking server already)."""
    if cells_at_once == 1 or tracker.uri.startswith(("http://", "https://")):
        yield None
        return
    from mlflow.tracking import MlflowClient

    from lrexp.tracking import server as store_server

    with store_server.serve(tracker.uri, store_server.artifact_root_of(tracker.uri)) as url:
        tracker.client = MlflowClient(url)
        try:
            yield url
        finally:
            tracker.client = MlflowClient(tracker.uri)


def _stopped(signum: int, results: List[CellResult], total: int, command: str) -> Interrupted:
    done = sum(1 for r in results if r.status in ("FINISHED", "SKIPPED"))
    return Interrupted(signum, f"stopped by {signal_name(signum)} with {done} of {total} cell{'s' * (total != 1)} "
                               f"done; continue with: {command}")


def run(
    grid: Grid,
    resume: bool = False,
    runs_dir: Optional[Path] = None,
    out: Optional[TextIO] = None,
    run_cell_fn: Callable[..., Tuple[int, Optional[Dict[str, Any]], str]] = run_cell,
    jobs: int = 1,
) -> Outcome:
    """Run every cell, `jobs` at once, one result per cell in grid order. A failing cell is recorded and the
    grid goes on; a SIGTERM or SIGINT is passed on to the running cells (which save a checkpoint and end
    KILLED), then the grid stops without starting another cell, its parent run KILLED, and raises
    `Interrupted`."""
    shares = slots(grid, jobs)
    tracker, out = _open(grid, out)
    parent_id, attempts = tracker.open_parent(resume)
    steps = plan(grid, attempts or [])
    n = len(grid.cells)
    with StopSignals() as stop:
        with _shared_store(tracker, len(shares.cpus)) as server:
            runner = _Runner(grid, tracker, parent_id, runs_dir, out, run_cell_fn, stop, shares, server)
            runner.say(f"grid {grid.name}: {n} cell{'s' * (n != 1)}, scale {grid.scale}, MLflow experiment "
                       f"lrexp-{grid.name}, parent run {parent_id}" + (" (resumed)" if attempts is not None else "")
                       + (f", {jobs} cells at once" if jobs > 1 else "") + f", logs under {runner.folder}")
            results = runner.run(steps)
        tracker.close_parent(parent_id, results, interrupted=stop.received is not None)
    if stop.received is not None:
        raise _stopped(stop.received, results, n, resume_command(grid))
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
        raise _stopped(stop.received, [result], 1, "the same --cell command")
    return result


def _metric_note(metrics: Dict[str, Any]) -> str:
    bpt = metrics.get(FINAL_BPT)
    return f"val bits/token {bpt:.4f}" if isinstance(bpt, (int, float)) else "no val bits/token"
