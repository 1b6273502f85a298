"""Helpers shared by the Triton kernels of every fused op; importable as ``vit_fast.kernels.common``.

Every kernel imports these from here, never from another op's kernel file.

``INTERPRETING: tl.constexpr`` is the one name, in every kernel that needs one, for "this kernel
runs under Triton's interpreter: apply the work-arounds it needs". Each launcher sets it from
``vit_fast.fused.launch.interpreting()`` (so it is False on a GPU and in every ahead-of-time
compile, where the helpers below compile to exactly the plain operation), and each kernel says
which of these work-arounds it applies under it:

    dot(a, b, acc, INPUT_PRECISION, INTERPRETING)   widened 16-bit dots: triton 3.8's interpreter
        returns garbage for a bf16 ``tl.dot`` (upstream issue 11584)
    round_to(x, dtype, INTERPRETING)   software round-to-nearest-even fp32 -> bf16 casts: the
        interpreter truncates them
    mul_rn(a, b, INTERPRETING)   a float32 product rounded on its own: PTX ``mul.rn`` compiled,
        a plain multiply in the interpreter, which cannot run inline asm (and never fuses)

``dot`` and ``round_to`` act only where the interpreter needs them (bf16 operands, fp32 -> bf16
results), so fp16, fp32 and fp64 run the same operations with INTERPRETING set or not; the two
forms of ``mul_rn`` round alike (each product on its own).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, INTERPRETING: tl.constexpr):
    """acc + a @ b, accumulated in acc's dtype; INPUT_PRECISION "ieee" keeps fp32 operands off TF32.

    Under INTERPRETING, bf16 operands are multiplied as fp32: triton 3.8's interpreter returns
    garbage for a bf16 ``tl.dot`` (upstream issue 11584). The operands keep their bf16 rounding and
    a product of two bf16 values is exact in fp32, so this is the arithmetic of a tensor core
    accumulating in fp32: the CPU tests still test the kernel. (The interpreter's fp16 dot is
    right, and fp16 widened would give the same bits: numpy multiplies fp16 operands as fp32.)
    Callers that must not add into their accumulator inside the product pass ``tl.zeros``, which
    is what ``tl.dot`` starts from without one.
    """
    if INTERPRETING and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETING: tl.constexpr):
    """``x.to(dtype)``, rounding fp32 to nearest even as the GPU's conversion (cvt.rn) does.

    Triton 3.8's interpreter truncates fp32 -> bf16 casts (``cast_impl`` in
    triton/runtime/interpreter.py ignores the rounding mode), a biased error twice as large that
    the bf16 parity tests catch. Under INTERPRETING the rounding is therefore done on the bits
    first: adding 0x7FFF plus the lowest kept bit (ties to even) carries into the kept 16 bits
    exactly when rounding up is due, and the truncating cast of the result is then exact. A
    compiled kernel keeps the hardware conversion; other casts are plain ``.to``.
    """
    if INTERPRETING:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
                x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def mul_rn(a, b, INTERPRETING: tl.constexpr):
    """a * b in float32, rounded on its own even where a sum follows. torch rounds every product
    and sum separately (one kernel each); compiled, Triton would fuse a product with the sum after
    it into one fma (enable_fp_fusion), rounding once, which can move a value lying on an integer
    or a half by one level or pixel. PTX's mul.rn is never fused, by LLVM (inline asm is opaque)
    or ptxas (an explicit rounding mode). Under INTERPRETING a plain multiply: the interpreter
    cannot run asm, and it never fuses."""
    if INTERPRETING:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
