"""Reading a config: YAML files, presets and `key=value` overrides merged into a typed, resolved RunConfig.

`load(files, overrides)` merges, in order: the schema defaults, `experiments/base.yaml`, the scale preset
(`scale=NAME`, default tiny), the data preset (`data=NAME`), the row preset (`row=NAME`), the given YAML
files, then `key=value` overrides.
Every key is checked against the schema before anything is merged, so a typo fails naming the key and the
closest real one.

Sizes of a model are written once, in the `scale` section; the `model` fields refer to them with
interpolations (`${scale.window}`), so a row can say "twice the scale's window" (`${mul:2,${scale.window}}`)
and keep the paper's ratios at every scale. Values computed from others (segment length, lanes, head
width, vocabulary) are never written by users: `resolve()` (lrexp.config.checks) fills the `derived` section
from the inputs, so resolving an already resolved config gives the same config.
"""

from __future__ import annotations

import difflib
from operator import attrgetter
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Type

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lrexp.config.checks import resolve
from lrexp.config.derive import SHORT_RUN_CADENCES, short_run_cadences
from lrexp.config.errors import ConfigError
from lrexp.config.plugins import load_plugins
from lrexp.config.paths import EXPERIMENTS
from lrexp.config.schema import OPEN_SECTIONS, SCHEMA_PATHS, RunConfig, is_section
from lrexp.tracking.names import TAG_ROW_PRESET

SELECTORS = ("scale", "row", "data")  # `scale=tiny`, `row=xl512`, `data=my_corpus` pick a preset file
PRESET_DIRS = {"scale": EXPERIMENTS / "scales", "row": EXPERIMENTS / "rows", "data": EXPERIMENTS / "data"}
_USER_FORBIDDEN = ("derived",)
Layer = Tuple[str, Dict[str, Any]]  # (where it came from, for messages; its nested dict)


def _mul(a: int, b: int) -> int:
    return a * b


def _add(a: int, b: int) -> int:
    return a + b


# `${mul:2,${scale.window}}` lets a row keep the paper's ratios at every scale.
for _name, _fn in (("mul", _mul), ("add", _add)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_resolver(_name, _fn)


# --------------------------------------------------------------------------------------------------
# Key checking (before any merge, so the error names the user's key and the closest real one)
# --------------------------------------------------------------------------------------------------


def suggest_key(key: str) -> Optional[str]:
    """The schema key closest to a misspelt one.

    A near-exact last component wins (`model.gatee` -> `model.recurrent.gate`), preferring the same
    top-level section; then the whole dotted path; then a looser match on the last component.
    """
    paths = list(SCHEMA_PATHS)
    leaf = key.rsplit(".", 1)[-1]
    section = key.split(".", 1)[0]
    by_leaf: Dict[str, List[str]] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)

    def by_leaf_match(cutoff: float) -> Optional[str]:
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=cutoff)
        if not leaves:
            return None
        cands = by_leaf[leaves[0]]
        return next((c for c in cands if c.startswith(section + ".")), cands[0])

    close = difflib.get_close_matches(key, paths, n=1, cutoff=0.75)
    return by_leaf_match(0.8) or (close[0] if close else None) or by_leaf_match(0.6)


