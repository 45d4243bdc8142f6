"""Compile the attention kernels for an sm_90 GPU (Hopper) without one: Triton's compiler (MLIR passes, LLVM,
ptxas) rejects what the interpreter lets through. Run as a script, outside any TRITON_INTERPRET process:

    python tests/kernels/compile_for_gpu.py [DTYPE ...]    (default bf16, the dtype the interpreter cannot run)

prints one line per kernel and dtype and exits non-zero on a compile error.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted ones

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lrexp.kernels.attention.kernel import attention_bwd_dkdv, attention_bwd_dq, attention_fwd  # noqa: E402

EVERY_FEATURE = dict(CAUSAL=True, HAS_WINDOW=True, NEAREST=1, HAS_BIAS=True, HAS_VALID=True, DROPOUT=True,
                     L_BIAS=129, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64)
FP32 = ("LSE", "Delta", "Scale", "Bias", "DScale", "DBias")


def compile_kernel(autotuned, dtype: str) -> int:
    """Bytes of the cubin of one kernel with every feature on, its tensors of dtype."""
    fn = autotuned.fn
    flags = dict(EVERY_FEATURE, IEEE=dtype == "fp32")
    signature = {}
    for name in fn.arg_names:
        if name in flags:
            signature[name] = "constexpr"
        elif name == "p_drop":
            signature[name] = "fp32"
        elif name in ("Valid", "Seed"):
            signature[name] = {"Valid": "*i8", "Seed": "*i64"}[name]
        elif name[0].isupper() and name not in ("H", "Tq", "Tk", "Mv", "D"):
            signature[name] = "*fp32" if name in FP32 else f"*{dtype}"
        else:
            signature[name] = "i32"
    constexprs = {(fn.arg_names.index(name),): value for name, value in flags.items()}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 2})
    return len(compiled.asm["cubin"])


if __name__ == "__main__":
    for dtype in sys.argv[1:] or ["bf16"]:
        for kernel in (attention_fwd, attention_bwd_dkdv, attention_bwd_dq):
            print(f"{kernel.fn.__name__} {dtype}: {compile_kernel(kernel, dtype)} bytes of cubin")
