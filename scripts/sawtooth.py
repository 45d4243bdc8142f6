"""The training loss's saw-tooth and the validation curve of runs, from MLflow (docs/data.md#staggered-lanes).

    python scripts/sawtooth.py --uri sqlite:///mlflow.db RUN_ID [RUN_ID ...] [--after 100] [--period 94]

Train with `log.every_n_steps=1` so that every step's loss is logged. Per run, over the steps after
--after (the warm-up): the loss's residual around a smooth trend (a least-squares fit of a + b log t), its
standard deviation, and its autocorrelation at --period steps (a document's segments: lanes in lockstep
repeat their saw-tooth with that period); then the validation bits/token at each validation and whether
they fell at every one, and the final validation bits/token (the whole split). Prints a markdown table.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import numpy as np
from mlflow.tracking import MlflowClient


def history(client: MlflowClient, run_id: str, key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a metric, a step logged twice keeping its latest value."""
    points: Dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        points[m.step] = m.value
    return np.array(list(points), dtype=np.float64), np.array(list(points.values()), dtype=np.float64)


def sawtooth(steps: np.ndarray, loss: np.ndarray, after: int, period: int) -> Tuple[float, float]:
    """(std of the residual around a + b log t, its autocorrelation at lag `period`) over steps > after."""
    keep = steps > after
    t, y = steps[keep], loss[keep]
    design = np.stack([np.ones_like(t), np.log(t + 1.0)], axis=1)  # [T, 2]
    residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]  # [T]
    lagged = residual[:-period], residual[period:]
    return float(residual.std()), float(np.corrcoef(*lagged)[0, 1]) if len(lagged[0]) > 2 else float("nan")


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--uri", required=True)
    parser.add_argument("--after", type=int, default=100, help="leave out the warm-up's steps")
    parser.add_argument("--period", type=int, required=True, help="segments per document")
    args = parser.parse_args(argv)
    client = MlflowClient(tracking_uri=args.uri)
    print("| run | settings | train loss residual std | autocorrelation at the period | "
          "validation bits/token by step | falls at every validation | final validation bits/token |")
    print("|---|---|---|---|---|---|---|")
    for run_id in args.runs:
        run = client.get_run(run_id)
        std, acf = sawtooth(*history(client, run_id, "train/loss"), args.after, args.period)
        val_steps, val = history(client, run_id, "val/bits_per_token")
        curve = ", ".join(f"{int(s)}: {v:.3f}" for s, v in zip(val_steps, val))
        falls = bool(np.all(np.diff(val) < 0))
        p = run.data.params
        settings = (f"stagger_lanes={p.get('data.stagger_lanes')} {p.get('optim.name')} "
                    f"warmup={p.get('optim.warmup_steps')} lr={p.get('optim.lr')}")
        final = run.data.metrics.get("final/val_bits_per_token", float("nan"))
        print(f"| {run.info.run_name} | {settings} | {std:.4f} | {acf:.3f} | {curve} | {'yes' if falls else 'no'} "
              f"| {final:.3f} |")


if __name__ == "__main__":
    main()
