"""Sections 1-3 and 7 of `make bench`: every row's step time against Slide:13L and the paper, the scaling of
the step with the segment length T, model FLOP utilisation, and torch.compile per row."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from harness import TrainStep, ratios, round_robin, saved_bytes, summary, timed
from lrexp.config.load import load
from lrexp.model.flops import forward_flops
from lrexp.model.variants import row_name
from lrexp.tracking.names import REFERENCE_ROW
from report import ms, x

# Table 1's step time relative to Slide:13L (docs/models.md#paper-results-table-1); Full is not in the table.
PAPER_STEP_TIME = {
    "xl512": 0.88, "xl1024": 1.20, "xl2048": 2.11, "slide12": 0.93, "slide13": 1.00,
    "rec_lstm_dual": 1.06, "rec_lstm_single": 1.05, "rec_lstm_skip": 1.00, "rec_fixed_dual": 1.01,
    "rec_fixed_single": 1.02, "rec_fixed_skip": 0.99, "fb_lstm_single": 1.40, "fb_fixed_skip": 1.35,
    "mem64k": 1.94, "full": None,
}
ROWS = list(PAPER_STEP_TIME)
BASE = REFERENCE_ROW  # the row every step time is divided by
MATMUL = "dense matmul"
COMPILED = "compiled "
SCALING = {"Full": "full", "XL": "xl512", "Slide": "slide13", "Rec": "rec_fixed_skip"}


def _matmul(n: int, device: torch.device):
    """A dense n x n matmul and its FLOPs: the attainable matmul rate, in fp32 as the timed models run."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    return (lambda: a @ b), 2 * n ** 3


# ---- 1 and 3: rows and MFU ---------------------------------------------------------------------------


def _compiled(step: TrainStep, device: torch.device) -> Dict[str, float]:
    """Compile seconds (the first step), graphs and graph breaks of a compiled step's model, from dynamo's
    counters around its first call."""
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    seconds = timed(step, device)
    return {"compile_s": seconds, "graphs": counters["stats"]["unique_graphs"] - graphs,
            "graph_breaks": sum(counters["graph_break"].values()) - breaks}


