"""The one place a benchmark's report is written: printed, and saved as reports/bench/<name>.md (and .json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from lrexp.config.paths import PROJECT_ROOT


REPORTS = PROJECT_ROOT / "reports" / "bench"


def write_report(name: str, lines: List[str], data: Optional[Any] = None, folder: Path = REPORTS) -> Path:
    """Print the markdown lines and write them to <folder>/<name>.md, and `data` (when given) to
    <name>.json; returns the markdown's path."""
    report = "\n".join(lines) + "\n"
    print(report)
    out = Path(folder) / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    if data is not None:
        out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"written to {out}")
    return out


def ms(s: Dict[str, float]) -> str:
    """Seconds as 'median (min-max)' milliseconds."""
    return f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f})"


def x(s: Dict[str, float]) -> str:
    """A ratio as 'median (min-max)'."""
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
