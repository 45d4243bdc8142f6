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
9. A profile of one step per row (bench/step_profile.py): time by operator family, the overhead outside them.
10. `lrexp eval`: decode tokens/s per cache policy and mode beside the native forward (bench/eval_speed.py).
11. Registers and spills of the Triton kernels compiled for sm_90 (tests/kernels/spill_report.py), where triton
    imports (not with --quick).

Every timing is interleaved round-robin over repeats with what it is compared with (bench/harness.py), and
reported as the median with its min-max; ratios are per repeat. Numbers from a shared machine are noisy:
compare within one report.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# bench/ is the script's folder, so on sys.path
from harness import CLOCKS, use_clock  # noqa: E402
from lrexp.config.load import load  # noqa: E402
from lrexp.runtime.cpus import usable_cpus  # noqa: E402
from lrexp.runtime.heap import keep_freed_memory  # noqa: E402
from lrexp.train.run import cpu_threads  # noqa: E402
from pipeline import data_section, knn_section, overhead_section  # noqa: E402
from report import REPORTS, write_report  # noqa: E402
from rows import BASE, PAPER_STEP_TIME, ROWS, rows_section, scaling_section  # noqa: E402
from step_profile import profile_section  # noqa: E402

SECTIONS = ("rows", "scaling", "overhead", "data", "gpu", "knn", "profile", "eval", "spills")


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
                        help="comma-separated: rows (1, 3 and 7), scaling, overhead, data, gpu, knn, profile (9)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="what sections 1 to 3 time: wall seconds, or this process's CPU seconds (a CPU shared "
                        "with other work: the time a step waits for a core left out; the CPU only)")
    parser.add_argument("--out", type=Path, default=REPORTS, help="folder of bench.md and bench.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.clock == "process" and device.type == "cuda":
        parser.error("--clock process counts CPU seconds: a GPU's step time is wall time")
    use_clock(args.clock)
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
    torch.set_num_threads(cpu_threads(cfg))  # as `lrexp train` would (a thread more than the free cores costs)
    kept = cfg.train.keep_freed_memory and device.type == "cpu" and keep_freed_memory()  # as `lrexp train` does
    command = " ".join(["python bench/bench.py", *argv])
    info = machine(device)
    report: Dict = {"machine": info, "command": command, "scale": scale, "keep_freed_memory": bool(kept)}
    lines = ["# lrexp benchmark", "",
             f"`{command}` on {info['host']}: {info['cpu']}, {info['usable_cpus']} usable CPUs, "
             f"{info['torch_threads']} torch threads, device {info['device']}"
             f"{', ' + info['gpu'] if 'gpu' in info else ''}; "
             f"load average {info['load_average']} at the start; Python {info['python']}, torch {info['torch']}, "
             f"Lightning {info['lightning']}, tokenizers {info['tokenizers']}; {info['date']}. Scale `{scale}`.",
             "", "Medians over interleaved repeats, (min-max) beside them; ratios are taken within a repeat."
             + (" Times are this process's CPU seconds (`--clock process`), the matmul's too." if args.clock == "process"
                else "")
             + (" The C heap keeps freed blocks (`train.keep_freed_memory`)." if kept else ""), ""]

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

    lines.append("## 9. Profile of one step\n")
    if "profile" in sections:
        lines += ["One step of every row under torch.profiler (bench/step_profile.py): each operator family's "
                  "self time as a share of the step's wall time, and the overhead outside the operators (Python, "
                  "autograd, dispatch); `aten calls` counts the operators the step launched. The profiler adds to "
                  "the wall time: read the shares, not the milliseconds.", "",
                  *_timed_section(report, "profile", profile_section, rows, overrides, device), ""]
    else:
        lines += [left_out, ""]
    lines.append("## 10. lrexp eval: decode speed per cache policy (Full row, random weights)\n")
    if "eval" in sections:
        from eval_speed import eval_section  # bench/ is on sys.path (the script's folder)

        lines += [*_timed_section(report, "eval", eval_section, args.quick), ""]
    else:
        lines += [left_out, ""]
    lines.append("## 11. Triton registers and spills (sm_90)\n")
    if "spills" not in sections or importlib.util.find_spec("triton") is None or args.quick:
        lines += ["Left out (not among --sections, no triton here, or --quick: compiling every candidate takes minutes).", ""]
    else:  # compiled for sm_90 by ptxas, no GPU needed (docs/benchmark.md#registers-and-spills)
        spills = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tests/kernels/spill_report.py")],
                                capture_output=True, text=True)
        table = [line for line in spills.stdout.splitlines() if line.startswith("|")]
        report["spills"] = {"spilling": bool(spills.returncode), "table": table}
        lines += [*(table or spills.stderr.strip().splitlines()[-3:]), ""]

    report["seconds"] = round(time.perf_counter() - clock, 1)
    lines.append(f"The benchmark took {report['seconds']:.0f} s (by section: " +
                 ", ".join(f"{k} {v:.0f} s" for k, v in report["section_seconds"].items()) + ").")
    write_report("bench", lines, report, args.out)
    return report


if __name__ == "__main__":
    main()
