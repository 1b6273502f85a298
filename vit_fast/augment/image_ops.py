"""Batched uint8 (B, C, H, W) image operations with a per-image magnitude (a (B,) tensor), matched
to ``torchvision.transforms.v2.functional`` per image: geometric ops exactly (nearest
interpolation, fill 0), colour ops within one intensity level (see ``blend``), the others exactly.

``OPS`` names the operations a policy draws from (their ids index it); ``apply_ops`` runs one
policy step, each image its own op and magnitude, without host syncs.
"""

from __future__ import annotations

import math

import torch
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


def check_uint8(images: Tensor) -> None:
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
    check_uint8(images)
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
    check_uint8(images)
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
    check_uint8(images)
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
# One policy step.


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
