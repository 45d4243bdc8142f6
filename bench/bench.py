"""`make bench`: what lrexp costs on this machine, measured in one run; writes reports/bench/bench.md and bench.json.

    python bench/bench.py [--repeats 7] [--max-step-s 20] [--compile-backend inductor|none] [key=value ...]
    python bench/bench.py --quick      (smoke sizes, two rows, dynamo's capture only: seconds, for the test)

(default: the tiny scale, every row, CPU threads as `lrexp train` picks them)

1. Step time of every row (experiments/rows) relative to Slide:13L, beside the paper's column (Table 1).
2. Scaling with the segment length T (1k .. 16k, one lane, the scale's width) of Full, XL (W = T), Slide and
   Rec: time per token, activation memory, and the fitted exponent of each in T.
3. Model FLOP utilisation: model FLOPs from the layer specs (lrexp.flops) per second over the rate of a dense
   square matmul timed in the same rounds.
4. Framework overhead: `lrexp train` (Lightning, TBPTT callback, metrics, MLflow) against a bare torch loop over
   the same model, batches and optimiser.
5. Data: `lrexp data prepare` MB/s on 1 and on all cores, and the loader's share of a step.
6. GPU: the attention backends (bench/attention_kernels.py) when CUDA is present; sections 1-5 then run on it.
7. torch.compile (`train.compile`): every row compiled, its step beside the eager one, its graph breaks.
8. The Memorizing row's carried kNN memory per lane.

Every timing is interleaved round-robin over repeats with what it is compared with (bench/harness.py), and
reported as the median with its min-max; ratios are per repeat. Numbers from a shared machine are noisy:
compare within one report.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# bench/ is the script's folder, so on sys.path
from harness import TrainStep, ratios, round_robin, saved_bytes, summary, sync, timed  # noqa: E402
from lrexp.config.load import load  # noqa: E402
from lrexp.runtime.cpus import usable_cpus  # noqa: E402
from lrexp.model.flops import forward_flops  # noqa: E402
from lrexp.layers.memorizing import STATE_DTYPES, MemorizingLayer  # noqa: E402
from lrexp.model.variants import layer_specs, row_name  # noqa: E402
from report import REPORTS, write_report  # noqa: E402

# Table 1's step time relative to Slide:13L (docs/models.md#paper-results-table-1); Full is not in the table.
PAPER_STEP_TIME = {
    "xl512": 0.88, "xl1024": 1.20, "xl2048": 2.11, "slide12": 0.93, "slide13": 1.00,
    "rec_lstm_dual": 1.06, "rec_lstm_single": 1.05, "rec_lstm_skip": 1.00, "rec_fixed_dual": 1.01,
    "rec_fixed_single": 1.02, "rec_fixed_skip": 0.99, "fb_lstm_single": 1.40, "fb_fixed_skip": 1.35,
    "mem64k": 1.94, "full": None,
}
ROWS = list(PAPER_STEP_TIME)
BASE = "slide13"
MATMUL = "dense matmul"
COMPILED = "compiled "
SECTIONS = ("rows", "scaling", "overhead", "data", "gpu", "knn")
SCALING = {"Full": "full", "XL": "xl512", "Slide": "slide13", "Rec": "rec_fixed_skip"}


def _ms(s: Dict[str, float]) -> str:
    return f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f})"


def _x(s: Dict[str, float]) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def machine(device: torch.device) -> Dict[str, str]:
    import lightning
    import tokenizers

    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "host": platform.node(), "cpu": cpu, "usable_cpus": str(usable_cpus()),
        "torch_threads": str(torch.get_num_threads()),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()), "device": str(device),
        "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
        "tokenizers": tokenizers.__version__, "numpy": np.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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
        lines.append(f"| {names[row]} | {row} | {steps[row].lanes} x {steps[row].seg_len} | {_ms(summary(t))} | "
                     f"{_x(data[row]['vs_base'])} | {paper} | {flops[row] / 1e9:.3f} | "
                     f"{flops[row] / summary(t)['median'] / 1e9:.1f} | {100 * mfu['median']:.1f}% "
                     f"({100 * mfu['min']:.1f}-{100 * mfu['max']:.1f}) |")
    compile_lines = ["| row | eager ms | compiled ms | compiled / eager | compile s | graphs | graph breaks |",
                     "|---|---|---|---|---|---|---|"]
    for row, c in compiled.items():
        t = seconds[COMPILED + row]
        data[row]["compiled"] = {**c, "backend": compile_backend, "step_s": summary(t),
                                 "vs_eager": ratios(t, seconds[row])}
        compile_lines.append(f"| {names[row]} | {_ms(summary(seconds[row]))} | {_ms(summary(t))} | "
                             f"{_x(data[row]['compiled']['vs_eager'])} | {c['compile_s']:.1f} | {c['graphs']} | "
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
            lines.append(f"| {label} | {t} | {_ms(p['step_s'])} | {p['step_s']['median'] / t * 1e6:.1f} | "
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


# ---- 4 and 5: Lightning against a bare loop, the loader's share ---------------------------------------


class StepClock(pl.Callback):
    """Seconds from one training batch's start to the next's: everything a step of the loop costs
    (loading, forward, backward, optimiser, callbacks, logging)."""

    def __init__(self) -> None:
        self.starts: List[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.starts.append(time.perf_counter())

    def intervals(self, warmup: int) -> List[float]:
        return list(np.diff(self.starts))[warmup:]


def bare_loop(cfg, device: torch.device, vocab: int, steps: int, warmup: int) -> Tuple[List[float], List[float]]:
    """(batch-to-batch seconds, loading seconds) of the same steps without Lightning: the data module's
    batches, the same model initialisation and optimiser, TBPTT by hand."""
    from lrexp.data_modules import StreamDataModule

    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)  # as lrexp train seeds before the model
    step = TrainStep(cfg, device, vocab=vocab, seed=cfg.train.seed)
    dm = StreamDataModule(cfg, world_size=1, rank=0)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    starts, loading = [], []
    for _ in range(steps + 1):
        sync(device)
        starts.append(time.perf_counter())
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(loader).items()}
        loading.append(time.perf_counter() - starts[-1])
        step(batch)
    return list(np.diff(starts))[warmup:], loading[warmup:steps]


def overhead_section(overrides: List[str], device: torch.device, steps: int, warmup: int,
                     workdir: Path) -> Tuple[List[str], Dict]:
    from lrexp.train import run as train
    from lrexp.data_modules import prepare

    run_overrides = [  # a 3 MB subset unless given: the final passes over the whole splits stay short
        "row=slide13", "data.max_bytes=3000000", *overrides,
        f"train.max_steps={steps + 1}", f"train.val_every={steps + 1}",
        f"train.checkpoint_dir={workdir / 'checkpoints'}", f"log.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        "log.progress_bar=false", "log.experiment=bench", f"train.accelerator={device.type}",
    ]
    cfg = load(overrides=run_overrides)
    vocab = prepare(cfg).vocab_size
    threads = torch.get_num_threads()
    bare, loading = bare_loop(cfg, device, vocab, steps, warmup)  # before and after: the drift shows as range
    clock = StepClock()
    train.run(load(overrides=[*run_overrides, f"train.threads={threads}"]), callbacks=[clock])
    torch.set_num_threads(threads)
    bare2, loading2 = bare_loop(cfg, device, vocab, steps, warmup)
    lit = clock.intervals(warmup)[:steps - warmup]
    bare_all, loading_all = bare + bare2, loading + loading2
    b, l_ = summary(bare_all), summary(lit)
    data = {"row": row_name(cfg), "tokens_per_step": cfg.data.tokens_per_step, "steps_timed": len(lit),
            "lrexp_train_step_s": l_, "bare_step_s": b,
            "overhead": l_["median"] / b["median"] - 1,
            "lrexp_train_tokens_per_s": cfg.data.tokens_per_step / l_["median"],
            "bare_tokens_per_s": cfg.data.tokens_per_step / b["median"],
            "loader_s": summary(loading_all), "loader_share": summary(loading_all)["median"] / b["median"]}
    lines = [
        f"{row_name(cfg)} at {cfg.derived.lanes_per_rank} lanes x N {cfg.derived.segment_len}, {steps} steps after "
        f"{warmup} left out; bare loop before and after `lrexp train` (pooled), batch start to batch start:", "",
        "| loop | step ms | tokens/s |", "|---|---|---|",
        f"| lrexp train (Lightning, TBPTT, metrics, MLflow) | {_ms(l_)} | {data['lrexp_train_tokens_per_s']:,.0f} |",
        f"| bare torch loop | {_ms(b)} | {data['bare_tokens_per_s']:,.0f} |", "",
        f"Overhead of lrexp train: {100 * data['overhead']:+.1f}% (median against median; goal at most +5%).", "",
    ]
    return lines, data


def data_section(overrides: List[str], repeats: int, loader: Optional[Dict]) -> Tuple[List[str], Dict]:
    """A cold `prepare` of the corpus into an empty cache with 1 worker and with every usable CPU, alternated;
    the tokenizer is the cached one's (data.tokenizer_file), so both time listing, reading, encoding and writing."""
    from lrexp.data_modules import prepare
    from lrexp.data_modules.tokenizer import BPE_FILE

    cfg = load(overrides=overrides)
    cached = prepare(cfg)
    tokenizer = cached.dir / BPE_FILE
    extra = [f"data.tokenizer_file={tokenizer}"] if tokenizer.is_file() else []
    counts = sorted({1, usable_cpus()})
    seconds: Dict[int, List[float]] = {n: [] for n in counts}
    megabytes = cached.meta["bytes"] / 1e6
    for _ in range(repeats):
        for n in counts:
            with tempfile.TemporaryDirectory() as tmp:
                cold = load(overrides=[*overrides, *extra, f"data.cache_dir={tmp}", f"data.prepare_workers={n}"])
                started = time.perf_counter()
                prepare(cold)
                seconds[n].append(time.perf_counter() - started)
    data = {"corpus": cfg.data.corpus, "megabytes": megabytes, "documents": cached.meta["documents"],
            "tokens": cached.meta["tokens"],
            "prepare": {str(n): {"seconds": summary(s), "mb_per_s": megabytes / summary(s)["median"]}
                        for n, s in seconds.items()},
            "loader_ms": loader and {k: v * 1e3 for k, v in loader["loader_s"].items()},
            "loader_share": loader and loader["loader_share"]}
    lines = [f"Cold `lrexp data prepare` of {cfg.data.corpus} ({megabytes:.1f} MB, {data['documents']} documents, "
             f"{data['tokens']:,} tokens{'; the cached tokenizer, so no BPE training' if extra else ''}), "
             f"{repeats} alternated runs:", "",
             "| workers | seconds | MB/s |", "|---|---|---|"]
    for n in counts:
        d = data["prepare"][str(n)]
        lines.append(f"| {n} | {d['seconds']['median']:.2f} ({d['seconds']['min']:.2f}-{d['seconds']['max']:.2f}) | "
                     f"{d['mb_per_s']:.2f} |")
    lines += ["", f"Loader: {_ms(loader['loader_s'])} ms per batch (num_workers=0, in the bare loop of section 4), "
              f"{100 * loader['loader_share']:.2f}% of a step." if loader else "Loader: section 4 left out.", ""]
    return lines, data


