"""Compile the attention kernels for an sm_90 GPU (Hopper) without one: Triton's compiler (MLIR passes, LLVM,
ptxas) rejects what the interpreter lets through. Run as a script, outside any TRITON_INTERPRET process:

    python tests/kernels/compile_for_gpu.py [DTYPE ...]    (default bf16, the dtype the interpreter cannot run)

prints one line per kernel and dtype and exits non-zero on a compile error. `spill_report.py` compiles every
autotune candidate with `compile_kernel` and reads ptxas's register and spill counts.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted ones

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lrexp.kernels.attention.kernel import attention_bwd_dkdv, attention_bwd_dq, attention_fwd  # noqa: E402

KERNELS = (attention_fwd, attention_bwd_dkdv, attention_bwd_dq)
EVERY_FEATURE = dict(CAUSAL=True, HAS_WINDOW=True, NEAREST=1, HAS_BIAS=True, HAS_VALID=True, DROPOUT=True,
                     L_BIAS=129)
FP32 = ("LSE", "Delta", "Scale", "Bias", "DScale", "DFar", "DNear")
SM90 = GPUTarget("cuda", 90, 32)


def compile_kernel(autotuned, dtype: str, block_d: int = 64, block_m: int = 64, block_n: int = 64,
                   num_warps: int = 4, num_stages: int = 2, **features):
    """The compiled kernel (Triton's CompiledKernel: asm["ptx"], asm["cubin"]) for sm_90, its tensors of dtype,
    with every feature on unless `features` turns some off."""
    fn = autotuned.fn
    flags = dict(EVERY_FEATURE, **features, IEEE=dtype == "fp32", BLOCK_D=block_d, BLOCK_M=block_m,
                 BLOCK_N=block_n)
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
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=SM90,
                          options={"num_warps": num_warps, "num_stages": num_stages})


if __name__ == "__main__":
    for dtype in sys.argv[1:] or ["bf16"]:
        for kernel in KERNELS:
            print(f"{kernel.fn.__name__} {dtype}: {len(compile_kernel(kernel, dtype).asm['cubin'])} bytes of cubin")
