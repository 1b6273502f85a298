"""The augmentation policy's pixel work in one launch: crop + flip, then S policy steps, per image.

``augment_policy_kernel`` computes, for image b of a batch,

    x = crop/flip of images[index[b]]            (zero-padded by ``padding``, offsets oy, ox, flip)
    for s in 0..S-1:  x = OPS[op[s, b]](x, magnitude[s, b])
    out[b] = x

with the arithmetic of the torch implementation (``vit_fast.augment.image_ops.apply_ops`` after
``vit_fast.augment.pipeline.apply_crop_flip``), op by op and in the same order, so the uint8 result is the same
bit for bit (see "Exactness" below).

Design: one program per image, each program branching on its own op id with a scalar ``if``, so
it runs only the op its image drew (the torch version runs every op on the whole batch and
selects per image) and the whole policy is one launch with no trip to the host. The image lives
in its own row of the output between operations: that row is the program's scratch. An operation
loads a channel at a time as a (BLOCK,) vector (BLOCK = next power of two of H * W), computes,
and stores it back. Ops that read other pixels (the affine gather of the five geometric ops,
sharpness's 3x3 window) load them from the row at computed addresses, which registers cannot
serve; ``tl.debug_barrier`` (a CTA barrier, after which every thread's stores are visible to
every thread of the program) separates each channel's loads from its store, and each step's
stores from the next step's loads. Each program owns its row, so no program waits on another and
nothing is allocated beyond the output. Holding one channel rather than the whole image keeps
the program at 8 values per thread (32 x 32 at 4 warps: 80 registers on sm_80, 96 on sm_90, no
spills; the AOT test checks; the whole image in registers needed 255 and spilled).
Per-channel reductions (autocontrast's min/max, contrast's mean grey) are vector reductions;
equalize builds its 256-bin histogram with ``tl.histogram`` and looks its table up with
``tl.gather``, both in registers.

The geometric ops build their inverse affine matrix in the kernel, in float64 from the op id and
the magnitude, with the operations of ``vit_fast.augment.image_ops.inverse_affine`` in its order, then
round it to float32; the sampling grid is then built in float32 as ``augment.warp`` builds it
((x * r0 + y * r1) + r2, the order torch's CPU bmm sums in) and rounded half to even. Blends
compute factor * x + (1 - factor) * degenerate in float32 and truncate, as ``augment.blend``.

Exactness:
- Under the interpreter (CPU) every op matches the torch implementation bit for bit (the tests
  check each op, both magnitude signs and edge magnitudes, and whole policies).
- float64 sin, cos and atan are computed here (``_sin_cos``, ``_atan``: argument reduction and
  Taylor series, within a few float64 ulp), on a GPU and in the interpreter alike: libdevice's
  sin/cos/tan carry a Payne-Hanek slow path with a local array and a call (a stack frame in every
  program), and Triton's interpreter cannot call libdevice at all. A few float64 ulp change the
  float32 matrix only when a value lies that close to a float32 rounding boundary; at every
  magnitude bin of every policy for 32 x 32 images, both signs, none does (the tests check).
- float32 products that feed a sum are rounded on their own on a GPU too
  (``vit_fast.kernels.common.mul_rn``: PTX mul.rn, which no compiler pass fuses into an fma),
  and float32 divisions are IEEE (``tl.div_rn``; Triton's ``/`` is the approximate div.full), so
  a blend value on an integer or a sampling coordinate on a half rounds as torch's separate
  kernels round it. The float64 matrix is left
  to the compiler's fma contraction: it moves the matrix by float64 ulps, as the software trig
  does. Untested on a GPU here (no GPU on the development machine): a GPU run should compare with
  the torch implementation on CUDA, whose bmm may sum the grid in another order.
- Contrast's mean grey is summed in float32: exact (integers) while 255 * H * W < 2**24, i.e.
  up to 65793 pixels, beyond MAX_PIXELS of the launcher.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from vit_fast.kernels.common import mul_rn

# The constants Python's math.radians / math.degrees multiply by (as vit_fast.augment.image_ops').
_DEG_TO_RAD = tl.constexpr(math.pi / 180.0)
_RAD_TO_DEG = tl.constexpr(180.0 / math.pi)
_HALF_PI = tl.constexpr(math.pi / 2.0)
_INV_255 = tl.constexpr(1.0 / 255.0)
# Taylor terms of atan after two half-angle reductions (|t| <= tan(pi / 16) ~ 0.199): the term
# t^(2k+1) / (2k+1) drops below 2^-53 relative at k = 12.
_ATAN_TERMS = tl.constexpr(13)
# pi / 2 split for the reduction of sin / cos arguments (Cody and Waite): the hi part is pi / 2
# rounded down to 33 significant bits (so k * hi is exact for |k| < 2^20), the lo part the
# float64 nearest to the rest (from 60 digits of pi). Taylor terms: r^19 / 19! < 1e-19 at pi / 4.
_TWO_OVER_PI = tl.constexpr(2.0 / math.pi)
_PIO2_HI = tl.constexpr(1.5707963267341256)
_PIO2_LO = tl.constexpr(6.077100506506192e-11)
_TRIG_TERMS = tl.constexpr(9)

# Op ids, as vit_fast.augment.image_ops.OPS orders them.
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
def _sin_cos(x):
    """float64 (sin x, cos x) for the moderate angles of the geometric ops: x - k pi/2 in two
    steps (k pi/2 hi is exact for |k| < 2^20), then the Taylor series on [-pi/4, pi/4], whose
    truncation error is below 1e-19; quadrant k mod 4 picks the signs and the swap."""
    k = tl.floor(x * _TWO_OVER_PI + 0.5)
    r = (x - k * _PIO2_HI) - k * _PIO2_LO
    r2 = r * r
    sin_series = tl.zeros_like(r)
    for n in tl.static_range(_TRIG_TERMS, 0, -1):  # (-1)^n / (2n+1)!, n = TERMS..1
        sin_series = sin_series * r2 + (1 - 2 * (n % 2)) / math.factorial(2 * n + 1)
    cos_series = tl.zeros_like(r)
    for n in tl.static_range(_TRIG_TERMS, 1, -1):  # (-1)^n / (2n)!, n = TERMS..2
        cos_series = cos_series * r2 + (1 - 2 * (n % 2)) / math.factorial(2 * n)
    sin_r = r + r * (r2 * sin_series)
    cos_r = 1.0 - 0.5 * r2 + r2 * (r2 * cos_series)
    quadrant = (k - 4.0 * tl.floor(k * 0.25)).to(tl.int32)  # k mod 4, in 0..3
    swap = (quadrant % 2) == 1
    sin_x = tl.where(swap, cos_r, sin_r)
    cos_x = tl.where(swap, sin_r, cos_r)
    sin_x = tl.where(quadrant >= 2, -sin_x, sin_x)
    cos_x = tl.where((quadrant == 1) | (quadrant == 2), -cos_x, cos_x)
    return sin_x, cos_x


@triton.jit
def _atan(x):
    """float64 atan: atan(a) = 2 atan(a / (1 + sqrt(1 + a^2))) twice, then the alternating
    series; |x| > 1 through atan(x) = pi/2 - atan(1/x)."""
    a = tl.abs(x)
    inverted = a > 1.0
    a = tl.where(inverted, 1.0 / tl.maximum(a, 1.0), a)  # the maximum keeps 1 / 0 out of unused lanes
    a = a / (1.0 + tl.sqrt(1.0 + a * a))
    a = a / (1.0 + tl.sqrt(1.0 + a * a))
    t2 = a * a
    series = tl.zeros_like(a)
    for k in tl.static_range(_ATAN_TERMS - 1, -1, -1):  # (-1)^k / (2k+1), k = TERMS-1..0
        series = series * t2 + (1 - 2 * (k % 2)) / (2 * k + 1)
    r = 4.0 * a * series
    r = tl.where(inverted, _HALF_PI - r, r)
    return tl.where(x < 0, -r, r)


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
    return tl.minimum(tl.maximum(v, 0.0), 255.0).to(tl.uint8)


@triton.jit
def _trunc(v):
    return tl.where(v < 0.0, tl.ceil(v), tl.floor(v))


@triton.jit
def _store_channel(row_ptr, c, HW, pix, ok, y):
    """Write channel c of the scratch row once every thread has read what it needs of it."""
    tl.debug_barrier()
    tl.store(row_ptr + c * HW + pix, y, mask=ok)


@triton.jit
def _geometric(row_ptr, op, m, pix, ok, row, col, C, H, W, HW, INTERPRETING: tl.constexpr):
    """ShearX/ShearY/TranslateX/TranslateY/Rotate, with vit_fast.augment.image_ops.geometric's magnitude
    convention and inverse_affine's float64 arithmetic; one gather per channel from the row."""
    # Per-op parameters (augment.geometric), float64.
    is_shear = (op == _SHEAR_X) | (op == _SHEAR_Y)
    shear = _atan(m) * _RAD_TO_DEG
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
    sin_sx, cos_sx = _sin_cos(sx)
    _, cos_sy = _sin_cos(sy)
    sin_rot, cos_rot = _sin_cos(rot)
    sin_diff, cos_diff = _sin_cos(rot - sy)
    tan_sx = sin_sx / cos_sx
    cxt = cx + tx
    cyt = cy + ty
    a = cos_diff / cos_sy
    b = -(a * tan_sx + sin_rot)
    c = sin_diff / cos_sy
    d = cos_rot - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = 0.0 + (cx - m0 * cxt - m1 * cyt)
    m5 = 0.0 + (cy - m3 * cxt - m4 * cyt)
    # augment.warp: theta in float32 over half the size, then the pixel-centred base grid. Sizes
    # enter float32 as `* 1.0` (not .to): Triton passes a size of 1 as a Python int.
    half_w = 0.5 * (W * 1.0)
    half_h = 0.5 * (H * 1.0)
    bx = col.to(tl.float32) + (1.0 - W * 1.0) * 0.5  # (BLOCK,) linspace((1-W)/2, (W-1)/2), exact
    by = row.to(tl.float32) + (1.0 - H * 1.0) * 0.5
    gx = mul_rn(bx, tl.div_rn(m0.to(tl.float32), half_w), INTERPRETING) \
        + mul_rn(by, tl.div_rn(m1.to(tl.float32), half_w), INTERPRETING) + tl.div_rn(m2.to(tl.float32), half_w)
    gy = mul_rn(bx, tl.div_rn(m3.to(tl.float32), half_h), INTERPRETING) \
        + mul_rn(by, tl.div_rn(m4.to(tl.float32), half_h), INTERPRETING) + tl.div_rn(m5.to(tl.float32), half_h)
    ix = _round_half_even(mul_rn(gx + 1.0, half_w, INTERPRETING) - 0.5)
    iy = _round_half_even(mul_rn(gy + 1.0, half_h, INTERPRETING) - 0.5)
    inside = ok & (ix >= 0.0) & (ix <= W - 1.0) & (iy >= 0.0) & (iy <= H - 1.0)
    src = tl.minimum(tl.maximum(iy, 0.0), H - 1.0).to(tl.int32) * W \
        + tl.minimum(tl.maximum(ix, 0.0), W - 1.0).to(tl.int32)
    for ci in range(C):
        y = tl.load(row_ptr + ci * HW + src, mask=inside, other=0)
        _store_channel(row_ptr, ci, HW, pix, ok, y)


