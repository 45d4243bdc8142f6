"""Attention kernel benchmark: the Triton sliding-window kernel against the other ways to run the same window.

    python bench/attention_kernels.py [--steps 10]     (a GPU: bf16, T in {4096, 16384}, W = 512, D in {64, 128})
    python bench/attention_kernels.py --smoke          (CPU: tiny fp32 shapes under the Triton interpreter)

One measurement is forward + backward of one layer's window attention, q [1, 8, T, D] over the W-key XL prefix
and the segment, with the T5 bias and the per-head scale. Candidates:

- `triton`: the fused banded kernel (`model.attn.backend=triton`), O(T W);
- `sdpa tiles`: what `model.attn.backend=sdpa` runs, SDPA over the [B*T/W, H, W, 2W] block tiles, O(T W);
- `sdpa dense mask`: SDPA over the whole segment with the dense band as a float mask, O(T^2) memory;
- `flex`: FlexAttention with a sliding-window block mask and the bias as a score_mod (no sink key: a timing
  comparison only);
- `flash causal`: dense causal flash SDPA over the segment, no window, no bias: the O(T^2) work a window
  avoids, at the speed of the fastest dense kernel.

Each row gives the median time, the peak memory and the max error of the output against the reference
backend (on a GPU, at the smallest T; "OOM" where a candidate does not fit). Writes
reports/bench/attention_kernels.md (not in --smoke mode, which only checks that every path runs).
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


def _inputs(t: int, w: int, d: int, heads: int, dtype: torch.dtype, device: torch.device):
    """q, k, v [1, H, T, D], the XL prefix k_prev, v_prev [1, H, W, D], the bias and the scale, as leaves."""
    g = torch.Generator(device=device).manual_seed(0)
    q = l2_normalize(torch.randn(1, heads, t, d, generator=g, device=device)).to(dtype)
    k = l2_normalize(torch.randn(1, heads, t + w, d, generator=g, device=device)).to(dtype)
    v = torch.randn(1, heads, t + w, d, generator=g, device=device).to(dtype)
    table = torch.randn(heads, BUCKETS, generator=g, device=device) / BUCKETS ** 0.5
    scale = torch.ones(heads, device=device)
    return [x.requires_grad_() for x in (q, k, v, table, scale)]


def _window(backend: str, w: int):
    def run(q, k, v, table, scale):
        bias = BiasSpec(table, BUCKETS, MAX_DISTANCE)
        return sliding_window_attention(q, k[:, :, w:], v[:, :, w:], k[:, :, :w], v[:, :, :w], window=w, bias=bias,
                                        scale=scale, backend=backend)  # [1, H, T, D]
    return run


def _dense_mask(w: int):
    def run(q, k, v, table, scale):
        return attend(q, k, v, MaskSpec(window=w), bias=BiasSpec(table, BUCKETS, MAX_DISTANCE), scale=scale,
                      backend="sdpa")  # [1, H, T, D]
    return run


def _flex(w: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    block_masks = {}  # a model builds its block mask once per shape, so it is not timed

    def run(q, k, v, table, scale):
        t_q, t_k = q.shape[2], k.shape[2]
        by_distance = BiasSpec(table, BUCKETS, MAX_DISTANCE).by_distance()  # [H, MAX_DISTANCE + 1]

        def band(b, h, i, j):
            n = t_k - t_q + i - j
            return (n >= 1) & (n <= w)

        def score(logit, b, h, i, j):
            n = (t_k - t_q + i - j).clamp(0, MAX_DISTANCE)
            return scale[h] * (logit + by_distance[h, n])

        if (t_q, t_k) not in block_masks:
            block_masks[t_q, t_k] = create_block_mask(band, None, None, t_q, t_k, device=q.device)
        return compiled(q, k, v, score_mod=score, block_mask=block_masks[t_q, t_k], scale=1.0)  # [1, H, T, D]
    return run


def _flash_causal(q, k, v, table, scale):
    return F.scaled_dot_product_attention(q, k[:, :, -q.shape[2]:], v[:, :, -q.shape[2]:], is_causal=True)


def measure(fn, inputs, steps: int, device: torch.device):
    """(median seconds of forward + backward, peak MiB as text, output), or None when the device runs out of
    memory."""
    times, out = [], None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps + 2):  # two warm-up calls: compilation and autotuning
            for x in inputs:
                x.grad = None
            _sync(device)
            start = time.perf_counter()
            out = fn(*inputs)
            out.float().sum().backward()
            _sync(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return None
    peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "-"
    return statistics.median(times[2:]), peak, out.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes under the Triton interpreter (CPU)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the comparison needs a CUDA device; --smoke runs the CPU interpreter check")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        dtype, heads, w, steps = torch.float32, 2, 16, 1
        shapes = [(64, 16), (48, 24)]  # (T, D): 4 and 3 blocks; D = 24 is padded inside the kernel
    else:
        dtype, heads, w, steps = torch.bfloat16, HEADS, 512, args.steps
        shapes = [(t, d) for t in (4096, 16384) for d in (64, 128)]
    candidates = {"triton": _window("triton", w), "sdpa tiles": _window("sdpa", w), "sdpa dense mask": _dense_mask(w)}
    if not args.smoke:  # FlexAttention has no backward on CPU (docs/design.md#attention-backends)
        candidates.update({"flex": _flex(w), "flash causal": _flash_causal})
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    lines = [f"# Attention kernels ({name}, {dtype}, W = {w}, {heads} heads, torch {torch.__version__})", "",
             "| T | D | candidate | fwd + bwd ms | peak MiB | max abs err vs reference |", "|---|---|---|---|---|---|"]
    for t, d in shapes:
        inputs = _inputs(t, w, d, heads, dtype, device)
        check = args.smoke or t == shapes[0][0]  # the fp32 reference materialises T x T: the smallest T only
        ref_out = (attend(*[x.detach() for x in inputs[:3]], MaskSpec(window=w),
                          bias=BiasSpec(inputs[3].detach(), BUCKETS, MAX_DISTANCE), scale=inputs[4].detach(),
                          backend="reference") if check else None)
        for label, fn in candidates.items():
            try:
                result = measure(fn, inputs, steps, device)
            except Exception as err:  # one candidate failing (a torch without its feature) keeps the others
                if args.smoke:
                    raise
                lines.append(f"| {t} | {d} | {label} | failed: {type(err).__name__}: {err} | | |".replace("\n", " "))
                continue
            if result is None:
                lines.append(f"| {t} | {d} | {label} | OOM | | |")
                continue
            seconds, peak, out = result
            err = (f"{(out.float() - ref_out.float()).abs().max().item():.2e}"
                   if check and label != "flash causal" else "-")
            lines.append(f"| {t} | {d} | {label} | {seconds * 1e3:.2f} | {peak} | {err} |")
    if args.smoke:
        print("\n".join(lines))
    else:
        write_report("attention_kernels", lines)
    return lines


if __name__ == "__main__":
    main()
