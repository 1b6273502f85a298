"""Soft-target cross-entropy with label smoothing over (B, K) logits: Triton kernels.

For row b with logits z (K,), the mixed target is

    m_k  = (1 - s) * t_k + s / K        t: the one-hot of label y_b, or the soft target row
    loss = sum_k m_k * (lse - z_k),     lse = log sum_k exp(z_k)   (= -sum_k m_k log softmax(z)_k)

and the batch loss is the mean over rows, as ``F.cross_entropy(logits.float(), target,
label_smoothing=s)`` computes it. Its gradient is

    dz_k = (softmax(z)_k * sum_j m_j - m_k) * grad / B

(``sum_j m_j`` is 1 for labels and for soft targets that sum to 1; soft targets that do not are
taken as they are, as PyTorch does).

Forward: one program walks every row in a fixed order, ``BLOCK_B`` rows at a time with the whole
row in registers, keeps the per-row losses of each tile slot in a (BLOCK_B,) accumulator and sums
that once at the end: the same order, so the same bits, on every run (no atomics). Backward: one
program per tile of rows, no cross-row reduction; it recomputes each row's max and sum of
exponentials from the row it reads anyway, so the forward saves nothing.

Logits are read in their own dtype (fp16, bf16, fp32, fp64) and converted in registers: no cast
kernel runs before the loss. Arithmetic is in the dtype of the ``Loss`` buffer (fp32; fp64 for
fp64 logits, which gradcheck uses). The gradient is stored in the logits' dtype, through
``vit_fast.kernels.common.round_to``: under Triton's interpreter (the backward's INTERPRETING, set
by the launcher) fp32 -> bf16 rounded to nearest even in software. The forward needs no
work-around (it stores only the fp32 loss).

Edge cases (the launcher's module documents them for users):
  * a class with target weight m_k = 0 contributes nothing (not 0 * (lse - z_k)), so a -inf logit
    there is a class of probability 0 and the loss stays finite; a -inf logit with m_k > 0 makes
    the loss +inf (its gradient stays finite), as in PyTorch;
  * a label outside [0, K) makes its row's loss and gradient NaN: the batch loss is then NaN,
    which the training loop's non-finite watch reports, instead of a host-side check (a sync).
"""

from __future__ import annotations

import triton
import triton.language as tl

from vit_fast.kernels.common import round_to


@triton.jit
def _mixed_target(Labels, Target, rows64, rows, cols, mask, row_mask, stride_tb, stride_tk, K, smoothing,
                  acc_dtype: tl.constexpr, SOFT: tl.constexpr):
    """The (BLOCK_B, BLOCK_K) mixed target m (0 in masked lanes) and each row's validity."""
    if SOFT:
        t = tl.load(Target + rows64 * stride_tb + cols.to(tl.int64)[None, :] * stride_tk, mask=mask,
                    other=0.0).to(acc_dtype)
        valid = row_mask
    else:
        label = tl.load(Labels + rows, mask=row_mask, other=0)
        t = tl.where(cols[None, :] == label[:, None], 1.0, 0.0).to(acc_dtype)
        valid = (label >= 0) & (label < K)
    s = tl.zeros((), acc_dtype) + smoothing  # s / K in the compute dtype (fp64 for fp64 logits)
    m = (1.0 - s) * t + s / K
    return tl.where(mask, m, 0.0), valid


@triton.jit
def _log_softmax(Logits, rows64, cols, mask, row_mask, stride_lb, stride_lk, acc_dtype: tl.constexpr):
    """log softmax of a (BLOCK_B, BLOCK_K) tile of logits read in their dtype (-inf in padding).

    Computed as (z - max) - log(sum exp(z - max)), never z - lse with lse rounded: at logits of
    1e4 an fp32 lse is off by half an ulp of 1e4 (5e-4), which would shift every probability."""
    z = tl.load(Logits + rows64 * stride_lb + cols.to(tl.int64)[None, :] * stride_lk, mask=mask,
                other=float("-inf")).to(acc_dtype)
    # Padding rows (all -inf) get max 0 and sum 1 so they stay NaN-free; a real row of -inf
    # logits keeps its -inf max and comes out NaN, as in PyTorch (it has no distribution).
    row_max = tl.where(row_mask, tl.max(z, axis=1), 0.0)
    shifted = z - row_max[:, None]
    sum_exp = tl.where(row_mask, tl.sum(tl.exp(shifted), axis=1), 1.0)
    return shifted - tl.log(sum_exp)[:, None]


@triton.jit
def cross_entropy_fwd_kernel(
    Logits,  # (B, K) any float dtype, any strides
    Labels,  # (B,) int64 class indices; read only when not SOFT
    Target,  # (B, K) soft targets, any strides; read only when SOFT
    Loss,  # () the batch mean, in the compute dtype (fp32, or fp64 for fp64 logits)
    stride_lb, stride_lk,
    stride_tb, stride_tk,
    B, K,
    smoothing,  # label smoothing s in [0, 1]
    SOFT: tl.constexpr,  # targets are (B, K) probabilities, not labels
    BLOCK_B: tl.constexpr,  # rows per step
    BLOCK_K: tl.constexpr,  # power of two >= K: the whole row is one block
):
    acc_dtype = Loss.dtype.element_ty
    cols = tl.arange(0, BLOCK_K)
    col_mask = cols < K
    total = tl.zeros((BLOCK_B,), dtype=acc_dtype)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        logp = _log_softmax(Logits, rows64, cols, mask, row_mask, stride_lb, stride_lk, acc_dtype)
        m, valid = _mixed_target(Labels, Target, rows64, rows, cols, mask, row_mask, stride_tb, stride_tk,
                                 K, smoothing, acc_dtype, SOFT)
        # Lanes of weight 0 (padding included) contribute 0 * 0, never 0 * -inf.
        row_loss = -tl.sum(m * tl.where(m != 0.0, logp, 0.0), axis=1)
        row_loss = tl.where(valid, row_loss, float("nan"))
        total += tl.where(row_mask, row_loss, 0.0)
    tl.store(Loss, tl.sum(total, axis=0) / B)


@triton.jit
def cross_entropy_bwd_kernel(
    Logits,  # (B, K) the forward's logits, any strides
    Labels,  # (B,) int64; read only when not SOFT
    Target,  # (B, K) soft targets; read only when SOFT
    Grad,  # () gradient of the batch loss, compute dtype: read on the device, never on the host
    DLogits,  # (B, K) gradient of the logits in their dtype, contiguous
    stride_lb, stride_lk,
    stride_tb, stride_tk,
    B, K,
    smoothing,
    SOFT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRETING: tl.constexpr,  # under the interpreter: bf16 stores rounded in software (round_to)
):
    acc_dtype = Grad.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_K)
    row_mask = rows < B
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    # The row statistics are recomputed from the row in registers (cheaper than saving them).
    p = tl.exp(_log_softmax(Logits, rows64, cols, mask, row_mask, stride_lb, stride_lk, acc_dtype))
    m, valid = _mixed_target(Labels, Target, rows64, rows, cols, mask, row_mask, stride_tb, stride_tk,
                             K, smoothing, acc_dtype, SOFT)
    scale = tl.load(Grad).to(acc_dtype) / B
    dz = (p * tl.sum(m, axis=1)[:, None] - m) * scale
    dz = tl.where(valid[:, None], dz, float("nan"))
    tl.store(DLogits + rows64 * K + cols[None, :], round_to(dz, DLogits.dtype.element_ty, INTERPRETING),
             mask=mask)
