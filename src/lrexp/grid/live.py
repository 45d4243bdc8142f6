"""The line `lrexp grid` keeps about the cells it is training, from each cell's progress file
(`log.progress_file`, written by lit/progress.py): step / max_steps, train loss, tokens/s, and the ETA of
the cells and of the grid. A terminal gets the line rewritten in place; a file or pipe (a scheduler's log)
gets it as a new line every `every_s` seconds, so the log does not grow by a line a second.
"""

from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TextIO


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class Running:
    """A training cell as the grid sees it: its `[i/n]` prefix, progress file and start (time.monotonic)."""

    prefix: str
    path: Path
    started: float


@dataclass
class Progress:
    text: str  # "step 8/20, loss 2.500, 1,000 tok/s"
    left_s: Optional[float]  # None until a step has been timed


def progress(path: Path) -> Optional[Progress]:
    """The cell's progress so far; None before its first progress file."""
    try:
        p = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return None
    step, total = p["step"], p["max_steps"]
    rate = (step - p["start_step"]) / p["seconds"] if p["seconds"] > 0 else 0.0
    parts = [f"step {step}/{total}"]
    if p["loss"] is not None:
        parts.append(f"loss {p['loss']:.3f}")
    parts.append(f"{p['tokens_per_s']:,.0f} tok/s")
    return Progress(", ".join(parts), (total - step) / rate if rate > 0 else None)


def grid_left(cells_left: Sequence[float], later_cells: int, cell_seconds: float, slots: int) -> float:
    """Seconds until the grid ends: the running cells end in `cells_left`, then each of `later_cells` (of
    `cell_seconds` each) starts on the first of the `slots` to come free."""
    free = sorted([*cells_left, *[0.0] * (slots - len(cells_left))])
    for _ in range(later_cells):
        heapq.heappush(free, heapq.heappop(free) + cell_seconds)
    return max(free, default=0.0)


def status(running: Sequence[Running], later_cells: int, cell_seconds: Optional[float], slots: int,
           now: Optional[float] = None) -> Optional[str]:
    """The line for the cells training now; `later_cells` wait to start, `cell_seconds` is the mean time of
    the cells trained so far (None: the running cells' own projections stand for them)."""
    now = time.monotonic() if now is None else now
    seen = [(r, p) for r in running if (p := progress(r.path)) is not None]
    if not seen:
        return None
    timed = [(r, p) for r, p in seen if p.left_s is not None]
    eta = None
    if len(timed) == len(running):
        projected = [now - r.started + p.left_s for r, p in timed]
        per_cell = cell_seconds if cell_seconds is not None else sum(projected) / len(projected)
        eta = grid_left([p.left_s for _, p in timed], later_cells, per_cell, slots)
    if len(running) == 1:
        r, p = seen[0]
        tail = f", ETA cell {duration(p.left_s)}, grid {duration(eta)}" if eta is not None else ""
        return f"{r.prefix} {p.text}{tail}"
    cells = [f"{r.prefix} {p.text}" + (f", ETA {duration(p.left_s)}" if p.left_s is not None else "")
             for r, p in seen]
    return " | ".join(cells + ([f"ETA grid {duration(eta)}"] if eta is not None else []))


class LiveLine:
    """Shows the latest status line: rewritten in place on a terminal, else a new line every `every_s`."""

    def __init__(self, out: TextIO, every_s: float = 30.0) -> None:
        self.out = out
        self.every_s = every_s
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._shown = ""
        self._printed_at = float("-inf")

    def show(self, text: Optional[str]) -> None:
        if text is None or text == self._shown:
            return
        if self.tty:
            self.out.write("\r" + text.ljust(len(self._shown)))
        elif time.monotonic() - self._printed_at >= self.every_s:
            self.out.write(text + "\n")
            self._printed_at = time.monotonic()
        else:
            return
        self.out.flush()
        self._shown = text

    def clear(self) -> None:
        """A terminal's line is cleared before another line is printed (a cell's start or end)."""
        if self.tty and self._shown:
            self.out.write("\r" + " " * len(self._shown) + "\r")
            self.out.flush()
        self._shown = ""

