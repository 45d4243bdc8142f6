"""`lrexp report NAME [--out DIR] [--run PARENT_RUN_ID] [--tracking-uri URI]`
`lrexp report --runs RUN_ID [RUN_ID ...] | --experiment NAME [--reference NAME]`

The comparison table (printed, and written as markdown + CSV) and plots, read from MLflow alone: of a
grid's invocation, or of single runs (`lrexp train`) named by id or gathered from an experiment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrexp.errors import UserError
from lrexp.tracking.names import REFERENCE_ROW


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", nargs="?", help="the grid's name (its experiment is lrexp-NAME)")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/NAME/<parent run id>)")
    parser.add_argument("--run", metavar="PARENT_RUN_ID", help="a parent run of the grid (default: its latest)")
    parser.add_argument("--runs", nargs="+", metavar="RUN_ID", help="single runs to compare instead of a grid")
    parser.add_argument("--experiment", metavar="NAME", help="compare every run of this MLflow experiment")
    parser.add_argument("--reference", metavar="NAME", help="with --runs/--experiment: the line Δ and step time "
                        f"are relative to, by run name or row preset (default: {REFERENCE_ROW}'s, else the first)")
    parser.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db)"
    )


def run(args: argparse.Namespace) -> int:
    from lrexp.report import collect  # loads configs (torch): not while the parser is built

    chosen = [bool(args.name), bool(args.runs), bool(args.experiment)]
    if sum(chosen) != 1:
        raise UserError("name a grid, or --runs RUN_ID ..., or --experiment NAME (exactly one of them)")
    if args.name:
        rep = collect.build(args.name, args.out, parent_id=args.run, uri=args.tracking_uri)
        where = f"also on parent run {rep.parent_id} under report/"
    else:
        rep = collect.build_runs(args.runs or (), args.experiment, args.out, args.tracking_uri, args.reference)
        where = f"{len(rep.cells)} runs"
    print(rep.markdown, end="")
    print(f"\nreport: {rep.files[0].parent} ({where})")
    return 0
