"""One prepared GPU check (docs/benchmark.md#gpu-check): `make gpu-check [DRY=1]`.

    python scripts/gpu_check.py [--out DIR]        a CUDA device: writes docs/results/gpu/<device>/ (README.md,
                                                   results.json)
    python scripts/gpu_check.py --dry [--out DIR]  the CPU: every part at tiny size (interpreter, smoke scale)

Parts, each with its own time budget so the whole fits one call of 8 minutes on one GPU (`BUDGET_S`):
1. tests: the `gpu`-marked tests (collected only in --dry: they need CUDA);
2. kernels: bench/attention_kernels.py (T = 4k and 16k, W = 512, bf16, forward + backward; --smoke in --dry);
3. rows: every row's training step at the small scale over 20 steps: step time, tokens/s, peak memory after the
   warm-up, MFU against the device's dense bf16 peak (`PEAK_BF16`, else a timed bf16 matmul);
4. train: Rec:fixed:skip trained through `lrexp train` for three minutes, the loss every 20 steps; it must fall;
5. eval: `lrexp eval` with the TOVA policy, its tokens/s, on a checkpoint of a few steps of Slide:13L (cache
   policies apply to plain KV caches, not to Rec's state).
Without CUDA (and without --dry) it refuses in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DRY = "--dry" in sys.argv
if DRY:  # before any kernel is defined (docs/design.md#triton-without-a-gpu)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from harness import TrainStep, sync  # noqa: E402  bench/ holds the step harness

from lrexp.config.load import load  # noqa: E402
from lrexp.config.paths import EXPERIMENTS  # noqa: E402
from lrexp.model.flops import forward_flops  # noqa: E402
from lrexp.train import run as train_run  # noqa: E402
from lrexp.train.auto import resolve_auto  # noqa: E402

ROWS = sorted(p.stem for p in (EXPERIMENTS / "rows").glob("*.yaml"))
# seconds per part: 510 of the 480 + 60 a call may take, the rest for start-up, compiles and writing
BUDGET_S = {"tests": 110, "kernels": 90, "rows": 90, "train": 180, "eval": 60}
DRY_BUDGET_S = {"tests": 120, "kernels": 120, "rows": 60, "train": 20, "eval": 90}
# dense bf16 tensor-core peak (no sparsity) by device name, FLOP/s
PEAK_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 PCIe": 756e12, "H100": 989.4e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12}
PARTS = ["tests", "kernels", "rows", "train", "eval"]
TRAIN_ROW = "rec_fixed_skip"
LOSS_EVERY = 1 if DRY else 20  # optimiser steps between the losses recorded (a few steps in all with --dry)
EVAL_ROW, EVAL_TRAIN_STEPS = "slide13", 5
TOVA_BUDGET = 32 if DRY else 512  # rows each layer's cache keeps: 2 windows at the small scale
TIMED_STEPS = 20


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_flops(device: torch.device) -> tuple:
    """(FLOP/s, where it comes from): the table's dense bf16 peak, else a timed matmul of the compute dtype."""
    name = device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, f"{key} dense bf16 peak"
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    sync(device)
    return 5 * 2 * n ** 3 / (time.perf_counter() - start), f"timed {n}^3 {dtype} matmul"


def part_tests(budget: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    if DRY:
        cmd.append("--collect-only")
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"stopped at the {budget:.0f} s budget"}
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-300:]
    failed = [line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"ok": run.returncode == 0, "summary": summary, "failed": failed}


def part_kernels(budget: float) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "attention_kernels.py"), *(["--smoke"] if DRY else [])]
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"ok": False, "lines": [f"stopped at the {budget:.0f} s budget"]}
    if run.returncode:
        return {"ok": False, "lines": run.stderr.strip().splitlines()[-5:]}
    table = Path(ROOT / "reports" / "bench" / "attention_kernels.md")
    text = run.stdout if DRY or not table.is_file() else table.read_text()
    return {"ok": True, "lines": [line for line in text.splitlines() if line.startswith(("|", "#"))]}


def _overrides() -> list:
    return ["scale=smoke"] if DRY else ["scale=small"]


def part_rows(budget: float, device: torch.device) -> dict:
    """Each row's step at the run's precision: 3 warm-up steps, then TIMED_STEPS timed (fewer in --dry)."""
    peak, peak_source = peak_flops(device)
    warmup, steps = (1, 2) if DRY else (3, TIMED_STEPS)
    start, rows = time.monotonic(), {}
    for row in ROWS:
        if time.monotonic() - start > budget:
            rows[row] = {"skipped": "budget spent"}
            continue
        cfg = resolve_auto(load(overrides=[*_overrides(), f"row={row}", "train.accelerator=auto"]))
        step = TrainStep(cfg, device)
        dtype = torch.bfloat16 if cfg.train.precision.startswith("bf16") else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for _ in range(warmup):
                step()
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
        seconds = (time.perf_counter() - t0) / steps
        flops = forward_flops(step.model, step.lanes, step.seg_len).train_step
        rows[row] = {"backend": cfg.model.attn.backend, "precision": cfg.train.precision, "lanes": step.lanes,
                     "segment_len": step.seg_len, "step_s": seconds, "tokens_per_s": step.tokens / seconds,
                     "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                     "mfu": flops / seconds / peak}
        del step
    return {"peak_flops": peak, "peak_source": peak_source, "rows": rows}


class _LossAndTime(pl.Callback):
    """The training loss every LOSS_EVERY optimiser steps, and a stop once the budget is spent."""

    def __init__(self, budget: float) -> None:
        self.budget, self.start, self.losses = budget, time.monotonic(), []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if trainer.global_step % LOSS_EVERY == 0 and loss is not None:
            self.losses.append((trainer.global_step, float(loss)))
        if time.monotonic() - self.start > self.budget:
            trainer.should_stop = True


def _train(row: str, budget: float, work: Path, max_steps: int = 1_000_000) -> tuple:
    """`lrexp train` of the row until the budget or max_steps: (its result, the losses every LOSS_EVERY steps)."""
    overrides = [*_overrides(), f"row={row}", f"train.max_steps={max_steps}", "train.val_every=1000000",
                 f"log.tracking_uri=sqlite:///{work / 'mlflow.db'}", "log.experiment=gpu-check",
                 f"train.checkpoint_dir={work / 'ckpt'}", "log.progress_bar=false"]
    if DRY:  # the smoke corpus of the tests' kind: a few small documents, bytes
        corpus = work / "corpus"
        corpus.mkdir(exist_ok=True)
        for i in range(12):
            (corpus / f"doc{i:02d}.txt").write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * (8 + i)))
        overrides += [f"data.corpus={corpus}", "data.tokenizer=bytes", "data.val_fraction=0.2",
                      "data.test_fraction=0.2", f"data.cache_dir={work / 'data'}", "train.val_tokens=256"]
    watch = _LossAndTime(budget)
    return train_run.run(load(overrides=overrides), callbacks=[watch]), watch.losses


