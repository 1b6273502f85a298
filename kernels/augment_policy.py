"""The augmentation policy's pixel work in one launch: crop + flip, then S policy steps, per image.

``augment_policy_kernel`` computes, for image b of a batch,

    x = crop/flip of images[index[b]]            (zero-padded by ``padding``, offsets oy, ox, flip)
    for s in 0..S-1:  x = OPS[op[s, b]](x, magnitude[s, b])
    out[b] = x

with the arithmetic of the torch implementation (``vit_fast.augment.apply_ops`` after
``vit_fast.data.apply_crop_flip``), op by op and in the same order, so the uint8 result is the same
bit for bit (see "Exactness" below).

Design: one program per image. The image lives in registers as one (BLOCK_C, BLOCK) int32 tile
(channels x pixels, BLOCK = next power of two of H*W) for all steps, and each program branches
on its own op id with a scalar ``if``, so it runs only the op its image drew (the torch version
runs every op on the whole batch and selects per image). Reductions (autocontrast's per-channel
min/max, contrast's mean grey) are tile reductions; equalize builds its 256-bin histogram with
``tl.histogram`` and looks its table up with ``tl.gather``, both in registers. The two ops that
read other pixels (the affine gather of the five geometric ops, sharpness's 3x3 window) cannot
index registers by a computed address, so they go through a scratch row: the image's own output
row in global memory. The program stores the tile there, waits at ``tl.debug_barrier`` (a CTA
barrier: every thread's stores are visible to every thread of the program after it), loads the
pixels it needs, and waits again before anything may overwrite the row. Each program owns its
row, so no program waits on another, the batch needs no scratch allocation beyond the output,
and a step never costs a trip to the host: the whole policy is one launch.

The geometric ops build their inverse affine matrix in the kernel, in float64 from the op id and
the magnitude, with the operations of ``vit_fast.augment.inverse_affine`` in its order, then
round it to float32; the sampling grid is then built in float32 as ``augment.warp`` builds it
((x * r0 + y * r1) + r2, the order torch's CPU bmm sums in) and rounded half to even. Blends
compute factor * x + (1 - factor) * degenerate in float32 and truncate, as ``augment.blend``.

Exactness:
- Under the interpreter (CPU) every op matches the torch implementation bit for bit (the tests
  check each op, both magnitude signs and edge magnitudes, and whole policies).
- float64 atan and tan: compiled, the kernel calls libdevice's ``atan`` and ``tan``, the
  functions torch's CUDA kernels call. Triton's interpreter cannot call libdevice, so with
  ATAN_TAN_IN_SOFTWARE (set by the launcher only when interpreting) atan is computed here
  (``_atan_in_software``: two half-angle reductions and a Taylor series, a few float64 ulp) and
  tan as sin / cos. A few ulp of float64 change the float32 matrix only when a value sits within
  that distance of a float32 rounding boundary, which the tests' magnitudes never do.
- On a GPU, Triton contracts a * b + c into one fused multiply-add (its default
  ``enable_fp_fusion``), where torch's separate multiply and add kernels round twice. A blend
  value sitting exactly on an integer, or a sampling coordinate exactly on a half, can then move
  by one intensity level or one pixel. The CPU tests are exact; a GPU check compares with the
  torch CUDA implementation.
- Contrast's mean grey is summed in float32: exact (integers) while 255 * H * W < 2**24, i.e.
  up to 65793 pixels, beyond MAX_PIXELS of the launcher.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from triton.language.extra import libdevice

# The constants Python's math.radians / math.degrees multiply by (as vit_fast.augment's).
_DEG_TO_RAD = tl.constexpr(math.pi / 180.0)
_RAD_TO_DEG = tl.constexpr(180.0 / math.pi)
_HALF_PI = tl.constexpr(math.pi / 2.0)
_INV_255 = tl.constexpr(1.0 / 255.0)
# Taylor terms of atan after two half-angle reductions (|t| <= tan(pi / 16) ~ 0.199): the term
# t^(2k+1) / (2k+1) drops below 2^-53 relative at k = 12.
_ATAN_TERMS = tl.constexpr(13)

# Op ids, as vit_fast.augment.OPS orders them.
_SHEAR_X = tl.constexpr(1)
_SHEAR_Y = tl.constexpr(2)
_TRANSLATE_X = tl.constexpr(3)
_TRANSLATE_Y = tl.constexpr(4)
_ROTATE = tl.constexpr(5)
_BRIGHTNESS = tl.constexpr(6)
_COLOR = tl.constexpr(7)
_CONTRAST = tl.constexpr(8)
_SHARPNESS = tl.constexpr(9)
_POSTERIZE = tl.constexpr(10)
_SOLARIZE = tl.constexpr(11)
_AUTOCONTRAST = tl.constexpr(12)
_EQUALIZE = tl.constexpr(13)
_INVERT = tl.constexpr(14)


@triton.jit
def _atan_in_software(x):
    """float64 atan without libdevice (the interpreter's path): atan(a) = 2 atan(a / (1 +
    sqrt(1 + a^2))) twice, then the alternating series; |x| > 1 through atan(x) = pi/2 - atan(1/x)."""
    a = tl.abs(x)
    inverted = a > 1.0
    a = tl.where(inverted, 1.0 / a, a)
    a = a / (1.0 + tl.sqrt(1.0 + a * a))
    a = a / (1.0 + tl.sqrt(1.0 + a * a))
    t2 = a * a
    series = tl.zeros_like(a)
    for k in tl.static_range(_ATAN_TERMS - 1, -1, -1):
        series = series * t2 + (1 - 2 * (k % 2)) / (2 * k + 1)
    r = 4.0 * a * series
    r = tl.where(inverted, _HALF_PI - r, r)
    return tl.where(x < 0, -r, r)


@triton.jit
def _atan(x, ATAN_TAN_IN_SOFTWARE: tl.constexpr):
    if ATAN_TAN_IN_SOFTWARE:
        return _atan_in_software(x)
    else:
        return libdevice.atan(x)


@triton.jit
def _tan(x, ATAN_TAN_IN_SOFTWARE: tl.constexpr):
    if ATAN_TAN_IN_SOFTWARE:
        return tl.sin(x) / tl.cos(x)
    else:
        return libdevice.tan(x)


@triton.jit
def _round_half_even(v):
    """Round float32 to the nearest integer, ties to even (torch.round, grid_sample's nearbyint),
    from exact steps only: v - floor(v) is exact, so is the parity test on floor(v)."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _to_level(v):
    """clamp(v, 0, 255) truncated to an integer level (torch's clamp_ then .to(torch.uint8))."""
    return tl.minimum(tl.maximum(v, 0.0), 255.0).to(tl.int32)


@triton.jit
def _trunc(v):
    return tl.where(v < 0.0, tl.ceil(v), tl.floor(v))


@triton.jit
def _gray_floor(xf, ch):
    """Floored ITU-R 601 luma (BLOCK,) of an RGB tile (BLOCK_C, BLOCK), float32, summed in the
    order of vit_fast.augment._gray_floor; extracting one channel by a masked sum is exact."""
    r = tl.sum(tl.where(ch == 0, xf, 0.0), axis=0)
    g = tl.sum(tl.where(ch == 1, xf, 0.0), axis=0)
    b = tl.sum(tl.where(ch == 2, xf, 0.0), axis=0)
    return tl.floor(r * 0.2989 + g * 0.587 + b * 0.114)


@triton.jit
def _geometric(x, op, m, scratch, ch, row, col, valid, H, W, HW, ATAN_TAN_IN_SOFTWARE: tl.constexpr):
    """ShearX/ShearY/TranslateX/TranslateY/Rotate of the tile through the scratch row, with
    vit_fast.augment.geometric's magnitude convention and inverse_affine's float64 arithmetic."""
    # Per-op parameters (augment.geometric), float64.
    is_shear = (op == _SHEAR_X) | (op == _SHEAR_Y)
    shear = _atan(m, ATAN_TAN_IN_SOFTWARE) * _RAD_TO_DEG
    angle = tl.where(op == _ROTATE, -m, 0.0)  # torchvision's rotate negates the angle
    tx = tl.where(op == _TRANSLATE_X, _trunc(m), 0.0)
    ty = tl.where(op == _TRANSLATE_Y, _trunc(m), 0.0)
    shear_x = tl.where(op == _SHEAR_X, shear, 0.0)
    shear_y = tl.where(op == _SHEAR_Y, shear, 0.0)
    # Shears turn about the top-left corner; -0.5 * size is exact in float32 and float64.
    cx = tl.where(is_shear, W * -0.5, 0.0).to(tl.float64)
    cy = tl.where(is_shear, H * -0.5, 0.0).to(tl.float64)
    # augment.inverse_affine, operation for operation.
    rot = angle * _DEG_TO_RAD
    sx = shear_x * _DEG_TO_RAD
    sy = shear_y * _DEG_TO_RAD
    cos_sy = tl.cos(sy)
    tan_sx = _tan(sx, ATAN_TAN_IN_SOFTWARE)
    cxt = cx + tx
    cyt = cy + ty
    a = tl.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + tl.sin(rot))
    c = tl.sin(rot - sy) / cos_sy
    d = tl.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = 0.0 + (cx - m0 * cxt - m1 * cyt)
    m5 = 0.0 + (cy - m3 * cxt - m4 * cyt)
    # augment.warp: theta in float32 over half the size, then the pixel-centred base grid.
    # Sizes enter float32 as `* 1.0` (not .to): Triton passes a size of 1 as a Python int.
    half_w = 0.5 * (W * 1.0)
    half_h = 0.5 * (H * 1.0)
    r00 = m0.to(tl.float32) / half_w
    r10 = m1.to(tl.float32) / half_w
    r20 = m2.to(tl.float32) / half_w
    r01 = m3.to(tl.float32) / half_h
    r11 = m4.to(tl.float32) / half_h
    r21 = m5.to(tl.float32) / half_h
    bx = col.to(tl.float32) + (1.0 - W * 1.0) * 0.5  # (BLOCK,) linspace((1-W)/2, (W-1)/2), exact
    by = row.to(tl.float32) + (1.0 - H * 1.0) * 0.5
    gx = bx * r00 + by * r10 + r20
    gy = bx * r01 + by * r11 + r21
    ix = _round_half_even((gx + 1.0) * half_w - 0.5)
    iy = _round_half_even((gy + 1.0) * half_h - 0.5)
    inside = (ix >= 0.0) & (ix <= W - 1.0) & (iy >= 0.0) & (iy <= H - 1.0)
    src = tl.minimum(tl.maximum(iy, 0.0), H - 1.0).to(tl.int32) * W + tl.minimum(tl.maximum(ix, 0.0), W - 1.0).to(tl.int32)
    tl.store(scratch + ch * HW + row * W + col, x.to(tl.uint8), mask=valid)
    tl.debug_barrier()  # the tile is in the scratch row for every thread
    y = tl.load(scratch + ch * HW + src, mask=valid & inside, other=0).to(tl.int32)
    tl.debug_barrier()  # every thread has read before anyone writes the row again
    return y


