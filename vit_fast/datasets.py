"""Datasets as uint8 tensors (``ImageDataset``), to be held on the training device.

A ViT on 32x32 images eats tens of thousands of images per second on one GPU; a per-image
PIL/worker pipeline cannot keep up. So the whole dataset (CIFAR-100 train is 150 MB as uint8)
lives on the device, where ``vit_fast.loader.DeviceLoader`` builds each batch with
``vit_fast.augment.pipeline``'s batched tensor ops. This module reads the data; it imports
nothing of the loader or the augmentation.

Sources: CIFAR-100 and CIFAR-10 in their official python-pickle format (downloaded through
torchvision when missing and online), an image folder (its layouts and its prepared cache are
``vit_fast.image_folder``), and a synthetic, learnable task for smoke runs and tests.
``ImageDataset``, the errors and ``read_image`` live in ``vit_fast.image_files`` and are
re-exported here.

Integrity: CIFAR files are checked against their official MD5 sums before they are read and are
unpickled by an unpickler that admits only what those files contain; every image file is read
through ``read_image``, whose errors name the file; ``align_classes`` maps a split's classes onto
the training classes by name (or refuses); ``fingerprint`` summarises a loaded dataset so that a
resumed run can tell that its data changed.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import image_folder
from .image_files import (MAX_IMAGE_PIXELS, DatasetIntegrityError, DatasetNotFoundError, ImageDataset,  # noqa: F401
                          ImageReadError, read_image)

DATASETS = ("cifar100", "cifar10", "imagefolder", "synthetic")

# Official archives (https://www.cs.toronto.edu/~kriz/cifar.html) and their published MD5 sums.
_CIFAR = {
    "cifar100": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
    "cifar10": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
}


# MD5 of every file of the extracted official archives, as torchvision publishes them (the
# ``train_list``, ``test_list`` and ``meta`` entries of torchvision.datasets.CIFAR10 / CIFAR100).
# load_cifar checks them before reading; tests, which write small fake files, pass their own table.
CIFAR_MD5: dict[str, dict[str, str]] = {
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals the official CIFAR pickles use: numpy's array reconstruction (under
    its numpy 1 and numpy 2 module names). Everything else in them is a dict, list, str, bytes or int,
    which unpickling builds without calling anything; a pickle that names any other global (os.system,
    say) is refused before that global is even imported."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as err:  # the unpickler's errors are many kinds; the file is what the user needs
        raise DatasetIntegrityError(f"{path} is not a CIFAR python-pickle file: {type(err).__name__}: {err}") from None
    if not isinstance(content, dict):
        raise DatasetIntegrityError(f"{path} holds a {type(content).__name__}, expected the dict of the CIFAR format")
    return content


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_md5(path: Path, expected: str | None) -> None:
    if expected is None:
        raise DatasetIntegrityError(f"{path}: no MD5 sum is known for this file, so it is not read")
    actual = file_md5(path)
    if actual != expected:
        raise DatasetIntegrityError(
            f"{path} is not the official file: MD5 {actual}, expected {expected}. It is damaged or was "
            f"replaced; delete {path.parent} and download the archive again"
        )


def load_cifar(
    root: str | Path, name: str = "cifar100", train: bool = True, download: bool = True,
    md5: dict[str, str] | None = None,
) -> ImageDataset:
    """Read CIFAR-10/100 from the official python-pickle files under ``root``.

    When the files are missing and ``download`` is set, fetch and verify the official archive
    through torchvision; when that fails (offline), raise an error that says what to put where.
    Every file is checked against ``md5`` (file name -> MD5; default: the official sums in
    CIFAR_MD5) before it is read. Only tests pass ``md5``, for the fake files they write.
    """
    spec = _CIFAR[name]
    md5 = CIFAR_MD5[name] if md5 is None else md5
    folder = Path(root) / spec["folder"]
    files = spec["train"] if train else spec["test"]
    wanted = [folder / f for f in [*files, spec["meta"]]]
    if not all(p.exists() for p in wanted) and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(spec["url"], download_root=str(root), md5=spec["md5"])
        except Exception as err:  # offline, proxy, disk: all end in the same advice
            print(f"download of {spec['url']} failed: {err}")
    missing = [str(p) for p in wanted if not p.exists()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found in {Path(root).resolve()}: missing {missing}. Download "
            f"{spec['url']} and extract it there (it unpacks to {spec['folder']}/), or run once "
            "with network access so it downloads itself."
        )
    for path in wanted:
        _verify_md5(path, md5.get(path.name))
    data, labels = [], []
    for f in files:
        batch = _unpickle(folder / f)
        rows, batch_labels = batch.get("data"), batch.get(spec["label_key"])
        if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8:
            raise DatasetIntegrityError(f"{folder / f}: 'data' should be a uint8 numpy array, got "
                                        f"{getattr(rows, 'dtype', type(rows).__name__)}")
        if not isinstance(batch_labels, list) or not all(type(v) is int for v in batch_labels):
            raise DatasetIntegrityError(f"{folder / f}: {spec['label_key']!r} should be a list of ints")
        data.append(rows)
        labels.extend(batch_labels)
    raw = np.concatenate(data)
    if raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{folder}: expected rows of 3072 bytes (3x32x32), got array of shape {raw.shape}")
    images = torch.from_numpy(raw.reshape(-1, 3, 32, 32).copy())  # rows are stored channel-major
    classes = _unpickle(folder / spec["meta"]).get(spec["names_key"])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DatasetIntegrityError(f"{folder / spec['meta']}: {spec['names_key']!r} should be a list of names")
    if len(classes) != spec["num_classes"]:
        raise ValueError(f"{folder / spec['meta']}: expected {spec['num_classes']} class names, got {len(classes)}")
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), classes)


def align_classes(split: ImageDataset, classes: list[str], where: str) -> ImageDataset:
    """``split`` relabelled to index ``classes`` (the training classes): its classes must be the same
    or a subset, matched by name, never by position. ``where`` names the split in the error."""
    if list(split.classes) == list(classes):
        return split
    unknown = [c for c in split.classes if c not in classes]
    if unknown:
        missing = [c for c in classes if c not in split.classes]
        raise DatasetIntegrityError(
            f"{where} has classes the model was not trained on: {unknown} (training classes missing there: "
            f"{missing}); its classes must be the training classes or a subset of them"
        )
    index = {name: i for i, name in enumerate(classes)}
    mapping = torch.tensor([index[c] for c in split.classes], dtype=torch.int64, device=split.labels.device)
    return ImageDataset(split.images, mapping[split.labels], list(classes))


def load_image_folder(root: str | Path, train: bool, image_size: int, **options) -> ImageDataset:
    """The training split (``train``) or the val/test split of the image folder ``root``, at
    image_size x image_size, through its prepared cache (vit_fast.image_folder.load_image_folder,
    whose keyword ``options`` these are)."""
    return image_folder.load_image_folder(root, train, image_size, **options)


def fingerprint(dataset: str, train: ImageDataset, test: ImageDataset) -> dict:
    """What identifies the data of a run: its name, classes, split sizes and a SHA-256 of each
    split's labels and image bytes. Computed on the host, once, right after loading (0.25 s
    for CIFAR-100's 180 MB of images on a 2-core CPU)."""
    def digest(split: ImageDataset) -> str:
        h = hashlib.sha256()
        for t in (split.labels, split.images):
            if t.device.type != "cpu":
                raise ValueError(f"fingerprint the dataset before moving it to {t.device}")
            h.update(memoryview(t.contiguous().numpy()).cast("B"))
        return h.hexdigest()

    return {"dataset": dataset, "classes": list(train.classes), "train_count": len(train),
            "test_count": len(test), "train_sha256": digest(train), "test_sha256": digest(test)}


