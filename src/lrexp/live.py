"""The line `lrexp grid` keeps about the cell it is training, from the cell's progress file
(`log.progress_file`, written by lit/progress.py): step / max_steps, train loss, tokens/s, and the ETA of
the cell and of the grid. A terminal gets the line rewritten in place; a file or pipe (a scheduler's log)
gets it as a new line every `every_s` seconds, so the log does not grow by a line a second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, TextIO


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LiveLine:
    def __init__(self, out: TextIO, prefix: str, path: Path, later_cells: int, cell_seconds: Optional[float],
                 every_s: float = 30.0) -> None:
        """`later_cells`: cells still to train after this one; `cell_seconds`: the mean time of the cells
        trained so far (None: this cell's own projection stands for them)."""
        self.out, self.prefix, self.path = out, prefix, path
        self.later_cells, self.cell_seconds = later_cells, cell_seconds
        self.every_s = every_s
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._t0 = time.monotonic()
        self._shown = ""
        self._printed_at = float("-inf")

    def text(self) -> Optional[str]:
        try:
            p = json.loads(self.path.read_text())
        except (OSError, ValueError):  # not written yet
            return None
        step, total = p["step"], p["max_steps"]
        rate = (step - p["start_step"]) / p["seconds"] if p["seconds"] > 0 else 0.0
        parts = [f"step {step}/{total}"]
        if p["loss"] is not None:
            parts.append(f"loss {p['loss']:.3f}")
        parts.append(f"{p['tokens_per_s']:,.0f} tok/s")
        if rate > 0:
            left = (total - step) / rate
            per_cell = self.cell_seconds if self.cell_seconds is not None else time.monotonic() - self._t0 + left
            parts.append(f"ETA cell {duration(left)}, grid {duration(left + self.later_cells * per_cell)}")
        return f"{self.prefix} " + ", ".join(parts)

    def update(self) -> None:
        text = self.text()
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

    def close(self) -> None:
        """A terminal's line is cleared: the cell's result line takes its place."""
        if self.tty and self._shown:
            self.out.write("\r" + " " * len(self._shown) + "\r")
            self.out.flush()
