"""The Triton attention as a torch op: input checks, launches, autograd, and `torch.compile` registration.

`attention(q, k, v, mask, bias, scale, dropout_p)` takes `attend`'s backend arguments and returns what
`reference.attention_reference` returns. The kernels see the mask as its fields (causal, window,
include_self, memory_valid) and the bias as `BiasSpec.by_distance()` [H, max_distance + 1], which they index
at min(n, max_distance) per tile. `lrexp::attention` and `lrexp::attention_backward` are `triton_op`s, so
`torch.compile` traces into the kernels on a GPU (under the interpreter only eager mode runs).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import warnings

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from lrexp.attention.bias import BiasSpec
from lrexp.attention.errors import BackendError
from lrexp.attention.mask import MaskSpec
from lrexp.kernels.attention.kernel import (GPU_SHAPES, INTERPRET, attention_bwd_dkdv, attention_bwd_dq, attention_fwd,
                                            length_bucket)

# the largest launch grid CUDA takes, per axis (docs/design.md#launch-grids)
GRID_LIMITS = (2**31 - 1, 65535, 65535)
KERNELS = {kernel.fn.__name__: kernel for kernel in (attention_fwd, attention_bwd_dkdv, attention_bwd_dq)}
_fixed = {"on": False, "warned": False}  # model.attn.deterministic (`fix_configs`)


def fix_configs(on: bool = True) -> None:
    """model.attn.deterministic: launch every kernel with one fixed config (the first spill-free candidate of the
    head-dim class) instead of the autotuner's pick by timing, which may differ from run to run and with it the
    order of the sums in dQ, dK and dV. The kernels have no float atomics either way."""
    _fixed["on"] = on


def _launcher(name: str, rows: int, b: int, h: int, block_d: int):
    """`wrap_triton(kernel)[grid]` for kernel `name` whose programs own blocks of `rows`, and the launch options:
    the autotuner with a grid of its pick, or with `fix_configs` the JIT function with one config."""
    kernel = KERNELS[name]
    block = "BLOCK_N" if name == "attention_bwd_dkdv" else "BLOCK_M"
    if not _fixed["on"]:
        if torch.are_deterministic_algorithms_enabled() and not _fixed["warned"]:
            _fixed["warned"] = True
            warnings.warn("the triton attention backend (lrexp::attention) autotunes its launch configs by timing, "
                          "so its gradients may differ in the last bits from run to run; "
                          "model.attn.deterministic=true fixes one config per kernel")
        return wrap_triton(kernel)[lambda meta: launch_grid(rows, b * h, meta[block])], {}
    if INTERPRET:  # its one config
        options = dict(kernel.configs[0].kwargs)
    else:
        m, n, warps, stages = GPU_SHAPES[name][64 if block_d <= 64 else 128][0]
        options = dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
    return wrap_triton(kernel.fn)[launch_grid(rows, b * h, options[block])], options

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # a [BLOCK, 128] fp32 tile per operand is what the GPU configs are sized for


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, bias: Optional[BiasSpec], scale: Optional[Tensor],
    dropout_p: float,
) -> Tensor:
    """Output [B, H, Tq, D] of q [B, H, Tq, D] over k, v [B, H, Tk, D] (`attend`'s `triton` backend)."""
    check_inputs(q, k, v, mask, bias, scale)
    h = q.shape[1]
    scale = torch.ones(h, device=q.device) if scale is None else scale.float()  # [H]
    table = None if bias is None else bias.by_distance().float().contiguous()  # [H, L]
    valid = None if mask.memory_valid is None else mask.memory_valid.to(torch.int8).contiguous()  # [B, Mv]
    # a tensor, not a Python int: drawing it needs no host sync and torch.compile traces it
    seed = (torch.randint(0, 2**62, (1,), device=q.device) if dropout_p > 0
            else torch.zeros(1, dtype=torch.int64, device=q.device))
    out, _ = torch.ops.lrexp.attention(q.contiguous(), k.contiguous(), v.contiguous(), scale, table, valid, seed,
                                       mask.causal, mask.window or 0, mask.include_self, float(dropout_p))
    return out


def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, bias: Optional[BiasSpec],
                 scale: Optional[Tensor]) -> None:
    """One `BackendError` naming the first limit the inputs break (shapes were checked by `attend`)."""
    if q.dtype not in DTYPES or not q.dtype == k.dtype == v.dtype:
        raise BackendError(f"the triton attention backend takes q, k, v of one dtype among float16, bfloat16 and "
                           f"float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if INTERPRET and q.dtype == torch.bfloat16:
        raise BackendError("bfloat16 is computed wrongly under the Triton interpreter (TRITON_INTERPRET=1, "
                           "triton#4972): use float16 or float32 on CPU, bfloat16 on a GPU")
    if mask.prefix:
        raise BackendError("the triton attention backend takes no prefix keys (model.slots.read=prefix_kv); "
                           "use model.attn.backend=sdpa")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise BackendError(f"the triton attention backend supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    named = {"q": q, "k": k, "v": v, "scale": scale, "bias table": None if bias is None else bias.table,
             "memory_valid": mask.memory_valid}
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise BackendError("the triton attention backend needs every input on one device; got "
                           + ", ".join(f"{name} on {device}" for name, device in devices.items()))
    if q.device.type != "cuda" and not INTERPRET:
        raise BackendError(f"the triton attention backend runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 "
                           f"set before lrexp is imported); got {q.device}")


def _launch_args(q: Tensor, k: Tensor, scale: Tensor, table: Optional[Tensor], valid: Optional[Tensor],
                 causal: bool, window: int, include_self: bool, dropout_p: float) -> Tuple[tuple, tuple, dict]:
    """What every kernel takes after its own tensors: (scale, table, valid), (dropout_p and the sizes), and the
    constexpr keywords. An absent table or valid mask is replaced by `scale`, a pointer the kernel never reads
    (HAS_BIAS / HAS_VALID off)."""
    _, h, t_q, d = q.shape
    t_k = k.shape[2]
    tensors = (scale, scale if table is None else table, scale if valid is None else valid)
    sizes = (dropout_p, h, t_q, t_k, 0 if valid is None else valid.shape[1], window, d, length_bucket(t_q, t_k))
    flags = dict(
        L_BIAS=1 if table is None else table.shape[1], CAUSAL=causal, HAS_WINDOW=window > 0,
        NEAREST=0 if include_self else 1, HAS_BIAS=table is not None, HAS_VALID=valid is not None,
        DROPOUT=dropout_p > 0, IEEE=q.dtype == torch.float32, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return tensors, sizes, flags


def launch_grid(rows: int, lanes_heads: int, block: int) -> Tuple[int]:
    """The grid of a kernel whose programs own blocks of `block` of `rows` queries or keys of every (lane, head):
    one axis (the kernels split program_id(0) into (lane, head) and block), so B * H * T may reach 2^31 - 1."""
    return (triton.cdiv(rows, block) * lanes_heads,)


def launch_grids(b: int, h: int, t_q: int, t_k: int) -> Dict[str, List[Tuple[int]]]:
    """Every grid the three kernels may launch on a GPU for q [b, h, t_q, D] over k [b, h, t_k, D]: one per
    autotune candidate (`GPU_SHAPES`, every head-dim class). dK/dV programs own key blocks, the others query
    blocks."""
    return {name: [launch_grid(t_k if name == "attention_bwd_dkdv" else t_q, b * h,
                               block_n if name == "attention_bwd_dkdv" else block_m)
                   for by_dim in shapes.values() for block_m, block_n, _, _ in by_dim]
            for name, shapes in GPU_SHAPES.items()}


@triton_op("lrexp::attention", mutates_args=())
def _attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Tensor, table: Optional[Tensor], valid: Optional[Tensor], seed: Tensor,
    causal: bool, window: int, include_self: bool, dropout_p: float,
) -> Tuple[Tensor, Tensor]:
    """(out [B, H, Tq, D], lse [B, H, Tq] fp32) for contiguous q [B, H, Tq, D], k, v [B, H, Tk, D]."""
    b, h, t_q, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t_q, device=q.device, dtype=torch.float32)
    tensors, sizes, flags = _launch_args(q, k, scale, table, valid, causal, window, include_self, dropout_p)
    launch, options = _launcher("attention_fwd", t_q, b, h, flags["BLOCK_D"])
    launch(q, k, v, out, lse, *tensors, seed, *sizes, **flags, **options)
    return out, lse


