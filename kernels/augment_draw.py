"""Every random draw of a training batch, counter-based, in one launch (two with per-pixel noise).

``augment_draw_kernel`` computes, for row b of a rank's batch at (epoch, step) of the run,

    g = rank + b * world                    the image's position in the global batch
    index[b] = order[step * global_batch + g],  labels[b] = dataset labels[index[b]]
    crop offsets, flip, the policy's ops and signed magnitudes, the erasing box,
    and (rows b < mix rows) mixup / cutmix's choice, Beta weights, box and "applied"

where every random number is a Philox-4x32-10 block (Salmon et al. 2011, "Parallel random numbers:
as easy as 1, 2, 3") of the counter (g, step, epoch, stream) under the key (seed low, seed high):
a pure function of where the draw is in the run, not of how many draws came before. A replay of a
CUDA graph that reads (epoch, step) from ``Position`` and advances it therefore draws the next
batch with no host work, and a resumed run draws what the uninterrupted one drew.
``normal_fill_kernel`` writes per-pixel (or per-channel) erasing noise from the streams 1024 + e // 4.

The streams (counter word 3) of an image: 0 crop/flip/AutoAugment sub-policy; 1 + s policy step s;
32 + t erasing try t; 48 the erasing box's placement; 1024 + e // 4 its noise element e. Mix row m
uses the counter (m, step, epoch, 2**20 + rank * 256 + k): k = 0 the choice, centre and "applied",
k = 1 + 16 * i + j proposal j of Gamma draw i (mixup's two, then cutmix's two).

The arithmetic on the random words, and the order of the draws, is ``vit_fast.augment.draws``'s
(the torch twin, used where Triton cannot run): integers from words by a high multiply
(``umulhi(x, n)`` in [0, n)), uniforms ``(x >> 8) * 2**-24`` (exact in float32), normals by
Box-Muller. Exactness: ln, e**x, cos and sin are computed here from +, *, / alone (``soft_log``,
``soft_exp``, ``cos_sin_turn``: range reduction and short series), square roots and divisions
are IEEE (``tl.sqrt_rn``, ``tl.div_rn``), the erasing box's integer sides are exact whatever the
root (``round_sqrt``), and the launcher turns off fma contraction, so every operation rounds as
torch's float32 ops round it: the draws are the twin's bit for bit under the interpreter on any
CPU (tested field by field), and by that reasoning on a GPU (a GPU test compares them; no GPU has
run it yet).

Design: programs of BLOCK_B rows, everything a (BLOCK_B,) vector: the image draws in the first
programs, the mix draws (64 Gamma proposals per row, the longest chain) in programs of their own
that run beside them. The draws are a few hundred Philox rounds per row, so the launch is
latency-, not memory-bound, and one launch replaces the hundred-odd small kernels the
generator-based draws took.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Philox-4x32 constants (Salmon et al. 2011): the round multipliers and the Weyl key increments.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
MIX_STREAM = tl.constexpr(1 << 20)
NOISE_STREAM = tl.constexpr(1024)
# ln 2 in two parts: LN2_HI has 12 significant bits, so k * LN2_HI is exact for |k| < 2**12.
LN2 = tl.constexpr(0.6931471805599453)
LN2_HI = tl.constexpr(0.693115234375)
LN2_LO = tl.constexpr(3.194618494528623e-05)
INV_LN2 = tl.constexpr(1.4426950408889634)
SQRT2 = tl.constexpr(1.4142135623730951)
HALF_PI = tl.constexpr(1.5707963267948966)


@triton.jit
def philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1), all uint32."""
    for _ in tl.static_range(10):
        h0 = tl.umulhi(c0, PHILOX_M0)
        h1 = tl.umulhi(c2, PHILOX_M1)
        l0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)
        l1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0, c1, c2, c3 = h1 ^ c1 ^ k0, l1, h0 ^ c3 ^ k1, l0
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def uniform(x):
    """A uint32 word as a float32 in [0, 1): its top 24 bits times 2**-24 (exact)."""
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def below(x, n):
    """A uint32 word as an integer in [0, n): the high word of x * n."""
    return tl.umulhi(x, n.to(tl.uint32)).to(tl.int64)


