"""`lrexp show-config [CONFIG.yaml ...] [key=value ...]`"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config arguments every sub-command that builds a run shares."""
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | key=value",
        help="YAML files merged in order, then key=value overrides; scale=NAME, row=NAME and data=NAME pick presets",
    )


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """Files are the items without '=' and existing files (a path may hold '='); the rest are overrides."""
    is_file = [("=" not in i) or Path(i).is_file() for i in items]
    files = [i for i, f in zip(items, is_file) if f]
    overrides = [i for i, f in zip(items, is_file) if not f]
    return files, overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lrexp.config.load import load, to_yaml  # imports torch (the registries): not while the parser is built
    from lrexp.train.validate import check_run

    files, overrides = split_items(args.items)
    cfg = load(files, overrides)
    check_run(cfg)  # valid means a run starts: the model and the corpus are checked too
    print(to_yaml(cfg), end="")
    return 0
