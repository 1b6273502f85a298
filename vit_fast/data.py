"""``python -m vit_fast.data --preview grid.png``: the data side's command, and its public names
in one place for scripts.

The data side, each module with one job, each importing only those above it:

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

from .augment.config import AugmentConfig
from .augment.pipeline import normalize
from .datasets import (CIFAR_MD5, DATASETS, MAX_IMAGE_PIXELS, DatasetIntegrityError, DatasetNotFoundError,
                       ImageDataset, ImageReadError, align_classes, channel_stats, file_md5, fingerprint,
                       fingerprint_changes, load_cifar, load_data, load_image_folder, load_split, read_image,
                       synthetic)
from .loader import DeviceLoader
from .preview import MAX_PREVIEW_IMAGES, main, preview, preview_path

__all__ = [
    "AugmentConfig", "CIFAR_MD5", "DATASETS", "DatasetIntegrityError", "DatasetNotFoundError", "DeviceLoader",
    "ImageDataset", "ImageReadError", "MAX_IMAGE_PIXELS", "MAX_PREVIEW_IMAGES", "align_classes", "channel_stats",
    "file_md5", "fingerprint", "fingerprint_changes", "load_cifar", "load_data", "load_image_folder", "load_split",
    "main", "normalize", "preview", "preview_path", "read_image", "synthetic",
]

if __name__ == "__main__":
    main()
