"""The Triton attention kernel against its torch reference (docs/design.md#triton-without-a-gpu).

CPU runs use the interpreter (TRITON_INTERPRET=1, set by conftest before any kernel is defined) at tiny
shapes in fp32 and fp16; bf16 and large shapes run only on a GPU (marked `gpu`).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrexp.attention import BackendError, BiasSpec, MaskSpec, attend, l2_normalize, resolve_backend
from lrexp.errors import UserError

B, H, D, W = 2, 2, 24, 20  # D = 24 is padded to 32 inside the kernel; W = 20 crosses the 32-key tiles
BUCKETS, MAX_DISTANCE = 16, 24  # small, so the dense rows reach the shared last bucket (its own atomic add)
TOL = {torch.float32: dict(out=1e-5, grad=5e-5), torch.float16: dict(out=2e-3, grad=1e-2)}


@pytest.fixture
def poisoned():
    """torch.empty returns NaN while a test runs: every output element the kernels do not write shows up."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(False)


def _inputs(t_q, t_k, dtype, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(B, H, t_q, d, generator=g)).to(dtype)
    k = l2_normalize(torch.randn(B, H, t_k, d, generator=g)).to(dtype)
    v = torch.randn(B, H, t_k, d, generator=g).to(dtype)
    table = torch.randn(H, BUCKETS, generator=g)
    scale = torch.tensor([2.5, -1.5])
    return q, k, v, table, scale


