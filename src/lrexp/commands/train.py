"""`lrexp train [CONFIG.yaml ...] [key=value ...] [--resume RUN_ID_OR_CHECKPOINT]`

One MLflow run. The last stdout line is the final metrics as JSON, with "run_id" and "checkpoint".
"""

from __future__ import annotations

import argparse
import json

from lrexp.commands.show_config import add_config_arguments, split_items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--resume",
        metavar="RUN_ID_OR_CHECKPOINT",
        help="continue a run (same MLflow run) from its last checkpoint; the checkpoint's config is the "
        "base, given files and overrides apply on top (say train.max_steps=...)",
    )


def run(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities import rank_zero_only

    from lrexp.config.load import load  # imports torch (the registries): not while the parser is built
    from lrexp.train.run import resume_config, run as train_run  # Lightning, MLflow, the model: only to train

    files, overrides = split_items(args.items)
    if args.resume:
        cfg, _ = resume_config(args.resume, files, overrides)
    else:
        cfg = load(files, overrides)
    result = train_run(cfg, resume=args.resume)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this command
        print(json.dumps(result, sort_keys=True), flush=True)
    return 0
