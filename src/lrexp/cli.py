"""The `lrexp` console script (docs/design.md#command-line).

Each sub-command lives in the module that owns it and exposes `add_arguments(parser)` and `run(args) -> int`;
this file only routes. Modules are imported lazily, so `lrexp show-config` does not pay for Lightning.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from lrexp.errors import Interrupted, UserError, storage_failure
from lrexp.runtime.cpus import CPUS_ENV

# name -> (module, one-line help)
COMMANDS = {
    "show-config": ("lrexp.commands.show_config", "print the resolved, validated config as YAML"),
    "grid": ("lrexp.commands.grid", "train every cell of an ablation grid (one MLflow child run each), then report"),
    "report": ("lrexp.commands.report", "a grid's comparison table (markdown + CSV) and plots, from MLflow"),
    "train": ("lrexp.commands.train", "train one run, logged to MLflow; prints the final metrics as JSON"),
    "eval": ("lrexp.commands.eval", "evaluate a checkpoint under KV-cache policies x budgets (bounded multi-state)"),
    "ui": ("lrexp.commands.ui", "the MLflow UI over the project's store; prints the latest grid's runs page"),
    "data": ("lrexp.commands.data", "prepare a corpus: tokens + offsets + meta, cached (`lrexp data prepare`)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrexp", description="Long-sequence ablations with PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get(CPUS_ENV):
        os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS_ENV].split(",")})
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as exc:
        print(f"lrexp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"lrexp {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"lrexp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        storage = storage_failure(exc)  # a full disk or a read-only folder met anywhere: one line too
        if storage is None:
            raise
        print(f"lrexp {args.command}: error: {storage}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