@triton.jit
def _blend(row_ptr, op, m, pix, ok, HW, INTERPRETING: tl.constexpr):
    """Brightness / Color / Contrast of an RGB image (augment.apply_ops' shared blend):
    factor = 1 + m, blended with black, the grey image or its mean grey level, in float32,
    clamped and truncated."""
    r = tl.load(row_ptr + pix, mask=ok, other=0).to(tl.float32)
    g = tl.load(row_ptr + HW + pix, mask=ok, other=0).to(tl.float32)
    b = tl.load(row_ptr + 2 * HW + pix, mask=ok, other=0).to(tl.float32)
    factor = 1.0 + m  # float64, as augment.blend forms ratio and 1 - ratio before rounding
    ratio = factor.to(tl.float32)
    alpha = (1.0 - factor).to(tl.float32)
    gray = tl.floor(mul_rn(r, 0.2989, INTERPRETING) + mul_rn(g, 0.587, INTERPRETING)
                    + mul_rn(b, 0.114, INTERPRETING))  # augment._gray_floor, in its order
    mean = tl.div_rn(tl.sum(tl.where(ok, gray, 0.0), axis=0), HW * 1.0)
    degenerate = tl.where(op == _COLOR, gray, tl.where(op == _CONTRAST, mean, 0.0))
    toward = mul_rn(degenerate, alpha, INTERPRETING)
    _store_channel(row_ptr, 0, HW, pix, ok, _to_level(mul_rn(r, ratio, INTERPRETING) + toward))
    _store_channel(row_ptr, 1, HW, pix, ok, _to_level(mul_rn(g, ratio, INTERPRETING) + toward))
    _store_channel(row_ptr, 2, HW, pix, ok, _to_level(mul_rn(b, ratio, INTERPRETING) + toward))


