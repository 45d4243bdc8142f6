"""A grid file -> its cells (docs/design.md#a-grids-lifecycle): every cell a complete resolved config with a stable id, the
step-time reference, the `evaluate:` section, and the config file each cell trains from.

A cell's id is built from its axis values, sorted by name, the seed last (`gate=lstm,topology=dual,seed=0`),
so ids never depend on the order of keys in a file. Overrides given on the command line apply to every cell,
except that `key=[a,b]` (a list, on a key whose own type is not a list) makes `key` an axis with these values
and `key=v` on an axis key pins it to one value; `train.seed` is the seeds axis.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from lrexp.config.errors import ConfigError
from lrexp.config.load import compose, flatten, load, to_dict
from lrexp.config.schema import RunConfig
from lrexp.errors import UserError
from lrexp.grid.spec import (
    GridError, check_grid_key, dotlist_value, grid_path, id_value, is_list_field, parse_value, per_scale,
    read_file,
)
from lrexp.model.variants import row_name
from lrexp.tracking.names import (
    REFERENCE_ROW, SEED_KEY, TAG_CELL, TAG_CONTINUE, TAG_GRID, TAG_GROUP, TAG_HASH, TAG_INDEX, TAG_PARENT,
)
from lrexp.tracking.run_names import cell_names



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


def config_hash(cfg: RunConfig, steps: bool = True) -> str:
    """Identity of a cell's training: the resolved config without what the grid sets per invocation (and
    without train.max_steps when `steps` is False: the runs that training longer continues)."""
    data = to_dict(cfg)
    data["log"] = {k: v for k, v in data["log"].items() if k not in ("tags", "run_name", "progress_file")}
    data.pop("policy")  # evaluation-only keys (`lrexp eval`): they never change what a cell trains
    # the record of cadences scaled to a short run (docs/configuration.md#short-runs): the cell file keeps the values
    adapted = data["derived"].pop("adapted")
    if not steps:
        data["train"] = {k: v for k, v in data["train"].items() if k != "max_steps"}
        for key, (was, _) in adapted.items():  # they follow max_steps: the presets' values
            section, name = key.rsplit(".", 1)
            data[section][name] = was
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        check_grid_key(key, "override")
        parsed = parse_value(value)
        if key in axes or (isinstance(parsed, list) and not is_list_field(key)):
            axes[key] = parsed if isinstance(parsed, list) else [parsed]
        else:
            plain.append(item)
    return plain


def _axis_values(raw: Dict[str, Any], scale: Optional[str], where: str) -> Dict[str, List[Any]]:
    axes: Dict[str, List[Any]] = {}
    for key, values in raw.items():
        label = "seeds" if key == SEED_KEY else f"axis '{key}'"
        values = per_scale(values, scale, f"{where}: {label}")
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
    text, data = read_file(path)

    base = flatten(data.get("base") or {})
    for key in base:
        check_grid_key(key, f"{where}, base")
    raw: Dict[str, Any] = dict(data.get("axes") or {})
    for key in raw:
        check_grid_key(key, f"{where}, axes")
    if SEED_KEY in base or SEED_KEY in raw:
        raise GridError(f"{where}: set '{SEED_KEY}' with 'seeds:'")
    if data.get("seeds") is not None:
        raw[SEED_KEY] = data["seeds"]
    plain = _split_overrides(overrides, raw)

    # The scale picks per-scale value lists; compose() also checks every base and plain key right here.
    base_items = [f"{k}={dotlist_value(v)}" for k, v in base.items()]
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
        parts = [f"{names[k]}={id_value(values[k])}" for k in id_order]
        cell_id = ",".join(parts)
        if any(c.id == cell_id for c in cells):
            raise GridError(f"{where}: two cells have the id '{cell_id}' (a value listed twice?)")
        cell_overrides = [
            "log.progress_bar=false",  # the cell's output goes to a log file
            *base_items,
            *[f"{k}={dotlist_value(values[k])}" for k in id_order],
            *plain,
        ]
        try:
            cfg = load(overrides=cell_overrides)
        except ConfigError as exc:
            raise GridError(f"{where}, cell {cell_id}: {exc}") from None
        cfg.log.experiment = f"lrexp-{grid_name}"
        group = ",".join(p for k, p in zip(id_order, parts) if k != SEED_KEY) or "base"
        cells.append(Cell(index, cell_id, group, values, cell_overrides, cfg, config_hash(cfg),
                          config_hash(cfg, steps=False)))

    shown = [{k: id_value(c.values[k]) for k in id_order} for c in cells]
    for cell, run_name in zip(cells, cell_names([row_name(c.config) for c in cells], shown, names, skip=["row"])):
        cell.config.log.run_name = run_name

    dirnames = [c.dirname for c in cells]
    for c in cells:
        if dirnames.count(c.dirname) > 1:
            raise GridError(f"{where}: two cells share the folder name '{c.dirname}'")

    reference = _reference(data.get("reference"), cells, id_order, names, scale, where)
    evaluate = _evaluate(data.get("evaluate") or {}, cells, scale, where)
    return Grid(grid_name, path, text, scale or "per cell", cells, reference, list(overrides), evaluate)


def _evaluate(raw: Dict[str, Any], cells: List[Cell], scale: Optional[str], where: str) -> List[str]:
    """The `evaluate:` section as `lrexp eval` overrides, checked against every cell now (policy names,
    budgets and knobs), so a bad one fails before any cell trains; the cells must score the same targets
    (one `policy.limit` K), or their settings would be compared over different ones."""
    items = []
    for key, value in raw.items():
        if not key.startswith("policy."):
            raise GridError(f"{where}, evaluate: '{key}' is not a policy.* key (lrexp eval sets only those)")
        check_grid_key(key, f"{where}, evaluate")
        items.append(f"{key}={dotlist_value(per_scale(value, scale, f'{where}: evaluate {key}'))}")
    if items:
        from lrexp.eval.passes import settings  # torch: only a grid with an `evaluate:` section pays for it

        limits: Dict[str, Optional[int]] = {}
        for cell in cells:
            try:
                cfg = load(overrides=[*cell.overrides, *items])
                settings(cfg)
            except UserError as exc:  # a config error, or a policy that refuses a budget
                raise GridError(f"{where}, evaluate (cell {cell.id}): {exc}") from None
            limits[cell.id] = cfg.policy.limit
        if len(set(limits.values())) > 1:
            named = ", ".join(f"{c}: K = {'all' if k is None else k}" for c, k in limits.items())
            raise GridError(f"{where}, evaluate: the cells would be evaluated on different targets (policy.limit "
                            f"{named}); give every cell one K, e.g. policy.limit in the evaluate: section")
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
            if all(id_value(cell.values[k]) == id_value(v) for k, v in want.items()):
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
    # written by OmegaConf, which reads it back: it quotes a string its loader would take for another type
    # (PyYAML does not: a hash tag such as 9e94038183485901 came back as the float inf, and --resume then
    # found no run to skip or continue)
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(data)))
    return path
