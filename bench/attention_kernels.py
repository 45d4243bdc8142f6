"""Attention kernel benchmark: the Triton sliding-window kernel against the other ways to run the same window.

    python bench/attention_kernels.py [--steps 10] [--lanes 8]   (a GPU: bf16, T in {4096, 16384}, W = 512,
                                                                  D in {64, 128})
    python bench/attention_kernels.py --smoke                     (CPU: tiny fp32 shapes under the interpreter)

One measurement is one layer's window attention, q [B, 8, T, D] over the W-key XL prefix and the segment, with
the T5 bias and the per-head scale, forward and backward timed apart. Candidates:

- `triton`: the fused banded kernel (`model.attn.backend=triton`), O(T W);
- `flex`: the `flex` backend (FlexAttention, compiled with dynamic=False, its block mask built once per shape);
- `sdpa tiles`: what `model.attn.backend=sdpa` runs, SDPA over the [B*T/W, H, W, 2W] block tiles, O(T W);
- `sdpa dense mask`: SDPA over the whole segment with the dense band as a float mask, O(T^2) memory;
- `flash causal`: dense causal flash SDPA over the segment, no window, no bias: the O(T^2) work a window
  avoids, at the speed of the fastest dense kernel; its FLOP rate is the yardstick.

FLOPs are counted on the band: 4 D T W per (lane, head) forward (q . k and p v over the W visible keys of each
query), 2.5 times that backward (five products of the same size against two); flash causal's on its triangle,
4 D T (T + 1) / 2. Each row gives median milliseconds forward and backward, the band's TFLOP/s (forward +
backward) and its fraction of flash causal's rate on the same device, the peak memory after the warm-up (so the
autotuner's buffers and compiles do not count), and the largest error of the output and of every gradient (q,
k, v, bias table, scale) against the sdpa tiles in fp32 (exact, O(T W), itself tested against the reference),
at every T. Writes reports/bench/attention_kernels.md (not in --smoke mode, which only checks every path runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

if "--smoke" in sys.argv:  # before any kernel is defined (docs/design.md#triton-without-a-gpu)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lrexp.attention import BiasSpec, MaskSpec, attend, l2_normalize, sliding_window_attention  # noqa: E402
from report import write_report  # noqa: E402  bench/ is the script's folder, so on sys.path

HEADS = 8
BUCKETS, MAX_DISTANCE = 32, 128


def _inputs(t: int, w: int, d: int, heads: int, lanes: int, dtype: torch.dtype, device: torch.device):
    """q [B, H, T, D], k, v [B, H, W + T, D] (the XL prefix first), the bias table and the scale, as leaves."""
    g = torch.Generator(device=device).manual_seed(0)
    q = l2_normalize(torch.randn(lanes, heads, t, d, generator=g, device=device)).to(dtype)
    k = l2_normalize(torch.randn(lanes, heads, t + w, d, generator=g, device=device)).to(dtype)
    v = torch.randn(lanes, heads, t + w, d, generator=g, device=device).to(dtype)
    table = torch.randn(heads, BUCKETS, generator=g, device=device) / BUCKETS ** 0.5
    scale = torch.linspace(0.5, 2.0, heads, device=device)
    return [x.requires_grad_() for x in (q, k, v, table, scale)]


def _window(backend: str, w: int):
    def run(q, k, v, table, scale):
        bias = BiasSpec(table, BUCKETS, MAX_DISTANCE)
        return sliding_window_attention(q, k[:, :, w:], v[:, :, w:], k[:, :, :w], v[:, :, :w], window=w, bias=bias,
                                        scale=scale, backend=backend)  # [B, H, T, D]
    return run


def _dense_mask(w: int):
    def run(q, k, v, table, scale):
        return attend(q, k, v, MaskSpec(window=w), bias=BiasSpec(table, BUCKETS, MAX_DISTANCE), scale=scale,
                      backend="sdpa")  # [B, H, T, D]
    return run


def _flash_causal(q, k, v, table, scale):
    return F.scaled_dot_product_attention(q, k[:, :, -q.shape[2]:], v[:, :, -q.shape[2]:], is_causal=True)


def band_flops(lanes: int, heads: int, t: int, w: int, d: int) -> float:
    """Forward + backward FLOPs of the window over the band (3.5 x the forward's 4 D T W per lane and head)."""
    return 3.5 * 4 * d * t * w * lanes * heads


def causal_flops(lanes: int, heads: int, t: int, d: int) -> float:
    return 3.5 * 4 * d * t * (t + 1) / 2 * lanes * heads


def measure(fn, inputs, steps: int, device: torch.device):
    """(median forward s, median backward s, peak MiB or None, output, gradients), or None when the device runs
    out of memory. Two warm-up calls first (compilation, autotuning), then the peak is reset."""
    fwd, bwd = [], []
    try:
        for i in range(steps + 2):
            if i == 2 and device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for x in inputs:
                x.grad = None
            _sync(device)
            start = time.perf_counter()
            out = fn(*inputs)
            _sync(device)
            middle = time.perf_counter()
            out.backward(torch.ones_like(out))
            _sync(device)
            fwd.append(middle - start)
            bwd.append(time.perf_counter() - middle)
    except torch.OutOfMemoryError:
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return (statistics.median(fwd[2:]), statistics.median(bwd[2:]), peak, out.detach(),
            [x.grad for x in inputs])  # None where a candidate ignores an input (flash causal: bias, scale)


def _oracle(inputs, w: int):
    """Output and gradients of the sdpa tiles in fp32 (ones as the cotangent, as `measure` uses)."""
    leaves = [x.detach().float().requires_grad_() for x in inputs]
    out = _window("sdpa", w)(*leaves)
    out.backward(torch.ones_like(out))
    return out.detach(), [x.grad for x in leaves]


def _error(out, grads, ref_out, ref_grads) -> tuple:
    def err(a, b):
        return (a.float() - b).abs().max().item() / max(b.abs().max().item(), 1e-30)

    return err(out, ref_out), max(err(g, r) for g, r in zip(grads, ref_grads))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lanes", type=int, default=8, help="B: lanes per call (8 to 32 on a GPU)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes under the Triton interpreter (CPU)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the comparison needs a CUDA device; --smoke runs the CPU interpreter check")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        dtype, heads, w, steps, lanes = torch.float32, 2, 16, 1, 2
        shapes = [(64, 16), (48, 24)]  # (T, D): 4 and 3 blocks; D = 24 is padded inside the kernel
    else:
        dtype, heads, w, steps, lanes = torch.bfloat16, HEADS, 512, args.steps, args.lanes
        shapes = [(t, d) for t in args.lengths for d in (64, 128)]
    candidates = {"triton": _window("triton", w), "sdpa tiles": _window("sdpa", w), "sdpa dense mask": _dense_mask(w)}
    if not args.smoke:  # FlexAttention has no backward on CPU (docs/design.md#attention-backends)
        candidates.update({"flex": _window("flex", w), "flash causal": _flash_causal})
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    lines = [f"# Attention kernels ({name}, {dtype}, W = {w}, {heads} heads, {lanes} lanes, torch {torch.__version__})",
             "", "| T | D | candidate | fwd ms | bwd ms | band TFLOP/s | / flash causal rate | peak MiB | "
             "rel err out | rel err grads |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t, d in shapes:
        inputs = _inputs(t, w, d, heads, lanes, dtype, device)
        ref_out, ref_grads = _oracle(inputs, w)
        results = {}
        for label, fn in candidates.items():
            try:
                results[label] = measure(fn, inputs, steps, device)
            except Exception as err:  # one candidate failing (a torch without its feature) keeps the others
                if args.smoke:
                    raise
                results[label] = f"failed: {type(err).__name__}: {err}".replace("\n", " ")[:200]
        flash = results.get("flash causal")
        flash_rate = (causal_flops(lanes, heads, t, d) / (flash[0] + flash[1])
                      if isinstance(flash, tuple) else None)
        for label, result in results.items():
            if not isinstance(result, tuple):
                lines.append(f"| {t} | {d} | {label} | {result or 'OOM'} | | | | | | |")
                continue
            fwd, bwd, peak, out, grads = result
            flops = causal_flops(lanes, heads, t, d) if label == "flash causal" else band_flops(lanes, heads, t, w, d)
            rate = flops / (fwd + bwd)
            share = "-" if flash_rate is None else f"{rate / flash_rate:.2f}"
            errors = ("-", "-") if label == "flash causal" else tuple(
                f"{e:.1e}" for e in _error(out, grads, ref_out, ref_grads))
            lines.append(f"| {t} | {d} | {label} | {fwd * 1e3:.2f} | {bwd * 1e3:.2f} | {rate / 1e12:.1f} | {share} | "
                         f"{'-' if peak is None else f'{peak:.0f}'} | {errors[0]} | {errors[1]} |")
    if args.smoke:
        print("\n".join(lines))
    else:
        write_report("attention_kernels", lines)
    return lines


if __name__ == "__main__":
    main()
