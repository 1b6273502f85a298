"""FlashAttention-style fused attention in Triton: forward and deterministic backward.

Non-causal softmax(Q K^T * scale) V for one (batch, head) pair per program column, computed tile
by tile so that the (N, N) attention matrix never reaches global memory (Dao et al., 2022,
"FlashAttention", arXiv:2205.14135; the backward follows FlashAttention-2, arXiv:2307.08691,
Algorithm 2, split into a dK/dV pass and a dQ pass so that no atomics are needed; where one
dK/dV program holds every key of its head, it computes delta and dQ as well, and the backward is
that one kernel).

Layout contract, shared by every kernel here: each of q, k, v, o, do, dq, dk, dv is addressed as a
(B, H, N, D) tensor through four strides, of which the last (head dim) is 1. That covers both the
plain contiguous (B, H, N, D) layout and views into the packed projection output (B, N, 3, H, D)
or into an output of shape (B, N, H, D) == (B, N, H*D), so no permute or copy is ever needed.
The per-row statistics LSE and Delta are contiguous (B, H, N) in the accumulation dtype. Batch
and head offsets are int64 (B * H * N * D can pass 2**31); offsets within one (b, h) slice,
N * stride_n, stay int32. The grid is 1-D: program = (b * H + h) * num_tiles + tile.

Numerics: logits, the running max, the running sum and the accumulators are fp32 (fp64 for fp64
inputs, which exist so that gradcheck can verify the real kernels); the softmax
uses exp2 with the scale folded into log2(e) * scale. Probabilities are cast to the input dtype
only as tl.dot operands (the same rounding FlashAttention does). Padding, to the tile size in N
and to a power of two in D, is done with masked loads (zeros) and with -inf / 0 on the logits of
keys past the end; nothing is copied.

Under Triton's interpreter (INTERPRETING, set by the launchers) the dots and the casts to the
input dtype go through ``vit_fast.kernels.common``'s work-arounds: bf16 ``tl.dot`` operands are
multiplied as fp32 (``dot``) and fp32 -> bf16 casts are rounded to nearest even in software
(``round_to``); fp16, fp32 and fp64 run unchanged, and so does every compiled kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vit_fast.kernels.common import dot, round_to

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)


@triton.jit
def _program_position(N_CTX, H, BLOCK: tl.constexpr):
    """(tile index along N, flattened batch*head index, batch, head) of this program in a 1-D grid
    of cdiv(N, BLOCK) * B * H programs. Tiles of one head are adjacent, so they run together and
    share that head's K and V in L2; and a 1-D grid has no 65535 limit on B * H. Batch and head
    come back as int64, so the offsets they multiply cannot overflow."""
    num_tiles = tl.cdiv(N_CTX, BLOCK)
    pid = tl.program_id(0)
    pid_bh = pid // num_tiles
    return pid % num_tiles, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _head(Ptr, off_b, off_h, stride_b, stride_h):
    """Ptr moved to the (off_b, off_h) slice of a (B, H, N, D) tensor."""
    return Ptr + off_b * stride_b + off_h * stride_h


@triton.jit
def _four_at_head(A, B, C, D, off_b, off_h, stride_ab, stride_ah, stride_bb, stride_bh, stride_cb, stride_ch,
                  stride_db, stride_dh):
    """_head of four (B, H, N, D) tensors at once: q, k, v and o (forward) or dO (backward)."""
    return (_head(A, off_b, off_h, stride_ab, stride_ah), _head(B, off_b, off_h, stride_bb, stride_bh),
            _head(C, off_b, off_h, stride_cb, stride_ch), _head(D, off_b, off_h, stride_db, stride_dh))


@triton.jit
def _rows(Ptr, offs_rows, stride_n, offs_d):
    """(rows, BLOCK_D) pointers to rows ``offs_rows`` of one head's (N, D) slice (stride 1 on D)."""
    return Ptr + offs_rows[:, None] * stride_n + offs_d[None, :]