# ---- 7: kNN memory -----------------------------------------------------------------------------------


def memory_bytes_per_lane(overrides: List[str]) -> int:
    """Bytes of one lane's kNN memories (every memory layer), counted on the meta device."""
    cfg = load(overrides=["row=mem64k", *overrides])
    total = 0
    for spec in layer_specs(cfg):
        if spec.kind != "memorizing":
            continue
        with torch.device("meta"):  # sizes only: nothing allocated
            state = MemorizingLayer(spec, cfg, cfg.model.attn.backend).initial_state(1, "meta")
        total += sum(getattr(state, f).numel() * getattr(state, f).element_size()
                     for f in ("memory_k", "memory_v", "pointer", "count"))
    return total


def knn_section(overrides: List[str], scale: str) -> Tuple[List[str], Dict]:
    lines = ["| scale | state_dtype | MiB per lane | MiB for all lanes of a device |", "|---|---|---|---|"]
    data = {}
    for name in dict.fromkeys([scale, "paper"]):
        lanes = load(overrides=[f"scale={name}", "row=mem64k"]).derived.lanes_per_rank
        for dtype in STATE_DTYPES:
            per_lane = memory_bytes_per_lane([f"scale={name}", f"model.knn.state_dtype={dtype}"]
                                             + ([o for o in overrides if not o.startswith("scale=")]
                                                if name == scale else []))
            data[f"{name}/{dtype}"] = per_lane
            lines.append(f"| {name} | {dtype} | {per_lane / 2 ** 20:.2f} | {lanes * per_lane / 2 ** 20:.1f} |")
    return lines, data


