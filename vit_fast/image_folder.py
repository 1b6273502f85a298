"""Image folders: their layouts, and a prepared cache of decoded uint8 arrays.

``python -m vit_fast.data prepare DATA_DIR`` (and a training run on ``--dataset imagefolder``, on
first use) decodes every image of each split once, in parallel worker processes, into
``images.npy`` (N, 3, S, S) uint8 plus ``labels.npy`` and a ``manifest.json`` that lists every
file with its size and modification time, the classes and a fingerprint of all that. Later loads
list the folder again (one ``stat`` per file, no decoding), compare it with the manifest and, when
nothing changed, memory-map the cached array: a fraction of a second instead of minutes of
Pillow. A file added, removed or modified is reported and the split's cache written again, with
only the new and modified files decoded.

Layouts of a split directory (``DATA_DIR/train``, ``DATA_DIR/val`` or ``DATA_DIR/test``), first
match wins:

- ``labels.csv`` in it: rows ``file,label`` (an optional ``file,label`` header), paths relative to
  the split directory, the classes the sorted distinct labels;
- ``val_annotations.txt`` in it (Tiny-ImageNet's val split): tab-separated ``name<TAB>class...``
  rows naming files in ``images/``;
- otherwise a folder per class, ``<class>/**/<image>`` (Tiny-ImageNet's ``train/<wnid>/images/``
  is one), classes sorted by name; files and folders whose name starts with a dot are skipped.

The cache lives in ``DATA_DIR/.vit_fast_cache/`` or, with ``cache_dir``, in
``cache_dir/<folder name>-<hash of its path>/`` (for a data directory that cannot be written).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .image_files import DatasetIntegrityError, DatasetNotFoundError, ImageDataset, read_image

# The file suffixes read as images (torchvision's ImageFolder reads the same), in any letter case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_DIRNAME = ".vit_fast_cache"
CACHE_VERSION = 1  # bump when the cached arrays or the manifest change meaning
LABELS_CSV = "labels.csv"
TINY_IMAGENET_ANNOTATIONS = "val_annotations.txt"
# Below this many images a split is decoded in this process: starting workers costs more.
MIN_PARALLEL_IMAGES = 256


@dataclass
class SplitListing:
    """What a split directory holds: its image files (relative paths), their labels and classes,
    and the (path, size, mtime_ns) of every file the split is read from, index files included."""

    directory: Path
    layout: str  # "class-folders", "labels-csv" or "tiny-imagenet-val"
    files: list[str]
    labels: list[int]
    classes: list[str]
    entries: list[list] = field(default_factory=list)

    def fingerprint(self, image_size: int) -> str:
        content = {"version": CACHE_VERSION, "layout": self.layout, "image_size": image_size,
                   "classes": self.classes, "labels": self.labels, "entries": self.entries}
        return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()


def split_directory(root: str | Path, train: bool) -> Path:
    """``root/train``, or ``root/val`` (else ``root/test``) for the evaluation split."""
    names = ["train"] if train else ["val", "test"]
    found = next((Path(root) / s for s in names if (Path(root) / s).is_dir()), None)
    if found is None:
        raise DatasetNotFoundError(
            f"image folder {Path(root).resolve()} has no {' or '.join(names)}/ directory; expected "
            f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (docs/data.md lists the layouts)"
        )
    return found


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _stat_entries(directory: Path, relative: list[str], where: str) -> list[list]:
    entries = []
    for rel in relative:
        try:
            st = os.stat(directory / rel)
        except FileNotFoundError:
            raise DatasetNotFoundError(f"{where} names {directory / rel}, which does not exist") from None
        entries.append([rel, st.st_size, st.st_mtime_ns])
    return entries


def _class_folders(directory: Path) -> SplitListing:
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetNotFoundError(f"image folder {directory}: no class folder in it; expected "
                                   f"{directory}/<class>/<image>, a {LABELS_CSV} or a {TINY_IMAGENET_ANNOTATIONS}")
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = []
        for folder, subdirs, names in os.walk(directory / name, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            rel = Path(folder).relative_to(directory).as_posix()
            found += [f"{rel}/{n}" for n in sorted(names) if _is_image(n)]
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if empty:  # the wording of torchvision's ImageFolder, which read these folders before
        raise DatasetNotFoundError(f"image folder {directory}: Found no valid file for the classes "
                                   f"{', '.join(empty)}. Supported extensions are: {', '.join(IMAGE_EXTENSIONS)}")
    return SplitListing(directory, "class-folders", files, labels, classes, _stat_entries(directory, files, "listing"))


def _labelled_files(directory: Path, layout: str, index: Path, rows: list[tuple[int, str, str]]) -> SplitListing:
    """A split from (line number, file, label) rows of its index file."""
    if not rows:
        raise DatasetIntegrityError(f"{index} lists no images")
    classes = sorted({label for _, _, label in rows})
    number = {name: i for i, name in enumerate(classes)}
    seen: dict[str, int] = {}
    for line, file, _ in rows:
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise DatasetIntegrityError(f"{index}, line {line}: {file!r} must be a path inside {directory}")
        if file in seen:
            raise DatasetIntegrityError(f"{index}, line {line}: {file!r} is listed twice (first on line {seen[file]})")
        seen[file] = line
    files = [file for _, file, _ in rows]
    entries = _stat_entries(directory, files, str(index))
    entries.append([index.name, index.stat().st_size, index.stat().st_mtime_ns])
    return SplitListing(directory, layout, files, [number[label] for _, _, label in rows], classes, entries)


def _labels_csv(directory: Path) -> SplitListing:
    index = directory / LABELS_CSV
    rows = []
    with open(index, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue  # a blank line
            if line == 1 and [c.lower() for c in cells] == ["file", "label"]:
                continue
            if len(cells) != 2 or not all(cells):
                raise DatasetIntegrityError(f"{index}, line {line}: expected two values 'file,label', got {row!r}")
            rows.append((line, cells[0], cells[1]))
    return _labelled_files(directory, "labels-csv", index, rows)


def _tiny_imagenet_val(directory: Path) -> SplitListing:
    index = directory / TINY_IMAGENET_ANNOTATIONS
    rows = []
    with open(index) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            cells = text.rstrip("\n").split("\t")
            if len(cells) < 2 or not cells[0].strip() or not cells[1].strip():
                raise DatasetIntegrityError(f"{index}, line {line}: expected 'file<TAB>class<TAB>...', got {text!r}")
            rows.append((line, f"images/{cells[0].strip()}", cells[1].strip()))
    return _labelled_files(directory, "tiny-imagenet-val", index, rows)


def list_split(directory: str | Path) -> SplitListing:
    """The split in ``directory``, read by its layout (the module docstring lists them)."""
    directory = Path(directory)
    if (directory / LABELS_CSV).is_file():
        return _labels_csv(directory)
    if (directory / TINY_IMAGENET_ANNOTATIONS).is_file():
        return _tiny_imagenet_val(directory)
    return _class_folders(directory)


# --- decoding -------------------------------------------------------------------------------------


def decode_image(path: str | Path, image_size: int) -> np.ndarray:
    """The image at ``path`` as uint8 (3, image_size, image_size): read_image, then an antialiased
    bilinear resize of the uint8 tensor (what the image folder's torchvision transform did)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    pixels = torch.from_numpy(np.array(read_image(path), dtype=np.uint8)).permute(2, 0, 1)
    if pixels.shape[1:] != (image_size, image_size):
        pixels = TF.resize(pixels, [image_size, image_size], antialias=True)
    return pixels.contiguous().numpy()


def _decode_chunk(paths: list[str], image_size: int) -> np.ndarray:
    out = np.empty((len(paths), 3, image_size, image_size), np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_image(path, image_size)
    return out


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the cores; one thread each


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_all(paths: list[str], image_size: int, out: np.ndarray, workers: int | None = None,
               progress: bool = True, desc: str = "decoding", rows: list[int] | None = None) -> None:
    """Decode ``paths`` into rows ``rows`` (default: 0, 1, ...) of ``out`` (N, 3, S, S), in
    ``workers`` processes (default: one per core), with a progress bar. The first bad file stops
    it with read_image's error naming it."""
    from tqdm import tqdm

    import torchvision.transforms.v2.functional  # noqa: F401  (imported once, before the workers start)

    workers = default_workers() if workers is None else workers
    rows = np.arange(len(paths)) if rows is None else np.asarray(rows, dtype=np.int64)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, file=sys.stderr, mininterval=0.5)
    with bar:
        if workers <= 1 or len(paths) < MIN_PARALLEL_IMAGES:
            for i, path in enumerate(paths):
                out[rows[i]] = decode_image(path, image_size)
                bar.update(1)
            return
        chunk = max(16, min(512, len(paths) // (workers * 8)))
        with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
            pending = {pool.submit(_decode_chunk, paths[s:s + chunk], image_size): s
                       for s in range(0, len(paths), chunk)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    start = pending.pop(future)
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    block = future.result()
                    out[rows[start:start + len(block)]] = block
                    bar.update(len(block))


# --- the cache ------------------------------------------------------------------------------------


def cache_root(root: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the folder ``root``'s cache lives: beside the data, or under ``cache_dir``."""
    root = Path(root)
    if cache_dir is None:
        return root / CACHE_DIRNAME
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{root.resolve().name}-{tag}"


def _changes(saved: dict, listing: SplitListing) -> str:
    """What differs between the manifest ``saved`` and the folder now, in words."""
    old = {rel: (size, mtime) for rel, size, mtime in saved.get("entries", [])}
    new = {rel: (size, mtime) for rel, size, mtime in listing.entries}
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    modified = sorted(k for k in new.keys() & old.keys() if new[k] != old[k])
    parts = [f"{len(v)} {what}" + (f" ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" if v else "")
             for what, v in (("added", added), ("removed", removed), ("modified", modified))]
    if not (added or removed or modified):
        return "its classes, labels or the cache format differ"
    return ", ".join(parts)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file and a rename: a reader (another rank, another
    node) sees the old file or the whole new one, never a partial one."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # unique on a shared disk
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _reusable_rows(saved: dict, cache: Path, listing: SplitListing, image_size: int) -> tuple[np.ndarray | None,
                                                                                               dict[int, int]]:
    """The cached images of the manifest ``saved`` and {row now: row there} of every file it lists
    with the same size and modification time, which need no decoding again."""
    count = saved.get("count")
    if saved.get("version") != CACHE_VERSION or saved.get("image_size") != image_size or not isinstance(count, int):
        return None, {}
    try:
        old = np.load(cache / "images.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None, {}
    if old.shape != (count, 3, image_size, image_size):
        return None, {}
    # The manifest is removed before the arrays are replaced and written after them, so while it
    # exists the arrays are the ones it lists, files first in their rows' order.
    there = {rel: (row, (size, mtime)) for row, (rel, size, mtime) in enumerate(saved.get("entries", [])[:count])}
    reuse = {}
    for row, (rel, size, mtime) in enumerate(listing.entries[:len(listing.files)]):
        hit = there.get(rel)
        if hit is not None and hit[1] == (size, mtime):
            reuse[row] = hit[0]
    return old, reuse


@dataclass
class PreparedSplit:
    """One split as ``prepare_split`` left it: its data, and whether it came from the cache."""

    dataset: ImageDataset | None  # None when asked for no tensors (the prepare command)
    count: int
    classes: list[str]
    directory: Path
    layout: str
    cached: bool  # loaded from the cache, nothing decoded
    cache: Path | None  # where the cache is (None: it could not be written)
    seconds: float


def prepare_split(directory: str | Path, image_size: int, cache: Path | None, workers: int | None = None,
                  log: Callable[[str], None] = print, progress: bool = True, tensors: bool = True) -> PreparedSplit:
    """The split in ``directory`` at ``image_size``: from the cache in ``cache`` when it matches
    the folder, else decoded (and the cache written; ``cache`` None or unwritable: in memory only).
    ``tensors`` False: no ImageDataset is made (a current cache is then checked without torch)."""
    start = time.perf_counter()

    def done(images: np.ndarray | None, cached: bool) -> PreparedSplit:
        dataset = None
        if tensors:
            import torch

            dataset = ImageDataset(torch.from_numpy(images), torch.tensor(listing.labels, dtype=torch.int64),
                                   listing.classes)
        return PreparedSplit(dataset, n, listing.classes, directory, listing.layout, cached, cache,
                             time.perf_counter() - start)

    directory = Path(directory)
    listing = list_split(directory)
    fingerprint = listing.fingerprint(image_size)
    n = len(listing.files)
    manifest_path = cache / "manifest.json" if cache is not None else None
    old, reuse = None, {}  # cached rows a changed folder still has
    if manifest_path is not None and manifest_path.is_file():
        try:
            saved = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("fingerprint") == fingerprint:
            try:
                images = np.load(cache / "images.npy", mmap_mode="c")  # copy-on-write: writable, never written back
                labels = np.load(cache / "labels.npy")
                if images.shape == (n, 3, image_size, image_size) and labels.tolist() == listing.labels:
                    return done(images, True)
                log(f"{directory}: the cache in {cache} does not match its manifest; decoding again")
            except (OSError, ValueError) as err:
                log(f"{directory}: the cache in {cache} cannot be read ({err}); decoding again")
        else:
            old, reuse = _reusable_rows(saved, cache, listing, image_size)
            again = (f"decoding {n - len(reuse)} image(s), the other {len(reuse)} taken from the cache" if reuse
                     else "decoding again")
            log(f"{directory} changed since its cache was written: {_changes(saved, listing)}; {again}")
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            if not os.access(cache, os.W_OK):
                raise PermissionError(f"{cache} is not writable")
        except OSError as err:
            log(f"note: cannot write the cache of {directory} ({err}); decoding into memory only, every run. "
                "Pass --cache-dir DIR to keep a cache elsewhere")
            cache = None
    todo = [row for row in range(n) if row not in reuse]
    paths = [str(directory / listing.files[row]) for row in todo]
    desc = f"decoding {directory.name}/"

    def fill(out: np.ndarray) -> None:
        now, there = np.fromiter(reuse.keys(), np.int64), np.fromiter(reuse.values(), np.int64)
        for s in range(0, len(now), 4096):  # in blocks: a few MB of memory at a time
            out[now[s:s + 4096]] = old[there[s:s + 4096]]
        decode_all(paths, image_size, out, workers, progress, desc, todo)

    if cache is None:
        images = np.empty((n, 3, image_size, image_size), np.uint8)
        fill(images)
    else:
        def write_images(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, image_size, image_size))
            fill(out)
            out.flush()
            del out

        def write_labels(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(listing.labels, dtype=np.int64))

        def write_manifest(tmp: Path) -> None:
            tmp.write_text(json.dumps({
                "version": CACHE_VERSION, "source": str(directory.resolve()), "layout": listing.layout,
                "image_size": image_size, "count": n, "classes": listing.classes, "fingerprint": fingerprint,
                "entries": listing.entries}))

        (cache / "manifest.json").unlink(missing_ok=True)  # the old manifest no longer describes the arrays
        _write_atomic(cache / "images.npy", write_images)
        _write_atomic(cache / "labels.npy", write_labels)
        _write_atomic(cache / "manifest.json", write_manifest)  # last: it vouches for the arrays
        images = np.load(cache / "images.npy", mmap_mode="c")
    return done(images, False)


def split_cache(root: str | Path, directory: Path, image_size: int, cache_dir: str | Path | None) -> Path:
    return cache_root(root, cache_dir) / f"{directory.name}-{image_size}px"


def load_image_folder(root: str | Path, train: bool, image_size: int, *, cache_dir: str | Path | None = None,
                      workers: int | None = None, log: Callable[[str], None] = print,
                      progress: bool = True) -> ImageDataset:
    """The training split (``train``) or the val/test split of the image folder ``root``, as
    uint8 image_size x image_size RGB, through the prepared cache (decoded on first use). The
    classes are the split's own; ``datasets.align_classes`` maps a val/test split onto the
    training classes."""
    directory = split_directory(root, train)
    return prepare_split(directory, image_size, split_cache(root, directory, image_size, cache_dir), workers, log,
                         progress).dataset


def prepare(root: str | Path, image_size: int = 32, cache_dir: str | Path | None = None, workers: int | None = None,
            log: Callable[[str], None] = print, progress: bool = True, tensors: bool = True) -> list[PreparedSplit]:
    """Prepare the splits of ``root`` a run reads, train/ and the evaluation split (val/, else
    test/, where there is one: Tiny-ImageNet's unlabelled test/ is left alone), and log their sizes."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist or is not a directory")
    directories = [split_directory(root, True)]  # a folder without train/ is an error naming the layout
    if (root / "val").is_dir() or (root / "test").is_dir():
        directories.append(split_directory(root, False))
    done = []
    for directory in directories:
        name = directory.name
        split = prepare_split(directory, image_size, split_cache(root, directory, image_size, cache_dir), workers,
                              log, progress, tensors)
        how = "from the cache" if split.cached else ("decoded, cached" if split.cache else "decoded, not cached")
        log(f"{name}: {split.count} images, {len(split.classes)} classes ({split.layout}; {how} "
            f"in {split.seconds:.2f} s)")
        done.append(split)
    return done
