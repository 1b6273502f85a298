"""The end of the training data phase in one pass: normalise, random erasing, mixup / cutmix and
the (smoothed, mixed) one-hot targets. Triton kernel.

One program per (pair, tile): pair p holds the mix partners i = p and j = B-1-p (the middle image
of an odd batch pairs with itself), tile t a run of ``BLOCK_N`` elements of the flattened image
(C * H * W). The program reads both images' uint8 pixels of the tile once and writes both mixed
images' pixels; the programs of tile 0 also write both target rows. Per pixel, for image i:

    v  = (u8 / 255 - mean[c]) / std[c]                 (float32, in torch's order)
    v  = value[i, c, y, x] if erase box i holds (y, x) else v      (ERASE; value 0 without VALUES)
    x_i = v_j  inside cutmix box i,  v_i outside        (MIX, use_cut[i])
    x_i = lam_mix[i] * v_i + (1 - lam_mix[i]) * v_j     (MIX, not use_cut[i])
    x_i = v_i                                           (MIX_APPLIED and not applied[i])

and its targets t_i[k] = on_value if k == label[i] else off_value, mixed as
lam[i] * t_i + (1 - lam[i]) * t_j (unless not applied[i]). Mixing parameters are read at index
i * stride_mix: stride 0 gives the whole batch one set ("batch" mode). Offsets are 32-bit: the
launcher refuses tensors of 2**31 elements or more.

Exactness: every operation is the one the torch data phase runs, on float32 in the same order,
so the batch is bit-identical to it on the same device. Two device differences of torch are
followed: its CUDA division by a Python scalar multiplies by the float32 reciprocal
(DIVIDE_BY_RECIPROCAL, with ``inv_255`` = float32(1) / float32(255)), its CPU division divides;
divisions use ``div_rn`` (Triton's ``/`` is an approximate division on NVIDIA GPUs). The
launcher turns off the compiler's fusion of multiplies and adds into FMAs, which round once
where torch's separate kernels round twice.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _finished_pixels(Images, Mean, Std, Top, Left, EHeight, EWidth, EOn, Values, img, c, y, x, inside, inv_255,
                     stride_ib, stride_ic, stride_ih, stride_iw, stride_box, stride_on,
                     stride_vb, stride_vc, stride_vh, stride_vw,
                     ERASE: tl.constexpr, ERASE_VALUES: tl.constexpr, DIVIDE_BY_RECIPROCAL: tl.constexpr):
    """Image ``img``'s normalised, erased pixels at (c, y, x), float32 (the tile's shape)."""
    u8 = tl.load(Images + img * stride_ib + c * stride_ic + y * stride_ih + x * stride_iw, mask=inside, other=0)
    v = u8.to(tl.float32)
    if DIVIDE_BY_RECIPROCAL:
        v = v * inv_255
    else:
        v = tl.math.div_rn(v, 255.0)
    mean = tl.load(Mean + c, mask=inside, other=0.0)
    std = tl.load(Std + c, mask=inside, other=1.0)
    v = tl.math.div_rn(v - mean, std)
    if ERASE:
        top = tl.load(Top + img * stride_box)
        left = tl.load(Left + img * stride_box)
        height = tl.load(EHeight + img * stride_box)
        width = tl.load(EWidth + img * stride_box)
        on = tl.load(EOn + img * stride_on) != 0
        yf = y.to(tl.float32)
        xf = x.to(tl.float32)
        erased = on & (yf >= top) & (yf < top + height) & (xf >= left) & (xf < left + width)
        if ERASE_VALUES:
            value = tl.load(Values + img * stride_vb + c * stride_vc + y * stride_vh + x * stride_vw,
                            mask=inside & erased, other=0.0)
        else:
            value = tl.zeros_like(v)
        v = tl.where(erased, value, v)
    return v


@triton.jit
def _mixed_pixels(own, partner, img, y, x, UseCut, LamMix, Y0, Y1, X0, X1, Applied, stride_mix,
                  MIX_APPLIED: tl.constexpr):
    """Image ``img``'s mixed pixels from its own (``own``) and its partner's finished pixels."""
    m = img * stride_mix
    use_cut = tl.load(UseCut + m) != 0
    lam = tl.load(LamMix + m)
    yf = y.to(tl.float32)
    xf = x.to(tl.float32)
    in_box = (yf >= tl.load(Y0 + m)) & (yf < tl.load(Y1 + m)) & (xf >= tl.load(X0 + m)) & (xf < tl.load(X1 + m))
    blended = lam * own + (1.0 - lam) * partner
    out = tl.where(use_cut, tl.where(in_box, partner, own), blended)
    if MIX_APPLIED:
        out = tl.where(tl.load(Applied + m) != 0, out, own)
    return out


@triton.jit
def _target_rows(Labels, Targets, Lam, Applied, i, j, K, stride_label, stride_mix, on_value, off_value,
                 MIX: tl.constexpr, MIX_APPLIED: tl.constexpr, BLOCK_K: tl.constexpr):
    """Target rows i and j (each (K,), contiguous rows of ``Targets``)."""
    label_i = tl.load(Labels + i * stride_label)
    label_j = tl.load(Labels + j * stride_label)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_row = k < K
        t_i = tl.where(k == label_i, on_value, off_value)
        t_j = tl.where(k == label_j, on_value, off_value)
        out_i, out_j = t_i, t_j
        if MIX:
            lam_i = tl.load(Lam + i * stride_mix)
            lam_j = tl.load(Lam + j * stride_mix)
            out_i = lam_i * t_i + (1.0 - lam_i) * t_j
            out_j = lam_j * t_j + (1.0 - lam_j) * t_i
            if MIX_APPLIED:
                out_i = tl.where(tl.load(Applied + i * stride_mix) != 0, out_i, t_i)
                out_j = tl.where(tl.load(Applied + j * stride_mix) != 0, out_j, t_j)
        tl.store(Targets + i * K + k, out_i, mask=in_row)
        tl.store(Targets + j * K + k, out_j, mask=in_row)


@triton.jit
def augment_finish_kernel(
    Images,  # (B, C, H, W) uint8, any strides: the policy's batch
    Mean, Std,  # (C,) float32, contiguous: the normalisation, in [0, 1] units
    Labels,  # (B,) int64, stride stride_label
    X,  # (B, C, H, W) float32, contiguous: the training batch (written)
    Targets,  # (B, K) float32, contiguous (written when TARGETS)
    Top, Left, EHeight, EWidth,  # (B,) float32, stride stride_box: erase boxes (ERASE)
    EOn,  # (B,) bool, stride stride_on: whether the image is erased (ERASE)
    Values,  # (B, C, H, W) float32, any strides (0 where broadcast): erase values (ERASE_VALUES)
    UseCut,  # mixing parameters at img * stride_mix (MIX): bool
    LamMix, Y0, Y1, X0, X1, Lam,  # float32
    Applied,  # bool (MIX_APPLIED)
    B, C, H, W, K,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_label, stride_box, stride_on,
    stride_vb, stride_vc, stride_vh, stride_vw,
    stride_mix,
    inv_255,  # float32(1) / float32(255), used when DIVIDE_BY_RECIPROCAL
    on_value, off_value,  # the target of the label's class and of the others
    ERASE: tl.constexpr,
    ERASE_VALUES: tl.constexpr,
    MIX: tl.constexpr,
    MIX_APPLIED: tl.constexpr,
    TARGETS: tl.constexpr,
    DIVIDE_BY_RECIPROCAL: tl.constexpr,
    BLOCK_N: tl.constexpr,  # elements of one image per program
    BLOCK_K: tl.constexpr,  # target columns per step
):
    pair = tl.program_id(0)
    tile = tl.program_id(1)
    i = pair
    j = B - 1 - pair
    image_size = C * H * W
    offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = offs < image_size
    c = offs // (H * W)
    y = offs % (H * W) // W
    x = offs % W
    v_i = _finished_pixels(Images, Mean, Std, Top, Left, EHeight, EWidth, EOn, Values, i, c, y, x, inside, inv_255,
                           stride_ib, stride_ic, stride_ih, stride_iw, stride_box, stride_on,
                           stride_vb, stride_vc, stride_vh, stride_vw, ERASE, ERASE_VALUES, DIVIDE_BY_RECIPROCAL)
    v_j = _finished_pixels(Images, Mean, Std, Top, Left, EHeight, EWidth, EOn, Values, j, c, y, x, inside, inv_255,
                           stride_ib, stride_ic, stride_ih, stride_iw, stride_box, stride_on,
                           stride_vb, stride_vc, stride_vh, stride_vw, ERASE, ERASE_VALUES, DIVIDE_BY_RECIPROCAL)
    out_i, out_j = v_i, v_j
    if MIX:
        out_i = _mixed_pixels(v_i, v_j, i, y, x, UseCut, LamMix, Y0, Y1, X0, X1, Applied, stride_mix, MIX_APPLIED)
        out_j = _mixed_pixels(v_j, v_i, j, y, x, UseCut, LamMix, Y0, Y1, X0, X1, Applied, stride_mix, MIX_APPLIED)
    tl.store(X + i * image_size + offs, out_i, mask=inside)
    tl.store(X + j * image_size + offs, out_j, mask=inside)
    if TARGETS:
        if tile == 0:
            _target_rows(Labels, Targets, Lam, Applied, i, j, K, stride_label, stride_mix, on_value, off_value,
                         MIX, MIX_APPLIED, BLOCK_K)
