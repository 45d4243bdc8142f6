"""Section 9 of `make bench`: where one training step of every row spends its time, from torch.profiler.

One step (forward, loss, backward, optimiser: `harness.TrainStep`) per row, after warm-up steps, is profiled
on the CPU (and CUDA where present). Every aten operator's self time goes to its family below; what the
step's wall time holds beyond the operators is the Python, autograd and dispatch overhead around them, which
a GPU run pays too (on a GPU it is time the device waits). The operator count is the number of those small
launches: the recurrent cell's per-block loop and per-step mask and bias construction show up there.
"""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from harness import TrainStep, sync
from lrexp.config.load import load
from lrexp.model.variants import row_name

# aten operator -> family; an operator not named here is "other"
FAMILIES: Dict[str, Tuple[str, ...]] = {
    "matmul": ("mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "dot"),
    "attention": ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
                  "_softmax", "_softmax_backward_data", "_safe_softmax"),
    "loss": ("_log_softmax", "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward",
             "nll_loss2d_forward", "nll_loss2d_backward"),
    "dropout": ("bernoulli_", "native_dropout", "native_dropout_backward"),
    "elementwise": ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "where", "exp", "rsqrt", "pow",
                    "sqrt", "sigmoid", "sigmoid_backward", "tanh", "tanh_backward", "relu", "threshold_backward",
                    "clamp", "clamp_min", "clamp_max", "fill_", "zero_", "masked_fill", "masked_fill_", "neg",
                    "log", "lerp_", "addcmul_", "addcdiv_", "abs", "sign", "eq", "ne", "lt", "le", "gt", "ge",
                    "logical_not", "bitwise_not", "bitwise_and", "bitwise_or", "maximum", "minimum", "reciprocal"),
    "reduction": ("sum", "mean", "amax", "amin", "max", "min", "all", "any", "norm", "linalg_vector_norm",
                  "_foreach_norm", "argmax", "topk"),
    "copy and layout": ("copy_", "cat", "stack", "index", "index_select", "gather", "scatter_add_", "clone",
                        "contiguous", "empty", "empty_strided", "zeros", "ones", "full", "arange", "_to_copy",
                        "to", "embedding", "embedding_dense_backward", "index_put_", "_index_put_impl_",
                        "new_zeros", "new_ones", "new_empty", "new_empty_strided", "resize_", "set_", "randn",
                        "normal_", "uniform_", "random_", "as_strided_scatter", "expand", "constant_pad_nd"),
}
_FAMILY_OF = {op: family for family, ops in FAMILIES.items() for op in ops}
ORDER = [*FAMILIES, "other"]


def profile_step(step: TrainStep, device: torch.device, warmup: int = 2) -> Dict:
    """One step's wall seconds, seconds by operator family (self time), the overhead beyond the operators
    and the operator count."""
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - started
    families = {name: 0.0 for name in ORDER}
    calls = 0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):  # record_function ranges (autograd nodes, the optimiser)
            continue
        op = event.key[len("aten::"):]
        # self time: a composite operator's children are counted where they run, once
        families[_FAMILY_OF.get(op, "other")] += event.self_cpu_time_total / 1e6
        calls += event.count
    in_ops = sum(families.values())
    return {"wall_s": wall, "families_s": families, "ops_s": in_ops, "overhead_s": max(0.0, wall - in_ops),
            "op_calls": calls}


def profile_section(rows: List[str], overrides: List[str], device: torch.device) -> Tuple[List[str], Dict]:
    """One profiled step per row: the share of its wall time in each operator family and outside them."""
    data: Dict[str, Dict] = {}
    for row in rows:
        cfg = load(overrides=[f"row={row}", *overrides])
        data[row] = {"row": row_name(cfg), **profile_step(TrainStep(cfg, device), device)}
    head = " | ".join(ORDER)
    lines = [f"| row | step ms (profiled) | {head} | overhead | aten calls |",
             "|---|---|" + "---|" * len(ORDER) + "---|---|"]
    for row, d in data.items():
        shares = " | ".join(f"{100 * d['families_s'][f] / d['wall_s']:.0f}%" for f in ORDER)
        lines.append(f"| {d['row']} | {1e3 * d['wall_s']:.1f} | {shares} | "
                     f"{100 * d['overhead_s'] / d['wall_s']:.0f}% | {d['op_calls']} |")
    return lines, data
