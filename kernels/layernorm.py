"""LayerNorm over the last dimension, with an optional fused residual add: Triton kernels.

Forward, one program per tile of ``BLOCK_M`` rows, the whole row in registers:

    s    = x + residual                     (HAS_RESIDUAL; stored, it is the next residual stream)
    mean = sum(s) / N
    rstd = 1 / sqrt(sum((s - mean)^2) / N + eps)
    y    = (s - mean) * rstd * weight + bias

Backward, with xhat = (s - mean) * rstd and g = weight * dy:

    ds_total = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds      (ds: HAS_DS)
    dweight  = sum over rows of dy * xhat,  dbias = sum over rows of dy

``ds_total`` is the gradient of both x and residual. The weight and bias gradients are column sums
over every row. Each backward program owns a contiguous range of rows and writes its partial
column sums to its own row of a (num_programs, N) buffer; a second kernel sums that buffer in a
fixed order. No atomics, so the result is bitwise the same from run to run.

Statistics and arithmetic run in the dtype of the ``Mean`` buffer the launcher allocates: fp32 for
fp32/fp16/bf16 inputs, fp64 for fp64 inputs (which ``gradcheck`` uses). Every load and store is
masked, so widths need not be powers of two and row counts need not be multiples of ``BLOCK_M``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_to(x, dtype: tl.constexpr, BF16_RNE_IN_SOFTWARE: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype``, rounding to nearest even as the GPU's conversion does.

    Triton 3.8's interpreter truncates fp32 -> bf16 casts (``cast_impl`` in
    triton/runtime/interpreter.py ignores the rounding mode), which doubles bf16 errors and breaks
    parity with torch. The launchers set BF16_RNE_IN_SOFTWARE only under the interpreter; the
    compiled kernels keep the hardware conversion (cvt.rn.bf16.f32).
    """
    if BF16_RNE_IN_SOFTWARE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            # Add just under half an ulp of bf16, plus the kept lsb for ties-to-even, then clear
            # the 16 bits the cast drops; the truncating cast is then exact.
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
            x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def layer_norm_fwd_kernel(
    X,  # (M, N) input, any strides
    RES,  # (M, N) residual, any strides; read only when HAS_RESIDUAL
    W,  # (N,) weight, contiguous
    B,  # (N,) bias, contiguous
    Y,  # (M, N) output in X's dtype, row stride stride_ym, unit column stride
    S,  # (M, N) x + residual in X's dtype, row stride stride_sm; written only when HAS_RESIDUAL
    Mean,  # (M,) mean of each row, in the compute dtype
    Rstd,  # (M,) 1 / sqrt(var + eps) of each row, in the compute dtype
    stride_xm, stride_xn,
    stride_resm, stride_resn,
    stride_ym,
    stride_sm,
    M, N,  # rows, width
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row is one block
    BF16_RNE_IN_SOFTWARE: tl.constexpr,  # interpreter only, see _round_to
):
    acc_dtype = Mean.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)
    # int64: rows * stride overflows int32 beyond 2**31 elements.
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[None, :]

    x = tl.load(X + rows64 * stride_xm + cols64 * stride_xn, mask=mask, other=0.0).to(acc_dtype)
    if HAS_RESIDUAL:
        res = tl.load(RES + rows64 * stride_resm + cols64 * stride_resn, mask=mask, other=0.0)
        # Round the sum to the input dtype before normalizing it: the stored s is what the next
        # block reads, and LayerNorm(s) must be the LayerNorm of exactly that tensor.
        s = _round_to(x + res.to(acc_dtype), S.dtype.element_ty, BF16_RNE_IN_SOFTWARE)
        tl.store(S + rows64 * stride_sm + cols64, s, mask=mask)
        x = s.to(acc_dtype)

    # Corrected two-pass variance (Chan, Golub & LeVeque, "Algorithms for computing the sample
    # variance", 1983): the variance comes from centred values, never E[x^2] - E[x]^2, which
    # cancels catastrophically for rows like mean 1e4, std 1e-3. The rounding error of the first
    # mean shows up as sum(x - mean) != 0; folding it back costs one more register reduction.
    mean = tl.sum(x, axis=1) / N  # (BLOCK_M,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    correction = tl.sum(xc, axis=1) / N
    mean += correction
    xc = tl.where(mask, xc - correction[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)  # eps > 0 keeps constant rows finite

    w = tl.load(W + cols, mask=col_mask, other=0.0).to(acc_dtype)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(acc_dtype)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64 * stride_ym + cols64, _round_to(y, Y.dtype.element_ty, BF16_RNE_IN_SOFTWARE), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def layer_norm_bwd_kernel(
    X,  # (M, N) the normalized input: x, or s = x + residual; any strides
    W,  # (N,) weight, contiguous
    Mean,  # (M,) saved by the forward, compute dtype
    Rstd,  # (M,) saved by the forward, compute dtype
    DY,  # (M, N) gradient of y, any strides (stride 0 when expanded)
    DS,  # (M, N) gradient of s, any strides; read only when HAS_DS
    DX,  # (M, N) gradient of x (and of residual) in X's dtype, row stride stride_dxm
    DW_partial,  # (num_programs, N) compute dtype: this program's column sums of dy * xhat
    DB_partial,  # (num_programs, N) compute dtype: this program's column sums of dy
    stride_xm, stride_xn,
    stride_dym, stride_dyn,
    stride_dsm, stride_dsn,
    stride_dxm,
    M, N,  # rows, width
    rows_per_program,  # a multiple of BLOCK_M
    HAS_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # power of two >= N
    BF16_RNE_IN_SOFTWARE: tl.constexpr,  # interpreter only, see _round_to
):
    acc_dtype = Mean.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    cols64 = cols.to(tl.int64)[None, :]
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(acc_dtype)

    # Accumulate per element and reduce over rows once at the end: one cross-thread reduction per
    # program instead of one per tile.
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]

        x = tl.load(X + rows64 * stride_xm + cols64 * stride_xn, mask=mask, other=0.0).to(acc_dtype)
        dy = tl.load(DY + rows64 * stride_dym + cols64 * stride_dyn, mask=mask, other=0.0).to(acc_dtype)
        # Masked rows read mean = rstd = 0, so their xhat, dx and partial sums are all zero.
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)

        # Re-centre as the forward did: the saved fp32 mean of a row like mean 1e4, std 1e-3 is
        # off by up to half an ulp of 1e4 (5e-4), half the spread; x - mean is exact (Sterbenz),
        # and subtracting its own mean recovers the forward's accurate centring.
        xc = tl.where(mask, x - mean[:, None], 0.0)
        xc = tl.where(mask, xc - (tl.sum(xc, axis=1) / N)[:, None], 0.0)
        xhat = xc * rstd[:, None]
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / N
        mean_gxhat = tl.sum(g * xhat, axis=1) / N
        dx = (g - mean_g[:, None] - xhat * mean_gxhat[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64 * stride_dsm + cols64 * stride_dsn, mask=mask, other=0.0).to(acc_dtype)
        tl.store(DX + rows64 * stride_dxm + cols64, _round_to(dx, DX.dtype.element_ty, BF16_RNE_IN_SOFTWARE), mask=mask)

        dw_acc += dy * xhat
        db_acc += dy

    tl.store(DW_partial + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(DB_partial + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def column_sum_kernel(
    DW_partial,  # (P, N) compute dtype, contiguous
    DB_partial,  # (P, N) compute dtype, contiguous
    DW,  # (N,) weight gradient in the weight's dtype
    DB,  # (N,) bias gradient in the bias's dtype
    P, N,
    BLOCK_P: tl.constexpr,  # partial rows summed per step
    BLOCK_N: tl.constexpr,  # columns per program
    BF16_RNE_IN_SOFTWARE: tl.constexpr,  # interpreter only, see _round_to
):
    """Second stage of the weight and bias gradients: sums the per-program partials in a fixed
    order (the same tiles, the same tree), so the result is deterministic."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros((BLOCK_P, BLOCK_N), dtype=DW_partial.dtype.element_ty)
    db = tl.zeros((BLOCK_P, BLOCK_N), dtype=DB_partial.dtype.element_ty)
    for p_start in range(0, P, BLOCK_P):
        ps = p_start + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & col_mask[None, :]
        offsets = ps.to(tl.int64)[:, None] * N + cols[None, :]
        dw += tl.load(DW_partial + offsets, mask=mask, other=0.0)
        db += tl.load(DB_partial + offsets, mask=mask, other=0.0)
    tl.store(DW + cols, _round_to(tl.sum(dw, axis=0), DW.dtype.element_ty, BF16_RNE_IN_SOFTWARE), mask=col_mask)
    tl.store(DB + cols, _round_to(tl.sum(db, axis=0), DB.dtype.element_ty, BF16_RNE_IN_SOFTWARE), mask=col_mask)
