"""Random erasing (Zhong et al. 2020) per image, sync-free, on uint8 or normalised float batches:
the draws (``draw_erasing``: one box per image and the values written into it, ``EraseDraw``)
apart from their application (``apply_erasing``), and both at once (``random_erasing``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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
