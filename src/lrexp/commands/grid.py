"""`lrexp grid NAME [--dry-run] [--resume] [--jobs K | --launcher slurm|local] [--list] [--new-parent]
[--cell ID [--parent RUN_ID]] [--status [--parent RUN_ID]] [key=value ...]`

Expands and validates every cell first (bad input fails here, before anything runs), then trains the cells,
each as its own process, one after another or `--jobs K` at once, and ends with the report (the table is
printed). The exit status is 0 only when every cell finished.

Fanned out to a scheduler instead: `--new-parent` opens the invocation's parent run and prints its id;
`--cell ID` (or its number in `--list`) trains that one cell under the parent named by `--parent` or
`$LREXP_GRID_PARENT`, with the parent's overrides (then any given). An explicit parent, because cells that
start at once on several machines cannot agree on one they create themselves: MLflow has no atomic "create
unless it exists". `lrexp report NAME` then gathers the cells. `--launcher slurm` does that in one command:
the cells as a job array, each job a `--cell` (grid/slurm.py); `--status` shows where every cell stands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

from lrexp.commands.options import add_overrides, jobs_option, late_options
from lrexp.errors import UserError
from lrexp.runtime.cpus import AUTO_JOBS
from lrexp.tracking.view import publish, ui_base

PARENT_ENV = "LREXP_GRID_PARENT"


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="list the cells and validate their configs; train nothing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the grid's latest invocation (its overrides, then any given now): skip cells that "
        "FINISHED there with the same config, train on those that only had fewer train.max_steps or were "
        "stopped after a checkpoint",
    )
    parser.add_argument("--jobs", type=jobs_option, metavar="K",  # None: not given (see _late_options): auto
                        help="train K cells at once, each on its own share of the CPU cores and, on a GPU machine, "
                        "its own train.devices GPUs; their runs reach the store through one local MLflow server "
                        "(default: auto, as many as the usable cores, one each or its train.threads, and GPUs allow)")
    parser.add_argument("--list", action="store_true", help="print the cell ids, one a line, in grid order")
    parser.add_argument("--new-parent", action="store_true",
                        help="open a parent run for --cell processes (a scheduler's jobs) and print its id")
    parser.add_argument("--cell", metavar="ID", help="train this one cell (its id, or its line number in "
                        "--list) under the parent run of --parent / $LREXP_GRID_PARENT, resuming it if it stopped")
    parser.add_argument("--parent", metavar="RUN_ID", help=f"the parent run for --cell (default: ${PARENT_ENV})")
    parser.add_argument("--launcher", metavar="slurm|local",
                        help="run every cell as a job through submitit: a SLURM job array (launcher.KEY=VALUE: "
                        "partition, account, qos, nodes, gpus_per_node, cpus_per_task, mem, time, signal_s, "
                        "array_parallelism, sbatch.OPTION), or processes on this machine (local)")
    parser.add_argument("--status", action="store_true",
                        help="every cell of the latest invocation (or --parent RUN_ID): pending, running, "
                        "finished, failed, preempted/requeued; exit status 1 while a cell failed")
    parser.add_argument("--runs-dir", type=Path, help="cell configs and logs go to DIR/NAME/CELL/ (default: runs/)")
    parser.add_argument("--out", type=Path, help="report folder (default: reports/NAME)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="a grid in experiments/grids, or the path of a grid YAML")
    add_overrides(parser, _add_options, "applied to every cell (scale=NAME picks the scale); key=[a,b] makes key "
                  "an axis with these values, key=v on an axis key pins it; train.seed=[0,1] sets the seeds")


def _late_options(args: argparse.Namespace) -> argparse.Namespace:
    """Options written after NAME (`lrexp grid gates --dry-run scale=small`); --jobs None when not given."""
    args = late_options(args, _add_options, "grid")
    args.jobs_given = args.jobs is not None  # --launcher takes none, whatever the default
    return args


def _dry_run(g, steps=None) -> None:
    """The cells; with `steps` (a --resume plan) what the resume does with each."""
    from lrexp.model.variants import row_name  # the row registry imports torch: not while the parser is built

    print(
        f"grid {g.name} ({g.path}): {len(g.cells)} cell{'s' * (len(g.cells) != 1)} at scale {g.scale}; "
        f"step-time reference: {g.reference}"
    )
    header = ("#", "cell", "row", "N", "W", "lanes", "steps", "config hash", *(["on resume"] if steps else []))
    actions = {
        "skip": lambda s: f"skip (FINISHED in run {s.run_id})",
        "continue": lambda s: f"train on from step {s.from_step} (run {s.run_id})" + (f"; {s.note}" if s.note else ""),
        "train": lambda s: "train" + (f" ({s.note})" if s.note else ""),
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
    if g.evaluate:
        print(f"then lrexp eval of every trained cell's checkpoint with {' '.join(g.evaluate)}")
    print("every cell's config is valid (dry run: nothing trained, nothing logged)")


def _check_cells(g) -> None:
    """Every cell as `lrexp train` will check it, before any runs: a dry run that passes means the cells start."""
    from lrexp.grid.spec import GridError  # the grid modules load configs (torch): not while the parser is built
    from lrexp.train.validate import check_run

    for cell in g.cells:
        try:
            check_run(cell.config)
        except UserError as exc:
            raise GridError(f"grid {g.name}, cell {cell.id}: {exc}") from None


def _pick(g, wanted: str):
    """A cell by its id or by its line number in `--list` (a job array's task id)."""
    from lrexp.grid.spec import GridError  # the grid modules load configs (torch): not while the parser is built

    for cell in g.cells:
        if wanted in (cell.id, str(cell.index + 1)):
            return cell
    raise GridError(f"grid {g.name} has no cell '{wanted}' ({len(g.cells)} cells; lrexp grid {g.name} --list)")


def _fan_out(args: argparse.Namespace) -> int:
    """--list, --new-parent and --cell."""
    import os

    # mlflow: paid for by `lrexp grid` only, not by every command whose parser this module builds
    from lrexp.grid import runner
    from lrexp.grid.expand import expand
    from lrexp.grid.plan import invocation_overrides, tracking_uri_of
    from lrexp.grid.tracker import Tracker

    parent_id = args.parent or os.environ.get(PARENT_ENV)
    g = expand(args.name, args.overrides)
    if parent_id and not args.new_parent:  # the invocation's overrides first, the ones given now on top
        parent = Tracker(tracking_uri_of(g), g).parent(parent_id)
        g = expand(args.name, [*invocation_overrides(parent), *args.overrides])
    if args.list:
        print("\n".join(c.id for c in g.cells))
        return 0
    _check_cells(g)
    if args.new_parent:
        print(Tracker(tracking_uri_of(g), g).new_parent())
        return 0
    if not parent_id:
        raise UserError(f"--cell needs the invocation's parent run: --parent RUN_ID or ${PARENT_ENV} "
                        f"(lrexp grid {args.name} --new-parent opens one)")
    result = runner.run_one(g, _pick(g, args.cell), parent_id, runs_dir=args.runs_dir)
    return 0 if result.status in ("FINISHED", "SKIPPED") else 1


def _view(outcome, cells) -> str:
    """The invocation's view in the MLflow UI, published now (tracking/view.py), as its link."""
    from mlflow.tracking import MlflowClient  # mlflow: see run()

    client = MlflowClient(outcome.uri)
    base, lrexp_ui = ui_base(outcome.uri)
    return publish(client, client.get_run(outcome.parent_id), cells, base, lrexp_ui)


def _cells(name: str, overrides: List[str], resume: bool):
    """The grid's cells, checked, and with `resume` what the resume does with each (else None)."""
    # mlflow: paid for by `lrexp grid` only, not by every command whose parser this module builds
    from lrexp.grid.expand import expand
    from lrexp.grid.plan import invocation_overrides, plan, previous_invocation

    g = expand(name, overrides)
    steps = None
    if resume:
        parent, finished = previous_invocation(g)
        earlier = invocation_overrides(parent) if parent is not None else []
        if earlier:  # the invocation's own overrides first, the ones given now on top
            g = expand(name, [*earlier, *overrides])
            print(f"resuming parent run {parent.info.run_id} with its overrides: {' '.join(earlier)}"
                  + (f", then {' '.join(overrides)}" if overrides else ""))
        steps = plan(g, finished)
    _check_cells(g)
    return g, steps


def _status(args: argparse.Namespace) -> int:
    """--status: the latest invocation's cells (or --parent's), with its overrides."""
    import os

    # mlflow: paid for by `lrexp grid` only, not by every command whose parser this module builds
    from lrexp.grid import status
    from lrexp.grid.expand import expand
    from lrexp.grid.plan import invocation_overrides
    from lrexp.grid.runner import RUNS_DIR

    if args.dry_run or args.resume or args.launcher or args.list or args.new_parent or args.cell:
        raise UserError("--status takes no other option but --parent and --runs-dir")
    g = expand(args.name, args.overrides)
    parent = status.parent_of(g, args.parent or os.environ.get(PARENT_ENV))
    g = expand(args.name, [*invocation_overrides(parent), *args.overrides])
    return status.show(g, parent, args.runs_dir or RUNS_DIR)


def _launch(args: argparse.Namespace) -> int:
    """--launcher slurm|local: the cells as submitit jobs; local ones are waited for and reported."""
    # submitit only once the launcher is checked: slurm.py imports it in one function, for the one-line error
    from lrexp.grid import slurm
    from lrexp.grid.runner import RUNS_DIR

    if args.list or args.new_parent or args.cell or args.jobs_given:
        raise UserError("--launcher takes no --list, --new-parent, --cell or --jobs (launcher.array_parallelism "
                        "sets how many cells run at once)")
    if args.launcher not in slurm.LAUNCHERS:
        raise UserError(f"unknown launcher '{args.launcher}'; allowed: {', '.join(slurm.LAUNCHERS)}")
    launcher, overrides = slurm.split_overrides(args.overrides)
    g, steps = _cells(args.name, overrides, args.resume)
    slurm.check(args.launcher, launcher, g, submit=not args.dry_run)
    if args.dry_run:
        _dry_run(g, steps)
        if args.launcher == "slurm":
            folder = (args.runs_dir or RUNS_DIR) / g.name / "launcher"
            print(f"\nthe job script (one array task per cell, written under {folder}):\n")
            print(slurm.job_script(launcher, g, folder / "%j", len(g.cells)))
        return 0
    outcome = slurm.launch(g, args.launcher, launcher, resume=args.resume, runs_dir=args.runs_dir)
    return 0 if outcome is None else _report(g, args, outcome)  # SLURM's jobs go on after this command


def run(args: argparse.Namespace) -> int:
    # mlflow: paid for by `lrexp grid` only, not by every command whose parser this module builds
    from lrexp.grid import runner
    from lrexp.grid.launch import slots
    from lrexp.train.validate import short_run_note

    args = _late_options(args)
    if args.status:
        return _status(args)
    if args.launcher is not None:
        return _launch(args)
    if any(o.startswith("launcher.") for o in args.overrides):
        raise UserError("launcher.* keys take --launcher slurm|local")
    if args.list or args.new_parent or args.cell:
        if args.dry_run or args.resume or args.jobs not in (None, 1):
            raise UserError("--list, --new-parent and --cell take no --dry-run, --resume or --jobs (a --cell "
                            "resumes its cell by itself; a scheduler runs as many at once as it starts)")
        return _fan_out(args)
    g, steps = _cells(args.name, args.overrides, args.resume)
    args.jobs = AUTO_JOBS if args.jobs is None else args.jobs
    slots(g, runner.jobs_for(g, args.jobs, steps))  # refused now, not after the dry run said yes
    for note in dict.fromkeys(short_run_note(c.config) for c in g.cells):  # the cells' logs cannot say it
        if note:
            print(f"lrexp grid: {note}", file=sys.stderr)
    if args.dry_run:
        _dry_run(g, steps)
        return 0
    return _report(g, args, runner.run(g, resume=args.resume, runs_dir=args.runs_dir, jobs=args.jobs))


def _report(g, args: argparse.Namespace, outcome) -> int:
    """The table of the cells just run, then the grid's evaluations; 0 only when every cell finished."""
    from lrexp.report import collect  # matplotlib and mlflow: only once cells ran

    rep = collect.build(g.name, args.out, parent_id=outcome.parent_id, uri=outcome.uri)
    print()
    print(rep.markdown, end="")
    print(f"\nreport: {rep.files[0].parent} (also on the parent run's artifacts under report/)")
    print(f"MLflow UI (make ui), the comparison: {_view(outcome, rep.cells)}")
    failed = [r.cell.id for r in outcome.results if r.status == "FAILED"]
    if g.evaluate:  # the grid's `evaluate:` section: `lrexp eval` of every trained cell's checkpoint
        from lrexp.eval.run import evaluate_grid  # the model and the decoders: only for a grid that evaluates

        print()
        failed += [f"{c} (eval)" for c in evaluate_grid(g, outcome, rep.files[0].parent)]
    if failed:
        print(f"lrexp grid: {len(failed)} of {len(g.cells)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
