"""Triton JIT functions of the fused attention (the semantics of `reference.py`), flash-style.

One program owns a block of queries (forward, dQ) or of keys (dK, dV) of one (lane, head) and walks only the
key (query) blocks its mask can reach: the band of the window, the causal triangle, or everything. Nothing
of size Tq x Tk is stored; the forward keeps the row statistic lse = m + log(l) [B, H, Tq] for the backward.

Indexing: queries sit at the end of the keys (bottom-right), so query i and key j are n = shift + i - j
apart, shift = Tk - Tq. Key j is visible to query i iff
  causal: NEAREST <= n (NEAREST = 0 with include_self, else 1), and with a window n <= window - 1 + NEAREST;
  memory_valid: j >= Mv or valid[b, j].
Softmax: the running max starts at the sink's logit -1000 and the running sum at the sink's exp(0) = 1, which
is exactly the reference's m = max(max_j a_ij, -1000) and its extra denominator term; masked logits are
-inf, so exp gives 0 and a row with no visible key keeps l = 1 and acc = 0: output 0, never NaN.
Dropout keeps p_ij with probability 1 - p (Philox on the element's flat index), scaled by 1 / (1 - p), after
the normaliser is accumulated, as `F.dropout` on the normalised probabilities does; the backward redraws
the same bits from the same seed.
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from lrexp.kernels.attention.reference import SINK_LOGIT

SINK = tl.constexpr(SINK_LOGIT)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b in fp32 accumulation, a cast to b's dtype; fp32 tiles stay fp32 (GPUs would use tf32)."""
    if IEEE:
        out = tl.dot(a.to(b.dtype), b, input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


INTERPRET = isinstance(_dot, InterpretedFunction)  # how TRITON_INTERPRET was when these kernels were defined


@triton.jit
def _load_rows(Ptr, base, offs, T, offs_d, D):
    """Rows offs [R] of a [.., T, D] tensor at base, as a [R, BLOCK_D] tile: 0 past T and past D (the padding to
    a power of two, which adds nothing to a dot product)."""
    mask = (offs[:, None] < T) & (offs_d[None, :] < D)
    return tl.load(Ptr + base + offs[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(Ptr, base, offs, T, offs_d, D, x):
    """Store the [R, BLOCK_D] tile x at rows offs of a [.., T, D] tensor (fp32 accumulators in its dtype)."""
    mask = (offs[:, None] < T) & (offs_d[None, :] < D)
    tl.store(Ptr + base + offs[:, None] * D + offs_d[None, :], x.to(Ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_logits(q, k, offs_m, offs_n, bias_row, valid_row, shift, Tq, Tk, Mv, window,
                 L_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, NEAREST: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr):
    """q . k + b [BM, BN] of one tile (before the scale), which entries the mask keeps, and the distances n."""
    qk = _dot(q, tl.trans(k), IEEE)  # [BM, BN]
    n = shift + offs_m[:, None] - offs_n[None, :]  # [BM, BN]
    if HAS_BIAS:
        qk += tl.load(bias_row + tl.minimum(tl.maximum(n, 0), L_BIAS - 1))
    visible = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if CAUSAL:
        visible &= n >= NEAREST
        if HAS_WINDOW:
            visible &= n <= window - 1 + NEAREST
    if HAS_VALID:
        key_ok = tl.load(valid_row + offs_n, mask=offs_n < Mv, other=1) != 0  # [BN]
        visible &= key_ok[None, :]
    return qk, visible, n


@triton.jit
def _keep(seed, bh, offs_m, offs_n, Tq, Tk, p_drop):
    """Dropout's keep mask [BM, BN]: one Philox draw per (lane, head, query, key), the same in every kernel."""
    flat = (bh.to(tl.int64) * Tq + offs_m[:, None]) * Tk + offs_n[None, :]  # [BM, BN]
    return tl.rand(seed, flat) >= p_drop


@triton.jit
def _key_range(start_m, shift, Tk, window, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, NEAREST: tl.constexpr):
    """[lo, hi): the keys any query of the block start_m .. start_m + BLOCK_M - 1 can see."""
    lo = 0
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, shift + start_m + BLOCK_M - NEAREST)
        if HAS_WINDOW:
            lo = tl.maximum(0, shift + start_m - (window - 1 + NEAREST))
    return lo, hi


@triton.jit
def _query_range(start_n, shift, Tq, window, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, NEAREST: tl.constexpr):
    """[lo, hi): the queries that can see any key of the block start_n .. start_n + BLOCK_N - 1."""
    lo = 0
    hi = Tq
    if CAUSAL:
        lo = tl.maximum(0, start_n - shift + NEAREST)
        if HAS_WINDOW:
            hi = tl.minimum(Tq, start_n + BLOCK_N - shift + window - 1 + NEAREST)
    return lo, hi


@triton.jit
def _tile_grads(q, k, v, do, lse, delta, s, seed, bh, offs_m, offs_n, bias_row, valid_row, p_drop, shift,
                Tq, Tk, Mv, window, L_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                NEAREST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, DROPOUT: tl.constexpr,
                IEEE: tl.constexpr):
    """One tile of the backward: the mask, the distances, the dropped probabilities P Z and
    dA = dL/da [BM, BN]. With P = exp(a - lse): dP = Z dO v^T (Z the dropout scale, 0 or 1 / (1 - p)) and
    dA = P (dP - Delta), Delta_i = dO_i . O_i."""
    qk, visible, n = _tile_logits(q, k, offs_m, offs_n, bias_row, valid_row, shift, Tq, Tk, Mv, window,
                                  L_BIAS, CAUSAL, HAS_WINDOW, NEAREST, HAS_BIAS, HAS_VALID, IEEE)
    p = tl.exp(tl.where(visible, s * qk, float("-inf")) - lse[:, None])  # [BM, BN]
    dp = _dot(do, tl.trans(v), IEEE)  # [BM, BN]
    pz = p
    if DROPOUT:
        z = tl.where(_keep(seed, bh, offs_m, offs_n, Tq, Tk, p_drop), 1.0 / (1.0 - p_drop), 0.0)
        pz = p * z
        dp = dp * z
    return visible, n, pz, p * (dp - delta[:, None])


@triton.jit
def _program_head(Scale, Seed, Bias, Valid, H, Tq, Tk, Mv, D, T_OWN, L_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """What every program reads of its (lane, head) and block. The launch grid is one axis of
    cdiv(T_OWN, BLOCK) * B * H programs, blocks of one (lane, head) adjacent (docs/design.md#launch-grids): axis 0
    takes up to 2^31 - 1 programs where axes 1 and 2 stop at 65535, which the kNN memory attention's B * H * T
    rows of one query exceed. Returns bh, the first row of the program's block of T_OWN (queries or keys), the
    offsets of its q and k rows, the alignment shift = Tk - Tq, s_h, the dropout seed, its bias row and its
    lane's memory_valid row."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(T_OWN, BLOCK)
    bh = pid // n_blocks
    h = bh % H
    q_base = bh.to(tl.int64) * Tq * D
    kv_base = bh.to(tl.int64) * Tk * D
    return (bh, (pid % n_blocks) * BLOCK, q_base, kv_base, Tk - Tq, tl.load(Scale + h), tl.load(Seed),
            Bias + h * L_BIAS, Valid + (bh // H) * Mv)


# What a tuned config is reused for: the head dim, the window, the mask kind, bias, memory_valid and dropout
# (each changes the code and its registers), and the lengths' powers of two (`len_bucket`), not the lengths
# themselves, so a new length of the same size class does not tune again
KEY = ["D", "window", "len_bucket", "CAUSAL", "HAS_WINDOW", "HAS_BIAS", "HAS_VALID", "DROPOUT"]


def length_bucket(t_q: int, t_k: int) -> int:
    """The autotune key's length class: the bit lengths of Tq - 1 and Tk - 1 (powers of two at or above them),
    so the kNN memory attention's single query still tunes apart from a segment's thousands."""
    return max(t_q - 1, 0).bit_length() * 64 + max(t_k - 1, 0).bit_length()


# The GPU's autotune candidates per kernel and head-dim class (BLOCK_D <= 64, <= 128): (BLOCK_M, BLOCK_N,
# num_warps, num_stages), each compiled for sm_90 without register spills in the kernel's costliest variant
# (window, bias, memory_valid and dropout on; tests/kernels/spill_report.py, docs/benchmark.md#registers-and-spills)
GPU_SHAPES = {
    "attention_fwd": {64: ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (16, 64, 4, 2)),
                      128: ((64, 64, 8, 2), (64, 64, 8, 3), (16, 64, 4, 2))},
    "attention_bwd_dkdv": {64: ((32, 64, 8, 2), (16, 128, 8, 2), (32, 32, 4, 2)),
                           128: ((32, 64, 8, 2), (16, 64, 8, 2))},
    "attention_bwd_dq": {64: ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (16, 64, 4, 2)),
                         128: ((32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 8, 2))},
}


def _head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def _for_head_dim(name):
    """autotune's early_config_prune: the candidates of the launch's head-dim class."""
    def prune(configs, named_args, **kwargs):
        shapes = GPU_SHAPES[name][_head_dim_class(kwargs["BLOCK_D"])]
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in shapes]
    return {"early_config_prune": prune}


def _configs(name):
    """Autotune candidates of kernel `name` (`GPU_SHAPES`, every head-dim class; `_for_head_dim` keeps one
    class per launch); one under the interpreter, which cannot benchmark (docs/design.md#triton-without-a-gpu):
    32 x 32 tiles, so the tests' T <= 100 still span several blocks while the interpreter's cost per tile op
    (not per element) stays low."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})]
    shapes = dict.fromkeys(shape for by_dim in GPU_SHAPES[name].values() for shape in by_dim)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


@triton.autotune(configs=_configs("attention_fwd"), key=KEY, prune_configs_by=_for_head_dim("attention_fwd"))
@triton.jit
def attention_fwd(Q, K, V, O, LSE, Scale, Bias, Valid, Seed, p_drop, H, Tq, Tk, Mv, window, D, len_bucket,
                  L_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, NEAREST: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O [B, H, Tq, D] and lse [B, H, Tq] of one block of queries; grid (cdiv(Tq, BLOCK_M) * B * H,)."""
    bh, start_m, q_base, kv_base, shift, s, seed, bias_row, valid_row = _program_head(
        Scale, Seed, Bias, Valid, H, Tq, Tk, Mv, D, Tq, L_BIAS, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, q_base, offs_m, Tq, offs_d, D)  # [BM, BD]
    m_i = tl.full([BLOCK_M], SINK, tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, shift, Tk, window, BLOCK_M, CAUSAL, HAS_WINDOW, NEAREST)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, kv_base, offs_n, Tk, offs_d, D)  # [BN, BD]
        v = _load_rows(V, kv_base, offs_n, Tk, offs_d, D)  # [BN, BD]
        qk, visible, n = _tile_logits(q, k, offs_m, offs_n, bias_row, valid_row, shift, Tq, Tk, Mv, window,
                                      L_BIAS, CAUSAL, HAS_WINDOW, NEAREST, HAS_BIAS, HAS_VALID, IEEE)
        a = tl.where(visible, s * qk, float("-inf"))  # [BM, BN]
        m_new = tl.maximum(m_i, tl.max(a, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(a - m_new[:, None])  # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, Tq, Tk, p_drop), p / (1.0 - p_drop), 0.0)
        acc = acc * alpha[:, None] + _dot(p, v, IEEE)
        m_i = m_new
    _store_rows(O, q_base, offs_m, Tq, offs_d, D, acc / l_i[:, None])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, m_i + tl.log(l_i), mask=offs_m < Tq)


@triton.autotune(configs=_configs("attention_bwd_dkdv"), key=KEY, prune_configs_by=_for_head_dim("attention_bwd_dkdv"))
@triton.jit
def attention_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, DScale, DFar, DNear, Scale, Bias, Valid, Seed, p_drop,
                       H, Tq, Tk, Mv, window, D, len_bucket,
                       L_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, NEAREST: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, DROPOUT: tl.constexpr,
                       IEEE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK = s dA^T q and dV = (P Z)^T dO of one block of keys, and the parts of the bias gradient
    db(n) = s sum_{n_ij = n} dA_ij, all written with plain stores (no atomics, so no contention and one summation
    order; torch reduces them after the kernel):
      DScale [B, H, Tk]: k_j . sum_i dA_ij q_i of each key j, the q . k part of the scale gradient
        ds_h = sum_ij dA_ij (q_i . k_j + b(n_ij)), read off dK's accumulator after the loop instead of a
        [BM, BN] product per tile (the bias part is sum_n b(n) db(n) / s, from the bias parts);
      DFar [B, H, 2, Tk]: sum_i dA_ij of each key j over n < 0 (the bias at n = 0; unmasked attention only) and
        over n >= L_BIAS - 1 (the last entry, shared by every far key);
      DNear [B, H, Tq, L_BIAS - 1]: dA_ij itself at (i, n_ij) for 0 <= n_ij < L_BIAS - 1. Key j = shift + i - n
        is the only key at distance n from query i, so every entry has one writer (the program owning key j);
        entries no visible key reaches keep the zeros they were allocated with.
    Grid (cdiv(Tk, BLOCK_N) * B * H,)."""
    bh, start_n, q_base, kv_base, shift, s, seed, bias_row, valid_row = _program_head(
        Scale, Seed, Bias, Valid, H, Tq, Tk, Mv, D, Tk, L_BIAS, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, kv_base, offs_n, Tk, offs_d, D)  # [BN, BD]
    v = _load_rows(V, kv_base, offs_n, Tk, offs_d, D)  # [BN, BD]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    far = tl.zeros([BLOCK_N], tl.float32)
    near0 = tl.zeros([BLOCK_N], tl.float32)
    lo, hi = _query_range(start_n, shift, Tq, window, BLOCK_N, CAUSAL, HAS_WINDOW, NEAREST)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, q_base, offs_m, Tq, offs_d, D)  # [BM, BD]
        do = _load_rows(DO, q_base, offs_m, Tq, offs_d, D)  # [BM, BD]
        lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # [BM]
        delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # [BM]
        visible, n, pz, ds = _tile_grads(q, k, v, do, lse, delta, s, seed, bh, offs_m, offs_n, bias_row,
                                         valid_row, p_drop, shift, Tq, Tk, Mv, window, L_BIAS, CAUSAL,
                                         HAS_WINDOW, NEAREST, HAS_BIAS, HAS_VALID, DROPOUT, IEEE)
        dv += _dot(tl.trans(pz), do, IEEE)
        dk += _dot(tl.trans(ds), q, IEEE)  # sum_i dA_ij q_i; times s at the store
        if HAS_BIAS:
            near = visible & (n >= 0) & (n < L_BIAS - 1)  # [BM, BN]
            # a 64-bit base for the block, 32-bit offsets within it: half the registers of an int64 tile
            block = DNear + (bh.to(tl.int64) * Tq + start_m) * (L_BIAS - 1)
            within = tl.arange(0, BLOCK_M)[:, None] * (L_BIAS - 1) + tl.minimum(tl.maximum(n, 0), L_BIAS - 2)
            tl.store(block + within, ds, mask=near)  # [BM, BN]
            far += tl.sum(tl.where(visible & (n >= L_BIAS - 1), ds, 0.0), 0)
            if not CAUSAL:
                near0 += tl.sum(tl.where(visible & (n < 0), ds, 0.0), 0)
    in_k = offs_n < Tk
    tl.store(DScale + bh.to(tl.int64) * Tk + offs_n, tl.sum(k.to(tl.float32) * dk, 1), mask=in_k)
    _store_rows(DK, kv_base, offs_n, Tk, offs_d, D, s * dk)
    _store_rows(DV, kv_base, offs_n, Tk, offs_d, D, dv)
    if HAS_BIAS:
        tl.store(DFar + bh.to(tl.int64) * 2 * Tk + offs_n, near0, mask=in_k)
        tl.store(DFar + (bh.to(tl.int64) * 2 + 1) * Tk + offs_n, far, mask=in_k)


@triton.autotune(configs=_configs("attention_bwd_dq"), key=KEY, prune_configs_by=_for_head_dim("attention_bwd_dq"))
@triton.jit
def attention_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, Scale, Bias, Valid, Seed, p_drop, H, Tq, Tk, Mv, window, D,
                     len_bucket,
                     L_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, NEAREST: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ = s dA K of one block of queries (dA as in `_tile_grads`); grid (cdiv(Tq, BLOCK_M) * B * H,)."""
    bh, start_m, q_base, kv_base, shift, s, seed, bias_row, valid_row = _program_head(
        Scale, Seed, Bias, Valid, H, Tq, Tk, Mv, D, Tq, L_BIAS, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, q_base, offs_m, Tq, offs_d, D)  # [BM, BD]
    do = _load_rows(DO, q_base, offs_m, Tq, offs_d, D)  # [BM, BD]
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # [BM]
    delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # [BM]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, shift, Tk, window, BLOCK_M, CAUSAL, HAS_WINDOW, NEAREST)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, kv_base, offs_n, Tk, offs_d, D)  # [BN, BD]
        v = _load_rows(V, kv_base, offs_n, Tk, offs_d, D)  # [BN, BD]
        _, _, _, ds = _tile_grads(q, k, v, do, lse, delta, s, seed, bh, offs_m, offs_n, bias_row, valid_row,
                                     p_drop, shift, Tq, Tk, Mv, window, L_BIAS, CAUSAL, HAS_WINDOW, NEAREST,
                                     HAS_BIAS, HAS_VALID, DROPOUT, IEEE)
        dq += s * _dot(ds, k, IEEE)
    _store_rows(DQ, q_base, offs_m, Tq, offs_d, D, dq)
