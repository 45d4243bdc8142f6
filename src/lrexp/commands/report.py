"""`lrexp report NAME [--out DIR] [--run PARENT_RUN_ID] [--tracking-uri URI]`

The grid's comparison table (printed, and written as markdown + CSV) and plots, read from MLflow alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the grid's name (its experiment is lrexp-NAME)")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/NAME)")
    parser.add_argument("--run", metavar="PARENT_RUN_ID", help="a parent run of the grid (default: its latest)")
    parser.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db)"
    )


def run(args: argparse.Namespace) -> int:
    from lrexp import report

    rep = report.build(args.name, args.out, parent_id=args.run, uri=args.tracking_uri)
    print(rep.markdown, end="")
    print(f"\nreport: {rep.files[0].parent} (also on parent run {rep.parent_id} under report/)")
    return 0