# ---- main --------------------------------------------------------------------------------------------


def _memory_budget() -> int:
    """Half the memory available now (Linux), else 8 GiB."""
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemAvailable"))
        return kib * 1024 // 2
    except (OSError, StopIteration):
        return 8 * 2**30


def _timed_section(report: Dict, key: str, fn, *args):
    """fn(*args) -> (lines, data); the data goes to report[key], its wall time to report["section_seconds"]."""
    started = time.perf_counter()
    lines, report[key] = fn(*args)
    report.setdefault("section_seconds", {})[key] = round(time.perf_counter() - started, 1)
    return lines


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, one repeat each: checks the report")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of the row and scaling timings")
    parser.add_argument("--max-step-s", type=float, default=20.0, help="scaling: longest step a stack may take")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated row presets ({BASE} is always timed)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of section 7 ('none': leave it out; --quick: eager, dynamo only)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated: rows (1, 3 and 7), scaling, overhead, data, gpu, knn")
    parser.add_argument("--out", type=Path, default=REPORTS, help="folder of bench.md and bench.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:  # a small synthetic corpus (no BPE to train, final passes of a few batches), two blocks
        overrides = ["scale=smoke", "model.blocks_per_segment=2", "data.corpus=passkey", "data.tokenizer=bytes",
                     "data.probe.num_docs=96", *args.overrides]
        repeats, lengths, matmul_n, steps, warmup, data_repeats = 2, [64, 128], 128, 4, 1, 1
        if args.compile_backend == parser.get_default("compile_backend"):  # the capture, without code generation
            args.compile_backend = "eager"
        if args.rows == parser.get_default("rows"):  # two kinds of stack: the report's shape, in seconds
            args.rows = "slide13,rec_fixed_skip"
    else:
        overrides = list(args.overrides)
        repeats, lengths, matmul_n, steps, warmup, data_repeats = (args.repeats, [1024, 2048, 4096, 8192, 16384],
                                                                   1024, 40, 10, 2)
    cfg = load(overrides=overrides)
    scale = cfg.scale.name
    from lrexp.train.run import cpu_threads

    torch.set_num_threads(cpu_threads(cfg))  # as `lrexp train` would (a thread more than the free cores costs)
    command = " ".join(["python bench/bench.py", *argv])
    info = machine(device)
    report: Dict = {"machine": info, "command": command, "scale": scale}
    lines = ["# lrexp benchmark", "",
             f"`{command}` on {info['host']}: {info['cpu']}, {info['usable_cpus']} usable CPUs, "
             f"{info['torch_threads']} torch threads, device {info['device']}"
             f"{', ' + info['gpu'] if 'gpu' in info else ''}; "
             f"load average {info['load_average']} at the start; Python {info['python']}, torch {info['torch']}, "
             f"Lightning {info['lightning']}, tokenizers {info['tokenizers']}; {info['date']}. Scale `{scale}`.",
             "", "Medians over interleaved repeats, (min-max) beside them; ratios are taken within a repeat.", ""]

    args.compile_backend = None if args.compile_backend == "none" else args.compile_backend
    sections = args.sections.split(",")
    if set(sections) - set(SECTIONS):
        parser.error(f"unknown section(s) {', '.join(set(sections) - set(SECTIONS))}; available: {', '.join(SECTIONS)}")
    rows = list(dict.fromkeys([BASE, *args.rows.split(",")]))
    unknown = [r for r in rows if r not in PAPER_STEP_TIME]
    if unknown:
        parser.error(f"unknown row preset(s) {', '.join(unknown)}; available: {', '.join(ROWS)}")
    clock = time.perf_counter()
    left_out = "Left out (--sections)."
    compile_lines: List[str] = []
    lines.append(f"## 1. Step time of every row ({repeats} round-robin repeats)\n")
    if "rows" in sections:
        section = _timed_section(report, "rows", rows_section, rows, overrides, device, repeats, matmul_n,
                                 args.compile_backend)
        compile_lines = report["rows"].pop("compile_lines")
        lines += ["One optimiser step (forward, loss, backward, optimiser) of every lane's segment at this scale; "
                  "`paper` is Table 1's step time relative to Slide:13L. The last three columns are section 3's.",
                  "", *section, ""]
    else:
        lines += [left_out, ""]

    lines.append(f"## 2. Scaling with the segment length T (one lane, {scale} width)\n")
    if "scaling" in sections:
        section = _timed_section(report, "scaling", scaling_section, overrides, device, lengths,
                                 max(2, repeats // 2), args.max_step_s, _memory_budget())
        lines += ["XL's window grows with T (XL:W reads N = W); Slide and Rec keep the scale's window. `saved for "
                  "backward` is the activation memory autograd holds for the step (CPU allocators keep no peak).",
                  "", *section]
    else:
        lines += [left_out, ""]

    lines.append("## 3. Model FLOP utilisation\n")
    if "rows" in sections:
        matmul = report["rows"]["matmul"]["flop_per_s"]
        lines += [f"Model FLOPs per step from the layer specs (`lrexp.flops`: matmuls and in-band attention, backward "
                  f"2x forward) over the rate of a dense {matmul_n}^3 matmul timed in the same rounds as section 1: "
                  f"{matmul['median'] / 1e9:.1f} GFLOP/s ({matmul['min'] / 1e9:.1f}-{matmul['max'] / 1e9:.1f}). "
                  "Section 1's MFU column is that ratio per repeat (goal at bench scale on a CPU: at least 40%).", ""]
    else:
        lines += [left_out, ""]

    lines.append("## 4. Framework overhead\n")
    if "overhead" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            lines += _timed_section(report, "overhead", overhead_section, overrides, device, steps, warmup, Path(tmp))
    else:
        lines += [left_out, ""]

    lines.append("## 5. Data\n")
    if "data" in sections:
        lines += _timed_section(report, "data", data_section, overrides, data_repeats, report.get("overhead"))
    else:
        lines += [left_out, ""]

    lines.append("## 6. GPU\n")
    if device.type != "cuda":
        report["gpu"] = {"skipped": "no CUDA device"}
        lines += ["Skipped: no CUDA device on this machine (the other sections ran on the CPU).", ""]
    elif "gpu" in sections:
        import attention_kernels

        kernel_lines = attention_kernels.main(["--steps", "3" if args.quick else "10"])
        report["gpu"] = {"attention_kernels": kernel_lines}
        lines += ["The other sections ran on the GPU. Attention backends, forward + backward:", "",
                  *kernel_lines[2:], ""]
    else:
        lines += [left_out, ""]

    lines.append("## 7. torch.compile (`train.compile`)\n")
    if compile_lines:
        lines += [f"Every row compiled with the `{args.compile_backend}` backend, timed in section 1's rounds "
                  "beside its eager step; compile s is the first step's time; graphs and graph breaks are dynamo's "
                  "counts for that step (the model's input checks stay eager, outside the graph).", "",
                  *compile_lines, ""]
    else:
        lines += ["Left out (--compile-backend none, or --sections without rows).", ""]

    lines.append("## 8. kNN memory per lane (Memorizing row)\n")
    if "knn" in sections:
        lines += [*_timed_section(report, "knn_memory_bytes_per_lane", knn_section, overrides, scale), ""]
    else:
        lines += [left_out, ""]

    report["seconds"] = round(time.perf_counter() - clock, 1)
    lines.append(f"The benchmark took {report['seconds']:.0f} s (by section: " +
                 ", ".join(f"{k} {v:.0f} s" for k, v in report["section_seconds"].items()) + ").")
    write_report("bench", lines, report, args.out)
    return report


if __name__ == "__main__":
    main()
