"""Counter-based draws: every random draw of a training batch as a pure function of where it is in
the run, (seed, epoch, step, image position, stream), with torch ops (``counter_draws``) or the
fused kernel ``vit_fast::augment_draw`` (kernels/augment_draw.py), bit for bit the same.

Why: a batch whose draws come from a generator needs the generator's state on the host and a
hundred-odd small kernels per batch; a batch whose draws are Philox-4x32-10 blocks (Salmon et al.
2011) of the counter (image position, step, epoch, stream) under the key (seed) needs neither. The
loader keeps (epoch, step) in a device tensor, ``Position``, that the draw reads and the step
advances, so a CUDA graph that captured the data phase produces the next batch at every replay,
and a resumed run draws exactly what the uninterrupted run drew.

Exactness: the arithmetic is integer (Philox, ``below``), exact float32 (``uniform``), or float32
ops each rounded on its own (+, -, *, and / and sqrt correctly rounded: ``exact_div``,
``exact_sqrt``); ln, e**x, cos and sin are series of
those (``soft_log``, ``soft_exp``, ``cos_sin_turn``) rather than the library's, whose last bit
differs between devices and CPUs. So this module and the kernel agree bit for bit everywhere, and
every backend builds the same batch from the same draws (docs/data.md: "Draws").

The distributions are the generator-based ones' (``vit_fast.augment.pipeline.draw_batch``): crop
offsets and flips uniform, the policy's sub-policy / ops / bins / signs, random erasing's box
(area fraction U(0.02, max), aspect exp(U(log 0.3, log 1/0.3)), the first of 10 tries that fits,
rounded half up), its values (zeros, or standard normals per channel or per pixel), mixup /
cutmix's choice, Beta(alpha, alpha) weights (Marsaglia-Tsang Gammas, 16 proposals), box and
"applied" flag; only the random numbers behind them differ.

Data parallel: image draws are keyed by the image's position in the global batch, so every rank
draws what a single process with the global batch draws for that image; mix draws are keyed by
the rank's own rows and the rank (the rank mixes within its own batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .config import AugmentConfig
from .erasing import EraseDraw
from .mixing import MixDraw
from .pipeline import BatchDraws
from .policies import CIFAR10_POLICY, RANDOM_OPS, Policy

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 round multipliers (Salmon et al. 2011)
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # and its Weyl key increments
MIX_STREAM = 1 << 20  # counter word 3 of mix draws: MIX_STREAM + rank * 256 + k
NOISE_STREAM = 1024  # of erasing noise element e: NOISE_STREAM + e // 4
ERASE_TRIES = 10  # as torchvision and timm
MAX_POLICY_STEPS = 31  # streams 1..31; erasing's start at 32
MAX_ERASE_PIXELS = 1 << 19  # round_sqrt is exact below 2**20 (box area x aspect <= 1.34 H W)
MAX_NOISE_PER_IMAGE = 4 * (MIX_STREAM - NOISE_STREAM)  # noise streams end where mixing's begin
ERASE_MIN_AREA = 0.02
LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
LN2_HI, LN2_LO = 0.693115234375, 3.194618494528623e-05  # ln 2 = HI + LO, HI with 12 significant bits
INV_LN2, SQRT2, HALF_PI = 1.4426950408889634, 1.4142135623730951, 1.5707963267948966
ERASE_MODES = {"const": 0, "rand": 1, "pixel": 2}
POLICY_KINDS = {"none": 0, "autoaugment": 1, "randaugment": 2, "trivialaugment": 2}


@dataclass(frozen=True)
class DrawSpec:
    """What a batch's draws depend on besides (epoch, step): the run's seed, the rank's place in
    the global batch, the image size and the augmentation (from ``draw_spec``)."""

    seed: int
    rank: int
    world: int
    global_batch: int  # images per global batch: the stride of a step in the epoch's order
    batch: int  # this rank's rows
    mix_rows: int  # mix draws: 0 (no mixing), 1 ("batch") or batch ("elem")
    channels: int
    height: int
    width: int
    padding: int
    crop: bool
    flip: bool
    policy: int  # POLICY_KINDS: 0 none, 1 a sub-policy table, 2 an op table
    steps: int  # policy steps per image
    n_choices: int  # sub-policies (1) or ops (2) to choose from
    fixed_bin: int  # policy 2: the magnitude bin, or -1 to draw one of num_bins
    num_bins: int
    erase_p: float
    erase_span: float  # max area - ERASE_MIN_AREA
    erase_mode: int  # ERASE_MODES
    mixup: float
    cutmix: float
    switch_prob: float
    mix_prob: float

    def to_args(self) -> tuple[list[int], list[float]]:
        """The spec as the op's arguments: its int (and bool) fields, then its float fields, in order."""
        values = [getattr(self, f.name) for f in fields(self)]
        return [int(v) for v in values if not isinstance(v, float)], [v for v in values if isinstance(v, float)]

    @classmethod
    def from_args(cls, ints: list[int], floats: list[float]) -> DrawSpec:
        """The spec ``to_args`` gave (bools restored from their ints)."""
        ints, floats, values = list(ints), list(floats), {}
        for f in fields(cls):
            kind = {"int": int, "bool": bool, "float": float}[f.type]
            values[f.name] = floats.pop(0) if kind is float else kind(ints.pop(0))
        return cls(**values)

    @property
    def seed_words(self) -> tuple[int, int]:
        """The Philox key: the seed's low and high 32 bits (the seed taken modulo 2**64)."""
        s = self.seed % (1 << 64)
        return s & MASK32, s >> 32

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The erasing values' shape: () zeros, (B, C, 1, 1) per channel, (B, C, H, W) per pixel."""
        return ((), (self.batch, self.channels, 1, 1),
                (self.batch, self.channels, self.height, self.width))[self.erase_mode]


