"""Image files as uint8 tensors: ``ImageDataset`` (images, labels, class names), the data errors,
and ``read_image``, the one way an image file is decoded (every failure an error naming the file).

The lowest layer of the data side: ``vit_fast.image_folder`` (folder layouts and the prepared
cache) and ``vit_fast.datasets`` build on it; both re-export these names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is made: a current cache is checked without it
    from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    pass


class DatasetIntegrityError(ValueError):
    """A dataset file that is not what it should be (wrong checksum, forbidden pickle content,
    unreadable image, class sets that do not match); the message names the file or the classes."""


class ImageReadError(DatasetIntegrityError):
    pass


@dataclass
class ImageDataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64, with the class names."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        import torch

        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        if len(self.labels) and not (0 <= int(self.labels.min()) and int(self.labels.max()) < len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got [{int(self.labels.min())}, {int(self.labels.max())}]")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ImageDataset":
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes)


# Pillow's default limit. A larger image is refused before it is decoded: a small file can claim
# (and decompress to) billions of pixels, a decompression bomb.
MAX_IMAGE_PIXELS = 89_478_485

# Pillow modes of 8 bits per channel: convert("RGB") keeps their scale.
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _to_rgb8(img, path: Path):
    """``img`` as an 8-bit RGB Pillow image, with 16-bit and float pixels scaled to 0..255."""
    from PIL import Image

    if img.mode in _EIGHT_BIT_MODES:
        return img.convert("RGB")
    if img.mode.startswith("I;16"):  # 16-bit grayscale (PNG, TIFF): 65535 is white
        gray = np.asarray(img).astype(np.float32) * (255 / 65535)
    elif img.mode == "F":  # float (TIFF): accepted in [0, 1], the usual convention
        gray = np.asarray(img, dtype=np.float32)
        lo, hi = float(gray.min(initial=0.0)), float(gray.max(initial=0.0))
        if not np.isfinite(gray).all() or lo < 0 or hi > 1:
            raise ImageReadError(f"{path} has float pixels in [{lo}, {hi}]; expected values in [0, 1] "
                                 "(convert it to an 8- or 16-bit image)")
        gray = gray * 255
    else:  # "I" (32-bit integers) and rarer modes carry no scale Pillow can tell us
        raise ImageReadError(f"{path} has pixel mode {img.mode!r}, whose value range is unknown; expected an "
                             "8- or 16-bit image or float pixels in [0, 1]")
    return Image.fromarray(np.round(gray).clip(0, 255).astype(np.uint8), mode="L").convert("RGB")


def read_image(path: str | Path):
    """The image file at ``path`` as an 8-bit RGB Pillow image, decoded in full. Every way a file
    can fail (missing, a directory, empty, not an image, truncated, too large, a pixel format
    without a known scale) is one error naming the file."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path} is a directory; expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path} is empty (0 bytes); expected an image file")
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it, then decodes; the check below refuses instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageReadError(f"{path} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} "
                                     "allowed (a decompression bomb?); downscale it first")
            img.load()
            return _to_rgb8(img, path)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{path} is refused as a decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # Pillow raises all three on damaged files
        raise ImageReadError(f"{path} is not an image Pillow can read (PNG, JPEG, ...), or it is truncated "
                             f"or damaged: {err}") from None