@triton.jit
def attention_fwd_kernel(
    Q, K, V,  # (B, H, N, D) each, any strides with stride_*d == 1
    Out,  # (B, H, N, D) view of the output, written in the input dtype
    LSE,  # (B, H, N) ACC_DTYPE, contiguous: log-sum-exp of each row of scaled logits (natural log)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H,  # number of heads
    N_CTX,  # sequence length N
    HEAD_DIM,  # D, a multiple of 8 not above BLOCK_D
    sm_scale,  # softmax scale (usually 1/sqrt(D))
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop iteration; >= N means one tile covers the sequence
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two (>= 16 for tl.dot)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32/fp64 inputs (no TF32 rounding), else "tf32" (ignored)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs (so gradcheck can verify)
    INTERPRETING: tl.constexpr,  # under the interpreter: bf16 dots widened, bf16 casts rounded (module docstring)
):
    pid_m, pid_bh, off_b, off_h = _program_position(N_CTX, H, BLOCK_M)
    Q, K, V, Out = _four_at_head(Q, K, V, Out, off_b, off_h, stride_qb, stride_qh, stride_kb, stride_kh,
                                 stride_vb, stride_vh, stride_ob, stride_oh)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask_d = offs_d < HEAD_DIM

    q = tl.load(_rows(Q, offs_m, stride_qn, offs_d),
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    qk_scale = sm_scale * LOG2E  # logits in log2 units, so the softmax is exp2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)  # running unnormalised output

    for start_n in range(0, N_CTX, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_CTX
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(_rows(K, offs_n, stride_kn, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_rows(V, offs_n, stride_vn, offs_d), mask=kv_mask, other=0.0)

        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), INPUT_PRECISION, INTERPRETING) * qk_scale
        # Keys past the end get -inf. Every tile starts below N_CTX, so each row keeps at least
        # one finite logit and m_new is finite: no inf - inf below.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max (0 at first)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(round_to(p, v.dtype, INTERPRETING), v, tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE),
                                         INPUT_PRECISION, INTERPRETING)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(_rows(Out, offs_m, stride_on, offs_d), round_to(acc, Out.dtype.element_ty, INTERPRETING),
             mask=mask_m[:, None] & mask_d[None, :])
    # Back to natural-log units: lse = ln(sum_j exp(scale * q.k_j)).
    lse = (m_i + tl.log2(l_i)) / LOG2E
    tl.store(LSE + pid_bh.to(tl.int64) * N_CTX + offs_m, lse, mask=mask_m)