def gamma_constants(alpha: float) -> tuple[float, float, float]:
    """Marsaglia-Tsang's (d, c) for Gamma(alpha + 1), and 1 / alpha (the boost's exponent)."""
    if alpha <= 0:
        return 1.0, 1.0, 1.0  # unused
    d = alpha + 1.0 - 1.0 / 3.0
    return d, 1.0 / math.sqrt(9.0 * d), 1.0 / alpha


def draw_spec(config: AugmentConfig, policy: Policy | None, seed: int, batch: int, shape: tuple[int, int, int],
              rank: int = 0, world: int = 1, global_batch: int | None = None) -> DrawSpec:
    """The draws of a rank's ``batch`` rows of (C, H, W) images under ``config`` (``policy`` from
    ``pipeline.policy_of``); ``global_batch`` (default batch * world): the images of a full global
    batch, the stride of a step in the epoch's order (an epoch's last batch may be smaller)."""
    C, H, W = shape
    if policy is None:
        kind, steps, choices, fixed, bins = 0, 0, 1, -1, 1
    elif policy.kind == "autoaugment":
        kind, steps, choices, fixed, bins = 1, 2, len(CIFAR10_POLICY), -1, 1
    else:
        kind, choices, bins = 2, len(RANDOM_OPS), policy.num_bins
        steps, fixed = (policy.num_ops, policy.magnitude) if policy.kind == "randaugment" else (1, -1)
    mix_rows = (1 if config.mix_mode == "batch" else batch) if config.mixing else 0
    # The counter streams must not overlap (see the module docstring): policy steps use 1..31,
    # erasing 32..48, noise NOISE_STREAM + e // 4 below MIX_STREAM, mixing 256 per rank.
    if steps > MAX_POLICY_STEPS:
        raise ValueError(f"at most {MAX_POLICY_STEPS} policy steps per image, got {steps} (randaugment_ops)")
    if config.erase > 0 and H * W > MAX_ERASE_PIXELS:
        raise ValueError(f"random erasing takes images of at most {MAX_ERASE_PIXELS} pixels, got {H} x {W}")
    if config.erase > 0 and config.erase_mode == "pixel" and C * H * W > MAX_NOISE_PER_IMAGE:
        raise ValueError(f"an image of at most {MAX_NOISE_PER_IMAGE} values can draw erasing noise, got "
                         f"{C} x {H} x {W}")
    return DrawSpec(
        seed=seed, rank=rank, world=world, global_batch=batch * world if global_batch is None else global_batch, batch=batch, mix_rows=mix_rows,
        channels=C, height=H, width=W, padding=config.crop_padding, crop=config.crop_padding > 0 or config.flip,
        flip=config.flip, policy=kind, steps=steps, n_choices=choices, fixed_bin=fixed, num_bins=bins,
        erase_p=float(config.erase), erase_span=float(config.erase_max_area - ERASE_MIN_AREA),
        erase_mode=ERASE_MODES[config.erase_mode], mixup=float(config.mixup), cutmix=float(config.cutmix),
        switch_prob=float(config.mix_switch_prob), mix_prob=float(config.mix_prob),
    )