def part_train(budget: float, work: Path) -> dict:
    result, losses = _train(TRAIN_ROW, budget, work)
    fell = len(losses) >= 2 and losses[-1][1] < losses[0][1]
    return {"ok": fell or DRY, "losses": losses, "fell": fell, "steps": result.get("final/steps"),
            "tokens_seen": result.get("final/tokens_seen")}


def part_eval(budget: float, work: Path) -> dict:
    """TOVA applies to plain KV caches only: a few steps of Slide:13L give the checkpoint it evaluates."""
    start = time.monotonic()
    result, _ = _train(EVAL_ROW, budget / 3, work, max_steps=EVAL_TRAIN_STEPS)
    cmd = [sys.executable, "-m", "lrexp.cli", "eval", result["checkpoint"], "--policy", "tova", "--split",
           "validation", "--budget", str(TOVA_BUDGET), "--out", str(work / "eval")]
    budget = max(budget - (time.monotonic() - start), 10.0)
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"stopped at the {budget:.0f} s budget"}
    rates = re.findall(r"([\d,]+) tokens/s", run.stdout)
    return {"ok": run.returncode == 0 and bool(rates), "tokens_per_s": [float(r.replace(",", "")) for r in rates],
            "summary": (run.stdout + run.stderr).strip().splitlines()[-3:]}


def readme(results: dict) -> str:
    r = {name: {} for name in PARTS}
    r.update(results)
    lines = [f"# GPU check: {r['device']}", "", f"`make gpu-check` (scripts/gpu_check.py), torch {r['torch']}, "
             f"{r['seconds']:.0f} s in all.", "", "## gpu-marked tests", "", f"{r['tests'].get('summary')}", ""]
    lines += ["## Attention kernels", "", *r["kernels"].get("lines", []), ""]
    rows = r["rows"] or {"peak_source": "-", "peak_flops": 0.0, "rows": {}}
    lines += ["## Rows at the small scale", "", f"MFU against {rows['peak_source']} "
              f"({rows['peak_flops'] / 1e12:.0f} TFLOP/s).", "",
              "| row | backend | precision | step ms | tokens/s | peak MiB | MFU |", "|---|---|---|---|---|---|---|"]
    for row, v in rows["rows"].items():
        if "skipped" in v:
            lines.append(f"| {row} | {v['skipped']} | | | | | |")
            continue
        peak = "-" if v["peak_mib"] is None else f"{v['peak_mib']:.0f}"
        lines.append(f"| {row} | {v['backend']} | {v['precision']} | {v['step_s'] * 1e3:.1f} | "
                     f"{v['tokens_per_s']:,.0f} | {peak} | {100 * v['mfu']:.1f}% |")
    t = r["train"]
    lines += ["", f"## Training {TRAIN_ROW}", "", f"{t.get('steps')} steps; loss every {LOSS_EVERY} steps: "
              + ", ".join(f"{step}: {loss:.3f}" for step, loss in t.get("losses", [])), ""]
    lines += ["## lrexp eval, TOVA", "", f"tokens/s: {r['eval'].get('tokens_per_s')}", "",
              *[f"    {line}" for line in r["eval"].get("summary", [])], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="run every part at tiny size on the CPU")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="a subset of the parts")
    parser.add_argument("--out", type=Path, help="folder written (default docs/results/gpu/<device>/, or a "
                                                 "temporary one with --dry)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("gpu-check needs a CUDA device and this machine has none; `make gpu-check DRY=1` runs it on the CPU")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    budget = DRY_BUDGET_S if args.dry else BUDGET_S
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = args.out or (work / "out" if args.dry else ROOT / "docs" / "results" / "gpu" /
                           re.sub(r"[^A-Za-z0-9._-]+", "-", device_name()).strip("-"))
        results = {"device": device_name(), "torch": torch.__version__, "dry": args.dry}
        parts = {"tests": part_tests, "kernels": part_kernels, "rows": lambda b: part_rows(b, device),
                 "train": lambda b: part_train(b, work), "eval": lambda b: part_eval(b, work)}
        for name in args.parts:
            part = parts[name]
            t0 = time.monotonic()
            results[name] = part(budget[name])
            print(f"gpu-check {name}: {time.monotonic() - t0:.0f} s", flush=True)
        results["seconds"] = time.monotonic() - start
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "README.md").write_text(readme(results))
        print(readme(results))
    ok = all(results[name].get("ok", True) for name in args.parts if name != "rows")
    print(f"gpu-check: {'passed' if ok else 'FAILED'} in {results['seconds']:.0f} s, written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