@triton_op("lrexp::attention_backward", mutates_args=())
def _attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: Tensor,
    table: Optional[Tensor], valid: Optional[Tensor], seed: Tensor, causal: bool, window: int, include_self: bool,
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d scale [H], d table [H, L], empty without a table), all fp32 but dq, dk, dv. No atomics:
    the kernels store per-program parts that torch sums here, in one order whatever the launch."""
    b, h, t_q, _ = q.shape
    t_k = k.shape[2]
    delta = (grad_out.float() * out.float()).sum(-1)  # [B, H, Tq]: sum_j P_ij dP_ij = dO_i . O_i, dropout included
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # the parts of the scale and bias gradients, each written by one program (`attention_bwd_dkdv`)
    dscale_parts = scale.new_empty(b, h, t_k)
    far_parts = scale.new_empty(b, h, 2, t_k) if table is not None else dscale_parts
    near = scale.new_zeros(b, h, t_q, table.shape[1] - 1) if table is not None else dscale_parts
    tensors, sizes, flags = _launch_args(q, k, scale, table, valid, causal, window, include_self, dropout_p)
    launch, options = _launcher("attention_bwd_dkdv", t_k, b, h, flags["BLOCK_D"])
    launch(q, k, v, grad_out, lse, delta, dk, dv, dscale_parts, far_parts, near, *tensors, seed, *sizes, **flags,
           **options)
    launch, options = _launcher("attention_bwd_dq", t_q, b, h, flags["BLOCK_D"])
    launch(q, k, v, grad_out, lse, delta, dq, *tensors, seed, *sizes, **flags, **options)
    dscale = dscale_parts.sum((0, 2))  # [H]: sum_ij dA_ij q_i . k_j
    dtable = scale.new_zeros(0)
    if table is not None:
        far = far_parts.sum((0, 3))  # [H, 2]: n < 0, n >= L - 1
        by_distance = torch.cat([near.sum((0, 2)), far[:, 1:]], dim=1)  # [H, L]: sum_{n_ij = n} dA_ij
        by_distance[:, 0] += far[:, 0]  # n < 0 reads the bias at n = 0
        dscale += (table * by_distance).sum(1)  # + sum_ij dA_ij b(n_ij)
        dtable = scale[:, None] * by_distance  # db(n) = s_h sum_{n_ij = n} dA_ij
    return dq, dk, dv, dscale, dtable


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, table, valid, seed, causal, window, include_self, dropout_p = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], scale, table, valid, seed)
    ctx.flags = (causal, window, include_self, dropout_p)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
    q, k, v, out, lse, scale, table, valid, seed = ctx.saved_tensors
    dq, dk, dv, dscale, dtable = torch.ops.lrexp.attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, scale, table, valid, seed, *ctx.flags)
    return dq, dk, dv, dscale, (None if table is None else dtable), None, None, None, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)