def rows_section(rows: List[str], overrides: List[str], device: torch.device, repeats: int, matmul_n: int,
                 compile_backend: Optional[str]) -> Tuple[List[str], Dict]:
    """Sections 1 and 3, and 7 with a compile backend: every row eager (and compiled), interleaved with the
    dense matmul."""
    steps, names, flops, compiled = {}, {}, {}, {}
    if compile_backend:  # one process compiles every row: each is a cache entry of the same code
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(rows))
    for row in rows:
        cfg = load(overrides=[f"row={row}", *overrides])
        steps[row] = TrainStep(cfg, device)
        names[row] = row_name(cfg)
        flops[row] = forward_flops(steps[row].model, steps[row].lanes, steps[row].seg_len).train_step
        if compile_backend:
            steps[COMPILED + row] = TrainStep(cfg, device, compile=compile_backend)
            compiled[row] = _compiled(steps[COMPILED + row], device)
    matmul, matmul_flops = _matmul(matmul_n, device)
    seconds = round_robin({**steps, MATMUL: matmul}, repeats, device)
    rate = [matmul_flops / s for s in seconds[MATMUL]]  # FLOP/s per repeat
    data, lines = {}, [
        "| row | preset | lanes x N | step ms | vs Slide:13L | paper | model GFLOP/step | GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = seconds[row]
        mfu = summary([flops[row] / s / r for s, r in zip(t, rate)])
        data[row] = {"row": names[row], "lanes": steps[row].lanes, "segment_len": steps[row].seg_len,
                     "step_s": summary(t), "vs_base": ratios(t, seconds[BASE]), "paper": PAPER_STEP_TIME[row],
                     "train_flops": flops[row], "mfu": mfu}
        paper = "-" if PAPER_STEP_TIME[row] is None else f"{PAPER_STEP_TIME[row]:.2f}"
        lines.append(f"| {names[row]} | {row} | {steps[row].lanes} x {steps[row].seg_len} | {ms(summary(t))} | "
                     f"{x(data[row]['vs_base'])} | {paper} | {flops[row] / 1e9:.3f} | "
                     f"{flops[row] / summary(t)['median'] / 1e9:.1f} | {100 * mfu['median']:.1f}% "
                     f"({100 * mfu['min']:.1f}-{100 * mfu['max']:.1f}) |")
    compile_lines = ["| row | eager ms | compiled ms | compiled / eager | compile s | graphs | graph breaks |",
                     "|---|---|---|---|---|---|---|"]
    for row, c in compiled.items():
        t = seconds[COMPILED + row]
        data[row]["compiled"] = {**c, "backend": compile_backend, "step_s": summary(t),
                                 "vs_eager": ratios(t, seconds[row])}
        compile_lines.append(f"| {names[row]} | {ms(summary(seconds[row]))} | {ms(summary(t))} | "
                             f"{x(data[row]['compiled']['vs_eager'])} | {c['compile_s']:.1f} | {c['graphs']} | "
                             f"{c['graph_breaks']} |")
    return lines, {"rows": data, "matmul": {"n": matmul_n, "flop_per_s": summary(rate)},
                   "compile_lines": compile_lines if compiled else []}


# ---- 2: scaling with T -------------------------------------------------------------------------------


def _exponent(ts: List[int], values: List[float]) -> Optional[float]:
    return float(np.polyfit(np.log(ts), np.log(values), 1)[0]) if len(ts) >= 2 else None


def scaling_section(overrides: List[str], device: torch.device, lengths: List[int], repeats: int,
                    max_step_s: float, memory_budget: int) -> Tuple[List[str], Dict]:
    """One lane of T tokens per step for each stack, the stacks interleaved at each T; a stack stops where its
    next step would take longer than max_step_s or save more than memory_budget bytes, extrapolated from its
    last two points (a quadratic growth assumed after the first)."""
    results: Dict[str, Dict[int, Dict]] = {label: {} for label in SCALING}
    stopped: Dict[str, str] = {}
    for t in lengths:
        steps = {}
        for label, row in SCALING.items():
            if label in stopped:
                continue
            extra = [f"model.window={t}"] if label == "XL" else []  # XL:W reads segments of its window
            cfg = load(overrides=[f"row={row}", *overrides, f"model.segment_len={t}",
                                  f"data.tokens_per_step={t}", *extra])
            steps[label] = TrainStep(cfg, device, lanes=1, seg_len=t)
        seconds = round_robin(steps, repeats, device)
        for label, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            saved = saved_bytes(step)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            results[label][t] = {"step_s": summary(seconds[label]), "saved_bytes": saved, "peak_bytes": peak}
            done = sorted(results[label])
            growth = 4.0  # T doubles: quadratic until two points tell
            if len(done) >= 2:
                a, b = results[label][done[-2]], results[label][done[-1]]
                growth = max(b["step_s"]["median"] / a["step_s"]["median"], b["saved_bytes"] / a["saved_bytes"], 1.0)
            next_s, next_bytes = results[label][t]["step_s"]["median"] * growth, saved * growth
            if next_s > max_step_s or next_bytes > memory_budget:
                stopped[label] = (f"stopped after T = {t}: the next step is projected at {next_s:.0f} s and "
                                  f"{next_bytes / 2**30:.1f} GiB saved (limits {max_step_s:.0f} s, "
                                  f"{memory_budget / 2**30:.1f} GiB)")
        del steps
    lines = ["| stack | T | step ms | us per token | saved for backward MiB |" +
             (" peak MiB |" if device.type == "cuda" else ""),
             "|---|---|---|---|---|" + ("---|" if device.type == "cuda" else "")]
    data = {}
    for label, points in results.items():
        ts = sorted(points)
        for t in ts:
            p = points[t]
            peak = f" {p['peak_bytes'] / 2**20:.0f} |" if device.type == "cuda" else ""
            lines.append(f"| {label} | {t} | {ms(p['step_s'])} | {p['step_s']['median'] / t * 1e6:.1f} | "
                         f"{p['saved_bytes'] / 2**20:.1f} |{peak}")
        data[label] = {
            "row": SCALING[label], "points": {str(t): points[t] for t in ts},
            "time_exponent": _exponent(ts, [points[t]["step_s"]["median"] for t in ts]),
            "memory_exponent": _exponent(ts, [points[t]["saved_bytes"] for t in ts]),
            "stopped": stopped.get(label),
        }
    lines += ["", "Fitted exponent of the step time and of the saved memory in T (1: linear, 2: quadratic):", "",
              "| stack | time exponent | memory exponent | longest T |", "|---|---|---|---|"]
    for label, d in data.items():
        fmt = (lambda e: "-" if e is None else f"{e:.2f}")
        lines.append(f"| {label} | {fmt(d['time_exponent'])} | {fmt(d['memory_exponent'])} | "
                     f"{max(results[label]) if results[label] else '-'} |")
    lines += [""] + [f"- {label}: {why}" for label, why in stopped.items()]
    return lines, data
