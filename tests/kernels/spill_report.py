"""Registers and spills of every attention kernel in every autotune candidate (`GPU_SHAPES`), compiled for sm_90
without a GPU: ptxas -v on Triton's PTX. Run as a script, outside any TRITON_INTERPRET process:

    python tests/kernels/spill_report.py [--head-dims 64 128] [--dtype bf16] [--json PATH]

prints a markdown table (docs/benchmark.md#registers-and-spills) and exits 1 when any candidate spills.
Every feature is on (window, bias, memory_valid, dropout): the costliest variant of each kernel.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compile_for_gpu import KERNELS, SM90, compile_kernel  # noqa: E402  (sets up the non-interpreted kernels)

from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

from lrexp.kernels.attention.kernel import GPU_SHAPES  # noqa: E402

USAGE = re.compile(r"Used (\d+) registers.*?")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str) -> dict:
    """registers, spill store and load bytes per thread, as ptxas -v reports them for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([get_ptxas(SM90.arch).path, "-v", f"--gpu-name=sm_{SM90.arch}a", str(src), "-o",
                              str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    spills = SPILLS.search(log)
    return dict(registers=int(USAGE.search(log).group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)))


def report(head_dims, dtype: str):
    rows = []
    for kernel in KERNELS:
        name = kernel.fn.__name__
        for d in head_dims:
            for block_m, block_n, warps, stages in GPU_SHAPES[name][64 if d <= 64 else 128]:
                compiled = compile_kernel(kernel, dtype, block_d=d, block_m=block_m, block_n=block_n,
                                          num_warps=warps, num_stages=stages)
                rows.append(dict(kernel=name, block_m=block_m, block_n=block_n, warps=warps, stages=stages, d=d,
                                 **ptxas_usage(compiled.asm["ptx"])))
    return rows


def markdown(rows) -> str:
    lines = ["| kernel | BLOCK_M x BLOCK_N | warps | stages | D | registers | spill stores (B) | spill loads (B) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['block_m']} x {r['block_n']} | {r['warps']} | {r['stages']} | {r['d']} | "
              f"{r['registers']} | {r['spill_stores']} | {r['spill_loads']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = report(args.head_dims, args.dtype)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return int(any(r["spill_stores"] or r["spill_loads"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