def fingerprint_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty when they match)."""
    changes = []
    if saved.get("dataset") != now["dataset"]:
        changes.append(f"dataset {saved.get('dataset')!r} -> {now['dataset']!r}")
    if saved.get("classes") != now["classes"]:
        old, new = list(saved.get("classes") or []), now["classes"]
        added, removed = [c for c in new if c not in old], [c for c in old if c not in new]
        changes.append(f"classes (added {added}, removed {removed})" if added or removed else "class order")
    for split in ("train", "test"):
        count = f"{split}_count"
        if saved.get(count) != now[count]:
            changes.append(f"{split} images {saved.get(count)} -> {now[count]}")
        elif saved.get(f"{split}_sha256") != now[f"{split}_sha256"]:
            changes.append(f"{split} image or label content (same count, different SHA-256)")
    return changes


def synthetic(num_images: int, num_classes: int, image_size: int = 32, seed: int = 0) -> ImageDataset:
    """A learnable task: each class is a fixed random low-frequency pattern, each image that
    pattern plus noise. A model that learns drives the loss well below log(num_classes)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.randint(num_classes, (num_images,), generator=g)
    noise = 0.15 * torch.randn(num_images, 3, image_size, image_size, generator=g)
    images = ((templates[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageDataset(images, labels, [f"class_{i}" for i in range(num_classes)])


def load_split(
    dataset: str,
    data_dir: str | Path,
    train: bool,
    *,
    download: bool = True,  # fetch a missing CIFAR archive
    image_size: int = 32,  # image folders and synthetic data are made this size
    synthetic_size: int = 2048,  # training images of the synthetic task (its test split is a quarter of that)
    synthetic_classes: int = 10,
    seed: int = 0,  # the synthetic task's draw
    cache_dir: str | Path | None = None,  # an image folder's prepared cache: None, beside the data
    log=print,  # where an image folder's cache reports (a callable taking one line)
    progress: bool = True,  # an image folder's decoding progress bar
) -> ImageDataset:
    """The training or the test split of ``dataset`` (one of DATASETS); the defaults are those of
    ``python -m vit_fast.train``."""
    if dataset in _CIFAR:
        return load_cifar(data_dir, dataset, train, download)
    if dataset == "imagefolder":
        return load_image_folder(data_dir, train, image_size, cache_dir=cache_dir, log=log, progress=progress)
    if dataset != "synthetic":
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    n = synthetic_size
    # One draw split in two, so that train and test share the class patterns.
    both = synthetic(n + max(n // 4, 1), synthetic_classes, image_size, seed=seed)
    sl = slice(0, n) if train else slice(n, None)
    return ImageDataset(both.images[sl], both.labels[sl], both.classes)


def load_data(dataset: str, data_dir: str | Path, **options) -> tuple[ImageDataset, ImageDataset]:
    """(training split, test split) of ``dataset``; ``options`` are load_split's keyword options.
    The test split is mapped onto the training classes by name (align_classes), or refused."""
    train = load_split(dataset, data_dir, True, **options)
    test = load_split(dataset, data_dir, False, **options)
    return train, align_classes(test, train.classes, f"the test split of {dataset} in {data_dir}")


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (computed in chunks)."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.pow(2).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
