"""The one place a benchmark's report is written: printed, and saved as reports/bench/<name>.md."""

from __future__ import annotations

from pathlib import Path
from typing import List

from lrexp.config import PROJECT_ROOT


def write_report(name: str, lines: List[str]) -> Path:
    """Print the markdown lines and write them to reports/bench/<name>.md; returns that path."""
    report = "\n".join(lines) + "\n"
    print(report)
    out = PROJECT_ROOT / "reports" / "bench" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")
    return out
