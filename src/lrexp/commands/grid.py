"""`lrexp grid NAME [--dry-run] [--resume] [key=value ...]`

Expands and validates every cell first (bad input fails here, before anything runs), then trains the cells
one after another, each as its own process, and ends with the report (the table is printed). The exit
status is 0 only when every cell finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrexp.errors import UserError


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="list the cells and validate their configs; train nothing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the grid's latest invocation (its overrides, then any given now): skip cells that "
        "FINISHED there with the same config, train on those that only had fewer train.max_steps or were "
        "stopped after a checkpoint",
    )
    parser.add_argument("--runs-dir", type=Path, help="cell configs and logs go to DIR/NAME/CELL/ (default: runs/)")
    parser.add_argument("--out", type=Path, help="report folder (default: reports/NAME)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="a grid in experiments/grids, or the path of a grid YAML")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,  # options may follow (see _late_options)
        metavar="key=value",
        help="applied to every cell (scale=NAME picks the scale); key=[a,b] makes key an axis with these "
        "values, key=v on an axis key pins it; train.seed=[0,1] sets the seeds",
    )
    _add_options(parser)


def _late_options(args: argparse.Namespace) -> argparse.Namespace:
    """Options written after NAME (`lrexp grid gates --dry-run scale=small`): argparse leaves everything
    after the first positional to the overrides, so they are parsed from there."""
    late = argparse.ArgumentParser(prog="lrexp grid", add_help=False)
    _add_options(late)
    found, rest = late.parse_known_args(args.overrides)
    for key, value in vars(found).items():
        if value not in (None, False):
            setattr(args, key, value)
    unknown = [r for r in rest if r.startswith("-")]
    if unknown:
        raise UserError(f"unknown option '{unknown[0]}' (see lrexp grid --help)")
    args.overrides = rest
    return args


def _dry_run(g, steps=None) -> None:
    """The cells; with `steps` (a --resume plan) what the resume does with each."""
    from lrexp.variants import row_name

    print(
        f"grid {g.name} ({g.path}): {len(g.cells)} cell{'s' * (len(g.cells) != 1)} at scale {g.scale}; "
        f"step-time reference: {g.reference}"
    )
    header = ("#", "cell", "row", "N", "W", "lanes", "steps", "config hash", *(["on resume"] if steps else []))
    actions = {
        "skip": lambda s: f"skip (FINISHED in run {s.run_id})",
        "continue": lambda s: f"train on from step {s.from_step} (run {s.run_id})",
        "train": lambda s: "train",
    }
    lines = [
        (str(c.index + 1), c.id, row_name(c.config), str(c.config.derived.segment_len), str(c.config.model.window),
         str(c.config.derived.lanes), str(c.config.train.max_steps), c.config_hash,
         *([actions[steps[c.index].action](steps[c.index])] if steps else []))
        for c in g.cells
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    print("every cell's config is valid (dry run: nothing trained, nothing logged)")


def _check_cells(g) -> None:
    """Every cell as `lrexp train` will check it, before any runs: a dry run that passes means the cells start."""
    from lrexp.grid import GridError
    from lrexp.validate import check_run

    for cell in g.cells:
        try:
            check_run(cell.config)
        except UserError as exc:
            raise GridError(f"grid {g.name}, cell {cell.id}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from lrexp import grid, report

    args = _late_options(args)
    g = grid.expand(args.name, args.overrides)
    steps = None
    if args.resume:
        parent, finished = grid.previous_invocation(g)
        earlier = grid.invocation_overrides(parent) if parent is not None else []
        if earlier:  # the invocation's own overrides first, the ones given now on top
            g = grid.expand(args.name, [*earlier, *args.overrides])
            print(f"resuming parent run {parent.info.run_id} with its overrides: {' '.join(earlier)}"
                  + (f", then {' '.join(args.overrides)}" if args.overrides else ""))
        steps = grid.plan(g, finished)
    _check_cells(g)
    if args.dry_run:
        _dry_run(g, steps)
        return 0
    outcome = grid.run(g, resume=args.resume, runs_dir=args.runs_dir)
    rep = report.build(g.name, args.out, parent_id=outcome.parent_id, uri=outcome.uri)
    print()
    print(rep.markdown, end="")
    print(f"\nreport: {rep.files[0].parent} (also on the parent run's artifacts under report/)")
    failed = [r.cell.id for r in outcome.results if r.status == "FAILED"]
    if failed:
        print(f"lrexp grid: {len(failed)} of {len(g.cells)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
