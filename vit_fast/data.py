"""The data side's command, and its public names in one place for scripts:

    python -m vit_fast.data prepare DATA_DIR [--image-size N] [--cache-dir DIR]  # decode once, cache
    python -m vit_fast.data --preview grid.png                                  # what the model sees

The data side, each module with one job, each importing only those above it:

- ``vit_fast.image_files``: ``ImageDataset``, the data errors, ``read_image``;
- ``vit_fast.image_folder``: image-folder layouts and the prepared cache (``prepare``);
- ``vit_fast.datasets``: CIFAR-100 / CIFAR-10 from the official pickle files, image folders, the
  synthetic task, the dataset fingerprint, channel statistics;
- ``vit_fast.augment``: the batched augmentation (``config``: ``AugmentConfig``; ``image_ops``,
  ``policies``, ``erasing``, ``mixing``; ``pipeline``: a batch's draws and the batch built from
  them, by torch ops or the fused kernels);
- ``vit_fast.loader``: ``DeviceLoader`` (the epoch's order, sharding, repeated augmentation);
- ``vit_fast.preview``: the preview grid and this command (``main``).

The package's modules import from those modules; only the training command (``vit_fast.train``,
as ``data_mod``) still reaches the datasets and the loader through this one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .image_files import DatasetIntegrityError
from .image_folder import prepare

if TYPE_CHECKING:
    from .augment.config import AugmentConfig
    from .augment.pipeline import normalize
    from .datasets import (CIFAR_MD5, DATASETS, MAX_IMAGE_PIXELS, DatasetNotFoundError, ImageDataset, ImageReadError,
                           align_classes, channel_stats, file_md5, fingerprint, fingerprint_changes, load_cifar,
                           load_data, load_image_folder, load_split, read_image, synthetic)
    from .loader import DeviceLoader
    from .preview import MAX_PREVIEW_IMAGES, preview, preview_path

# The names below are imported on first use (__getattr__): ``prepare`` on a folder whose cache is
# current then runs without importing torch, most of such a command's time.
_DATASETS_NAMES = ("CIFAR_MD5", "DATASETS", "MAX_IMAGE_PIXELS", "DatasetNotFoundError", "ImageDataset",
                   "ImageReadError", "align_classes", "channel_stats", "file_md5", "fingerprint", "fingerprint_changes",
                   "load_cifar", "load_data", "load_image_folder", "load_split", "read_image", "synthetic")
_PREVIEW_NAMES = ("MAX_PREVIEW_IMAGES", "preview", "preview_path")


def __getattr__(name: str):
    if name in _DATASETS_NAMES:
        from . import datasets

        return getattr(datasets, name)
    if name in _PREVIEW_NAMES:
        from . import preview

        return getattr(preview, name)
    if name == "AugmentConfig":
        from .augment.config import AugmentConfig

        return AugmentConfig
    if name == "normalize":
        from .augment.pipeline import normalize

        return normalize
    if name == "DeviceLoader":
        from .loader import DeviceLoader

        return DeviceLoader
    raise AttributeError(f"module 'vit_fast.data' has no attribute {name!r}")

__all__ = [
    "AugmentConfig", "CIFAR_MD5", "DATASETS", "DatasetIntegrityError", "DatasetNotFoundError", "DeviceLoader",
    "ImageDataset", "ImageReadError", "MAX_IMAGE_PIXELS", "MAX_PREVIEW_IMAGES", "align_classes", "channel_stats",
    "file_md5", "fingerprint", "fingerprint_changes", "load_cifar", "load_data", "load_image_folder", "load_split",
    "main", "normalize", "prepare", "prepare_main", "preview", "preview_path", "read_image", "synthetic",
]


def prepare_main(argv: list[str] | None = None) -> list:
    """``python -m vit_fast.data prepare DATA_DIR``: decode an image folder once into its cache."""
    import argparse

    from .cli import UsageError, errors_handled

    p = argparse.ArgumentParser(prog="python -m vit_fast.data prepare", description=prepare_main.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR", help="the image folder: DATA_DIR/train and DATA_DIR/val or test")
    p.add_argument("--image-size", type=int, default=32, help="images are resized to this (train with the same)")
    p.add_argument("--cache-dir", default=None,
                   help="keep the cache here (for a read-only DATA_DIR) instead of DATA_DIR/.vit_fast_cache")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    args = p.parse_args(argv)
    with errors_handled(FileNotFoundError, DatasetIntegrityError):
        for name in ("image_size", "workers"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        return prepare(args.data_dir, args.image_size, args.cache_dir, args.workers, tensors=False)


def main(argv: list[str] | None = None):
    """``prepare DATA_DIR ...`` prepares an image folder; anything else is the preview's command."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: python -m vit_fast.data prepare DATA_DIR [--image-size N] [--cache-dir DIR] [--workers N]\n"
              "       python -m vit_fast.data --preview PNG [options]\n\n"
              "prepare: decode an image folder once into its cache (prepare --help for the options)\n"
              "--preview: a grid of augmented training images; its options follow\n")
    from .preview import main as preview_main

    return preview_main(argv)


if __name__ == "__main__":
    main()