@triton.jit
def soft_log(x):
    """ln x for normal float32 x > 0 from +, *, / alone (so every device rounds it alike):
    x = m * 2**e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172,
    to s**9 (relative error < 1e-7)."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    s = tl.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    p = s2 * (1.0 / 9.0) + (1.0 / 7.0)
    p = p * s2 + (1.0 / 5.0)
    p = p * s2 + (1.0 / 3.0)
    p = p * s2 + 1.0
    ef = e.to(tl.float32)
    return (ef * LN2_HI + 2.0 * s * p) + ef * LN2_LO


@triton.jit
def soft_exp(x):
    """e**x for float32 x, clamped to [-80, 88], from +, *, / alone: x = k ln 2 + r, |r| <= ln 2 / 2,
    e**r to r**8 / 8! (relative error < 1e-7), times 2**k built from its bits."""
    x = tl.minimum(tl.maximum(x, -80.0), 88.0)  # e**-80 is a normal float32: no denormal to flush
    k = tl.floor(x * INV_LN2 + 0.5)
    r = (x - k * LN2_HI) - k * LN2_LO
    p = r * (1.0 / 40320.0) + (1.0 / 5040.0)
    p = p * r + (1.0 / 720.0)
    p = p * r + (1.0 / 120.0)
    p = p * r + (1.0 / 24.0)
    p = p * r + (1.0 / 6.0)
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    scale = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return p * scale


@triton.jit
def cos_sin_turn(u):
    """(cos, sin) of 2 pi u for u in [0, 1): the quadrant floor(4u) (exact), then Taylor series of
    the angle a = (4u - quadrant) pi / 2 in [0, pi / 2) (to a**12 and a**11: error < 1e-7)."""
    t = u * 4.0
    q = tl.floor(t)
    a = (t - q) * HALF_PI
    a2 = a * a
    sn = a2 * (-1.0 / 39916800.0) + (1.0 / 362880.0)
    sn = sn * a2 + (-1.0 / 5040.0)
    sn = sn * a2 + (1.0 / 120.0)
    sn = sn * a2 + (-1.0 / 6.0)
    sn = (sn * a2) * a + a
    cs = a2 * (1.0 / 479001600.0) + (-1.0 / 3628800.0)
    cs = cs * a2 + (1.0 / 40320.0)
    cs = cs * a2 + (-1.0 / 720.0)
    cs = cs * a2 + (1.0 / 24.0)
    cs = cs * a2 + (-0.5)
    cs = cs * a2 + 1.0
    qi = q.to(tl.int32)
    cos = tl.where(qi == 0, cs, tl.where(qi == 1, -sn, tl.where(qi == 2, -cs, sn)))
    sin = tl.where(qi == 0, sn, tl.where(qi == 1, cs, tl.where(qi == 2, -sn, -cs)))
    return cos, sin


@triton.jit
def round_sqrt(x):
    """floor(sqrt(x) + 1/2) of the exact square root, for 0 <= x < 2**20: the hardware's
    approximate root (within one of the answer), then one exact correction each way by comparing
    the odd squares (2k +- 1)**2 (exact integers below 2**24) with 4x. Exact with any root, so
    no IEEE square root (and its slow-path call) is needed."""
    k = tl.floor(tl.sqrt(x) + 0.5)
    k = tl.where((2.0 * k + 1.0) * (2.0 * k + 1.0) <= 4.0 * x, k + 1.0, k)
    return tl.where((2.0 * k - 1.0) * (2.0 * k - 1.0) > 4.0 * x, k - 1.0, k)


@triton.jit
def box_muller(xa, xb):
    """Two words as a standard normal pair: sqrt(-2 ln(1 - u_a)) (cos, sin)(2 pi u_b)."""
    r = tl.sqrt_rn(-2.0 * soft_log(1.0 - uniform(xa)))
    c, s = cos_sin_turn(uniform(xb))
    return r * c, r * s


@triton.jit
def gamma(m, c1, c2, k0, k1, stream, d, c, inv_shape):
    """Gamma(shape, 1) per row: Marsaglia & Tsang (2000) on shape + 1 (d = shape + 2/3,
    c = 1 / sqrt(9 d), from the host), the first of 16 proposals accepted (each is accepted with
    probability >= 0.95, so all fail with probability < 1e-20), times U ** (1 / shape).
    ``stream``: the counter word 3 of proposal 0; proposal j uses stream + j."""
    g = tl.zeros(m.shape, tl.float32)
    found = m < 0  # all False
    boost = g
    for j in tl.static_range(16):
        x0, x1, x2, x3 = philox(m, c1, c2, (m * 0 + stream + j).to(tl.uint32), k0, k1)
        z, _ = box_muller(x0, x1)
        v = 1.0 + c * z
        v = (v * v) * v
        v_pos = tl.maximum(v, 1e-30)
        lhs = soft_log(tl.maximum(uniform(x2), 1e-30))
        rhs = ((0.5 * z) * z + d) - d * v + d * soft_log(v_pos)
        ok = (v > 0) & (lhs < rhs)
        g = tl.where(ok & ~found, v_pos * d, g)
        found = found | ok
        if j == 0:
            boost = tl.maximum(uniform(x3), 1e-30)
    # Clamped to a normal number: a GPU may flush a denormal product to zero, a CPU keeps it.
    return tl.maximum(g * soft_exp(soft_log(boost) * inv_shape), 1e-30)


@triton.jit
def beta(m, c1, c2, k0, k1, stream, d, c, inv_shape):
    """Beta(a, a) per row as X / (X + Y) of two Gamma(a) draws (streams ``stream`` and + 16)."""
    x = gamma(m, c1, c2, k0, k1, stream, d, c, inv_shape)
    y = gamma(m, c1, c2, k0, k1, stream + 16, d, c, inv_shape)
    total = x + y
    return tl.where(total > 0, tl.div_rn(x, tl.maximum(total, 1e-30)), 0.5)


@triton.jit
def augment_draw_kernel(
    Order, Labels, Position, OpTab, ProbTab, MagTab, SignTab,
    Index, LabelsOut, OY, OX, Flip, Op, Mag, ETop, ELeft, EH, EW, EOn, Values0,
    UseCut, LamMix, Y0, Y1, X0, X1, Lam, Applied,
    seed_lo, seed_hi, rank, world, global_batch, n_order, B, MIX_ROWS, image_programs, H, W, padding,
    n_choices, fixed_bin, num_bins, stride_tab,
    erase_p, area_lo, area_span, log_ratio_lo, log_ratio_span,
    mixup_d, mixup_c, mixup_inv, cutmix_d, cutmix_c, cutmix_inv, switch_prob, mix_prob,
    POLICY: tl.constexpr, S: tl.constexpr, CROP: tl.constexpr, FLIP: tl.constexpr,
    ERASE: tl.constexpr, ZERO_VALUES: tl.constexpr, TRIES: tl.constexpr, MIXUP: tl.constexpr,
    CUTMIX: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Programs [0, image_programs) draw BLOCK_B images each; the programs after them draw BLOCK_B
    mix rows each, so the mix's Gamma proposals (the longest serial chain) run beside the image
    draws rather than after them. POLICY 0 none, 1 AutoAugment's table of sub-policies
    (n_choices x S, one sub-policy per image), 2 a table of ops (RandAugment, TrivialAugment: one
    op per step, bin ``fixed_bin`` or drawn from ``num_bins`` when -1). ZERO_VALUES: store the
    0-dim erasing value ("const": zero, the mean colour) from program 0. A position past the end of
    the epoch's order (n_order) reads image 0: never out of bounds."""
    pid = tl.program_id(0)
    first = tl.where(pid < image_programs, pid, pid - image_programs) * BLOCK_B
    rows = first + tl.arange(0, BLOCK_B)
    live = rows < B
    epoch = tl.load(Position)
    step = tl.load(Position + 1)
    k0 = (rows * 0 + seed_lo).to(tl.uint32)
    k1 = (rows * 0 + seed_hi).to(tl.uint32)
    c1 = (rows * 0 + step).to(tl.uint32)
    c2 = (rows * 0 + epoch).to(tl.uint32)
    g = rank + rows.to(tl.int64) * world
    c0 = g.to(tl.uint32)
    zero = rows.to(tl.uint32) * 0
    area_total = (rows * 0 + H * W).to(tl.float32)

    if pid < image_programs:
        at = step * global_batch + g
        index = tl.load(Order + at, mask=live & (at < n_order), other=0)
        tl.store(Index + rows, index, mask=live)
        tl.store(LabelsOut + rows, tl.load(Labels + index, mask=live, other=0), mask=live)

        x0, x1, x2, x3 = philox(c0, c1, c2, zero, k0, k1)
        if CROP:
            span = (rows * 0 + 2 * padding + 1).to(tl.uint32)
            tl.store(OY + rows, below(x0, span), mask=live)
            tl.store(OX + rows, below(x1, span), mask=live)
        if FLIP:
            tl.store(Flip + rows, (x2 >> 31) != 0, mask=live)
        if POLICY == 1:
            sub = below(x3, (rows * 0 + n_choices).to(tl.uint32))
        for s in tl.static_range(S):
            y0, y1, y2, y3 = philox(c0, c1, c2, zero + 1 + s, k0, k1)
            if POLICY == 1:
                at = sub * stride_tab + s
                applied = uniform(y0) < tl.load(ProbTab + at, mask=live, other=0.0)
                op = tl.where(applied, tl.load(OpTab + at, mask=live, other=0), 0)
                mag = tl.load(MagTab + at, mask=live, other=0.0)
                signed = tl.load(SignTab + at, mask=live, other=0) != 0
            else:
                which = below(y0, (rows * 0 + n_choices).to(tl.uint32))
                if fixed_bin >= 0:
                    bin_ = which * 0 + fixed_bin
                else:
                    bin_ = below(y1, (rows * 0 + num_bins).to(tl.uint32))
                op = tl.load(OpTab + which, mask=live, other=0)
                mag = tl.load(MagTab + which * stride_tab + bin_, mask=live, other=0.0)
                signed = tl.load(SignTab + which, mask=live, other=0) != 0
            negative = signed & (uniform(y2) < 0.5)
            tl.store(Op + s * B + rows, op, mask=live)
            tl.store(Mag + s * B + rows, tl.where(negative, -mag, mag), mask=live)

        if ZERO_VALUES:
            if pid == 0:
                tl.store(Values0, 0.0)
        if ERASE:
            found = rows < 0
            eh = tl.zeros((BLOCK_B,), tl.float32)
            ew = eh
            for t in tl.static_range(TRIES):
                z0, z1, _, _ = philox(c0, c1, c2, zero + 32 + t, k0, k1)
                area = area_total * (area_lo + area_span * uniform(z0))
                log_aspect = log_ratio_lo + log_ratio_span * uniform(z1)
                h = round_sqrt(area * soft_exp(log_aspect))
                w = round_sqrt(area * soft_exp(-log_aspect))  # area / aspect, without a division
                fits = (h < H) & (w < W) & ~found
                eh = tl.where(fits, h, eh)
                ew = tl.where(fits, w, ew)
                found = found | fits
            p0, p1, p2, _ = philox(c0, c1, c2, zero + 48, k0, k1)
            on = found & (uniform(p0) < erase_p)
            tl.store(ETop + rows, tl.floor(uniform(p1) * ((H + 1) - eh)), mask=live)
            tl.store(ELeft + rows, tl.floor(uniform(p2) * ((W + 1) - ew)), mask=live)
            tl.store(EH + rows, eh, mask=live)
            tl.store(EW + rows, ew, mask=live)
            tl.store(EOn + rows, on, mask=live)
    else:
        if MIXUP or CUTMIX:
            mixing = rows < MIX_ROWS
            m = rows.to(tl.uint32)
            base = MIX_STREAM + rank * 256
            q0, q1, q2, q3 = philox(m, c1, c2, zero + base, k0, k1)
            if MIXUP and CUTMIX:
                use_cut = uniform(q0) < switch_prob
            else:
                use_cut = (rows * 0 + CUTMIX) != 0
            if MIXUP:
                lam_mix = beta(m, c1, c2, k0, k1, base + 1, mixup_d, mixup_c, mixup_inv)
            else:
                lam_mix = tl.full((BLOCK_B,), 1.0, tl.float32)
            if CUTMIX:
                lam_cut = beta(m, c1, c2, k0, k1, base + 33, cutmix_d, cutmix_c, cutmix_inv)
            else:
                lam_cut = tl.full((BLOCK_B,), 1.0, tl.float32)
            cut = tl.sqrt_rn(1.0 - lam_cut)
            half_h = tl.floor(tl.floor(H * cut) * 0.5)
            half_w = tl.floor(tl.floor(W * cut) * 0.5)
            cy = tl.floor(uniform(q1) * H)
            cx = tl.floor(uniform(q2) * W)
            box_y0 = tl.minimum(tl.maximum(cy - half_h, 0.0), H * 1.0)
            box_y1 = tl.minimum(tl.maximum(cy + half_h, 0.0), H * 1.0)
            box_x0 = tl.minimum(tl.maximum(cx - half_w, 0.0), W * 1.0)
            box_x1 = tl.minimum(tl.maximum(cx + half_w, 0.0), W * 1.0)
            lam_box = 1.0 - tl.div_rn((box_y1 - box_y0) * (box_x1 - box_x0), area_total)
            tl.store(UseCut + rows, use_cut, mask=mixing)
            tl.store(LamMix + rows, lam_mix, mask=mixing)
            tl.store(Y0 + rows, box_y0, mask=mixing)
            tl.store(Y1 + rows, box_y1, mask=mixing)
            tl.store(X0 + rows, box_x0, mask=mixing)
            tl.store(X1 + rows, box_x1, mask=mixing)
            tl.store(Lam + rows, tl.where(use_cut, lam_box, lam_mix), mask=mixing)
            tl.store(Applied + rows, uniform(q3) < mix_prob, mask=mixing)