@triton.jit
def _sharpness(row_ptr, m, pix, ok, row, col, C, H, W, HW, INTERPRETING: tl.constexpr):
    """Blend the interior with its 1-5-1 smoothed copy (augment.sharpness); the border is kept."""
    interior = ok & (row >= 1) & (row <= H - 2) & (col >= 1) & (col <= W - 2)
    alpha = (1.0 - (1.0 + m)).to(tl.float32)
    for ci in range(C):
        channel = row_ptr + ci * HW
        inner = tl.load(channel + pix, mask=ok, other=0)
        window = tl.zeros_like(pix)
        for dy in tl.static_range(-1, 2):
            for dx in tl.static_range(-1, 2):
                window += tl.load(channel + pix + dy * W + dx, mask=interior, other=0).to(tl.int32)
        x = inner.to(tl.float32)
        smooth = _round_half_even(tl.div_rn(window.to(tl.float32) + 4.0 * x, 13.0))
        _store_channel(row_ptr, ci, HW, pix, ok,
                       tl.where(interior, _to_level(x + mul_rn(smooth - x, alpha, INTERPRETING)), inner))


@triton.jit
def _autocontrast(row_ptr, pix, ok, C, HW):
    """Stretch each channel to [0, 255]; constant channels kept (augment.autocontrast)."""
    for ci in range(C):
        x = tl.load(row_ptr + ci * HW + pix, mask=ok, other=0).to(tl.float32)
        lo = tl.min(tl.where(ok, x, 255.0), axis=0)
        hi = tl.max(tl.where(ok, x, 0.0), axis=0)
        flat = hi == lo
        scale = tl.where(flat, 1.0, (hi - lo) * _INV_255)
        lo = tl.where(flat, 0.0, lo)
        _store_channel(row_ptr, ci, HW, pix, ok, _to_level(tl.div_rn(x - lo, scale)))


