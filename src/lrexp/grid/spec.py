"""A grid file, read and checked (docs/design.md#a-grids-lifecycle): where grid files are, the keys a file has, the config keys
it may set, and values given per scale.

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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, get_origin

import yaml

from lrexp.config.errors import ConfigError
from lrexp.config.load import check_key
from lrexp.config.paths import EXPERIMENTS
from lrexp.config.schema import SCHEMA_PATHS

GRIDS_DIR = EXPERIMENTS / "grids"
FILE_KEYS = ("description", "base", "axes", "seeds", "reference", "evaluate")


class GridError(ConfigError):
    """A bad grid file or grid argument; one line naming the problem."""


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


def check_grid_key(key: str, where: str) -> None:
    """A key a grid may set: a selector (`row`, `scale`), one config value (a section is refused: a grid's
    keys each set one value), or an entry of an open section such as log.tags."""
    check_key(key, where, selectors=True, sections=False, error=GridError)


def is_list_field(key: str) -> bool:
    return get_origin(SCHEMA_PATHS.get(key)) is list


def dotlist_value(value: Any) -> str:
    """A value as the right-hand side of a `key=value` override that parses back to the same value."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


def id_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def per_scale(value: Any, scale: Optional[str], where: str) -> Any:
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


def read_file(path: Path) -> Tuple[str, Dict[str, Any]]:
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid file is a mapping with {', '.join(FILE_KEYS)}")
    unknown = [k for k in data if k not in FILE_KEYS]
    if unknown:
        raise GridError(f"{path}: unknown grid key '{unknown[0]}'; a grid file has {', '.join(FILE_KEYS)}")
    for key in ("base", "axes", "reference", "evaluate"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise GridError(f"{path}: '{key}' must be a mapping")
    return text, data
