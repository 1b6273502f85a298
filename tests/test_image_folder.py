"""Image folders (vit_fast.image_folder): the prepared cache (hits, change detection, --cache-dir,
parallel decoding equal to serial), the layouts (class folders, Tiny-ImageNet's val split, a
labels CSV) and ``python -m vit_fast.data prepare``."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from vit_fast import data, datasets, image_folder
from vit_fast import train as train_mod


def write_png(path, seed, size=(10, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def class_folder(root, per_class=3, classes=("cat", "dog")):
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_png(root / split / name / f"{i}.png", seed=hash((split, c, i)) % 2**32)
    return root


def test_second_prepare_hits_the_cache_and_changes_are_detected(tmp_path):
    root = class_folder(tmp_path / "folder")
    lines = []
    first = image_folder.prepare(root, 8, log=lines.append, progress=False)
    assert [s.cached for s in first] == [False, False]
    assert lines == ["train: 6 images, 2 classes (class-folders; decoded, cached in "
                     f"{first[0].seconds:.2f} s)", lines[1]] and lines[1].startswith("val: 6 images, 2 classes")
    assert (root / ".vit_fast_cache" / "train-8px" / "manifest.json").is_file()
    lines.clear()
    second = image_folder.prepare(root, 8, log=lines.append, progress=False)
    assert [s.cached for s in second] == [True, True] and "from the cache" in lines[0]
    for a, b in zip(first, second):
        assert torch.equal(a.dataset.images, b.dataset.images) and torch.equal(a.dataset.labels, b.dataset.labels)
    # Another size is another cache.
    assert not image_folder.prepare(root, 16, log=lines.append, progress=False)[0].cached

    def reload():
        lines.clear()
        return image_folder.prepare_split(root / "train", 8, image_folder.split_cache(root, root / "train", 8, None),
                                          log=lines.append, progress=False)

    write_png(root / "train" / "dog" / "new.png", seed=99)
    split = reload()
    assert not split.cached and len(split.dataset) == 7
    assert lines == [f"{root / 'train'} changed since its cache was written: 1 added (dog/new.png), 0 removed, "
                     "0 modified; decoding 1 image(s), the other 6 taken from the cache"]
    assert_fresh(split.dataset, root / "train")
    assert reload().cached
    write_png(root / "train" / "cat" / "0.png", seed=123)  # same name and size, other pixels
    os.utime(root / "train" / "cat" / "0.png", ns=(1, 1))  # and a modification time unlike the old one's
    split = reload()
    assert not split.cached and "0 added, 0 removed, 1 modified (cat/0.png); decoding 1 image(s)" in lines[0]
    assert torch.equal(split.dataset.images[0], torch.from_numpy(image_folder.decode_image(root / "train/cat/0.png", 8)))
    assert_fresh(split.dataset, root / "train")
    (root / "train" / "dog" / "new.png").unlink()
    split = reload()
    assert not split.cached and "0 added, 1 removed (dog/new.png), 0 modified; decoding 0 image(s), the other 6" in lines[0]
    assert_fresh(split.dataset, root / "train")


def assert_fresh(dataset, directory):
    """``dataset`` (rebuilt from the cache's unchanged rows and the files decoded again) is what
    decoding every file of ``directory`` gives."""
    listing = image_folder.list_split(directory)
    fresh = np.stack([image_folder.decode_image(directory / rel, dataset.images.shape[-1]) for rel in listing.files])
    assert torch.equal(dataset.images, torch.from_numpy(fresh)) and dataset.labels.tolist() == listing.labels


def test_parallel_decoding_equals_serial_and_names_a_bad_file(tmp_path, monkeypatch):
    root = class_folder(tmp_path / "folder", per_class=6)
    serial = datasets.load_image_folder(root, True, 8, cache_dir=tmp_path / "serial", progress=False)
    monkeypatch.setattr(image_folder, "MIN_PARALLEL_IMAGES", 0)
    parallel = datasets.load_image_folder(root, True, 8, cache_dir=tmp_path / "parallel", workers=2, progress=False)
    assert torch.equal(serial.images, parallel.images) and torch.equal(serial.labels, parallel.labels)
    for name in ("cat/2.png", "dog/0.png", "dog/5.png", "cat/new.png"):  # rows decoded again between kept ones
        write_png(root / "train" / name, seed=len(name))
        os.utime(root / "train" / name, ns=(2, 2))
    rebuilt = datasets.load_image_folder(root, True, 8, cache_dir=tmp_path / "parallel", workers=2, progress=False)
    assert_fresh(rebuilt, root / "train")
    (root / "train" / "dog" / "4.png").write_bytes(b"not a png")
    with pytest.raises(datasets.ImageReadError, match=r"dog/4.png is not an image Pillow can read"):
        datasets.load_image_folder(root, True, 8, cache_dir=tmp_path / "parallel", workers=2, progress=False)


def test_cache_dir_keeps_the_data_directory_untouched(tmp_path):
    root = class_folder(tmp_path / "folder")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    ds = datasets.load_image_folder(root, False, 8, cache_dir=tmp_path / "cache", progress=False)
    assert len(ds) == 6 and sorted(p.relative_to(root) for p in root.rglob("*")) == before
    [cache] = (tmp_path / "cache").iterdir()
    assert cache.name.startswith("folder-") and (cache / "val-8px" / "images.npy").is_file()


def test_an_unwritable_cache_decodes_in_memory_with_a_note(tmp_path, monkeypatch):
    root = class_folder(tmp_path / "folder")
    monkeypatch.setattr(image_folder.os, "access", lambda path, mode: False)
    lines = []
    ds = datasets.load_image_folder(root, True, 8, log=lines.append, progress=False)
    assert len(ds) == 6 and "note: cannot write the cache" in lines[0] and "--cache-dir" in lines[0]


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for wnid in ("n01", "n02"):
        for i in range(2):
            write_png(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", seed=i)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\t0\t0\t1\t1\n")
    for i in range(3):
        write_png(root / "val" / "images" / f"val_{i}.JPEG", seed=10 + i)
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t9\t9\nval_1.JPEG\tn01\t1\t1\t8\t8\nval_2.JPEG\tn02\t0\t0\t5\t5\n")
    train, val = datasets.load_data("imagefolder", root, image_size=8, progress=False)
    assert train.classes == ["n01", "n02"] and train.labels.tolist() == [0, 0, 1, 1]
    assert val.classes == ["n01", "n02"] and val.labels.tolist() == [1, 0, 1]
    assert torch.equal(val.images[1], torch.from_numpy(image_folder.decode_image(root / "val/images/val_1.JPEG", 8)))
    write_png(root / "test" / "images" / "test_0.JPEG", seed=20)  # Tiny-ImageNet's test/ has no labels
    assert [s.directory.name for s in image_folder.prepare(root, 8, log=print, progress=False)] == ["train", "val"]
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\nval_9.JPEG\tn01\n")
    with pytest.raises(datasets.DatasetNotFoundError, match=r"val_annotations.txt names .*val/images/val_9.JPEG, "
                                                            "which does not exist"):
        datasets.load_split("imagefolder", root, False, image_size=8, progress=False)


def test_labels_csv_layout(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            write_png(root / split / "pics" / f"{i}.png", seed=i)
        rows = "".join(f"pics/{i}.png,{'bird' if i % 2 else 'ant'}\n" for i in range(n))
        (root / split / "labels.csv").write_text("file,label\n" + rows)
    train, val = datasets.load_data("imagefolder", root, image_size=8, progress=False)
    assert train.classes == ["ant", "bird"] and train.labels.tolist() == [0, 1, 0, 1] and val.labels.tolist() == [0, 1]
    (root / "train" / "labels.csv").write_text("file,label\npics/0.png,ant\npics/1.png\n")
    with pytest.raises(datasets.DatasetIntegrityError, match=r"labels.csv, line 3: expected two values 'file,label'"):
        datasets.load_split("imagefolder", root, True, image_size=8, progress=False)
    (root / "train" / "labels.csv").write_text("pics/0.png,ant\n../x.png,ant\n")
    with pytest.raises(datasets.DatasetIntegrityError, match=r"line 2: '../x.png' must be a path inside"):
        datasets.load_split("imagefolder", root, True, image_size=8, progress=False)


def test_prepare_command_prints_the_splits_and_training_uses_its_cache(tmp_path, capsys):
    root = class_folder(tmp_path / "folder")
    data.main(["prepare", str(root), "--image-size", "8", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "train: 6 images, 2 classes (class-folders; decoded, cached" in out and "val: 6 images, 2 classes" in out
    with pytest.raises(SystemExit, match="--image-size must be positive, got 0"):
        data.main(["prepare", str(root), "--image-size", "0"])
    with pytest.raises(SystemExit, match=r"error: image folder .*nowhere does not exist"):
        data.main(["prepare", str(tmp_path / "nowhere")])
    capsys.readouterr()
    train_mod.main(["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "8", "--cache-dir",
                    str(tmp_path / "cache"), "--dim", "16", "--heads", "2", "--depth", "1", "--batch-size", "4",
                    "--epochs", "1", "--warmup-epochs", "1", "--device", "cpu", "--recipe", "basic",
                    "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "decoding" not in out and "changed" not in out and "6 train / 6 test images" in out
    assert not (root / ".vit_fast_cache").exists()