@triton.jit
def attention_bwd_preprocess_kernel(
    Out, dOut,  # (B, H, N, D) each, stride_*d == 1
    Delta,  # (B, H, N) ACC_DTYPE, contiguous: rowsum(dO * O), the softmax-backward correction
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N_CTX, HEAD_DIM,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_m, pid_bh, off_b, off_h = _program_position(N_CTX, H, BLOCK_M)
    Out = _head(Out, off_b, off_h, stride_ob, stride_oh)
    dOut = _head(dOut, off_b, off_h, stride_dob, stride_doh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(_rows(Out, offs_m, stride_on, offs_d), mask=mask, other=0.0).to(ACC_DTYPE)
    do = tl.load(_rows(dOut, offs_m, stride_don, offs_d), mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(Delta + pid_bh.to(tl.int64) * N_CTX + offs_m, tl.sum(o * do, axis=1), mask=mask_m)


@triton.jit
def _add_pair(a0, a1, b0, b1):
    """Combine step of a tl.reduce that sums two tensors at once."""
    return a0 + b0, a1 + b1


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, dOut,  # (B, H, N, D) each, stride_*d == 1
    dK, dV,  # (B, H, N, D) views of the gradients, written in the input dtype
    dQ,  # (B, H, N, D) view, written only when FUSE_DQ
    LSE,  # (B, H, N) ACC_DTYPE, contiguous
    Delta,  # (B, H, N) ACC_DTYPE, contiguous; read only without FUSE_DQ (else a placeholder)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqn,
    H, N_CTX, HEAD_DIM,
    sm_scale,
    BLOCK_M: tl.constexpr,  # query rows per loop iteration
    BLOCK_N: tl.constexpr,  # keys owned by this program
    BLOCK_D: tl.constexpr,
    FUSE_DQ: tl.constexpr,  # BLOCK_N >= N: this program holds every key of its head
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    """One program owns a tile of keys and accumulates its dK and dV over all query tiles, so each
    element of dK and dV is written once, by one program: deterministic without atomics.

    Works on transposed tiles (keys along rows) so that both accumulations are plain products:
    dV = P^T dO and dK = scale * dS^T Q, with dS = P * (dP - Delta) and dP = dO V^T.

    With FUSE_DQ the program sees every key of the head, so dQ = scale * dS K of a query tile is
    complete within one loop step: it is stored there, and the dQ kernel (which would reload K, V,
    Q and dO and recompute P) is not launched. Holding every key, it also has whole rows of P and
    dP, so it computes delta as rowsum(P * dP) / rowsum(P), equal to rowsum(dO * O) since O = P V
    and rows of P sum to 1, and the preprocess kernel is not launched either: the whole backward
    is this one launch. That is the ViT-on-CIFAR case, N = 65. This delta is also the more
    accurate one: it is summed from fp32 P and dP, where rowsum(dO * O) reads O rounded to the
    input dtype, an error that dP - delta magnifies when the two nearly cancel (bf16 with very
    few keys).
    """
    pid_n, pid_bh, off_b, off_h = _program_position(N_CTX, H, BLOCK_N)
    Q, K, V, dOut = _four_at_head(Q, K, V, dOut, off_b, off_h, stride_qb, stride_qh, stride_kb, stride_kh,
                                  stride_vb, stride_vh, stride_dob, stride_doh)
    dK = _head(dK, off_b, off_h, stride_dkb, stride_dkh)
    dV = _head(dV, off_b, off_h, stride_dvb, stride_dvh)
    dQ = _head(dQ, off_b, off_h, stride_dqb, stride_dqh)
    LSE += pid_bh.to(tl.int64) * N_CTX
    Delta += pid_bh.to(tl.int64) * N_CTX

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_CTX
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(_rows(K, offs_n, stride_kn, offs_d), mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(_rows(V, offs_n, stride_vn, offs_d), mask=kv_mask, other=0.0)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    for start_m in range(0, N_CTX, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_CTX
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(_rows(Q, offs_m, stride_qn, offs_d), mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(_rows(dOut, offs_m, stride_don, offs_d), mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + offs_m, mask=mask_m, other=0.0) * LOG2E  # (BLOCK_M,)

        # P^T recomputed from the saved log-sum-exp: exactly the forward's normalised softmax.
        s_t = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], ACC_DTYPE), INPUT_PRECISION, INTERPRETING) * qk_scale
        # Padding is zero vectors, whose p = exp2(-lse2) is not 0 (and overflows for very negative
        # lse): zero p outside the real (key, query) pairs.
        p_t = tl.where(mask_n[:, None] & mask_m[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += dot(round_to(p_t, do.dtype, INTERPRETING), do, tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE), INPUT_PRECISION,
                  INTERPRETING)
        dp_t = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], ACC_DTYPE), INPUT_PRECISION, INTERPRETING)
        if FUSE_DQ:  # every key of the head is here: sums over keys (padded ones have p = 0)
            # Divided by the recomputed rowsum(P), which is 1 up to the rounding of s - lse, so that
            # dS sums to zero over each row as in exact arithmetic: otherwise that rounding times a
            # component that all keys share (large where logits are large) would leak into dQ.
            # Both sums in one reduction: one exchange across the warps instead of two (a barrier
            # less per query tile in the SASS).
            p_sum, pdp_sum = tl.reduce((p_t, p_t * dp_t), 0, _add_pair)
            delta = tl.where(mask_m, pdp_sum / tl.where(mask_m, p_sum, 1.0), 0.0)
        else:
            delta = tl.load(Delta + offs_m, mask=mask_m, other=0.0)
        ds_t = round_to(p_t * (dp_t - delta[None, :]), q.dtype, INTERPRETING)
        dk += dot(ds_t, q, tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE), INPUT_PRECISION, INTERPRETING)
        if FUSE_DQ:
            dq = dot(tl.trans(ds_t), k, tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE), INPUT_PRECISION,
                     INTERPRETING) * sm_scale
            tl.store(_rows(dQ, offs_m, stride_dqn, offs_d), round_to(dq, dQ.dtype.element_ty, INTERPRETING),
                     mask=q_mask)

    dk *= sm_scale  # d(scale * q.k)/dk = scale * q; applied once instead of per tile
    tl.store(_rows(dK, offs_n, stride_dkn, offs_d), round_to(dk, dK.dtype.element_ty, INTERPRETING), mask=kv_mask)
    tl.store(_rows(dV, offs_n, stride_dvn, offs_d), round_to(dv, dV.dtype.element_ty, INTERPRETING), mask=kv_mask)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, dOut,  # (B, H, N, D) each, stride_*d == 1
    dQ,  # (B, H, N, D) view of the gradient, written in the input dtype
    LSE, Delta,  # (B, H, N) ACC_DTYPE, contiguous
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N_CTX, HEAD_DIM,
    sm_scale,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # keys per loop iteration
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    """One program owns a tile of queries and accumulates dQ = scale * dS K over all key tiles."""
    pid_m, pid_bh, off_b, off_h = _program_position(N_CTX, H, BLOCK_M)
    Q, K, V, dOut = _four_at_head(Q, K, V, dOut, off_b, off_h, stride_qb, stride_qh, stride_kb, stride_kh,
                                  stride_vb, stride_vh, stride_dob, stride_doh)
    dQ = _head(dQ, off_b, off_h, stride_dqb, stride_dqh)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_CTX
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(_rows(Q, offs_m, stride_qn, offs_d), mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(_rows(dOut, offs_m, stride_don, offs_d), mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N_CTX + offs_m, mask=mask_m, other=0.0) * LOG2E
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N_CTX + offs_m, mask=mask_m, other=0.0)
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for start_n in range(0, N_CTX, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_CTX
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(_rows(K, offs_n, stride_kn, offs_d), mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(_rows(V, offs_n, stride_vn, offs_d), mask=kv_mask, other=0.0)

        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), INPUT_PRECISION, INTERPRETING) * qk_scale
        # Keys past the end are zero vectors, whose p would be exp2(-lse2) != 0: zero them.
        p = tl.where(mask_n[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE), INPUT_PRECISION, INTERPRETING)
        ds = p * (dp - delta[:, None])
        dq += dot(round_to(ds, k.dtype, INTERPRETING), k, tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE), INPUT_PRECISION,
                  INTERPRETING)

    dq *= sm_scale
    tl.store(_rows(dQ, offs_m, stride_dqn, offs_d), round_to(dq, dQ.dtype.element_ty, INTERPRETING), mask=q_mask)
