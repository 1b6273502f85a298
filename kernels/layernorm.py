"""LayerNorm over the last dimension, with an optional fused residual add: Triton kernels.

Forward, one program per tile of ``BLOCK_M`` rows, the whole row in registers:

    s    = residual + scale[sample] * x      (HAS_RESIDUAL; stored, it is the next residual stream;
                                             scale only with HAS_SCALE: stochastic depth's per-sample
                                             keep/scale vector, 0 or 1/keep)
    mean = sum(s) / N
    rstd = 1 / sqrt(sum((s - mean)^2) / N + eps)
    y    = (s - mean) * rstd * weight + bias  (bias only with HAS_BIAS)

Backward, with xhat = (s - mean) * rstd and g = weight * dy:

    ds_total = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds      (ds: HAS_DS)
    dweight  = sum over rows of dy * xhat,  dbias = sum over rows of dy

``ds_total`` is the gradient of the residual; the branch x receives scale[sample] * ds_total
(WRITE_DBRANCH writes it separately, in the branch's dtype, when it differs from ds_total). The
weight and bias gradients are column sums over every row. Each backward program owns a
contiguous range of rows and writes its partial column sums to its own column of a (2, N, P)
buffer (dweight's partials, then dbias's; each column's P partials contiguous); a second kernel
sums every (column, tensor) pair's partials in a fixed order, one small program per pair (or
per few pairs), so the reduction fills the GPU at width 192 and is bitwise the same from run to
run. No atomics.

Mixed precision: every tensor has its own dtype, converted in registers. Under autocast the
branch x, dy and the normalised output y are 16-bit, the residual stream (residual, s, ds and
its gradient) and the parameters are fp32: nothing is cast outside the kernels. Statistics and
arithmetic run in the dtype of the ``Mean`` buffer the launcher allocates: fp32, or fp64 for
fp64 inputs (which ``gradcheck`` uses). Every load and store is masked, so widths need not be
powers of two and row counts need not be multiples of ``BLOCK_M``.

Under Triton's interpreter (INTERPRETING, set by the launchers) the one work-around is
``vit_fast.kernels.common.round_to``'s: fp32 -> bf16 stores rounded to nearest even in software.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vit_fast.kernels.common import round_to


@triton.jit
def layer_norm_fwd_kernel(
    X,  # (M, N) input (the branch, in the residual variant), any strides
    RES,  # (M, N) residual, any strides; read only when HAS_RESIDUAL
    Scale,  # (M // rows_per_sample,) per-sample branch scale; read only when HAS_SCALE
    W,  # (N,) weight, contiguous
    B,  # (N,) bias, contiguous; read only when HAS_BIAS
    Y,  # (M, N) normalised output in its own dtype, row stride stride_ym, unit column stride
    S,  # (M, N) residual + scale * x in the residual's dtype, row stride stride_sm; HAS_RESIDUAL only
    Mean,  # (M,) mean of each row, in the compute dtype
    Rstd,  # (M,) 1 / sqrt(var + eps) of each row, in the compute dtype
    stride_xm, stride_xn,
    stride_resm, stride_resn,
    stride_ym,
    stride_sm,
    M, N,  # rows, width
    rows_per_sample,  # rows of one sample (tokens): row r belongs to sample r // rows_per_sample
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row is one block
    INTERPRETING: tl.constexpr,  # under the interpreter: bf16 stores rounded in software (round_to)
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
        if HAS_SCALE:
            keep = tl.load(Scale + rows // rows_per_sample, mask=row_mask, other=0.0).to(acc_dtype)
            x = x * keep[:, None]
        res = tl.load(RES + rows64 * stride_resm + cols64 * stride_resn, mask=mask, other=0.0)
        # Round the sum to the stream's dtype before normalizing it: the stored s is what the next
        # block reads, and LayerNorm(s) must be the LayerNorm of exactly that tensor.
        s = round_to(res.to(acc_dtype) + x, S.dtype.element_ty, INTERPRETING)
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
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(acc_dtype)[None, :]
    tl.store(Y + rows64 * stride_ym + cols64, round_to(y, Y.dtype.element_ty, INTERPRETING), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def layer_norm_bwd_kernel(
    X,  # (M, N) the normalized input: x, or s = residual + scale * x; any strides
    W,  # (N,) weight, contiguous
    Mean,  # (M,) saved by the forward, compute dtype
    Rstd,  # (M,) saved by the forward, compute dtype
    DY,  # (M, N) gradient of y, any strides (stride 0 when expanded), any float dtype
    DS,  # (M, N) gradient of s, any strides; read only when HAS_DS
    Scale,  # (M // rows_per_sample,) the forward's per-sample branch scale; read only when HAS_SCALE
    DX,  # (M, N) gradient of the normalized input (and of the residual) in X's dtype, row stride N
    DBranch,  # (M, N) scale * DX in the branch's dtype, row stride N; written only when WRITE_DBRANCH
    Partial,  # (2, N, P) compute dtype: column c of program p at [0, c, p] (dweight), [1, c, p] (dbias)
    stride_xm, stride_xn,
    stride_dym, stride_dyn,
    stride_dsm, stride_dsn,
    M, N,  # rows, width
    P,  # programs: the partial buffer's last dimension
    rows_per_program,  # a multiple of BLOCK_M
    rows_per_sample,
    HAS_DS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WRITE_DBRANCH: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # power of two >= N
    INTERPRETING: tl.constexpr,  # under the interpreter: bf16 stores rounded in software (round_to)
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
        tl.store(DX + rows64 * N + cols64, round_to(dx, DX.dtype.element_ty, INTERPRETING), mask=mask)
        if WRITE_DBRANCH:
            if HAS_SCALE:
                keep = tl.load(Scale + rows // rows_per_sample, mask=row_mask, other=0.0).to(acc_dtype)
                dx = dx * keep[:, None]
            tl.store(DBranch + rows64 * N + cols64, round_to(dx, DBranch.dtype.element_ty, INTERPRETING),
                     mask=mask)

        dw_acc += dy * xhat
        db_acc += dy

    tl.store(Partial + cols * P + pid, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(Partial + (N + cols) * P + pid, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def column_sum_kernel(
    Partial,  # (2 * N, P) compute dtype, contiguous: the backward's partials, one row per column
    DW,  # (N,) weight gradient in the weight's dtype
    DB,  # (N,) bias gradient in the bias's dtype
    P, N,
    BLOCK_C: tl.constexpr,  # partial rows (columns of dweight, then of dbias) per program
    BLOCK_P: tl.constexpr,  # partials summed per step
    INTERPRETING: tl.constexpr,  # under the interpreter: bf16 stores rounded in software (round_to)
):
    """Second stage of the weight and bias gradients: each program sums BLOCK_C rows of the
    partial buffer, BLOCK_P contiguous partials per step, in a fixed order (the same tiles, the
    same tree), so the result is deterministic."""
    rows = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) in [0, 2N)
    row_mask = rows < 2 * N
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=Partial.dtype.element_ty)
    for p_start in range(0, P, BLOCK_P):
        ps = p_start + tl.arange(0, BLOCK_P)
        mask = row_mask[:, None] & (ps < P)[None, :]
        acc += tl.load(Partial + rows.to(tl.int64)[:, None] * P + ps[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=1)  # (BLOCK_C,)
    is_dw = rows < N
    tl.store(DW + rows, round_to(total, DW.dtype.element_ty, INTERPRETING), mask=row_mask & is_dw)
    tl.store(DB + (rows - N), round_to(total, DB.dtype.element_ty, INTERPRETING),
             mask=row_mask & (rows >= N))