@triton.jit
def _equalize(row_ptr, pix, ok, C, HW):
    """PIL's histogram equalisation per channel (augment.equalize): step = (pixels not of the
    highest present level) // 255, lut[k] = (cdf[k-1] + step // 2) // step, kept where step is 0."""
    levels = tl.arange(0, 256)
    for ci in range(C):
        x = tl.load(row_ptr + ci * HW + pix, mask=ok, other=0).to(tl.int32)
        hist = tl.histogram(x, 256, mask=ok)
        top = tl.max(tl.where(hist > 0, levels, 0), axis=0)
        step = (HW - tl.sum(tl.where(levels == top, hist, 0), axis=0)) // 255
        cdf_before = tl.cumsum(hist, axis=0) - hist
        lut = tl.minimum((cdf_before + step // 2) // tl.maximum(step, 1), 255)
        y = tl.where(step != 0, tl.gather(lut, x, 0), x)
        _store_channel(row_ptr, ci, HW, pix, ok, y.to(tl.uint8))


@triton.jit
def _pointwise(row_ptr, op, m, pix, ok, C, HW):
    """Posterize, Solarize, Invert: each value on its own (augment.posterize/solarize/invert)."""
    bits = tl.minimum(tl.maximum(m, 0.0), 8.0).to(tl.int32)  # trunc(m) clamped to [0, 8]
    keep = (256 - (1 << (8 - bits))).to(tl.uint8)  # ones in the top `bits` bits
    threshold = (255.0 * m).to(tl.float32)
    for ci in range(C):
        x = tl.load(row_ptr + ci * HW + pix, mask=ok, other=0)
        inverted = 255 - x
        if op == _POSTERIZE:
            y = x & keep
        elif op == _SOLARIZE:
            y = tl.where(x.to(tl.float32) >= threshold, inverted, x)
        else:
            y = inverted
        _store_channel(row_ptr, ci, HW, pix, ok, y)


@triton.jit
def augment_policy_kernel(
    Images, Index, OY, OX, Flipped, Op, Magnitude, Out,
    stride_index, stride_oy, stride_ox, stride_flip, stride_op_s, stride_op_b, stride_mag_s, stride_mag_b,
    N, C, H, W, padding, S,
    HAS_FLIP: tl.constexpr, BLOCK: tl.constexpr, INTERPRETING: tl.constexpr,
):  # fmt: skip
    """One program per output image: Images uint8 (N, C, H, W) contiguous; Index, OY, OX,
    Flipped (B,) by their strides; Op int (S, B), Magnitude float32 (S, B); Out uint8 (B, C, H,
    W) contiguous, each program's row of it also its scratch. An index outside [0, N) gives a
    black image and an op id outside OPS leaves the image as it is (neither is checkable without
    a host sync). Steps need C = 3 (the launcher checks). INTERPRETING (running under Triton's
    interpreter, which cannot run inline asm): the products of ``mul_rn`` are plain multiplies,
    which the interpreter rounds on their own anyway; compiled, they are PTX mul.rn."""
    b = tl.program_id(0)
    HW = H * W
    pix = tl.arange(0, BLOCK)  # (BLOCK,) the pixels of one channel
    ok = pix < HW
    row = pix // W
    col = pix % W

    # Crop at (oy, ox) of the zero-padded image, mirrored where flipped (pipeline.apply_crop_flip).
    src_image = tl.load(Index + b * stride_index).to(tl.int64)  # int32 indices too: offsets past 2^31
    oy = tl.load(OY + b * stride_oy)
    ox = tl.load(OX + b * stride_ox)
    padded_col = col
    if HAS_FLIP:
        flip = tl.load(Flipped + b * stride_flip) != 0
        padded_col = tl.where(flip, W - 1 - col, col)
    sr = oy + row - padding
    sc = ox + padded_col - padding
    inside = ok & (sr >= 0) & (sr < H) & (sc >= 0) & (sc < W) & (src_image >= 0) & (src_image < N)
    image = Images + src_image * C * HW
    row_ptr = Out + b.to(tl.int64) * C * HW
    for ci in range(C):
        x = tl.load(image + ci * HW + sr * W + sc, mask=inside, other=0)
        tl.store(row_ptr + ci * HW + pix, x, mask=ok)

    for s in range(S):
        tl.debug_barrier()  # the previous stores are visible to every thread
        op = tl.load(Op + s * stride_op_s + b * stride_op_b)
        m = tl.load(Magnitude + s * stride_mag_s + b * stride_mag_b).to(tl.float64)
        if (op >= _SHEAR_X) & (op <= _ROTATE):
            _geometric(row_ptr, op, m, pix, ok, row, col, C, H, W, HW, INTERPRETING)
        elif (op >= _BRIGHTNESS) & (op <= _CONTRAST):
            _blend(row_ptr, op, m, pix, ok, HW, INTERPRETING)
        elif (op == _SHARPNESS) & (H > 2) & (W > 2):
            _sharpness(row_ptr, m, pix, ok, row, col, C, H, W, HW, INTERPRETING)
        elif (op == _POSTERIZE) | (op == _SOLARIZE) | (op == _INVERT):
            _pointwise(row_ptr, op, m, pix, ok, C, HW)
        elif op == _AUTOCONTRAST:
            _autocontrast(row_ptr, pix, ok, C, HW)
        elif op == _EQUALIZE:
            _equalize(row_ptr, pix, ok, C, HW)
