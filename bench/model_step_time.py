"""Model benchmark: training-step time of every row, and linear cost in the segment length.

    python bench/model_step_time.py [--steps 5] [--rows xl512,slide13,...] [key=value ...]
    (default: every row of experiments/rows at the tiny scale)

One step is forward + backward of one segment of every lane (lanes x N = tokens_per_step), with the carried
state detached between steps, as in training. Prints the mean step time per row and its ratio to Slide:13L
(the paper's normaliser), then the time per token of a sliding-window stack at N = W .. 32W for a fixed W,
which stays flat when the blockwise attention is linear in N. Writes reports/bench/model_step_time.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lrexp import config
from lrexp.config import EXPERIMENTS
from lrexp.model import build_model
from lrexp.variants import row_name
from report import write_report  # bench/ is the script's folder, so on sys.path

ROWS = sorted(p.stem for p in (EXPERIMENTS / "rows").glob("*.yaml"))
VOCAB = 2048


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_time(cfg, device: torch.device, steps: int, lanes: int, seg_len: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB).to(device).train()
    state = model.initial_state(lanes, device)
    tokens = torch.randint(0, VOCAB, (lanes, seg_len), device=device)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        _sync(device)
        started = time.perf_counter()
        logits, state = model(tokens, state)
        logits.float().square().mean().backward()
        state = state.detach()
        _sync(device)
        if i:
            times.append(time.perf_counter() - started)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row presets (slide13 is always timed)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"# Model step time ({platform.node()}, {device}, torch {torch.__version__})", ""]

    rows = {}
    for row in dict.fromkeys(["slide13", *args.rows.split(",")]):
        cfg = config.load(overrides=[f"row={row}", *args.overrides])
        rows[row] = (row_name(cfg), cfg.derived.lanes, cfg.derived.segment_len,
                     step_time(cfg, device, args.steps, cfg.derived.lanes, cfg.derived.segment_len))
    base = rows["slide13"][3]
    lines += ["| row | lanes x N | step s | vs Slide:13L |", "|---|---|---|---|"]
    for name, lanes, n, seconds in rows.values():
        lines.append(f"| {name} | {lanes} x {n} | {seconds:.4f} | {seconds / base:.2f} |")

    cfg = config.load(overrides=["row=slide12", *args.overrides])
    w = cfg.model.window
    lines += ["", f"Sliding window W = {w}, one lane: time per token vs N (flat = linear in N)", "",
              "| N | step s | us per token |", "|---|---|---|"]
    for blocks in (1, 4, 16, 32):
        seconds = step_time(cfg, device, args.steps, 1, blocks * w)
        lines.append(f"| {blocks * w} | {seconds:.4f} | {seconds / (blocks * w) * 1e6:.1f} |")

    write_report("model_step_time", lines)


if __name__ == "__main__":
    main()