@triton.jit
def _blend(x, op, m, ch, pixel_ok, HW):
    """Brightness / Color / Contrast (augment.apply_ops' shared blend): factor = 1 + m, blended
    with black, the grey image or its mean grey level, in float32, clamped and truncated."""
    xf = x.to(tl.float32)
    factor = 1.0 + m  # float64, as augment.blend forms ratio and 1 - ratio before rounding
    ratio = factor.to(tl.float32)
    alpha = (1.0 - factor).to(tl.float32)
    gray = _gray_floor(xf, ch)
    mean = tl.sum(tl.where(pixel_ok, gray, 0.0), axis=0) / (HW * 1.0)
    degenerate = tl.where(op == _COLOR, gray, tl.where(op == _CONTRAST, mean, 0.0))[None, :]
    return _to_level(xf * ratio + degenerate * alpha)


@triton.jit
def _sharpness(x, m, scratch, ch, row, col, valid, H, W, HW):
    """Blend the interior with its 1-5-1 smoothed copy (augment.sharpness); the border is kept."""
    tl.store(scratch + ch * HW + row * W + col, x.to(tl.uint8), mask=valid)
    tl.debug_barrier()
    interior = valid & (row >= 1) & (row <= H - 2) & (col >= 1) & (col <= W - 2)
    window = tl.zeros_like(x)
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            near = tl.load(scratch + ch * HW + (row + dy) * W + (col + dx), mask=interior, other=0)
            window += near.to(tl.int32)
    tl.debug_barrier()
    inner = x.to(tl.float32)
    smooth = _round_half_even((window.to(tl.float32) + 4.0 * inner) / 13.0)
    alpha = (1.0 - (1.0 + m)).to(tl.float32)
    return tl.where(interior, _to_level(inner + (smooth - inner) * alpha), x)