# ---------------------------------------------------------------------------------------------
# The generator and its conversions, on int64 tensors holding uint32 words.


def exact_sqrt(x: Tensor) -> Tensor:
    """sqrt of float32 x, correctly rounded: through float64, whose square root rounded to float32
    is the correctly rounded float32 one (53 >= 2 * 24 + 2 bits). torch's float32 sqrt on a CPU is
    not always correctly rounded (its vectorised path differs in the last bit)."""
    return torch.sqrt(x.double()).float()


def exact_div(a: Tensor, b: Tensor) -> Tensor:
    """a / b of float32 tensors, correctly rounded (through float64, as ``exact_sqrt``)."""
    return (a.double() / b.double()).float()


def _mul_wide(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * m for uint32 words a (int64) and a 32-bit constant m,
    through 16-bit halves so that no int64 product overflows."""
    p_lo = (a & 0xFFFF) * m  # < 2**48
    p_hi = (a >> 16) * m
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32


def philox(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> tuple[Tensor, ...]:
    """Philox-4x32-10 of the counters (broadcast int64 tensors of uint32 words) under the key (k0, k1)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        h0, l0 = _mul_wide(c0, PHILOX_M0)
        h1, l1 = _mul_wide(c2, PHILOX_M1)
        c0, c1, c2, c3 = h1 ^ c1 ^ k0, l1, h0 ^ c3 ^ k1, l0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def uniform(x: Tensor) -> Tensor:
    """A word as a float32 in [0, 1): its top 24 bits times 2**-24 (exact)."""
    return (x >> 8).to(torch.float32) * (1.0 / 16777216.0)


def below(x: Tensor, n: int | Tensor) -> Tensor:
    """A word as an integer in [0, n) (n < 2**31): the high word of x * n."""
    return (x * n) >> 32


def soft_log(x: Tensor) -> Tensor:
    """ln x of normal float32 x > 0 (kernels/augment_draw.py's ``soft_log``, op for op)."""
    bits = x.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > SQRT2
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e)
    s = exact_div(m - 1.0, m + 1.0)
    s2 = s * s
    p = s2 * (1.0 / 9.0) + (1.0 / 7.0)
    p = p * s2 + (1.0 / 5.0)
    p = p * s2 + (1.0 / 3.0)
    p = p * s2 + 1.0
    ef = e.to(torch.float32)
    return (ef * LN2_HI + 2.0 * s * p) + ef * LN2_LO