@triton.jit
def normal_fill_kernel(Out, Position, seed_lo, seed_hi, rank, world, B, E, BLOCK: tl.constexpr):
    """Out (B, E) float32: element e of row b is normal draw e % 4 of the Philox block of
    (g, step, epoch, 1024 + e // 4), g the row's global position; one program per (row, BLOCK x 4
    elements)."""
    b = tl.program_id(0)
    quads = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    epoch = tl.load(Position)
    step = tl.load(Position + 1)
    zero = quads.to(tl.uint32) * 0
    g = rank + b.to(tl.int64) * world
    x0, x1, x2, x3 = philox(zero + g.to(tl.uint32), zero + step.to(tl.uint32), zero + epoch.to(tl.uint32),
                            quads.to(tl.uint32) + NOISE_STREAM, (zero + seed_lo).to(tl.uint32),
                            (zero + seed_hi).to(tl.uint32))
    n0, n1 = box_muller(x0, x1)
    n2, n3 = box_muller(x2, x3)
    row = Out + b.to(tl.int64) * E
    e = quads * 4
    tl.store(row + e, n0, mask=e < E)
    tl.store(row + e + 1, n1, mask=e + 1 < E)
    tl.store(row + e + 2, n2, mask=e + 2 < E)
    tl.store(row + e + 3, n3, mask=e + 3 < E)