@triton.jit
def _autocontrast(x, valid):
    """Stretch each channel to [0, 255]; constant channels kept (augment.autocontrast)."""
    xf = x.to(tl.float32)
    lo = tl.min(tl.where(valid, xf, 255.0), axis=1)[:, None]
    hi = tl.max(tl.where(valid, xf, 0.0), axis=1)[:, None]
    flat = hi == lo
    scale = tl.where(flat, 1.0, (hi - lo) * _INV_255)
    lo = tl.where(flat, 0.0, lo)
    return _to_level((xf - lo) / scale)


@triton.jit
def _equalize(x, ch, pixel_ok, HW, BLOCK_C: tl.constexpr):
    """PIL's histogram equalisation per channel (augment.equalize): step = (pixels not of the
    highest present level) // 255, lut[k] = (cdf[k-1] + step // 2) // step, kept where step is 0."""
    levels = tl.arange(0, 256)
    y = x
    for c in tl.static_range(BLOCK_C):
        xc = tl.sum(tl.where(ch == c, x, 0), axis=0)  # (BLOCK,) channel c
        hist = tl.histogram(xc, 256, mask=pixel_ok)
        top = tl.max(tl.where(hist > 0, levels, 0), axis=0)
        step = (HW - tl.sum(tl.where(levels == top, hist, 0), axis=0)) // 255
        cdf_before = tl.cumsum(hist, axis=0) - hist
        lut = tl.minimum((cdf_before + step // 2) // tl.maximum(step, 1), 255)
        yc = tl.where(step != 0, tl.gather(lut, xc, 0), xc)
        y = tl.where(ch == c, yc[None, :], y)
    return y


@triton.jit
def augment_policy_kernel(
    Images, Index, OY, OX, Flipped, Op, Magnitude, Out,
    stride_index, stride_oy, stride_ox, stride_flip, stride_op_s, stride_op_b, stride_mag_s, stride_mag_b,
    N, C, H, W, padding, S,
    HAS_FLIP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr, ATAN_TAN_IN_SOFTWARE: tl.constexpr,
):  # fmt: skip
    """One program per output image: Images uint8 (N, C, H, W) contiguous; Index, OY, OX,
    Flipped (B,) by their strides; Op int (S, B), Magnitude float32 (S, B); Out uint8 (B, C, H,
    W) contiguous, also each program's scratch row. An index outside [0, N) gives a black image
    and an op id outside OPS leaves the image as it is (neither is checkable without a host sync)."""
    b = tl.program_id(0)
    HW = H * W
    ch = tl.arange(0, BLOCK_C)[:, None]  # (BLOCK_C, 1)
    pix = tl.arange(0, BLOCK)  # (BLOCK,)
    pixel_ok = pix < HW
    row = pix // W
    col = pix % W
    valid = (ch < C) & pixel_ok[None, :]  # (BLOCK_C, BLOCK)

    # Crop at (oy, ox) of the zero-padded image, mirrored where flipped (data.apply_crop_flip).
    src_image = tl.load(Index + b * stride_index)
    oy = tl.load(OY + b * stride_oy)
    ox = tl.load(OX + b * stride_ox)
    padded_col = col
    if HAS_FLIP:
        flip = tl.load(Flipped + b * stride_flip) != 0
        padded_col = tl.where(flip, W - 1 - col, col)
    sr = oy + row - padding
    sc = ox + padded_col - padding
    inside = valid & (sr >= 0) & (sr < H) & (sc >= 0) & (sc < W) & (src_image >= 0) & (src_image < N)
    x = tl.load(Images + src_image * C * HW + ch * HW + sr * W + sc, mask=inside, other=0).to(tl.int32)

    scratch = Out + b.to(tl.int64) * C * HW
    for s in range(S):
        op = tl.load(Op + s * stride_op_s + b * stride_op_b)
        m = tl.load(Magnitude + s * stride_mag_s + b * stride_mag_b).to(tl.float64)
        if (op >= _SHEAR_X) & (op <= _ROTATE):
            x = _geometric(x, op, m, scratch, ch, row, col, valid, H, W, HW, ATAN_TAN_IN_SOFTWARE)
        elif (op >= _BRIGHTNESS) & (op <= _CONTRAST):
            x = _blend(x, op, m, ch, pixel_ok, HW)
        elif (op == _SHARPNESS) & (H > 2) & (W > 2):
            x = _sharpness(x, m, scratch, ch, row, col, valid, H, W, HW)
        elif op == _POSTERIZE:
            bits = tl.minimum(tl.maximum(m, 0.0), 8.0).to(tl.int32)  # trunc(m) clamped to [0, 8]
            x = x & (256 - (1 << (8 - bits)))
        elif op == _SOLARIZE:
            threshold = (255.0 * m).to(tl.float32)
            x = tl.where(x.to(tl.float32) >= threshold, 255 - x, x)
        elif op == _AUTOCONTRAST:
            x = _autocontrast(x, valid)
        elif op == _EQUALIZE:
            x = _equalize(x, ch, pixel_ok, HW, BLOCK_C)
        elif op == _INVERT:
            x = 255 - x
    tl.store(scratch + ch * HW + row * W + col, x.to(tl.uint8), mask=valid)