def soft_exp(x: Tensor) -> Tensor:
    """e**x of float32 x clamped to [-80, 88] (the kernel's ``soft_exp``, op for op; e**-80 is a
    normal float32, so no device can flush a result to zero)."""
    x = x.clamp(-80.0, 88.0)
    k = torch.floor(x * INV_LN2 + 0.5)
    r = (x - k * LN2_HI) - k * LN2_LO
    p = r * (1.0 / 40320.0) + (1.0 / 5040.0)
    for coef in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + coef
    scale = ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    return p * scale


def cos_sin_turn(u: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) of 2 pi u for u in [0, 1) (the kernel's ``cos_sin_turn``, op for op)."""
    t = u * 4.0
    q = torch.floor(t)
    a = (t - q) * HALF_PI
    a2 = a * a
    sn = a2 * (-1.0 / 39916800.0) + (1.0 / 362880.0)
    for coef in (-1.0 / 5040.0, 1.0 / 120.0, -1.0 / 6.0):
        sn = sn * a2 + coef
    sn = (sn * a2) * a + a
    cs = a2 * (1.0 / 479001600.0) + (-1.0 / 3628800.0)
    for coef in (1.0 / 40320.0, -1.0 / 720.0, 1.0 / 24.0, -0.5, 1.0):
        cs = cs * a2 + coef
    qi = q.to(torch.int32)
    cos = torch.where(qi == 0, cs, torch.where(qi == 1, -sn, torch.where(qi == 2, -cs, sn)))
    sin = torch.where(qi == 0, sn, torch.where(qi == 1, cs, torch.where(qi == 2, -sn, -cs)))
    return cos, sin


def round_sqrt(x: Tensor) -> Tensor:
    """floor(sqrt(x) + 1/2) of the exact square root, 0 <= x < 2**20 (the kernel's ``round_sqrt``:
    any root within one of the answer, then exact corrections by the odd squares)."""
    k = torch.floor(torch.sqrt(x) + 0.5)
    k = torch.where((2.0 * k + 1.0) * (2.0 * k + 1.0) <= 4.0 * x, k + 1.0, k)
    return torch.where((2.0 * k - 1.0) * (2.0 * k - 1.0) > 4.0 * x, k - 1.0, k)


def box_muller(xa: Tensor, xb: Tensor) -> tuple[Tensor, Tensor]:
    """Two words as a standard normal pair: sqrt(-2 ln(1 - u_a)) (cos, sin)(2 pi u_b)."""
    r = exact_sqrt(-2.0 * soft_log(1.0 - uniform(xa)))
    c, s = cos_sin_turn(uniform(xb))
    return r * c, r * s


GAMMA_PROPOSALS = 16


def _first(ok: Tensor, values: Tensor, default: float = 0.0) -> Tensor:
    """Along the last dimension, the value where ``ok`` is first True (``default`` where it never
    is): the kernel's running "not found yet" selection, made at once."""
    first = ok.int().argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    return torch.where(ok.any(dim=-1), values.gather(-1, first).squeeze(-1), default)


def _gamma(m: Tensor, step: Tensor, epoch: Tensor, key: tuple[int, int], stream: int, alpha: float) -> Tensor:
    """Gamma(alpha) per row (the kernel's ``gamma``): its 16 proposals drawn at once, (n, 16)."""
    d, c, inv_shape = gamma_constants(alpha)
    proposals = stream + torch.arange(GAMMA_PROPOSALS, device=m.device)
    x0, x1, x2, x3 = philox(m.view(-1, 1), step, epoch, proposals.view(1, -1), *key)
    z, _ = box_muller(x0, x1)
    v = 1.0 + c * z
    v = (v * v) * v
    v_pos = v.clamp_min(1e-30)
    lhs = soft_log(uniform(x2).clamp_min(1e-30))
    rhs = ((0.5 * z) * z + d) - d * v + d * soft_log(v_pos)
    g = _first((v > 0) & (lhs < rhs), v_pos * d)
    boost = uniform(x3[:, 0]).clamp_min(1e-30)
    # Clamped to a normal number: a GPU may flush a denormal product to zero, a CPU keeps it.
    return (g * soft_exp(soft_log(boost) * inv_shape)).clamp_min(1e-30)


def _beta(m: Tensor, step: Tensor, epoch: Tensor, key: tuple[int, int], stream: int, alpha: float) -> Tensor:
    x = _gamma(m, step, epoch, key, stream, alpha)
    y = _gamma(m, step, epoch, key, stream + 16, alpha)
    total = x + y
    return torch.where(total > 0, exact_div(x, total.clamp_min(1e-30)), 0.5)


# ---------------------------------------------------------------------------------------------
# The draws of a batch


def policy_tables(policy: Policy | None, device, height: int, width: int) -> tuple[Tensor, ...]:
    """(op, prob, magnitude, signed) tables as the kernel reads them: AutoAugment's (25, 2) each,
    or an op table: op (ops,), prob unused (1,), magnitude (ops, bins), signed (ops,)."""
    if policy is None:
        empty = torch.zeros(1, device=device)
        return empty.long(), empty, empty, empty.bool()
    t = policy._tables(torch.device(device), height, width)
    prob = t["prob"] if "prob" in t else torch.zeros(1, device=device)
    return t["op"], prob, t["mag"], t["signed"]


def counter_draws(spec: DrawSpec, order: Tensor, labels: Tensor, position: Tensor,
                  tables: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, BatchDraws]:
    """(index (B,), labels (B,), the draws) of the rank's batch at ``position`` = (epoch, step)
    (int64 (2,), on the device) of the epoch's ``order`` (int64, dataset indices), in torch ops:
    what ``vit_fast::augment_draw`` computes, bit for bit. Reads nothing back to the host."""
    dev = order.device
    B, key = spec.batch, spec.seed_words
    epoch, step = position[0], position[1]
    rows = torch.arange(B, device=dev)
    g = spec.rank + rows * spec.world
    index = order[step * spec.global_batch + g]
    x0, x1, x2, x3 = philox(g, step, epoch, torch.zeros_like(g), *key)
    crop = None
    if spec.crop:
        span = 2 * spec.padding + 1
        flipped = ((x2 >> 31) != 0).view(B, 1) if spec.flip else None
        crop = (below(x0, span).view(B, 1), below(x1, span).view(B, 1), flipped)
    op = magnitude = None
    if spec.policy:
        op_tab, prob_tab, mag_tab, sign_tab = tables
        ops, mags = [], []
        sub = below(x3, spec.n_choices)
        for s in range(spec.steps):
            y0, y1, y2, _ = philox(g, step, epoch, torch.full_like(g, 1 + s), *key)
            if spec.policy == 1:
                applied = uniform(y0) < prob_tab[sub, s]
                o = torch.where(applied, op_tab[sub, s], 0)
                m, signed = mag_tab[sub, s], sign_tab[sub, s]
            else:
                which = below(y0, spec.n_choices)
                bin_ = torch.full_like(which, spec.fixed_bin) if spec.fixed_bin >= 0 else below(y1, spec.num_bins)
                o, m, signed = op_tab[which], mag_tab[which, bin_], sign_tab[which]
            negative = signed & (uniform(y2) < 0.5)
            ops.append(o)
            mags.append(torch.where(negative, -m, m))
        op, magnitude = torch.stack(ops), torch.stack(mags)
    erase = _erase_draws(spec, g, step, epoch, key) if spec.erase_p > 0 else None
    mix = _mix_draws(spec, step, epoch, key, dev) if spec.mix_rows else None
    return index, labels[index], BatchDraws(crop, op, magnitude, erase, mix)


def _erase_draws(spec: DrawSpec, g: Tensor, step: Tensor, epoch: Tensor, key: tuple[int, int]) -> EraseDraw:
    H, W, B = spec.height, spec.width, spec.batch
    area_total = float(H * W)
    tries = 32 + torch.arange(ERASE_TRIES, device=g.device)
    z0, z1, _, _ = philox(g.view(-1, 1), step, epoch, tries.view(1, -1), *key)  # (B, tries)
    area = area_total * (ERASE_MIN_AREA + spec.erase_span * uniform(z0))
    log_aspect = LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * uniform(z1)
    h = round_sqrt(area * soft_exp(log_aspect))
    w = round_sqrt(area * soft_exp(-log_aspect))  # area / aspect, without a division
    fits = (h < H) & (w < W)
    found = fits.any(dim=1)
    eh, ew = _first(fits, h), _first(fits, w)
    p0, p1, p2, _ = philox(g, step, epoch, torch.full_like(g, 48), *key)
    on = found & (uniform(p0) < spec.erase_p)
    top = torch.floor(uniform(p1) * ((H + 1) - eh))
    left = torch.floor(uniform(p2) * ((W + 1) - ew))
    values = erase_noise(spec, step, epoch, g.device)
    return EraseDraw(top.view(B, 1), left.view(B, 1), eh.view(B, 1), ew.view(B, 1), on.view(B, 1), values)


def erase_noise(spec: DrawSpec, step: Tensor, epoch: Tensor, device) -> Tensor:
    """The erasing values (``spec.noise_shape``): element e of row b is normal e % 4 of the block
    (g, step, epoch, NOISE_STREAM + e // 4)."""
    if spec.erase_mode == 0:
        return torch.zeros((), device=device)
    shape = spec.noise_shape
    per_row = math.prod(shape[1:])
    quads = (per_row + 3) // 4
    g = (spec.rank + torch.arange(spec.batch, device=device) * spec.world).view(-1, 1)
    x0, x1, x2, x3 = philox(g, step, epoch, NOISE_STREAM + torch.arange(quads, device=device).view(1, -1),
                            *spec.seed_words)
    n0, n1 = box_muller(x0, x1)
    n2, n3 = box_muller(x2, x3)
    noise = torch.stack([n0, n1, n2, n3], dim=2).view(spec.batch, 4 * quads)[:, :per_row]
    return noise.reshape(shape)


def _mix_draws(spec: DrawSpec, step: Tensor, epoch: Tensor, key: tuple[int, int], device) -> MixDraw:
    H, W, n = spec.height, spec.width, spec.mix_rows
    m = torch.arange(n, device=device)
    base = MIX_STREAM + spec.rank * 256
    q0, q1, q2, q3 = philox(m, step, epoch, torch.full_like(m, base), *key)
    if spec.mixup > 0 and spec.cutmix > 0:
        use_cut = uniform(q0) < spec.switch_prob
    else:
        use_cut = torch.full((n,), spec.cutmix > 0, device=device)
    one = torch.ones(n, dtype=torch.float32, device=device)
    lam_mix = _beta(m, step, epoch, key, base + 1, spec.mixup) if spec.mixup > 0 else one
    lam_cut = _beta(m, step, epoch, key, base + 33, spec.cutmix) if spec.cutmix > 0 else one
    cut = exact_sqrt(1.0 - lam_cut)
    half_h = torch.floor(torch.floor(H * cut) * 0.5)
    half_w = torch.floor(torch.floor(W * cut) * 0.5)
    cy, cx = torch.floor(uniform(q1) * H), torch.floor(uniform(q2) * W)
    y0, y1 = (cy - half_h).clamp(0, H), (cy + half_h).clamp(0, H)
    x0, x1 = (cx - half_w).clamp(0, W), (cx + half_w).clamp(0, W)
    lam_box = 1.0 - exact_div((y1 - y0) * (x1 - x0), torch.full_like(y0, float(H * W)))
    lam = torch.where(use_cut, lam_box, lam_mix)
    applied = uniform(q3) < spec.mix_prob if spec.mix_prob < 1.0 else None
    return MixDraw(use_cut, lam_mix, y0, y1, x0, x1, lam, applied)