def check_key(key: str, where: str, *, selectors: bool = False, sections: bool = True,
              error: Type[ConfigError] = ConfigError) -> None:
    """Refuse a key a user may not set, naming `where` it was written: a computed (`derived`) key, or one the
    schema does not have (with the closest real one). Entries of an open section (`log.tags.*`) are free.

    selectors: also accept `scale`, `row` and `data` (the preset pickers), as a grid's keys may be.
    sections: accept a whole section's name (`model`); a grid, whose keys each set one value, refuses it.
    error: the class raised (a grid raises its own subclass of ConfigError).
    """
    if any(key == s or key.startswith(s + ".") for s in _USER_FORBIDDEN):
        raise error(f"{where}: '{key}' is computed by lrexp and cannot be set")
    if (selectors and key in SELECTORS) or any(key.startswith(s + ".") for s in OPEN_SECTIONS):
        return
    if key not in SCHEMA_PATHS:
        hint = suggest_key(key)
        raise error(f"{where}: unknown config key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))
    if not sections and is_section(key):
        raise error(f"{where}: '{key}' is a config section; name one of its keys ('{key}.<name>')")


def flatten(data: RunConfig | Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Dotted key -> value. Nested and dotted keys alike (`{model: {window: 8}}`, `{model.window: 8}`); only
    sections of the schema are walked, so an open section (`log.tags`) stays one value and so does a dict
    under an unknown key. A RunConfig is flattened resolved (`to_dict`): the MLflow params, the grid's cell
    identity, the keys a checkpoint is compared on."""
    if isinstance(data, RunConfig):
        data = to_dict(data)
    out: Dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and is_section(path):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: one line, the file named
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def preset_path(kind: str, name: str) -> Path:
    folder = PRESET_DIRS[kind]
    path = folder / f"{name}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        if kind == "data":  # the user's own: none until `data prepare --name` records one
            have = (have or "none yet") + " (record one: lrexp data prepare --path DIR --name NAME)"
        raise ConfigError(f"unknown {kind} '{name}'; available: {have}")
    return path


def _data_preset(name: str) -> Layer:
    """A data preset (docs/data.md#data-presets): the `data` section only, recorded by `lrexp data prepare --name`."""
    where, data = f"data {name}", _read_yaml(preset_path("data", name))
    if set(data) - {"data"}:
        raise ConfigError(f"{where} ({preset_path('data', name)}): a data preset holds the 'data' section only, "
                          f"not {', '.join(sorted(set(data) - {'data'}))}")
    return where, data


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    return key, value


def compose(files: Sequence[str | Path | Layer] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge the layers in order and return the (unresolved, unvalidated) typed OmegaConf node. A file is a
    YAML path or a layer already in memory, (where it came from, its dict): a checkpoint's config."""
    return _compose(files, overrides)[0]


def _compose(files: Sequence[str | Path | Layer], overrides: Sequence[str]) -> Tuple[DictConfig, Set[str]]:
    """compose(), and the keys the user set: those of the files and overrides, not of the presets."""
    selected = {"scale": "tiny", "row": None, "data": None}
    dotlist: List[str] = []
    for item in overrides:
        key, value = _parse_override(item)
        if key in SELECTORS:
            selected[key] = value
        else:
            check_key(key, "override")
            dotlist.append(f"{key}={value}")

    layers: List[Layer] = [("experiments/base.yaml", _read_yaml(EXPERIMENTS / "base.yaml"))]
    layers.append((f"scale {selected['scale']}", _read_yaml(preset_path("scale", selected["scale"]))))
    if selected["data"]:  # after the scale: a corpus's vocabulary size wins over the scale's
        layers.append(_data_preset(selected["data"]))
    if selected["row"]:
        layers.append((f"row {selected['row']}", _read_yaml(preset_path("row", selected["row"]))))
        # the run is tagged with its preset: the report's step-time reference is a preset (REFERENCE_ROW)
        layers.append((f"row {selected['row']}", {"log": {"tags": {TAG_ROW_PRESET: selected["row"]}}}))

    presets = len(layers)
    layers.extend(f if isinstance(f, tuple) else (str(f), _read_yaml(Path(f))) for f in files)

    cfg = OmegaConf.structured(RunConfig)
    user = {key.split("=", 1)[0] for key in dotlist}
    for i, (where, data) in enumerate(layers):
        for key in flatten(data):
            check_key(key, where)
            if i >= presets:
                user.add(key)
        cfg = _merge(cfg, OmegaConf.create(data), where)
    if dotlist:
        cfg = _merge(cfg, OmegaConf.from_dotlist(dotlist), "override")
    return cfg, user


def _merge(cfg: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {_omegaconf_message(exc)}") from None


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"'{key}': {msg}" if key else msg


def load(files: Sequence[str | Path | Layer] = (), overrides: Sequence[str] = ()) -> RunConfig:
    """Compose, type-check, resolve derived values and validate. Raises ConfigError with one line."""
    cfg, user = _compose(files, overrides)
    load_plugins(OmegaConf.select(cfg, "plugins") or [])  # their registrations before the checks read them
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    adapt_short_run(run, user)
    return resolve(run)


def adapt_short_run(cfg: RunConfig, user: Set[str]) -> None:
    """Scale the cadences a short run would not see down to it, unless the user set them
    (docs/configuration.md#short-runs); what changed is kept in `derived.adapted` for the run to say."""
    values = {key: attrgetter(key)(cfg) for key in SHORT_RUN_CADENCES}
    if not isinstance(cfg.train.max_steps, int) or not all(isinstance(v, int) for v in values.values()):
        return  # a wrong type: resolve() names it
    adapted = short_run_cadences(cfg.train.max_steps, values, user)
    for key, (_, now) in adapted.items():
        section, name = key.rsplit(".", 1)
        setattr(attrgetter(section)(cfg), name, now)
    cfg.derived.adapted = adapted


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """Plain, fully resolved dict (for YAML, MLflow params and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
