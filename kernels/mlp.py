"""Triton kernels of the transformer MLP: fc2(GELU(fc1(x))) (+ residual), forward and backward.

Three matmul kernels, all tiled matmuls accumulating ``tl.dot`` products in fp32 (fp64 for fp64
inputs), that differ in what they reduce over and in their epilogues, and two small helpers:

  linear_fwd_kernel      Out = residual + scale[sample] * act(X @ W^T + bias)
                         one BLOCK_M x BLOCK_N output tile per program, a K loop
                         fc1: act = GELU (erf, or tanh approximation), no residual
                         fc2: act = identity, optional residual (the block's skip connection)
                         and optional scale (stochastic depth's per-sample 0 or 1/keep)
  gelu_bwd_kernel        DPre = ((scale * DY) @ W2) * GELU'(X @ W1^T + b1)
                         the gradient through fc2 and the GELU in one kernel; the
                         pre-activation is recomputed in the same program (see below); its
                         first column of tiles also stores the scale expanded to rows (RowScale)
  linear_bwd_kernel      the backward's remaining products, each tile by its own programs of
                         one grid: DW = (scale * DY)^T @ X and DB = column sums of scale * DY
                         for one or two layers (the MLP's fc2 then fc1), then DX = G @ W
                         (G the gradient of the layer's output, W its weight)
                         a DW program owns one BLOCK_N x BLOCK_K tile and one slice of the M
                         rows (rows_per_slice); with several slices it stores an fp32 partial
                         tile, summed by weight_grad_reduce_kernel. The bias sums ride along in
                         the programs of the first column of tiles (pid_k == 0), which add the DY
                         tiles they load anyway into an fp32 accumulator. The scale is read per
                         row (RowScale), contiguous: no division of row indices in the loop.
                         The DX programs are linear_fwd_kernel's tiles (W read as it is laid
                         out) and come last, so the many short ones fill the SMs that the
                         weight-gradient programs leave idle.
  weight_grad_reduce_kernel   the slices' partials summed in slice order (fixed, no atomics)
                         and rounded once to each gradient's dtype
  row_scale_kernel       RowScale from the per-sample scale, where no gelu_bwd_kernel runs

The backward kernel reads DY in its own dtype (the fp32 residual stream's gradient under
autocast) and applies stochastic depth's scale in registers, so no scaled 16-bit copy of DY is
stored for it, and the bias sums are taken from the fp32 values before the dot's rounding.

Mixed precision: the GEMM operands are converted in registers to the dtype of X (the compute
dtype, 16-bit under autocast): fp32 weights are loaded as fp32 and rounded to bf16/fp16 right
before ``tl.dot``, an fp32 incoming gradient likewise. The residual and the output may be fp32
(the residual stream), everything else is read in its own dtype and accumulated in fp32. Under
Triton's interpreter (INTERPRETING, set by the launchers) two work-arounds of
``vit_fast.kernels.common`` apply: bf16 dot operands are widened to fp32 (``dot``; the
interpreter's bf16 ``tl.dot`` returns garbage, triton issue 11584; exact: every bf16 value is an
fp32 value, and the GPU accumulates in fp32 too), and stores and operand conversions to bf16
round to nearest even in software (``round_to``).

These kernels serve two ops: ``vit_fast.fused.mlp`` (all three) and the autocast linear,
``vit_fast.fused.linear`` (``linear_fwd_kernel`` without activation, ``linear_bwd_kernel``).

Pre-activation: recomputed, not saved. Per element of the hidden (M, Hd) tensor, saving the
pre-activation in 16 bits costs 2 bytes written by the forward plus 2 bytes read by the
backward (and M*Hd*2 bytes of activation memory held between them); recomputing it inside the
backward kernel costs 2*D FLOPs (a second ``tl.dot`` over the same output tile) and no extra
bytes of the hidden size (the X tiles it reads are M*D, a factor Hd/D smaller, and L2-resident
across the N tiles of a group). On a roofline, with the H100 SXM's 989 TFLOP/s dense fp16 and
3.35 TB/s, 4 bytes cost 1.19 ps and 2*D FLOPs cost 0.39 ps at D = 192 and 0.78 ps at D = 384:
for the CIFAR widths the backward kernel is memory bound and the recompute is the cheaper of
the two (and the forward writes half the bytes); break-even is near D = 590 (A100: D = 400),
so at D = 768 saving would win by the same model. Achieved rates at K = 192 are below peak,
so this choice is to be confirmed by ``benchmarks/bench_mlp.py`` on a GPU.

All offsets that multiply a row index by a stride are int64 (M * stride overflows int32 at
2**31 elements); every load and store is masked, so M, N and K need not be multiples of the
block sizes. Strides are passed for every operand: incoming gradients may be non-contiguous
(even stride 0, from ``y.sum().backward()``) and are read as they are.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vit_fast.kernels.common import dot, round_to

# Activation names understood by the epilogues (constexpr strings select code at compile time).
ACTIVATIONS = ("none", "gelu", "gelu_tanh")

_RSQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_RSQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi), the normal density at 0
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # sqrt(2/pi)
_TANH_CUBIC: tl.constexpr = tl.constexpr(0.044715)  # Hendrycks & Gimpel's cubic coefficient
# (In expressions a tensor comes first: constexpr * tensor breaks in the interpreter of triton 3.8.)


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits at both ends (exp -> inf gives 1, exp -> 0
    # gives -1) and no libdevice call, so the interpreter runs the same code.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu(x, ACTIVATION: tl.constexpr):
    """GELU(x) = x * Phi(x) (erf form) or its tanh approximation; identity for "none"."""
    if ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.math.erf(x * _RSQRT_2))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * x * (1.0 + _tanh((x + x * x * x * _TANH_CUBIC) * _SQRT_2_OVER_PI))
    else:
        return x


# The fp32 normal CDF of _normal_cdf, in two pieces that meet at |x| = _CDF_SPLIT (fitted by
# weighted least squares to the fp64 CDF for this kernel; see docs/kernels.md, "Fused MLP"):
#   |x| <= 1.2:  Phi(x) = 0.5 + x * P(x^2)                      P of degree 5
#   |x| >  1.2:  1 - Phi(|x|) = exp(-x^2 / 2) * Q(|x| - 1.2)     Q of degree 7, |x| clamped to 6
# Evaluated in fp32 over [-12, 12] (2 million points) the CDF is within 8.3e-8 of the exact
# value and GELU' within 1.5e-7; fp32 `erf` from torch gives 7.0e-8 and 1.4e-7 (half an ulp
# of 1.0 is 6.0e-8). Beyond |x| = 6 the tail term is below 1e-9, so the clamp changes nothing
# in fp32 and keeps the polynomial from overflowing where exp(-x^2 / 2) is zero.
_CDF_SPLIT: tl.constexpr = tl.constexpr(1.2)
_CDF_CLAMP: tl.constexpr = tl.constexpr(6.0)
_NEG_HALF_LOG2E: tl.constexpr = tl.constexpr(-0.7213475204444817)  # -log2(e) / 2


@triton.jit
def _normal_cdf(x, gauss):
    """Phi(x) for fp32 ``x``, given ``gauss`` = exp(-x^2 / 2) (which GELU' needs anyway): one
    exponential in all, and polynomials with literal coefficients (FFMA immediates). libdevice's
    erff selects its coefficients per element (two moves each) and takes a second exponential:
    GELU' took 42 SASS instructions per element on sm_90 with it, 28 with this."""
    s = x * x
    p = s * -6.8529853e-06 + 0.000111117
    p = p * s + -0.0011837932
    p = p * s + 0.009972149
    p = p * s + -0.06649014
    p = p * s + 0.39894226
    centre = x * p + 0.5
    t = tl.minimum(tl.abs(x), _CDF_CLAMP) - _CDF_SPLIT
    q = t * -2.3424982e-05 + 0.0002864194
    q = q * t + -0.0016339374
    q = q * t + 0.0061770636
    q = q * t + -0.018600272
    q = q * t + 0.04900256
    q = q * t + -0.11525525
    q = q * t + 0.23640291
    tail = gauss * q  # 1 - Phi(|x|)
    far = tl.where(x > 0.0, 1.0 - tail, tail)
    return tl.where(tl.abs(x) <= _CDF_SPLIT, centre, far)


@triton.jit
def _gelu_grad(x, ACTIVATION: tl.constexpr):
    """d GELU / dx: Phi(x) + x * phi(x) for the erf form; the chain rule through tanh otherwise."""
    if ACTIVATION == "gelu":
        gauss = tl.exp2(x * x * _NEG_HALF_LOG2E)  # exp(-x^2 / 2), one multiply fewer than tl.exp
        if x.dtype == tl.float32:
            cdf = _normal_cdf(x, gauss)
        else:  # fp64 (gradcheck's path): libdevice's erf, exact to fp64
            cdf = 0.5 * (1.0 + tl.math.erf(x * _RSQRT_2))
        return cdf + x * (gauss * _RSQRT_2PI)
    else:
        t = _tanh((x + x * x * x * _TANH_CUBIC) * _SQRT_2_OVER_PI)
        dt_dx = (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + x * x * (3.0 * _TANH_CUBIC))
        return 0.5 * (1.0 + t) + 0.5 * x * dt_dx


@triton.jit
def _tile_coordinates(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile ``pid``, visiting tiles in column-major groups of GROUP_M rows.

    Consecutive programs then share the same few row panels of the left operand and walk across
    the right operand together, so both stay in L2 instead of being re-read from HBM per tile.
    """
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)  # the last group may be short
    pid_m = first_m + (pid % tiles_per_group) % rows_in_group
    pid_n = (pid % tiles_per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _k_step_masks(row_ok, col_ok, offs_k, k_left, EVEN_K: tl.constexpr):
    """The masks of one K step's (BLOCK_M, BLOCK_K) and (BLOCK_K, BLOCK_N) operand tiles, ``k_left``
    columns of K from this step on. With EVEN_K every step is whole and only the tile's rows and
    columns are masked: per-step compares and selects that were about a fifth of a K loop's SASS
    instructions (sm_90, gelu_bwd_kernel) drop out of the loop."""
    if EVEN_K:
        a_mask = tl.broadcast_to(row_ok[:, None], (row_ok.shape[0], offs_k.shape[0]))
        b_mask = tl.broadcast_to(col_ok[None, :], (offs_k.shape[0], col_ok.shape[0]))
    else:
        k_ok = offs_k < k_left  # masked (zero) lanes contribute nothing to the dot
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & col_ok[None, :]
    return a_mask, b_mask


@triton.jit
def _matmul_tile(
    acc,  # (BLOCK_M, BLOCK_N) accumulator, returned with A[rows] @ B[:, cols] added
    A, stride_am, stride_ak,  # left operand (M, K)
    B, stride_bk, stride_bn,  # right operand (K, N); a transposed weight is just swapped strides
    offs_m, offs_n,  # (BLOCK_M,) int64 rows and (BLOCK_N,) int64 columns of this tile
    M, N, K,
    DOT_DTYPE: tl.constexpr,  # both operands are converted to it in registers (fp32 weights -> 16 bits)
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
    EVEN_K: tl.constexpr = False,  # K % BLOCK_K == 0: no step is partial, the loads need no K mask
):
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < N
    for k_start in range(0, K, BLOCK_K):
        a_mask, b_mask = _k_step_masks(row_ok, col_ok, offs_k, K - k_start, EVEN_K)
        a = round_to(tl.load(a_ptrs, mask=a_mask, other=0.0), DOT_DTYPE, INTERPRETING)
        b = round_to(tl.load(b_ptrs, mask=b_mask, other=0.0), DOT_DTYPE, INTERPRETING)
        acc = dot(a, b, acc, INPUT_PRECISION, INTERPRETING)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def linear_fwd_kernel(
    X,  # (M, K) input rows, in the compute dtype
    W,  # (N, K) weight in nn.Linear layout (out_features, in_features), the compute dtype or fp32
    Bias,  # (N,) bias; not read unless HAS_BIAS
    Scale,  # (M // rows_per_sample,) per-sample scale of act(...); not read unless HAS_SCALE
    Residual,  # (M, N) added after the activation, any float dtype; not read unless HAS_RESIDUAL
    Out,  # (M, N) output, any float dtype: residual + scale * act(X W^T + bias)
    M, N, K,
    rows_per_sample,  # row r belongs to sample r // rows_per_sample
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_rm, stride_rn,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "gelu" (erf) or "gelu_tanh"
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32/fp64 (no TF32 rounding), "tf32" otherwise
    INTERPRETING: tl.constexpr,  # under the interpreter: bf16 dots widened, bf16 casts rounded (module docstring)
    EVEN_K: tl.constexpr = False,  # K % BLOCK_K == 0 (the launcher's check): K loads unmasked
):
    pid_m, pid_n = _tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # X W^T: the weight read as a (K, N) operand by swapping its strides, no transpose copy.
    acc = _matmul_tile(acc, X, stride_xm, stride_xk, W, stride_wk, stride_wn, offs_m, offs_n, M, N, K,
                       X.dtype.element_ty, BLOCK_K, INPUT_PRECISION, INTERPRETING, EVEN_K)

    # Epilogue, on the fp32 accumulator while the tile is still in registers: the pre-activation
    # never reaches memory, and the output is rounded to its dtype exactly once.
    row_ok = offs_m < M
    col_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    acc = _gelu(acc, ACTIVATION)
    if HAS_SCALE:
        acc *= tl.load(Scale + offs_m // rows_per_sample, mask=row_ok, other=0.0).to(ACC_DTYPE)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        r_ptrs = Residual + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    out_ptrs = Out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, round_to(acc, Out.dtype.element_ty, INTERPRETING), mask=mask)


@triton.jit
def gelu_bwd_kernel(
    DY,  # (M, K_OUT) gradient of the MLP output, any float dtype and strides (stride 0 included)
    Scale,  # (M // rows_per_sample,) the forward's per-sample scale of fc2's output; HAS_SCALE only
    RowScale,  # (M,) output, ACC_DTYPE: Scale expanded to rows, for linear_bwd_kernel; STORE_ROW_SCALE only
    W2,  # (K_OUT, N) fc2 weight, nn.Linear layout (out_features, hidden), compute dtype or fp32
    X,  # (M, K_IN) MLP input, the compute dtype
    W1,  # (N, K_IN) fc1 weight, nn.Linear layout (hidden, in_features), compute dtype or fp32
    B1,  # (N,) fc1 bias; not read unless HAS_BIAS1
    DPre,  # (M, N) output: gradient w.r.t. fc1's pre-activation, ((scale DY) W2) * GELU'(X W1^T + b1)
    M, N, K_OUT, K_IN,
    rows_per_sample,
    stride_dym, stride_dyk,
    stride_w2k, stride_w2n,
    stride_xm, stride_xk,
    stride_w1n, stride_w1k,
    stride_dpm, stride_dpn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    STORE_ROW_SCALE: tl.constexpr,  # HAS_SCALE and the weight gradients of fc2 want the per-row scale
    ACTIVATION: tl.constexpr,  # "gelu" (erf) or "gelu_tanh": the form the forward used
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
    EVEN_K_OUT: tl.constexpr = False,  # K_OUT % BLOCK_K == 0: the dY and W2 loads need no K mask
    EVEN_K_IN: tl.constexpr = False,  # K_IN % BLOCK_K == 0: the X and W1 loads need no K mask
):
    pid_m, pid_n = _tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < N
    dot_dtype = X.dtype.element_ty

    # Gradient of the hidden activation H, reduced over fc2's output width. The incoming gradient
    # is scaled per sample and converted to the compute dtype in registers (linear_bwd_kernel does
    # the same for dW2 and db2, so no scaled copy of it is ever stored).
    if HAS_SCALE:
        keep = tl.load(Scale + offs_m // rows_per_sample, mask=row_ok, other=0.0).to(ACC_DTYPE)
        if STORE_ROW_SCALE:
            # The first column of tiles hands the rows' scales to linear_bwd_kernel, whose
            # weight-gradient loop then loads them contiguously instead of dividing row indices.
            tl.store(RowScale + offs_m, keep, mask=row_ok & (pid_n == 0))
    offs_k = tl.arange(0, BLOCK_K)
    dy_ptrs = DY + offs_m[:, None] * stride_dym + offs_k[None, :] * stride_dyk  # (BLOCK_M, BLOCK_K)
    w2_ptrs = W2 + offs_k[:, None] * stride_w2k + offs_n[None, :] * stride_w2n  # (BLOCK_K, BLOCK_N)
    grad_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k_start in range(0, K_OUT, BLOCK_K):
        a_mask, b_mask = _k_step_masks(row_ok, col_ok, offs_k, K_OUT - k_start, EVEN_K_OUT)
        a = tl.load(dy_ptrs, mask=a_mask, other=0.0)
        if HAS_SCALE:
            a = a.to(ACC_DTYPE) * keep[:, None]
        a = round_to(a, dot_dtype, INTERPRETING)
        b = round_to(tl.load(w2_ptrs, mask=b_mask, other=0.0), dot_dtype, INTERPRETING)
        grad_h = dot(a, b, grad_h, INPUT_PRECISION, INTERPRETING)
        dy_ptrs += BLOCK_K * stride_dyk
        w2_ptrs += BLOCK_K * stride_w2k
    # The same tile of fc1's pre-activation, recomputed (module docstring: cheaper than saving it
    # at the CIFAR widths), reduced over fc1's input width; two loops because the MLP's input and
    # output widths may differ when there is no residual.
    pre = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    pre = _matmul_tile(pre, X, stride_xm, stride_xk, W1, stride_w1k, stride_w1n, offs_m, offs_n,
                       M, N, K_IN, dot_dtype, BLOCK_K, INPUT_PRECISION, INTERPRETING, EVEN_K_IN)

    if HAS_BIAS1:
        pre += tl.load(B1 + offs_n, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    # The recomputed pre-activation can differ from the forward's in the last fp32 bits (its
    # tile configuration, hence summation order, may differ); GELU' is smooth, so that is far
    # below the rounding of the 16-bit result.
    grad_pre = grad_h * _gelu_grad(pre, ACTIVATION)
    dp_ptrs = DPre + offs_m[:, None] * stride_dpm + offs_n[None, :] * stride_dpn
    tl.store(dp_ptrs, round_to(grad_pre, DPre.dtype.element_ty, INTERPRETING),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def row_scale_kernel(
    Scale,  # (M // rows_per_sample,) per-sample scale
    RowScale,  # (M,) output, ACC_DTYPE: RowScale[r] = Scale[r // rows_per_sample]
    M,
    rows_per_sample,
    BLOCK_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """The per-row scale of linear_bwd_kernel when no gelu_bwd_kernel launch stores it (an MLP
    backward that wants fc2's weight gradients but nothing below fc2)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    keep = tl.load(Scale + offs_m // rows_per_sample, mask=row_ok, other=0.0).to(ACC_DTYPE)
    tl.store(RowScale + offs_m, keep, mask=row_ok)


@triton.jit
def _weight_grad_tiles_k(K, BLOCK_K: tl.constexpr):
    # At least one column of tiles, so that a layer without inputs (K = 0) still gets the
    # programs that store its bias gradient.
    return tl.maximum(tl.cdiv(K, BLOCK_K), 1)


@triton.jit
def _weight_grad_rows(
    acc,  # (BLOCK_N, BLOCK_K) accumulator of (scale DY)^T X, returned with the rows added
    bias_acc,  # (BLOCK_N, BLOCK_M) elementwise sums of scale DY, returned with the rows added if WITH_BIAS
    dy_ptrs,  # (BLOCK_N, BLOCK_M) pointers to DY^T at the first row, m_begin
    x_ptrs,  # (BLOCK_M, BLOCK_K) pointers to X at the first row
    RowScale,  # (M,) per-row scale of DY; HAS_SCALE only
    m_begin, m_end,  # the rows reduced: [m_begin, m_end)
    n_ok, k_ok,  # the tile's valid columns of DY and of X
    stride_dym, stride_xm,
    BLOCK_M: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WITH_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    for m_start in range(m_begin, m_end, BLOCK_M):
        row_ok = rows < m_end - m_start
        dy = tl.load(dy_ptrs, mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        if HAS_SCALE:
            # BLOCK_M contiguous per-row scales: no sample index to divide out, no gather.
            keep = tl.load(RowScale + m_start + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
            dy = dy.to(ACC_DTYPE) * keep[None, :]
        if WITH_BIAS:
            bias_acc += dy.to(ACC_DTYPE)
        a = round_to(dy, DOT_DTYPE, INTERPRETING)
        b = round_to(tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0), DOT_DTYPE, INTERPRETING)
        acc = dot(a, b, acc, INPUT_PRECISION, INTERPRETING)
        dy_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm
    return acc, bias_acc


@triton.jit
def _weight_grad_tile(
    program,  # this layer's weight-gradient program: slice program // tiles, tile program % tiles
    DY, RowScale, X,  # as in linear_bwd_kernel, for one layer
    DWOut,  # (N, K) contiguous: DW itself, or slice 0's partial tile of it (then DBOut's too)
    DBOut,  # (N,) contiguous: DB, or slice 0's partial bias sums; HAS_BIAS only
    out_slice_stride,  # elements from one slice's partials to the next (0 unsplit: one slice)
    M, N, K,
    rows_per_slice,  # rows each program reduces, a multiple of BLOCK_M (M or more: one slice)
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    tiles_k = _weight_grad_tiles_k(K, BLOCK_K)
    tiles = tl.cdiv(N, BLOCK_N) * tiles_k
    slice_id = program // tiles
    tile = program % tiles
    pid_n = tile // tiles_k
    pid_k = tile % tiles_k
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_begin = slice_id * rows_per_slice
    m_end = tl.minimum(M, m_begin + rows_per_slice)
    rows = m_begin.to(tl.int64) + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    k_ok = offs_k < K
    dot_dtype = X.dtype.element_ty
    # DY read transposed through its strides, (BLOCK_N, BLOCK_M): the left operand of DY^T X.
    dy_ptrs = DY + offs_n[:, None] * stride_dyn + rows[None, :] * stride_dym
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    # The bias sums accumulate elementwise and are reduced once after the loop (no cross-thread
    # reduction per step, a fixed order), by the first column of tiles only (pid_k == 0): the
    # other programs run a loop without them.
    bias_acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC_DTYPE)
    if HAS_BIAS:
        if pid_k == 0:
            acc, bias_acc = _weight_grad_rows(acc, bias_acc, dy_ptrs, x_ptrs, RowScale, m_begin, m_end, n_ok, k_ok,
                                              stride_dym, stride_xm, BLOCK_M, HAS_SCALE, True, ACC_DTYPE, dot_dtype,
                                              INPUT_PRECISION, INTERPRETING)
        else:
            acc, bias_acc = _weight_grad_rows(acc, bias_acc, dy_ptrs, x_ptrs, RowScale, m_begin, m_end, n_ok, k_ok,
                                              stride_dym, stride_xm, BLOCK_M, HAS_SCALE, False, ACC_DTYPE, dot_dtype,
                                              INPUT_PRECISION, INTERPRETING)
    else:
        acc, bias_acc = _weight_grad_rows(acc, bias_acc, dy_ptrs, x_ptrs, RowScale, m_begin, m_end, n_ok, k_ok,
                                          stride_dym, stride_xm, BLOCK_M, HAS_SCALE, False, ACC_DTYPE, dot_dtype,
                                          INPUT_PRECISION, INTERPRETING)
    # DW and DB are contiguous: (N, K) with row stride K, and (N,); partials are the accumulator's
    # dtype, so round_to leaves them as they are.
    out_offset = slice_id.to(tl.int64) * out_slice_stride
    dw_ptrs = DWOut + out_offset + offs_n[:, None] * K + offs_k[None, :]
    tl.store(dw_ptrs, round_to(acc, DWOut.dtype.element_ty, INTERPRETING), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        db = tl.sum(bias_acc, axis=1)
        tl.store(DBOut + out_offset + offs_n, round_to(db, DBOut.dtype.element_ty, INTERPRETING),
                 mask=n_ok & (pid_k == 0))


@triton.jit
def _input_grad_tile(
    tile,  # this program's tile of DX, in _tile_coordinates' order
    G, W, DX,  # as in linear_bwd_kernel
    M, N, K,  # DX (M, K) = G (M, N) @ W (N, K): a reduction over the layer's N output features
    stride_gm, stride_gn,
    stride_wn, stride_wk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # DX tile columns (input features)
    BLOCK_K: tl.constexpr,  # output features reduced per step
    GROUP_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    pid_m, pid_n = _tile_coordinates(tile, M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # The weight (N, K) is the (reduction, column) operand as it is laid out; an fp32 weight is
    # rounded to DX's dtype (the compute dtype) in registers.
    acc = _matmul_tile(acc, G, stride_gm, stride_gn, W, stride_wn, stride_wk, offs_m, offs_n, M, K, N,
                       DX.dtype.element_ty, BLOCK_K, INPUT_PRECISION, INTERPRETING)
    dx_ptrs = DX + offs_m[:, None] * K + offs_n[None, :]  # DX is the op's own contiguous (M, K) output
    tl.store(dx_ptrs, round_to(acc, DX.dtype.element_ty, INTERPRETING),
             mask=(offs_m < M)[:, None] & (offs_n < K)[None, :])


@triton.jit
def linear_bwd_kernel(
    DY,  # (M, N) gradient of the first layer's output, any float dtype and strides (stride 0 included)
    RowScale,  # (M,) per-row scale of DY (stochastic depth's, expanded by gelu_bwd_kernel), ACC_DTYPE; HAS_SCALE only
    X,  # (M, K) the first layer's input, the compute dtype (the dot's operand dtype), any strides
    DW,  # (N, K) output, contiguous, the weight's dtype: (scale DY)^T X accumulated in ACC_DTYPE
    DB,  # (N,) output, contiguous, the bias's dtype: column sums of scale DY; HAS_BIAS only
    DY2, X2, DW2, DB2,  # the second layer's, LAYERS == 2 only (its DY is never scaled)
    G,  # (MX, NX) the gradient whose product with W is DX, the compute dtype, any strides; HAS_DX only
    W,  # (NX, KX) that layer's weight, the compute dtype or fp32, any strides; HAS_DX only
    DX,  # (MX, KX) output, contiguous, the compute dtype: G @ W; HAS_DX only
    Partial,  # (slices, part_size) ACC_DTYPE partial sums, SPLIT only: per slice DW, DB, DW2, DB2 in a row
    M,  # rows, shared by the layers
    N, K, N2, K2, NX, KX,
    rows_per_slice,  # rows each weight-gradient program reduces, a multiple of BLOCK_M
    slices,  # cdiv(M, rows_per_slice): weight-gradient programs per tile
    part_db, part_dw2, part_db2, part_size,  # where DB's, DW2's and DB2's partials start in a slice's row; its length
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_dy2m, stride_dy2n,
    stride_x2m, stride_x2k,
    stride_gm, stride_gn,
    stride_wn, stride_wk,
    BLOCK_M: tl.constexpr,  # rows reduced per step of a weight-gradient tile
    BLOCK_N: tl.constexpr,  # DW tile rows (output features)
    BLOCK_K: tl.constexpr,  # DW tile columns (input features)
    DX_BLOCK_M: tl.constexpr,  # DX tile rows
    DX_BLOCK_N: tl.constexpr,  # DX tile columns
    DX_BLOCK_K: tl.constexpr,  # output features reduced per step of a DX tile
    DX_GROUP_M: tl.constexpr,
    LAYERS: tl.constexpr,  # 0, 1 or 2 layers' weight (and bias) gradients, in this order
    SPLIT: tl.constexpr,  # slices > 1: partials into Partial, summed by weight_grad_reduce_kernel
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    HAS_DX: tl.constexpr,  # DX's tiles after the weight-gradient tiles
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    # Programs in this order: the first layer's weight-gradient programs (slice-major: the tiles of
    # one slice of rows run together and share its DY and X rows in L2), the second's, DX's tiles.
    # The many short DX programs come last, so they fill the SMs the others leave idle.
    program = tl.program_id(0)
    programs = 0
    if LAYERS >= 1:
        programs = tl.cdiv(N, BLOCK_N) * _weight_grad_tiles_k(K, BLOCK_K) * slices
    programs2 = 0
    if LAYERS == 2:
        programs2 = tl.cdiv(N2, BLOCK_N) * _weight_grad_tiles_k(K2, BLOCK_K) * slices
    if SPLIT:
        dw_out, db_out, dw2_out, db2_out = Partial, Partial + part_db, Partial + part_dw2, Partial + part_db2
        slice_stride = part_size
    else:
        dw_out, db_out, dw2_out, db2_out = DW, DB, DW2, DB2
        slice_stride = 0
    if program < programs:
        _weight_grad_tile(program, DY, RowScale, X, dw_out, db_out, slice_stride, M, N, K, rows_per_slice,
                          stride_dym, stride_dyn, stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_K, HAS_SCALE,
                          HAS_BIAS, ACC_DTYPE, INPUT_PRECISION, INTERPRETING)
    elif program < programs + programs2:
        _weight_grad_tile(program - programs, DY2, RowScale, X2, dw2_out, db2_out, slice_stride, M, N2, K2,
                          rows_per_slice, stride_dy2m, stride_dy2n, stride_x2m, stride_x2k, BLOCK_M, BLOCK_N, BLOCK_K,
                          False, HAS_BIAS2, ACC_DTYPE, INPUT_PRECISION, INTERPRETING)
    elif HAS_DX:
        _input_grad_tile(program - programs - programs2, G, W, DX, M, NX, KX, stride_gm, stride_gn, stride_wn,
                         stride_wk, DX_BLOCK_M, DX_BLOCK_N, DX_BLOCK_K, DX_GROUP_M, ACC_DTYPE, INPUT_PRECISION,
                         INTERPRETING)


@triton.jit
def _store_segment(Out, values, offs, start, end, INTERPRETING: tl.constexpr):
    """Out[i - start] = values[i] for the offsets i in [start, end) (one output in a row of partials)."""
    tl.store(Out + (offs - start), round_to(values, Out.dtype.element_ty, INTERPRETING),
             mask=(offs >= start) & (offs < end))


@triton.jit
def weight_grad_reduce_kernel(
    Partial,  # (SLICES, part_size) linear_bwd_kernel's partial sums, ACC_DTYPE, contiguous
    DW, DB, DW2, DB2,  # outputs, contiguous, each its parameter's dtype (any valid pointer when absent)
    part_db, part_dw2, part_db2, part_size,  # the outputs' segments of a row: DW [0, part_db), DB up to part_dw2, ...
    SLICES: tl.constexpr,  # partial rows to sum (a constant of the run: it follows the batch's rows)
    BLOCK: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    """The weight and bias gradients of a split linear_bwd_kernel launch: each element the sum of
    its slices' partials in slice order (0, 1, 2, ...) in the partials' dtype, then rounded once to
    its output's dtype. Fixed order, no atomics: the result does not depend on scheduling. The
    slices are unrolled (a constexpr count), so a thread issues all its loads before the first
    add needs one: a runtime loop waited one load latency per slice (20 for vit-cifar's proj)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < part_size
    total = tl.load(Partial + offs, mask=ok, other=0.0)
    for i in tl.static_range(1, SLICES):
        total += tl.load(Partial + i * part_size + offs, mask=ok, other=0.0)
    _store_segment(DW, total, offs, 0, part_db, INTERPRETING)
    _store_segment(DB, total, offs, part_db, part_dw2, INTERPRETING)
    _store_segment(DW2, total, offs, part_dw2, part_db2, INTERPRETING)
    _store_segment(DB2, total, offs, part_db2, part_size, INTERPRETING)
