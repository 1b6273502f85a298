"""The DeiT / Lee et al. (2021) CIFAR ViT augmentation recipe, batched, per image, on the device.

Every random draw comes from the ``torch.Generator`` passed in (the epoch's device generator), every
shape is fixed by the batch shape alone, and nothing reads a tensor back to the host, so a batch can be
built inside a captured CUDA graph and a run is exactly repeatable and resumable.

Contents:
- batched uint8 (B, C, H, W) image operations with a per-image magnitude (a (B,) tensor) that match
  ``torchvision.transforms.v2.functional`` per image: geometric ops exactly (nearest interpolation,
  fill 0), colour ops within one intensity level (see ``blend``);
- the AutoAugment CIFAR-10 policy (Cubuk et al. 2019), RandAugment(N, M) and TrivialAugment-Wide as
  ``Policy``: each image draws its own sub-policy / ops / magnitudes / signs;
- random erasing (Zhong et al. 2020), sync-free, on uint8 or normalised float batches;
- mixup / cutmix with a batched device Beta sampler (``sample_betas``), per batch or per sample;
- repeated augmentation index arithmetic (Hoffer et al. 2020; DeiT's RASampler);
- draws apart from their application: ``Policy.draw`` / ``Policy.apply``, ``draw_erasing`` /
  ``apply_erasing`` (``EraseDraw``), ``draw_mix`` / ``apply_mix`` (``MixDraw``), and for a whole
  batch ``draw_batch`` (``BatchDraws``), which ``build_batch`` applies in DeiT's order with torch
  ops, or with two fused kernels (``fused_batch``; the same batch from the same draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# Operation ids. A policy is a table of (op id, magnitude) per image and slot; the ids index OPS.
OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert",
)  # fmt: skip
OP_ID = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

_DEG_TO_RAD = math.pi / 180.0  # the constants Python's math.radians / math.degrees multiply by
_RAD_TO_DEG = 180.0 / math.pi


def _per_image(values: Tensor, images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A (B,) tensor of per-image values as (B, 1, 1, 1), checked against the batch."""
    if values.shape != (images.shape[0],):
        raise ValueError(f"expected one value per image, shape ({images.shape[0]},), got {tuple(values.shape)}")
    return values.to(dtype).view(-1, 1, 1, 1)


def _check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")


# ----------------------------------------------------------------------------------------------
# Geometric operations: one inverse affine matrix per image and one grid_sample for the batch.


def inverse_affine(
    angle: Tensor, tx: Tensor, ty: Tensor, shear_x: Tensor, shear_y: Tensor, cx: Tensor, cy: Tensor
) -> Tensor:
    """Per-image inverse affine matrices (B, 2, 3) float32, the matrix torchvision's affine builds.

    Angles in degrees; (cx, cy) the centre relative to the image centre. Computed in float64, in
    the same order of operations as torchvision computes it in Python floats, then rounded to
    float32 as torchvision does, so that the sampled pixels agree exactly."""
    rot = angle.double() * _DEG_TO_RAD
    sx, sy = shear_x.double() * _DEG_TO_RAD, shear_y.double() * _DEG_TO_RAD
    cx, cy = cx.double(), cy.double()
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    cxt, cyt = cx + tx.double(), cy + ty.double()
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = 0.0 + (cx - m0 * cxt - m1 * cyt)
    m5 = 0.0 + (cy - m3 * cxt - m4 * cyt)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3).float()


def warp(images: Tensor, theta: Tensor) -> Tensor:
    """Resample each image (B, C, H, W) uint8 through its inverse affine matrix theta (B, 2, 3),
    nearest neighbour, outside pixels 0.

    The sampling grid is built exactly as torchvision builds it (pixel-centred base grid times
    theta, normalised by half the image size); grid_sample's nearest mode is then done by hand,
    as one uint8 gather: source pixel round((g + 1) * size / 2 - 0.5) (grid_sample's unnormalisation
    for align_corners=False; round half to even, as its nearbyint), zero outside. This skips the
    float copy of the batch that grid_sample needs and gives the same pixels."""
    _check_uint8(images)
    B, C, H, W = images.shape
    dev = images.device
    x = torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, W, device=dev)
    y = torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, H, device=dev)
    base = torch.stack([x.expand(H, W), y.view(H, 1).expand(H, W), torch.ones(H, W, device=dev)], dim=-1)
    half = torch.where(torch.arange(2, device=dev) == 0, 0.5 * W, 0.5 * H)  # (2,) without host data
    rescaled = theta.transpose(1, 2) / half  # (B, 3, 2)
    grid = base.view(1, H * W, 3).expand(B, H * W, 3).bmm(rescaled)  # (B, H*W, 2) in [-1, 1]
    ix = ((grid[..., 0] + 1) * (W * 0.5) - 0.5).round()
    iy = ((grid[..., 1] + 1) * (H * 0.5) - 0.5).round()
    inside = (ix >= 0) & (ix <= W - 1) & (iy >= 0) & (iy <= H - 1)  # (B, H*W)
    src = (iy.clamp(0, H - 1) * W + ix.clamp(0, W - 1)).long()
    out = images.reshape(B, C, H * W).gather(2, src.view(B, 1, H * W).expand(B, C, H * W))
    return torch.where(inside.view(B, 1, H * W), out, 0).view(B, C, H, W)


def _zeros_like_batch(images: Tensor) -> Tensor:
    return torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)