def _run(backend, q, k, v, mask, table, scale, dropout_p=0.0):
    """Output and the gradients of q, k, v, the bias table and the scale under a fixed random cotangent."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    table = None if table is None else table.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    bias = None if table is None else BiasSpec(table, BUCKETS, MAX_DISTANCE)
    out = attend(*leaves, mask, bias=bias, scale=scale, backend=backend, dropout_p=dropout_p)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out.float() * cotangent).sum().backward()
    grads = [x.grad for x in leaves] + ([] if table is None else [table.grad]) + [scale.grad]
    return out, grads


def _reset_lanes(t_mem):
    """Lane 0's memory hidden (a document start under attn.mask_empty_cache), lane 1's visible."""
    return torch.tensor([[False] * t_mem, [True] * t_mem])


# (queries, memory prefix M, mask): windowed with and without the XL prefix / self / reset lanes, dense
# causal (the Full row), unmasked (kNN memory: 1 query per row; the cell's R read with memory_valid)
CASES = [
    (1, W, MaskSpec(window=W, memory_valid=_reset_lanes(W))),
    (63, 0, MaskSpec(window=W, include_self=True)),
    (63, W, MaskSpec(window=W, include_self=True, memory_valid=_reset_lanes(W))),
    (100, W, MaskSpec(window=W)),
    (100, 0, MaskSpec()),
    (63, W, MaskSpec(include_self=True, memory_valid=_reset_lanes(W))),
    (1, 8, MaskSpec(causal=False)),
    (8, 16, MaskSpec(causal=False, memory_valid=_reset_lanes(8))),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t_q,t_mem,mask", CASES)
def test_forward_and_every_gradient_match_the_reference(poisoned, dtype, t_q, t_mem, mask):
    t_k = t_q + t_mem if mask.causal else t_mem
    q, k, v, table, scale = _inputs(t_q, t_k, dtype)
    table = table if mask.causal else None  # the unmasked attentions of lrexp carry no position bias
    out, grads = _run("triton", q, k, v, mask, table, scale)
    ref, ref_grads = _run("reference", q, k, v, mask, table, scale)
    assert out.dtype == dtype and all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v)))
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype]["out"], rtol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.float(), ref_grad.float(), atol=TOL[dtype]["grad"], rtol=TOL[dtype]["grad"])


def test_a_row_with_no_visible_key_outputs_exactly_zero(poisoned):
    q, k, v, table, scale = _inputs(5, 25, torch.float32)
    mask = MaskSpec(window=W, memory_valid=torch.zeros(B, W, dtype=torch.bool))  # query 0 sees only memory
    out, grads = _run("triton", q, k, v, mask, table, scale)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.equal(grads[0][:, :, 0], torch.zeros_like(grads[0][:, :, 0]))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("d", [5, 16])
def test_head_dims_below_and_at_a_power_of_two(d):
    q, k, v, table, scale = _inputs(17, 17 + W, torch.float32, d=d)
    out, grads = _run("triton", q, k, v, MaskSpec(window=W), table, scale)
    ref, ref_grads = _run("reference", q, k, v, MaskSpec(window=W), table, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=5e-5, rtol=5e-5)


def test_dropout_drops_normalised_probabilities_with_the_reference_semantics():
    """With one-hot values o_ij = Z_ij p_ij: the kept fraction is 1 - p, a kept entry is p_ij / (1 - p), and the
    backward uses the same mask Z (gradients equal the reference math with Z applied)."""
    p, t_q, t_k = 0.5, 64, 16
    q, k, _, _, scale = _inputs(t_q, t_k, torch.float32, d=t_k)
    v = torch.eye(t_k).expand(B, H, t_k, t_k)  # [B, H, Tk, D = Tk]: value j is the unit vector e_j
    mask = MaskSpec(causal=False)
    torch.manual_seed(3)
    out, grads = _run("triton", q, k, v, mask, None, scale, dropout_p=p)  # [B, H, Tq, Tk] = Z * P
    probs, _ = _run("reference", q, k, v, mask, None, scale)  # P
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / kept.numel()) ** 0.5
    torch.testing.assert_close(out[kept], probs[kept] / (1 - p), atol=1e-6, rtol=1e-5)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s = scale.clone().requires_grad_()
    z = kept.float() / (1 - p)
    dropped = attend(*leaves[:2], v, mask, scale=s, backend="reference") * z  # P Z (v is the identity)
    oracle = dropped @ leaves[2]  # [B, H, Tq, D]
    cotangent = torch.randn(oracle.shape, generator=torch.Generator().manual_seed(7))
    (oracle * cotangent).sum().backward()
    for grad, ref_grad in zip(grads, [x.grad for x in leaves] + [s.grad]):
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)

    torch.manual_seed(3)
    again, _ = _run("triton", q, k, v, mask, None, scale, dropout_p=p)
    other, _ = _run("triton", q, k, v, mask, None, scale, dropout_p=p)
    assert torch.equal(again, out) and not torch.equal(other, out)  # seeded by torch's generator


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v, s: (q.double(), k.double(), v.double(), s), "float16, bfloat16 and float32"),
    (lambda q, k, v, s: (q, k.half(), v, s), "one dtype"),
    (lambda q, k, v, s: (q.bfloat16(), k.bfloat16(), v.bfloat16(), s), "bfloat16 .* interpreter"),
    (lambda q, k, v, s: (torch.cat([q] * 6, -1), torch.cat([k] * 6, -1), torch.cat([v] * 6, -1), s),
     "head dims up to 128, got 144"),
    (lambda q, k, v, s: (q, k, v, s.to("meta")), "one device; got q on cpu, k on cpu, v on cpu, scale on meta"),
])
def test_unsupported_inputs_raise_one_clear_error(change, message):
    q, k, v, _, scale = _inputs(4, 4, torch.float32)
    q, k, v, scale = change(q, k, v, scale)
    with pytest.raises(BackendError, match=message) as err:
        attend(q, k, v, MaskSpec(), scale=scale, backend="triton")
    assert "\n" not in str(err.value)


def test_backend_without_triton_raises_at_resolve_time(monkeypatch):
    from lrexp.attention import backends

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    backends._importable.cache_clear()  # looked up once per process
    try:
        with pytest.raises(UserError, match="'triton' needs the 'triton' package, which is not importable"):
            resolve_backend("triton")
    finally:
        backends._importable.cache_clear()


@pytest.mark.slow  # triton compiles every kernel for a GPU target: over 10 s
def test_the_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs code a GPU compiler may reject: compile the three kernels in bf16 with every feature
    on for sm_90 (MLIR, LLVM and ptxas, no device needed)."""
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_for_gpu.py"))], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("bytes of cubin") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("mask,t_mem", [(MaskSpec(window=512), 512), (MaskSpec(), 0), (MaskSpec(causal=False), 0)])
def test_bf16_at_scale_matches_the_reference_on_gpu(mask, t_mem):
    t, d = 2048, 128
    q, k, v, table, scale = (x.cuda() for x in _inputs(t, t + t_mem, torch.bfloat16, d=d))
    out, grads = _run("triton", q, k, v, mask, table, scale)
    ref, ref_grads = _run("reference", q, k, v, mask, table, scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_torch_compile_traces_through_the_kernel_on_gpu():
    q, k, v, table, scale = (x.cuda() for x in _inputs(256, 256 + 64, torch.float16))
    bias = BiasSpec(table, BUCKETS, MAX_DISTANCE)

    def window(q, k, v):
        return attend(q, k, v, MaskSpec(window=64), bias=bias, scale=scale, backend="triton")

    torch.testing.assert_close(torch.compile(window, fullgraph=True)(q, k, v), window(q, k, v), atol=1e-3, rtol=0)


@pytest.mark.slow  # 8 s: every autotune candidate under the interpreter
def test_benchmark_smoke_mode_runs_every_candidate_under_the_interpreter():
    script = Path(__file__).resolve().parents[2] / "bench" / "attention_kernels.py"
    run = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert {row[2].strip() for row in rows} == {"triton", "sdpa tiles", "sdpa dense mask"}
    assert all(float(row[8]) < 1e-5 and float(row[9]) < 1e-4 for row in rows)  # output and gradients, every T


@pytest.mark.slow  # four kernel runs forward and backward under the interpreter: about 5 s, more when loaded
def test_fixed_configs_are_bitwise_reproducible_and_the_autotuned_launch_warns_under_determinism(recwarn):
    """model.attn.deterministic: one config per kernel, the same bits every call; otherwise deterministic
    algorithms get a warning that the autotuner's pick may vary (once per process)."""
    from lrexp.kernels.attention import op

    q, k, v, table, scale = _inputs(40, 40 + W, torch.float32)
    mask = MaskSpec(window=W)
    op.fix_configs()
    try:
        first = _run("triton", q, k, v, mask, table, scale)
        again = _run("triton", q, k, v, mask, table, scale)
    finally:
        op.fix_configs(False)
    for a, b in zip([first[0], *first[1]], [again[0], *again[1]]):
        assert torch.equal(a, b)
    ref = _run("reference", q, k, v, mask, table, scale)
    torch.testing.assert_close(first[0], ref[0], atol=1e-5, rtol=0)
    op._fixed["warned"] = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _run("triton", q, k, v, mask, table, scale)
    finally:
        torch.use_deterministic_algorithms(False)
    assert any("model.attn.deterministic=true" in str(w.message) for w in recwarn)
