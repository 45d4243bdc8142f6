"""The late-option parser every sub-command that takes `key=value` overrides shares.

Such a sub-command reads its overrides as `argparse.REMAINDER`, so argparse leaves everything after the first
positional to them, options included (`lrexp grid gates --dry-run scale=small --jobs 0`, `lrexp eval CKPT
policy.sinks=2 --budget 8`). `late_options` parses those options from there, as if they came first.
"""

from __future__ import annotations

import argparse
from typing import Callable, Union

from lrexp.errors import UserError
from lrexp.runtime.cpus import AUTO_JOBS

AddOptions = Callable[[argparse.ArgumentParser], None]


def add_overrides(parser: argparse.ArgumentParser, add_options: AddOptions, help: str) -> None:
    """The overrides positional (options may follow it) and the sub-command's options, which `late_options`
    reads again from the overrides."""
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value", help=help)
    add_options(parser)


def late_options(args: argparse.Namespace, add_options: AddOptions, command: str) -> argparse.Namespace:
    """`args` of `lrexp COMMAND` with the options (`add_options`) written among the overrides applied and
    taken out of them; an unknown option is a one-line error."""
    prog = f"lrexp {command}"
    late = argparse.ArgumentParser(prog=prog, add_help=False)
    add_options(late)
    found, rest = late.parse_known_args(args.overrides)
    for key, value in vars(found).items():
        # given late: not None (an option not written) nor False (a flag not written, which must not undo
        # one written early); 0 is a value (`--jobs 0` is refused, not read as absent)
        if value is not None and value is not False:
            setattr(args, key, value)
    unknown = [r for r in rest if r.startswith("-")]
    if unknown:
        raise UserError(f"unknown option '{unknown[0]}' (see {prog} --help)")
    args.overrides = rest
    return args


def jobs_option(text: str) -> Union[int, str]:
    """`--jobs K` or `--jobs auto` (the cells at once from the usable cores: lrexp.grid.runner.jobs_for)."""
    if text == AUTO_JOBS:
        return AUTO_JOBS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--jobs takes a number of cells or '{AUTO_JOBS}', got '{text}'") from None