def geometric(images: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
    """Apply, per image, the geometric op ``op`` (ids from OPS; others leave the image as is) with
    torchvision's AutoAugment magnitude convention: shear factor (the tangent of the shear angle,
    sheared about the top-left corner), translation in pixels (truncated to int), rotation in degrees
    (counter-clockwise, about the centre). All five ops in one grid_sample."""
    _, _, H, W = images.shape
    zero = _zeros_like_batch(images)
    m = magnitude.double()
    shear = torch.atan(m) * _RAD_TO_DEG  # torchvision passes degrees(atan(magnitude))
    is_shear = (op == OP_ID["ShearX"]) | (op == OP_ID["ShearY"])
    theta = inverse_affine(
        angle=torch.where(op == OP_ID["Rotate"], -m, zero),  # torchvision's rotate negates the angle
        tx=torch.where(op == OP_ID["TranslateX"], torch.trunc(m), zero),
        ty=torch.where(op == OP_ID["TranslateY"], torch.trunc(m), zero),
        shear_x=torch.where(op == OP_ID["ShearX"], shear, zero),
        shear_y=torch.where(op == OP_ID["ShearY"], shear, zero),
        cx=torch.where(is_shear, zero - 0.5 * W, zero),  # shears use centre [0, 0]: the top-left corner
        cy=torch.where(is_shear, zero - 0.5 * H, zero),
    )
    moved = is_shear | (op == OP_ID["TranslateX"]) | (op == OP_ID["TranslateY"]) | (op == OP_ID["Rotate"])
    return torch.where(moved.view(-1, 1, 1, 1), warp(images, theta), images)


def _single_geometric(name: str):
    def apply(images: Tensor, magnitude: Tensor) -> Tensor:
        op = torch.full_like(magnitude, OP_ID[name], dtype=torch.long)
        return geometric(images, op, magnitude)

    apply.__name__ = name.lower()
    apply.__doc__ = f"{name} of each image by its own magnitude (see ``geometric`` for the units)."
    return apply


shear_x = _single_geometric("ShearX")
shear_y = _single_geometric("ShearY")
translate_x = _single_geometric("TranslateX")
translate_y = _single_geometric("TranslateY")
rotate = _single_geometric("Rotate")


# ----------------------------------------------------------------------------------------------
# Colour operations.
#
# Tolerance: the blend ops (brightness, color, contrast, sharpness) agree with torchvision within one
# intensity level. Both compute factor * image + (1 - factor) * degenerate in float32 and truncate to
# uint8, but torchvision forms 1 - factor from a Python double while here it is a per-image tensor,
# and its add-with-alpha kernel may fuse the multiply-add; a last-bit difference before truncation
# moves a value sitting on an integer by one level. Posterize, solarize, autocontrast, equalize and
# invert are exact.


def blend(images: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """factor * images + (1 - factor) * degenerate, clamped and truncated to uint8 (torchvision's
    blend). factor (B,) per image; degenerate broadcastable to images, float32."""
    f64 = _per_image(factor, images, torch.float64)
    ratio, alpha = f64.float(), (1.0 - f64).float()
    return (images.float() * ratio + degenerate * alpha).clamp_(0, 255).to(torch.uint8)


def _gray_floor(images: Tensor) -> Tensor:
    """ITU-R 601 luma of RGB images, floored, (B, 1, H, W) float32 (torchvision's weights)."""
    r, g, b = images.float().unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).floor_().unsqueeze(1)


def brightness(images: Tensor, factor: Tensor) -> Tensor:
    return blend(images, torch.zeros((), device=images.device), factor)


def color(images: Tensor, factor: Tensor) -> Tensor:
    """Saturation: blend with the grey image."""
    return blend(images, _gray_floor(images), factor)


def contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean grey level of each image."""
    return blend(images, _gray_floor(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def sharpness(images: Tensor, factor: Tensor) -> Tensor:
    """Blend the interior with its 3x3 smoothed (1-5-1 kernel / 13), rounded copy; the one-pixel
    border is kept, as torchvision and PIL keep it.

    The smoothing is (sum of the 3x3 window + 4 * centre) / 13, the window summed separably from
    shifted slices rather than by a grouped convolution (several times faster on a CPU). It rounds
    to the same integer as torchvision's float32 convolution: an integer over 13 is never within
    1/26 of a half, far beyond float32's error."""
    _check_uint8(images)
    B, C, H, W = images.shape
    if H <= 2 or W <= 2:
        return images
    x = images.float()
    rows = x[:, :, :, :-2] + x[:, :, :, 1:-1] + x[:, :, :, 2:]  # (B, C, H, W-2)
    window = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]  # (B, C, H-2, W-2), exact integers
    inner = x[:, :, 1:-1, 1:-1]
    smooth = ((window + 4 * inner) / 13).round_()  # (B, C, H-2, W-2)
    f64 = _per_image(factor, images, torch.float64)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner + (smooth - inner) * (1.0 - f64).float()
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(images: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` (0..8, truncated toward zero) bits of each value."""
    b = _per_image(bits, images, torch.float64).trunc().long().clamp(0, 8)
    mask = (256 - torch.pow(2, 8 - b)).to(torch.uint8)  # ones in the top b bits
    return images & mask


def solarize(images: Tensor, threshold: Tensor) -> Tensor:
    """Invert values >= threshold (in intensity levels, per image). Compared in float32 as
    torchvision compares a uint8 tensor with a Python float."""
    t = _per_image(threshold, images, torch.float64).float()
    return torch.where(images.float() >= t, 255 - images, images)


def autocontrast(images: Tensor) -> Tensor:
    """Stretch each channel of each image to span [0, 255]; constant channels are kept."""
    x = images.float()
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, 1.0, (hi - lo) * (1.0 / 255.0))
    lo = torch.where(flat, 0.0, lo)
    return ((x - lo) / scale).clamp_(0, 255).to(torch.uint8)


def equalize(images: Tensor) -> Tensor:
    """Histogram equalisation per channel of each image with PIL's lookup table (the one torchvision
    uses): step = (pixels not of the highest present level) // 255, lut[k] = (cdf[k-1] + step // 2)
    // step, images with step 0 left as they are. One scatter-add histogram for the whole batch."""
    _check_uint8(images)
    B, C, H, W = images.shape
    flat = images.reshape(B * C, H * W).long()
    hist = torch.zeros(B * C, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    levels = torch.arange(256, device=images.device)
    top = torch.where(hist > 0, levels, 0).amax(dim=1, keepdim=True)  # highest present level
    step = (H * W - hist.gather(1, top)).div(255, rounding_mode="floor")  # (B*C, 1)
    cdf_before = hist.cumsum(1) - hist  # cdf[k-1], with 0 for k = 0
    lut = (cdf_before + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    out = lut.gather(1, flat).to(torch.uint8)
    out = torch.where(step != 0, out, images.reshape(B * C, H * W))
    return out.view(B, C, H, W)


def invert(images: Tensor) -> Tensor:
    return 255 - images


# ----------------------------------------------------------------------------------------------
# Policies.

# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019), as torchvision defines it: 25 sub-policies of
# two (op, probability, magnitude bin) steps; bin None for ops without a magnitude.
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

# Ops RandAugment and TrivialAugment-Wide choose from (torchvision's lists: no Invert).
RANDOM_OPS = OPS[:-1]


def magnitude_bins(name: str, num_bins: int, height: int, width: int, wide: bool = False) -> tuple[Tensor, bool]:
    """torchvision's magnitude scale of an op: (bins (num_bins,) float32, signed). ``wide`` gives
    TrivialAugment-Wide's ranges. Ops without a magnitude get zeros."""
    top = 0.99 if wide else 0.9
    if name in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.99 if wide else 0.3, num_bins), True
    if name in ("TranslateX", "TranslateY"):
        size = width if name == "TranslateX" else height
        return torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * size, num_bins), True
    if name == "Rotate":
        return torch.linspace(0.0, 135.0 if wide else 30.0, num_bins), True
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, top, num_bins), True
    if name == "Posterize":
        levels = 6 if wide else 4
        return (8 - (torch.arange(num_bins) / ((num_bins - 1) / levels)).round().int()).float(), False
    if name == "Solarize":
        return torch.linspace(1.0, 0.0, num_bins), False
    return torch.zeros(num_bins), False


def apply_ops(images: Tensor, op: Tensor, magnitude: Tensor, ops: tuple[str, ...] = OPS) -> Tensor:
    """One step of a policy: image i gets op[i] (an id from OPS) with magnitude[i] in torchvision's
    AutoAugment convention (signed: shear factor, pixels, degrees, factor - 1, bits, threshold / 255).

    Sync-free by construction: every op of ``ops`` runs on the whole batch and each image selects
    its own result with torch.where, so the kernels launched and the shapes are the same whatever
    the draws. The five geometric ops share one grid_sample (one inverse matrix per image).

    Cost: a step costs the sum of its ops over the whole batch, not the one op each image needs.
    Measured on the shared 2-core CPU here (1 thread, heavily loaded, best of 5, a (256, 3, 32, 32)
    batch): one step of the CIFAR-10 policy (all 14 ops) ~130-150 ms, against ~15-30 ms for the
    most expensive single ops (equalize, the affine warp) and ~1-3 ms for the cheap ones: about
    6-9x the arithmetic of a dispatch that ran each image's op alone. That buys zero host syncs,
    fixed shapes and ~30 large kernels per step instead of ~2 small ones per image; the whole
    recipe still ran ~2x faster than torchvision's per-image transforms in a 2-worker DataLoader
    (benchmarks/bench_data.py --recipe). On a GPU every op is memory-bound on a 3 MB batch, so the
    extra work costs little next to the model's step.
    """
    out = images
    if any(name in GEOMETRIC for name in ops):
        out = geometric(images, op, magnitude)
    m = magnitude.double()
    blended = [name for name in ("Brightness", "Color", "Contrast") if name in ops]
    if blended:
        # One blend for the three: each image blends with its own op's degenerate image (black,
        # its grey image, its mean grey), the same arithmetic per image as the separate ops.
        gray = _gray_floor(images)
        degenerate = torch.where(
            (op == OP_ID["Color"]).view(-1, 1, 1, 1),
            gray,
            torch.where((op == OP_ID["Contrast"]).view(-1, 1, 1, 1), gray.mean(dim=(1, 2, 3), keepdim=True), 0.0),
        )
        is_blend = sum(op == OP_ID[name] for name in blended).bool().view(-1, 1, 1, 1)
        out = torch.where(is_blend, blend(images, degenerate, 1.0 + m), out)
    per_op = {
        "Sharpness": lambda: sharpness(images, 1.0 + m),
        "Posterize": lambda: posterize(images, m),
        "Solarize": lambda: solarize(images, 255.0 * m),
        "AutoContrast": lambda: autocontrast(images),
        "Equalize": lambda: equalize(images),
        "Invert": lambda: invert(images),
    }
    for name, fn in per_op.items():
        if name in ops:
            out = torch.where((op == OP_ID[name]).view(-1, 1, 1, 1), fn(), out)
    return out


@dataclass
class Policy:
    """An augmentation policy drawn per image.

    kind: "autoaugment" (CIFAR-10 policy), "randaugment" (``num_ops`` ops of magnitude bin
    ``magnitude`` of ``num_bins``) or "trivialaugment" (TrivialAugment-Wide: one op, a uniform bin).
    The magnitude tables are built on the host once per (device, image size) and cached; build them
    before capturing a CUDA graph by running one batch (graphs need warm-up runs anyway)."""

    kind: str = "autoaugment"  # "autoaugment" | "randaugment" | "trivialaugment"
    num_ops: int = 2  # randaugment: ops per image
    magnitude: int = 9  # randaugment: magnitude bin
    num_bins: int = 31  # randaugment / trivialaugment: magnitude bins (AutoAugment uses 10)

    def __post_init__(self) -> None:
        if self.kind not in ("autoaugment", "randaugment", "trivialaugment"):
            raise ValueError(f"kind must be autoaugment, randaugment or trivialaugment, got {self.kind!r}")
        if self.kind == "randaugment" and not 0 <= self.magnitude < self.num_bins:
            raise ValueError(f"magnitude must lie in [0, {self.num_bins}), got {self.magnitude}")
        self._cache: dict = {}

    @property
    def ops(self) -> tuple[str, ...]:
        if self.kind == "autoaugment":
            return tuple(sorted({s[0] for sub in CIFAR10_POLICY for s in sub}, key=OP_ID.get))
        return RANDOM_OPS

    def _tables(self, device: torch.device, height: int, width: int) -> dict[str, Tensor]:
        key = (str(device), height, width)
        if key in self._cache:
            return self._cache[key]
        if self.kind == "autoaugment":
            op, prob, mag, signed = [], [], [], []
            for sub in CIFAR10_POLICY:
                for name, p, b in sub:
                    bins, sgn = magnitude_bins(name, 10, height, width)
                    op.append(OP_ID[name])
                    prob.append(p)
                    mag.append(0.0 if b is None else float(bins[b]))
                    signed.append(sgn and b is not None)
            t = dict(
                op=torch.tensor(op).view(-1, 2),
                prob=torch.tensor(prob, dtype=torch.float32).view(-1, 2),
                mag=torch.tensor(mag, dtype=torch.float32).view(-1, 2),
                signed=torch.tensor(signed).view(-1, 2),
            )
        else:
            wide = self.kind == "trivialaugment"
            tables = [magnitude_bins(n, self.num_bins, height, width, wide) for n in RANDOM_OPS]
            t = dict(
                op=torch.tensor([OP_ID[n] for n in RANDOM_OPS]),
                mag=torch.stack([bins for bins, _ in tables]),  # (ops, num_bins)
                signed=torch.tensor([s for _, s in tables]),
            )
        self._cache[key] = t = {k: v.to(device) for k, v in t.items()}
        return t

    def draw(self, batch: int, height: int, width: int, generator: torch.Generator, device) -> tuple[Tensor, Tensor]:
        """Per-image op ids and signed magnitudes, each (steps, B)."""
        t = self._tables(torch.device(device), height, width)

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=device)

        if self.kind == "autoaugment":
            sub = torch.randint(len(CIFAR10_POLICY), (batch,), generator=generator, device=device)
            applied = rand(2, batch) < t["prob"][sub].T  # torchvision applies when rand <= p; same law
            op = torch.where(applied, t["op"][sub].T, OP_ID["Identity"])
            mag, signed = t["mag"][sub].T, t["signed"][sub].T
        else:
            steps = self.num_ops if self.kind == "randaugment" else 1
            which = torch.randint(len(RANDOM_OPS), (steps, batch), generator=generator, device=device)
            if self.kind == "randaugment":
                bin_ = torch.full_like(which, self.magnitude)
            else:
                bin_ = torch.randint(self.num_bins, (steps, batch), generator=generator, device=device)
            op, mag, signed = t["op"][which], t["mag"][which, bin_], t["signed"][which]
        negative = signed & (rand(*op.shape) < 0.5)
        return op, torch.where(negative, -mag, mag)

    def apply(self, images: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
        """Apply drawn (op, magnitude) tables (steps, B), as ``draw`` returns them, step by step."""
        _check_uint8(images)
        if op.shape != magnitude.shape or op.ndim != 2 or op.shape[1] != images.shape[0]:
            raise ValueError(f"expected op and magnitude of shape (steps, {images.shape[0]}), got "
                             f"{tuple(op.shape)} and {tuple(magnitude.shape)}")
        for step in range(op.shape[0]):
            images = apply_ops(images, op[step], magnitude[step], self.ops)
        return images

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        _check_uint8(images)
        B, _, H, W = images.shape
        return self.apply(images, *self.draw(B, H, W, generator, images.device))


# ----------------------------------------------------------------------------------------------
# Random erasing.


@dataclass
class EraseDraw:
    """The draws of random erasing for a batch: one box per image and the values written into it.

    A box covers rows [top, top + height) and columns [left, left + width) when ``on``; the
    coordinates are whole numbers held as float32 (B, 1), as they were drawn."""

    top: Tensor  # (B, 1) float32
    left: Tensor  # (B, 1) float32
    height: Tensor  # (B, 1) float32, rows erased
    width: Tensor  # (B, 1) float32, columns erased
    on: Tensor  # (B, 1) bool: whether the image is erased at all
    values: Tensor  # normalised units: () zero ("const"), (B, C, 1, 1) ("rand") or (B, C, H, W) ("pixel")

    def rows(self, rows: slice) -> "EraseDraw":
        """The draws of the images ``rows`` of the batch (views, no copy)."""
        values = self.values[rows] if self.values.ndim else self.values
        return EraseDraw(self.top[rows], self.left[rows], self.height[rows], self.width[rows], self.on[rows], values)

    def mask(self, height: int, width: int) -> Tensor:
        """The erased pixels (B, 1, H, W) bool."""
        return erase_mask(self.top, self.left, self.height, self.width, self.on, height, width)


def erase_mask(top: Tensor, left: Tensor, h: Tensor, w: Tensor, on: Tensor, height: int, width: int) -> Tensor:
    """The pixels (B, 1, H, W) bool of boxes (each parameter (B, 1)) as ``draw_erase_boxes`` draws them."""
    batch, device = top.shape[0], top.device
    rows = torch.arange(height, device=device).view(1, height)
    cols = torch.arange(width, device=device).view(1, width)
    in_rows = (rows >= top) & (rows < top + h)  # (B, H)
    in_cols = (cols >= left) & (cols < left + w)  # (B, W)
    return (in_rows.view(batch, 1, height, 1) & in_cols.view(batch, 1, 1, width)) & on.view(batch, 1, 1, 1)


def draw_erase_boxes(
    batch: int, height: int, width: int, p: float, generator: torch.Generator, device,
    scale: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3), tries: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The boxes of ``erase_boxes`` as (top, left, height, width, on), each (B, 1): float32
    coordinates and sizes, ``on`` bool."""
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
    area = height * width * (scale[0] + (scale[1] - scale[0]) * rand(batch, tries))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * rand(batch, tries))
    h = torch.sqrt(area * aspect).round()
    w = torch.sqrt(area / aspect).round()
    fits = (h < height) & (w < width)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first fitting try (argmax returns the first max)
    h, w = h.gather(1, first), w.gather(1, first)  # (B, 1)
    on = fits.any(dim=1, keepdim=True) & (rand(batch, 1) < p)
    # (size + 1) - h: one kernel for size - h + 1, the same small integers exactly.
    top = (rand(batch, 1) * ((height + 1) - h)).floor()
    left = (rand(batch, 1) * ((width + 1) - w)).floor()
    return top, left, h, w, on


def erase_boxes(
    batch: int, height: int, width: int, p: float, generator: torch.Generator, device,
    scale: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3), tries: int = 10,
) -> Tensor:  # fmt: skip
    """Per-image erasing masks (B, 1, H, W) bool: with probability p, a rectangle of area fraction
    U(scale) and aspect exp(U(log ratio)), rounded to pixels, the first of ``tries`` draws that fits
    inside the image (as torchvision and timm try 10 times; no rectangle when none fits), placed
    uniformly. The tries are drawn all at once and the first fitting one picked by argmax."""
    boxes = draw_erase_boxes(batch, height, width, p, generator, device, scale, ratio, tries)
    return erase_mask(*boxes, height, width)


def _erase_values(shape: torch.Size, mode: str, generator: torch.Generator, device) -> Tensor:
    """Erasing values in normalised units: 'const' zeros (the mean colour), 'rand' one normal draw per
    channel, 'pixel' one per pixel (timm's modes; DeiT uses 'pixel')."""
    B, C, H, W = shape
    if mode == "const":
        return torch.zeros((), device=device)
    if mode == "rand":
        return torch.randn(B, C, 1, 1, generator=generator, device=device)
    if mode == "pixel":
        return torch.randn(B, C, H, W, generator=generator, device=device)
    raise ValueError(f"erasing mode must be 'const', 'rand' or 'pixel', got {mode!r}")


def draw_erasing(
    shape: tuple[int, int, int, int], generator: torch.Generator, device, p: float = 0.25, mode: str = "pixel",
    tries: int = 10, scale: tuple[float, float] = (0.02, 1 / 3),
) -> EraseDraw:  # fmt: skip
    """The draws of ``random_erasing`` for a batch of ``shape`` (B, C, H, W): the boxes, then the values."""
    B, _, H, W = shape
    boxes = draw_erase_boxes(B, H, W, p, generator, device, scale=scale, tries=tries)
    return EraseDraw(*boxes, values=_erase_values(shape, mode, generator, device))


def apply_erasing(images: Tensor, draw: EraseDraw, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """Erase drawn boxes (see ``random_erasing`` for uint8 batches and ``mean`` / ``std``)."""
    B, C, H, W = images.shape
    values = draw.values
    if images.dtype == torch.uint8:
        if mean is None or std is None:
            raise ValueError("erasing a uint8 batch needs the normalisation's mean and std, got None")
        levels = (mean.view(1, C, 1, 1) + std.view(1, C, 1, 1) * values) * 255
        values = levels.round().clamp(0, 255).to(torch.uint8)
    return torch.where(draw.mask(H, W), values.to(images.dtype), images)


def random_erasing(
    images: Tensor, generator: torch.Generator, p: float = 0.25, mode: str = "pixel",
    mean: Tensor | None = None, std: Tensor | None = None, tries: int = 10,
    scale: tuple[float, float] = (0.02, 1 / 3),
) -> Tensor:  # fmt: skip
    """Random erasing (Zhong et al. 2020) per image, sync-free (see ``erase_boxes``).

    On a normalised float batch (DeiT erases after normalising) the values are drawn in normalised
    units. On a uint8 batch pass the normalisation's mean and std (C,) in [0, 1] units: the values
    are mapped back to intensity levels, clamp(round((mean + std * v) * 255)), the same erasing
    up to the clamp to [0, 255] and the rounding to a level. ``draw_erasing`` + ``apply_erasing``."""
    draw = draw_erasing(images.shape, generator, images.device, p, mode, tries, scale)
    return apply_erasing(images, draw, mean, std)


# ----------------------------------------------------------------------------------------------
# Mixup / CutMix.


def _per_row(values: tuple[float, ...], device) -> float | Tensor:
    """Per-row constants of a batched sampler: the Python float itself when every row has the same
    value (no kernel), else an (S, 1, 1) float32 tensor built on the device by selects, since a
    ``torch.tensor`` of a list would copy host data at every call."""
    if len(set(values)) == 1:
        return values[0]
    rows = torch.arange(len(values), device=device).view(-1, 1, 1)
    out = torch.full((len(values), 1, 1), values[-1], device=device)
    for i, value in enumerate(values[:-1]):
        out = torch.where(rows == i, value, out)
    return out


def sample_gammas(shapes: tuple[float, ...], n: int, generator: torch.Generator, device,
                  proposals: int = 16) -> Tensor:
    """(S, n) float32 Gamma(shapes[s], 1) draws, row s of shape shapes[s], all rows in one set of
    kernels, without host syncs: Marsaglia & Tsang (2000) on shape + 1 with a fixed number of
    proposals per draw (the first accepted is kept; acceptance is >= 95% per proposal for
    shape + 1 >= 1, so all 16 fail with probability < 1e-20), then the boost
    Gamma(a) = Gamma(a + 1) * U^(1/a).

    Batched because mixup and cutmix need four Gamma draws per batch, and one sampler is ~25 tiny
    kernels whatever n is: the draws of a batch then cost one sampler's kernels, not four."""
    for shape in shapes:
        if shape <= 0:
            raise ValueError(f"gamma shape must be positive, got {shape}")
    S = len(shapes)
    d_values = tuple(shape + 1.0 - 1.0 / 3.0 for shape in shapes)
    d = _per_row(d_values, device)
    c = _per_row(tuple(1.0 / math.sqrt(9.0 * d_) for d_ in d_values), device)
    z = torch.randn(S, n, proposals, generator=generator, device=device)
    u = torch.rand(S, n, proposals, generator=generator, device=device)
    v = (1.0 + c * z) ** 3
    v_positive = v.clamp_min(1e-30)
    ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v_positive))
    first = ok.int().argmax(dim=2, keepdim=True)  # the first accepted proposal (argmax: first max)
    g = v_positive.gather(2, first).squeeze(2) * (d if isinstance(d, float) else d.view(S, 1))
    boost = torch.rand(S, n, generator=generator, device=device).clamp_min(1e-30)
    if any(shape != 1.0 for shape in shapes):  # u ** 1 is u: a launch saved for Gamma(1) rows only
        exponent = _per_row(tuple(1.0 / shape for shape in shapes), device)
        boost = boost ** (exponent if isinstance(exponent, float) else exponent.view(S, 1))
    return g * boost


def sample_gamma(shape: float, n: int, generator: torch.Generator, device, proposals: int = 16) -> Tensor:
    """n Gamma(shape, 1) draws (n,) float32 (``sample_gammas`` with one row)."""
    return sample_gammas((shape,), n, generator, device, proposals)[0]


def sample_betas(alphas: tuple[float, ...], n: int, generator: torch.Generator, device) -> Tensor:
    """(S, n) float32 draws, row s from Beta(alphas[s], alphas[s]), as X / (X + Y) of two
    Gamma(alphas[s]) draws; every row's Gammas come from one batched sampler."""
    gammas = sample_gammas(alphas, 2 * n, generator, device)
    x, y = gammas[:, :n], gammas[:, n:]
    total = x + y
    return torch.where(total > 0, x / total.clamp_min(1e-30), 0.5)


def sample_beta(alpha: float, n: int, generator: torch.Generator, device) -> Tensor:
    """n Beta(alpha, alpha) draws (n,) float32 (``sample_betas`` with one row)."""
    return sample_betas((alpha,), n, generator, device)[0]


@dataclass
class MixDraw:
    """The draws of mixup / cutmix for a batch: n = 1 set of parameters ("batch" mode) or one per
    image ("elem"). Image i is mixed with its mirror B-1-i under parameters i (or the only set)."""

    use_cut: Tensor  # (n,) bool: cutmix rather than mixup
    lam_mix: Tensor  # (n,) float32: mixup's weight of the image itself
    y0: Tensor  # (n,) float32: cutmix's box, rows [y0, y1) and columns [x0, x1) taken from the partner
    y1: Tensor
    x0: Tensor
    x1: Tensor
    lam: Tensor  # (n,) float32: the targets' weight of the image itself (the pasted area corrected for cutmix)
    applied: Tensor | None  # (n,) bool: whether the image (batch) is mixed at all; None when always (prob 1)


def draw_mix(
    batch: int, height: int, width: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
    mode: str = "batch", generator: torch.Generator | None = None, device=None, prob: float = 1.0,
) -> MixDraw:  # fmt: skip
    """The draws of ``mix`` for a batch of ``batch`` images of height x width (see ``mix``)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError(f"mix needs mixup_alpha or cutmix_alpha > 0, got {mixup_alpha} and {cutmix_alpha}")
    if mode not in ("batch", "elem"):
        raise ValueError(f"mode must be 'batch' or 'elem', got {mode!r}")
    H, W, dev = height, width, device
    n = 1 if mode == "batch" else batch
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev)  # noqa: E731
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cut = rand(n) < switch_prob
    else:
        use_cut = torch.full((n,), cutmix_alpha > 0, device=dev)
    # Both lambdas in one batched sampler: row 0 mixup's, row 1 cutmix's (the ones present).
    alphas = tuple(a for a in (mixup_alpha, cutmix_alpha) if a > 0)
    lams = iter(sample_betas(alphas, n, generator, dev))
    lam_mix = next(lams) if mixup_alpha > 0 else torch.ones(n, device=dev)
    lam_cut = next(lams) if cutmix_alpha > 0 else torch.ones(n, device=dev)
    # The box (timm's rand_bbox): sides int(size * sqrt(1 - lam)), centre uniform on the pixels.
    cut = torch.sqrt(1.0 - lam_cut)
    half_h = ((H * cut).floor() / 2).floor()
    # A square image's half-sides are the same values: computed once (fewer tiny launches).
    half_w = half_h if W == H else ((W * cut).floor() / 2).floor()
    cy, cx = (rand(n) * H).floor(), (rand(n) * W).floor()
    y0, y1 = (cy - half_h).clamp(0, H), (cy + half_h).clamp(0, H)
    x0, x1 = (cx - half_w).clamp(0, W), (cx + half_w).clamp(0, W)
    lam_cut = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    lam = torch.where(use_cut, lam_cut, lam_mix)  # (n,)
    applied = rand(n) < prob if prob < 1.0 else None
    return MixDraw(use_cut, lam_mix, y0, y1, x0, x1, lam, applied)


def apply_mix(images: Tensor, targets: Tensor, draw: MixDraw) -> tuple[Tensor, Tensor]:
    """Mix drawn parameters into ``images`` (B, C, H, W) float and ``targets`` (B, K) (see ``mix``)."""
    _, _, H, W = images.shape
    n, dev = draw.lam.shape[0], images.device
    rows = torch.arange(H, device=dev).view(1, H)
    cols = torch.arange(W, device=dev).view(1, W)
    in_box = ((rows >= draw.y0[:, None]) & (rows < draw.y1[:, None])).view(n, 1, H, 1) & (
        (cols >= draw.x0[:, None]) & (cols < draw.x1[:, None])
    ).view(n, 1, 1, W)
    partner = images.flip(0)
    lam_img = draw.lam_mix.view(n, 1, 1, 1)
    mixed = torch.where(
        draw.use_cut.view(n, 1, 1, 1),
        torch.where(in_box, partner, images),
        lam_img * images + (1.0 - lam_img) * partner,
    )
    lam_t = draw.lam.view(n, 1)
    mixed_targets = lam_t * targets + (1.0 - lam_t) * targets.flip(0)
    if draw.applied is not None:
        mixed = torch.where(draw.applied.view(n, 1, 1, 1), mixed, images)
        mixed_targets = torch.where(draw.applied.view(n, 1), mixed_targets, targets)
    return mixed, mixed_targets


def mix(
    images: Tensor, targets: Tensor, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
    mode: str = "batch", generator: torch.Generator | None = None, prob: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) as DeiT uses them (timm's Mixup), sync-free.

    ``images`` float (B, C, H, W), ``targets`` soft labels (B, K) (label smoothing already applied).
    Each image is mixed with its mirror in the batch (image B-1-i). With both alphas > 0, cutmix is
    chosen with probability ``switch_prob``. mode "batch": one choice, lam and box for the batch;
    "elem": one per image. CutMix's lam is corrected to the area actually pasted after clipping the
    box to the image. Both mixes are computed and selected with torch.where, so the ops do not
    depend on the draws. ``prob``: the probability that a batch ("batch") or an image ("elem") is
    mixed at all (timm's mix_prob); below 1 it is drawn after everything else, so that prob 1
    leaves the random stream as it was. ``draw_mix`` + ``apply_mix``."""
    B, _, H, W = images.shape
    draw = draw_mix(B, H, W, mixup_alpha, cutmix_alpha, switch_prob, mode, generator, images.device, prob)
    return apply_mix(images, targets, draw)


def smooth_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0, classes: Tensor | None = None) -> Tensor:
    """One-hot (B, K) float targets with label smoothing: 1 - s + s/K on the label, s/K elsewhere
    (smoothing 0: the one-hot rows). ``classes``: arange(K) on the labels' device, when the caller
    keeps one (made here otherwise)."""
    # F.one_hot reads the labels' range back to the host; a comparison with arange does not.
    if classes is None:
        classes = torch.arange(num_classes, device=labels.device)
    hot = (labels.view(-1, 1) == classes).float()
    return hot * (1.0 - smoothing) + smoothing / num_classes if smoothing else hot


# ----------------------------------------------------------------------------------------------
# Repeated augmentation.


def repeated_indices(
    num_images: int, generator: torch.Generator, rank: int = 0, world_size: int = 1, repeats: int = 3,
    shuffle: bool = True, round_to: int = 256,
) -> Tensor:  # fmt: skip
    """Rank ``rank``'s image indices for one epoch of repeated augmentation, as DeiT's RASampler.

    The epoch's permutation (from ``generator``, the epoch's CPU generator, the same on every rank)
    is repeated element-wise ``repeats`` times ([a, a, a, b, b, b, ...]), padded with its own head
    to a multiple of world_size, and dealt round-robin: rank r takes positions r, r + W, ..., so the
    consecutive copies of an image go to different ranks (each augments its copy independently).
    Each rank then keeps its first floor(num_images // round_to * round_to / W) positions, so all
    ranks together still see about num_images images per epoch (DeiT: round_to 256): an epoch
    covers about 1/repeats of the distinct images, each ``repeats`` times. Returns int64 (n,) CPU."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of world_size {world_size}")
    if repeats < 1 or round_to < 1:
        raise ValueError(f"repeats and round_to must be >= 1, got {repeats} and {round_to}")
    order = torch.randperm(num_images, generator=generator) if shuffle else torch.arange(num_images)
    seq = order.repeat_interleave(repeats)
    total = math.ceil(num_images * repeats / world_size) * world_size
    if total > seq.numel():
        seq = torch.cat([seq, seq.repeat(math.ceil(total / max(seq.numel(), 1)))[: total - seq.numel()]])
    keep = int(num_images // round_to * round_to / world_size)
    return seq[rank:total:world_size][:keep]


# ----------------------------------------------------------------------------------------------
# The whole pipeline.


@dataclass
class AugmentConfig:
    """DeiT's augmentation defaults (Touvron et al. 2021); the lee2021 training recipe differs in a few
    values (vit_fast.recipes.Lee2021, built into this config by recipes.augment_config)."""

    padding: int = 4  # random crop from the zero-padded image (0 = off)
    flip: bool = True  # random horizontal flip
    policy: str | None = "autoaugment"  # "autoaugment" | "randaugment" | "trivialaugment" | None
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    erase_p: float = 0.25  # random erasing probability (0 = off)
    erase_mode: str = "pixel"  # "const" | "rand" | "pixel"
    erase_max_area: float = 1 / 3  # largest erased fraction of the image (the smallest is 0.02)
    mixup_alpha: float = 0.8  # 0 = off
    cutmix_alpha: float = 1.0  # 0 = off
    mix_prob: float = 1.0  # probability that a batch (or image, mode "elem") is mixed at all
    switch_prob: float = 0.5  # probability of cutmix when both are on
    mix_mode: str = "batch"  # "batch" | "elem"
    label_smoothing: float = 0.1


@dataclass
class BatchDraws:
    """Every random draw of one training batch, in the order ``draw_batch`` makes them; None where
    the step is off."""

    crop: tuple[Tensor, Tensor, Tensor | None] | None  # oy, ox (B, 1) int64, flipped (B, 1) bool or None
    op: Tensor | None  # (steps, B) int64: the policy's op ids
    magnitude: Tensor | None  # (steps, B) float32: their signed magnitudes
    erase: EraseDraw | None
    mix: MixDraw | None  # drawn for the mixing batch (see ``draw_batch``), not sliced by ``rows``

    def rows(self, rows: slice) -> "BatchDraws":
        """The per-image draws of the images ``rows`` of the batch (views); the mix draws as they are."""
        crop = None
        if self.crop is not None:
            oy, ox, flipped = self.crop
            crop = (oy[rows], ox[rows], None if flipped is None else flipped[rows])
        return BatchDraws(
            crop=crop, op=None if self.op is None else self.op[:, rows],
            magnitude=None if self.magnitude is None else self.magnitude[:, rows],
            erase=None if self.erase is None else self.erase.rows(rows), mix=self.mix,
        )


def draw_batch(config: AugmentConfig, policy: Policy | None, shape: tuple[int, int, int, int],
               generator: torch.Generator, device, mix_batch: int | None = None, erase: bool = True,
               mix: bool = True) -> BatchDraws:
    """Every draw of a training batch of ``shape`` (B, C, H, W) under ``config``, in DeiT's order:
    crop and flip, the policy, random erasing, mixup / cutmix. ``mix_batch``: the batch the images
    are mixed within (default B; a data-parallel rank mixes within its own rows of the global
    batch). ``erase`` / ``mix`` False leave those steps out even when ``config`` has them."""
    from vit_fast.data import crop_flip_offsets

    c = config
    B, C, H, W = shape
    crop = crop_flip_offsets(B, c.padding, c.flip, generator, device) if c.padding or c.flip else None
    op = magnitude = None
    if policy is not None:
        op, magnitude = policy.draw(B, H, W, generator, device)
    erasing = None
    if erase and c.erase_p > 0:
        erasing = draw_erasing(shape, generator, device, c.erase_p, c.erase_mode, scale=(0.02, c.erase_max_area))
    mixing = None
    if mix and (c.mixup_alpha > 0 or c.cutmix_alpha > 0):
        mixing = draw_mix(B if mix_batch is None else mix_batch, H, W, c.mixup_alpha, c.cutmix_alpha, c.switch_prob,
                          c.mix_mode, generator, device, c.mix_prob)
    return BatchDraws(crop, op, magnitude, erasing, mixing)


def apply_geometry_and_policy(images: Tensor, draws: BatchDraws, padding: int, policy: Policy | None) -> Tensor:
    """Crop, flip and the policy of drawn ``draws`` on the uint8 batch ``images`` (torch ops)."""
    from vit_fast.data import apply_crop_flip

    if draws.crop is not None:
        images = apply_crop_flip(images, padding, *draws.crop)
    if draws.op is not None:
        images = policy.apply(images, draws.op, draws.magnitude)
    return images


def fused_batch(images: Tensor, index: Tensor, labels: Tensor, draws: BatchDraws, padding: int, mean: Tensor,
                std: Tensor, num_classes: int, smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """The training batch from drawn ``draws`` in two fused kernels: gather + crop + flip + policy
    of ``images[index]`` (``images`` the (N, C, H, W) uint8 dataset, ``index`` (B,) int64), then
    ``vit_fast::augment_finish`` (normalise, erase, mix, targets). Returns (x (B, C, H, W) float32,
    targets (B, num_classes) float32, smoothed by ``smoothing`` and mixed); ``num_classes`` 0
    returns (x, an empty (B, 0) tensor). Equal to the torch path of the same draws."""
    from vit_fast.fused.augment_finish import augment_finish
    from vit_fast.fused.augment_policy import augment_policy

    B = index.shape[0]
    if draws.crop is not None:
        oy, ox, flipped = (None if t is None else t.view(B) for t in draws.crop)
    else:  # no crop, no flip: the identity window
        oy = ox = torch.zeros(B, dtype=torch.int64, device=images.device)
        flipped = None
    op, magnitude = draws.op, draws.magnitude
    if op is None:  # no policy: zero steps
        op = torch.empty((0, B), dtype=torch.int64, device=images.device)
        magnitude = torch.empty((0, B), dtype=torch.float32, device=images.device)
    batch = augment_policy(images, index, padding, oy, ox, flipped, op, magnitude)
    erase = values = None
    if draws.erase is not None:
        e = draws.erase
        erase = (e.top, e.left, e.height, e.width, e.on)
        values = e.values if e.values.ndim else None  # "const": zeros, the kernel's default
    mix = applied = None
    if draws.mix is not None:
        m = draws.mix
        mix, applied = (m.use_cut, m.lam_mix, m.y0, m.y1, m.x0, m.x1, m.lam), m.applied
    return augment_finish(batch, mean, std, labels, num_classes, smoothing, erase, values, mix, applied)


def build_batch(images: Tensor, index: Tensor, labels: Tensor, draws: BatchDraws, padding: int,
                policy: Policy | None, mean: Tensor, std: Tensor, classes: Tensor | None = None,
                smoothing: float = 0.0, fused: bool = False) -> tuple[Tensor, Tensor]:
    """The training batch of ``images[index]`` (``images`` the (N, C, H, W) uint8 dataset, ``index``
    (B,) int64) from drawn ``draws``, in DeiT's order: crop + flip and the policy (uint8), normalise
    (``mean``, ``std`` (C,) float32 on the device, in [0, 1] units), random erasing (on the
    normalised batch), then the targets and mixup / cutmix.

    Returns (x (B, C, H, W) float32, targets). With ``classes`` (arange(K) on the device, made once
    by the caller) the targets are (B, K) float32 one-hot rows, smoothed by ``smoothing`` and mixed
    as drawn; with None they are ``labels`` themselves (``draws`` must then hold no mixing).
    ``fused``: the same batch from the same draws by two fused kernels (``fused_batch``; CUDA
    tensors, or CPU tensors under Triton's interpreter), bit for bit."""
    from vit_fast.data import normalize

    if classes is None and draws.mix is not None:
        raise ValueError("mixing needs targets to mix: pass classes")
    if fused:
        x, targets = fused_batch(images, index, labels, draws, padding, mean, std,
                                 0 if classes is None else classes.shape[0], smoothing)
        return x, labels if classes is None else targets
    x = normalize(apply_geometry_and_policy(images[index], draws, padding, policy), mean, std)
    if draws.erase is not None:
        x = apply_erasing(x, draws.erase)
    if classes is None:
        return x, labels
    targets = smooth_targets(labels, classes.shape[0], smoothing, classes)
    if draws.mix is not None:
        x, targets = apply_mix(x, targets, draws.mix)
    return x, targets
