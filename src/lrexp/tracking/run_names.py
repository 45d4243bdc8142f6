"""The names runs carry in the MLflow UI's run list (docs/ui.md#run-names): short and telling
apart the runs shown together. Ids stay in tags (`lrexp.cell`, `lrexp.group`, `lrexp.overrides`); a name is
for reading only and nothing looks a run up by it.

- a grid invocation's parent: `<grid> · <date time> · <the invocation's overrides>`;
- a cell: its row's paper name, then the axis values that vary and that the row's name does not already
  say (`Rec:lstm:dual`, `Slide:13L window=16 seed=1`);
- a standalone `lrexp train` run: its row's paper name and the time it started.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

SEP = " · "
MAX_CHARS = 120  # the run list shows about 40; MLflow keeps 250, the full overrides are a tag


def _when(epoch_s: Optional[float], seconds: bool = False) -> str:
    stamp = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return time.strftime(stamp, time.localtime(time.time() if epoch_s is None else epoch_s))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 1] + "…"


def parent_name(grid: str, overrides: Sequence[str], epoch_s: Optional[float] = None) -> str:
    """`table · 2026-12-04 17:20 · scale=smoke train.max_steps=40`."""
    parts = [grid, _when(epoch_s)] + ([" ".join(overrides)] if overrides else [])
    return _cut(SEP.join(parts))


def standalone_name(row: str, epoch_s: Optional[float] = None) -> str:
    """`Slide:13L · 2026-12-04 17:20:31`: to the second, as `lrexp report --experiment` makes one line per run
    name (runs given one name with `log.run_name` are seeds of one line)."""
    return SEP.join([row, _when(epoch_s, seconds=True)])


def cell_names(rows: Sequence[str], values: Sequence[Mapping[str, str]], short: Mapping[str, str],
               skip: Sequence[str] = ()) -> List[str]:
    """One name per cell: its row's name (`rows[i]`), then `short=value` for each axis (`values[i]`: axis key
    -> the value as its id writes it, in id order) that takes more than one value in the grid, unless the
    row's name already tells its values apart (gate and topology in `Rec:lstm:dual`); `skip`: axes never
    named (the row preset, which the row's name stands for)."""
    keys = [k for k in (values[0] if values else {}) if k not in skip]

    def varies(key: str) -> bool:
        return len({v[key] for v in values}) > 1

    def said_by_row(key: str) -> bool:  # every row name goes with one value of the axis
        seen: Dict[str, Any] = {}
        return all(seen.setdefault(row, v[key]) == v[key] for row, v in zip(rows, values))

    named = [k for k in keys if varies(k) and not said_by_row(k)]
    out = [_cut(" ".join([row, *(f"{short[k]}={v[k]}" for k in named)])) for row, v in zip(rows, values)]
    if skip and len(set(out)) < len(out):  # two presets with one paper name: name the preset too
        return cell_names(rows, values, short)
    return out
