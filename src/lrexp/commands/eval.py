"""`lrexp eval CHECKPOINT [--split S] [--policy P ...] [--budget C ...] [--mode auto|token|block] [--block b]
[--context T] [--limit K] [--out DIR] [key=value ...]`

A trained row evaluated from its checkpoint (a file, a run's checkpoint folder or an MLflow run id) as a
bounded multi-state RNN: `full` (the topline) and every policy x budget over the same targets as the
training's final pass (lrexp.eval). The options set `policy.*` config keys (`lrexp show-config` lists
them all: sinks, granularity, positions, tova_score_query, protect_first_i, protect_newest, h2o_heavy);
key=value overrides may set any `policy.*` or `log.*` key.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrexp.commands.options import add_overrides, late_options

# option -> the policy.* key it sets
_OPTIONS = {"split": "split", "policy": "names", "budget": "budgets", "mode": "mode", "block": "block",
            "context": "context", "limit": "limit"}


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", help="the split scored (default: test)")
    parser.add_argument("--policy", nargs="+", metavar="P", help="cache policies: full, window, sinks, h2o, tova "
                        "(full, the topline, is always evaluated first)")
    parser.add_argument("--budget", nargs="+", metavar="C", help="budgets: real rows kept per layer")
    parser.add_argument("--mode", choices=["auto", "token", "block"], help="auto (default): b tokens per step where "
                        "that is exact (full, window, sinks), token by token for h2o and tova; token: every policy "
                        "token by token (the reference); block: b per step (approximate for h2o and tova)")
    parser.add_argument("--block", type=int, metavar="b", help="tokens per step in block mode (default: the window; "
                        "auto mode: a segment)")
    parser.add_argument("--context", type=int, metavar="T", help="T_eval, the visibility limit (default: the "
                        "model's: W for XL / Slide, the segment N for Full, whose segments it then sets)")
    parser.add_argument("--limit", type=int, metavar="K", help="score only the first K targets of the fixed "
                        "evaluation order (a quick look; recorded in the table and the MLflow run)")
    parser.add_argument("--out", type=Path, help="report folder (default: reports/eval/<parent run id>)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a last.ckpt, its run folder, or the MLflow run id")
    add_overrides(parser, _add_options, "policy.* and log.* config keys (options may follow)")


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The options as policy.* overrides, after the key=value ones (an option wins)."""
    out = list(args.overrides)
    for option, key in _OPTIONS.items():
        value = getattr(args, option)
        if isinstance(value, list):  # key=value items written after a list option's values are overrides
            out.extend(v for v in value if "=" in v)
            value = [v for v in value if "=" not in v]
        if value is not None:
            out.append(f"policy.{key}={'[' + ','.join(map(str, value)) + ']' if isinstance(value, list) else value}")
    return out


def run(args: argparse.Namespace) -> int:
    from lrexp.eval.run import run as evaluate  # torch and the model only when evaluating, not at start-up

    args = late_options(args, _add_options, "eval")
    parent, _, folder = evaluate(args.checkpoint, overrides_of(args), args.out)
    print()
    print((folder / "table.md").read_text(), end="")
    print(f"\nreport: {folder} (MLflow parent run {parent})")
    return 0
