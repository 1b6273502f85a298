"""Data: the official CIFAR file formats, image folders (vit_fast.datasets); batching, sharding,
repeated augmentation and the fused data phase through DeviceLoader (vit_fast.loader)."""

import pickle
import struct
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from vit_fast import datasets
from vit_fast.augment import mixing, pipeline
from vit_fast.augment.config import AugmentConfig
from vit_fast.loader import DeviceLoader, repeated_indices
from vit_fast.testing import assert_same_batches


def write_cifar100(root, n_train=20, n_test=10, seed=0):
    """A small dataset in the official cifar-100-python format (pickled dicts, rows of 3072 bytes)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        batch = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{split} batch",
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": rows}
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f)
        arrays[split] = (rows, fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine_{i}" for i in range(100)],
                     "coarse_label_names": [f"coarse_{i}" for i in range(20)]}, f)
    return arrays


def md5_table(folder):
    """The MD5 of every file in ``folder``: what load_cifar checks fake files against (the official
    sums in datasets.CIFAR_MD5 are for the real files)."""
    return {p.name: datasets.file_md5(p) for p in folder.iterdir()}


def test_cifar100_official_format(tmp_path):
    arrays = write_cifar100(tmp_path)
    md5 = md5_table(tmp_path / "cifar-100-python")
    train = datasets.load_cifar(tmp_path, "cifar100", train=True, download=False, md5=md5)
    test = datasets.load_cifar(tmp_path, "cifar100", train=False, download=False, md5=md5)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (10, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and len(train.classes) == 100 and train.classes[7] == "fine_7"
    rows, fine = arrays["train"]
    assert train.labels.tolist() == fine
    # Official layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    i, c, y, x = 3, 2, 5, 30
    assert train.images[i, c, y, x].item() == rows[i, c * 1024 + y * 32 + x]


def test_cifar10_official_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 9, 3, 3]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    train = datasets.load_cifar(tmp_path, "cifar10", train=True, download=False, md5=md5_table(folder))
    assert train.images.shape == (20, 3, 32, 32) and train.labels.tolist()[:4] == [0, 9, 3, 3]


def python2_pickle(obj) -> bytes:
    """``obj`` (a dict of str keys to uint8 arrays, lists of ints or of str) pickled as Python 2's
    cPickle wrote the official files: protocol 2, str as byte strings, arrays through
    numpy.core.multiarray._reconstruct (numpy 1's module name)."""
    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def value(v) -> bytes:
        if isinstance(v, np.ndarray):
            dtype = b"cnumpy\ndtype\n" + string(b"u1") + b"\x89\x88\x87R(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            shape = b"(" + b"".join(b"J" + struct.pack("<i", d) for d in v.shape) + b"t"
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
                    + b"(K\x01" + shape + dtype + b"\x89" + string(v.tobytes()) + b"tb")
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        if isinstance(v, str):
            return string(v.encode("latin1"))
        return b"J" + struct.pack("<i", v)

    return b"\x80\x02}(" + b"".join(string(k.encode()) + value(v) for k, v in obj.items()) + b"u."


def test_cifar_files_as_python2_wrote_them_load(tmp_path):
    """The official files' own pickle dialect passes the restricted unpickler (under numpy 2 too)."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    (folder / "test").write_bytes(python2_pickle({"data": rows, "fine_labels": [4, 0, 99], "batch_label": "test"}))
    (folder / "meta").write_bytes(python2_pickle({"fine_label_names": [f"n{i}" for i in range(100)]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 1's module name, read by numpy 2, must not even warn
        test = datasets.load_cifar(tmp_path, "cifar100", train=False, download=False, md5=md5_table(folder))
    assert torch.equal(test.images, torch.from_numpy(rows).view(3, 3, 32, 32))
    assert test.labels.tolist() == [4, 0, 99] and test.classes[99] == "n99"


def test_missing_dataset_names_the_directory(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError, match=r"cifar100 not found in .*cifar-100-python.tar.gz"):
        datasets.load_cifar(tmp_path / "nowhere", "cifar100", train=True, download=False)


def test_corrupt_cifar_rows_are_rejected(tmp_path):
    write_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="expected rows of 3072 bytes"):
        datasets.load_cifar(tmp_path, "cifar100", train=True, download=False, md5=md5_table(tmp_path / "cifar-100-python"))


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 24), color).save(tmp_path / split / cls / f"{i}.png")
    ds = datasets.load_image_folder(tmp_path, train=True, image_size=32)
    assert ds.images.shape == (4, 3, 32, 32) and ds.classes == ["cat", "dog"]
    assert ds.images[0, 0].float().mean() > 250 and ds.images[3, 2].float().mean() > 250
    with pytest.raises(datasets.DatasetNotFoundError, match="has no train/ directory"):
        datasets.load_image_folder(tmp_path / "val", train=True, image_size=32)


def test_random_crop_flip_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = pipeline.random_crop_flip(images, 2, True, g)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(16):  # every output is one of the 25 crops, possibly mirrored
        windows = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert torch.equal(pipeline.random_crop_flip(images, 0, False, g), images)
    flipped_only = pipeline.random_crop_flip(images, 0, True, torch.Generator().manual_seed(1))
    assert all(torch.equal(flipped_only[i], images[i]) or torch.equal(flipped_only[i], images[i].flip(-1)) for i in range(16))
    assert not torch.equal(flipped_only, images)


def test_device_loader_covers_each_sample_once_and_repeats_per_epoch():
    ds = datasets.synthetic(50, 5, seed=0)
    ds.images[:, 0, 0, 0] = torch.arange(50, dtype=torch.uint8)  # tag each image
    mean, std = datasets.channel_stats(ds.images)
    aug = AugmentConfig(crop_padding=0, flip=False)
    loader = DeviceLoader(ds, 16, mean, std, train=True, augment=aug, seed=3)
    assert len(loader) == 4

    def epoch_tags(e):
        loader.set_epoch(e)
        batches = list(loader)
        x = torch.cat([b[0] for b in batches])
        return torch.round((x[:, 0, 0, 0] * std[0] + mean[0]) * 255).long()

    tags0 = epoch_tags(0)
    assert sorted(tags0.tolist()) == list(range(50))
    assert torch.equal(tags0, epoch_tags(0))  # the same epoch replays identically (resume)
    assert not torch.equal(tags0, epoch_tags(1))


def test_sharded_loaders_partition_the_epoch():
    ds = datasets.synthetic(30, 3, seed=0)
    ds.images[:, 0, 0, 0] = torch.arange(30, dtype=torch.uint8)
    aug = AugmentConfig(crop_padding=0, flip=False)
    tags = []
    for rank in range(3):
        loader = DeviceLoader(ds, 4, [0.0] * 3, [1.0] * 3, True, aug, seed=1, rank=rank, world_size=3)
        tags += [round(v) for b in loader for v in (b[0][:, 0, 0, 0] * 255).tolist()]
    assert sorted(tags) == list(range(30))


@pytest.mark.parametrize("n,world,repeats", [(12, 3, 3), (100, 4, 3), (50, 1, 3), (37, 2, 3), (40, 8, 2)])
def test_repeated_indices_across_ranks(n, world, repeats):
    def rank(r: int) -> torch.Tensor:
        return repeated_indices(n, torch.Generator().manual_seed(7), r, world, repeats, round_to=1)

    ranks = [rank(r) for r in range(world)]
    keep = n // world
    assert all(len(r) == keep for r in ranks)
    # Interleaving the ranks back gives the head of the repeated permutation: consecutive copies
    # of an image sit on consecutive ranks.
    full = torch.stack(ranks, dim=1).flatten()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    assert torch.equal(full, perm.repeat_interleave(repeats)[: keep * world])
    counts = Counter(full.tolist())
    seen = keep * world // repeats
    assert all(counts[int(i)] == repeats for i in perm[:seen]), "an image did not get all its copies"
    assert len(counts) <= seen + 1 and max(counts.values()) <= repeats
    again = repeated_indices(n, torch.Generator().manual_seed(7), 0, world, repeats, round_to=1)
    assert torch.equal(again, ranks[0])
    other = repeated_indices(n, torch.Generator().manual_seed(8), 0, world, repeats, round_to=1)
    assert not torch.equal(other, ranks[0])


def test_repeated_indices_deit_epoch_length():
    sizes = [len(repeated_indices(50_000, torch.Generator().manual_seed(0), r, 8, 3)) for r in range(8)]
    assert sizes == [50_000 // 256 * 256 // 8] * 8
    once = repeated_indices(50, torch.Generator().manual_seed(0), 0, 1, 1, round_to=1)
    assert sorted(once.tolist()) == list(range(50))
    with pytest.raises(ValueError, match="rank"):
        repeated_indices(50, torch.Generator(), 2, 2)


def test_mixup_and_cutmix_targets_are_distributions():
    # The loader's mixer (vit_fast.augment.mixing.mix, as DeviceLoader calls it).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float()
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        xm, ym = mixing.mix(x, y, mixup, cutmix, generator=g)
        assert xm.shape == x.shape
        torch.testing.assert_close(ym.sum(1), torch.ones(8))
        assert not torch.equal(xm, x)


def test_normalize_and_channel_stats():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    mean, std = datasets.channel_stats(images)
    x = pipeline.normalize(images, mean, std)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_dataset_validation():
    with pytest.raises(ValueError, match="labels must lie in"):
        datasets.ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ["a", "b"])
    with pytest.raises(ValueError, match="images must be uint8"):
        datasets.ImageDataset(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), ["a", "b"])


def test_load_split_synthetic_train_and_test_share_classes_not_images():
    options = dict(image_size=16, synthetic_size=40, synthetic_classes=3, seed=4)
    train, test = datasets.load_data("synthetic", "unused", **options)
    assert len(train) == 40 and len(test) == 10 and train.images.shape[1:] == (3, 16, 16)
    assert train.classes == test.classes == ["class_0", "class_1", "class_2"]
    whole = datasets.synthetic(50, 3, 16, seed=4)  # one draw, cut in two
    assert torch.equal(torch.cat([train.images, test.images]), whole.images)
    assert torch.equal(datasets.load_split("synthetic", "unused", False, **options).labels, test.labels)
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; expected one of \("):
        datasets.load_split("mnist", "unused", True)


def _loader_pairs(augment: AugmentConfig, world_size: int = 1, rank: int = 0):
    """A torch and a fused training loader over one small synthetic dataset, same seed."""
    ds = datasets.synthetic(36, 10, image_size=16, seed=0)
    mean, std = datasets.channel_stats(ds.images)
    return [DeviceLoader(ds, 8, mean, std, train=True, augment=augment, seed=2, rank=rank, world_size=world_size,
                         backend=backend) for backend in ("torch", "fused")]


def _recipe_augment(name: str, **overrides) -> AugmentConfig:
    from vit_fast import recipes

    return recipes.get_recipe(name, **overrides).augmentation()


# lee2021 (const erasing, one mix per batch with probability 0.5, repeated augmentation: 3), DeiT's
# pixel erasing with per-image mixing, the basic recipe (no mixing: the loader yields labels).
FUSED_LOADER_CASES = {
    "lee2021": lambda: _recipe_augment("lee2021"),
    "deit_elem": lambda: AugmentConfig(policy="randaugment", erase=0.5, erase_mode="pixel", erase_max_area=1 / 3,
                                       mixup=0.8, cutmix=1.0, mix_prob=1.0, mix_mode="elem"),
    "basic": lambda: _recipe_augment("basic"),
    # Neither crop nor flip (the identity window), rand erasing, mixup alone.
    "no_crop": lambda: AugmentConfig(crop_padding=0, flip=False, erase=0.5, erase_mode="rand", erase_max_area=1 / 3,
                                     mixup=1.0, mix_prob=1.0),
}


@pytest.mark.parametrize("case", list(FUSED_LOADER_CASES))
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_fused_loader_yields_the_torch_loaders_batches(case, world_size, rank):
    """The fused data phase (augment_policy, then vit_fast::augment_finish) builds the same batches
    from the same counter-based draws, bit for bit, over several batches and epochs (rank 1 of 2:
    the rank's rows of the global batch)."""
    torch_loader, fused_loader = _loader_pairs(FUSED_LOADER_CASES[case](), world_size, rank)
    assert assert_same_batches(torch_loader, fused_loader) >= 6


def test_fused_data_phase_makes_no_host_syncs():
    from vit_fast.syncs import count_host_syncs

    _, loader = _loader_pairs(_recipe_augment("lee2021"))
    batches = iter(loader)  # the epoch's shuffle reaches the device here, before the first batch
    with count_host_syncs() as counter:
        for _ in range(2):
            with counter.phase("data"):
                next(batches)
    counter.assert_sync_free()


@pytest.mark.gpu(reason="the fused kernels' CUDA arithmetic is compared with "
                    "torch's CUDA kernels only on a GPU (the CPU runs of the test above use the interpreter)")
@pytest.mark.parametrize("case", ["lee2021", "deit_elem"])
def test_fused_loader_yields_the_reference_loaders_batches_on_cuda(case):
    """On a GPU the fused loader draws with the draw kernel and the reference loader with its
    torch twin: equal batches check the kernel's CUDA arithmetic against the twin's and the fused
    pixel kernels against torch's CUDA ops."""
    ds = datasets.synthetic(64, 10, seed=0)
    mean, std = datasets.channel_stats(ds.images)
    ds = ds.to("cuda")
    loaders = [DeviceLoader(ds, 16, mean, std, train=True, augment=FUSED_LOADER_CASES[case](), seed=1,
                            backend=backend) for backend in ("reference", "fused")]
    assert not loaders[0].uses_draw_kernel and loaders[1].uses_draw_kernel
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        for (x, y), (xf, yf) in zip(*loaders, strict=True):
            assert torch.equal(xf, x) and torch.equal(yf, y)


def test_an_epochs_batches_do_not_depend_on_the_epochs_before():
    """Resume exactness at the loader: a fresh loader set to epoch 2 yields what one that ran
    epochs 0 and 1 (and half of epoch 2 once) yields, and the draw kernel (under the interpreter)
    yields what the twin does, through the loader."""
    ds = datasets.synthetic(24, 4, image_size=8, seed=0)
    mean, std = datasets.channel_stats(ds.images)
    augment = _recipe_augment("lee2021", crop_padding=1)

    def loader(**kw):
        return DeviceLoader(ds, 8, mean, std, train=True, augment=augment, seed=4, **kw)

    ran = loader()
    for epoch in (0, 1):
        ran.set_epoch(epoch)
        list(ran)
    ran.set_epoch(2)
    next(iter(ran))  # an interrupted pass: the next pass starts the epoch again
    fresh, kernel = loader(), loader(backend="fused")
    kernel.fused_draws = True
    for one in (ran, fresh, kernel):
        one.set_epoch(2)
    for (x, y), (xf, yf), (xk, yk) in zip(ran, fresh, kernel, strict=True):
        assert torch.equal(x, xf) and torch.equal(y, yf)
        assert torch.equal(x, xk) and torch.equal(y, yk)


def test_fingerprint_covers_the_labels_and_a_relabelled_split_is_refused_on_resume(tmp_path):
    """Kills the mutation that drops the labels from ``datasets.fingerprint``'s digest: a split with the
    same images and one label changed must fingerprint differently, ``fingerprint_changes`` must
    name that split, and ``--resume`` (``run.check_resume_data``) must refuse it."""
    from vit_fast import run as run_mod

    ds = datasets.synthetic(40, 4, image_size=8, seed=0)
    train = datasets.ImageDataset(ds.images[:32], ds.labels[:32], ds.classes)
    test = datasets.ImageDataset(ds.images[32:], ds.labels[32:], ds.classes)
    saved = datasets.fingerprint("synthetic", train, test)
    assert datasets.fingerprint("synthetic", train, test) == saved
    assert datasets.fingerprint_changes(saved, datasets.fingerprint("synthetic", train, test)) == []

    def relabelled(split: datasets.ImageDataset) -> datasets.ImageDataset:
        labels = split.labels.clone()
        labels[3] = (labels[3] + 1) % len(split.classes)  # one label changed, the images the same
        return datasets.ImageDataset(split.images.clone(), labels, split.classes)

    for name, now in [("train", datasets.fingerprint("synthetic", relabelled(train), test)),
                      ("test", datasets.fingerprint("synthetic", train, relabelled(test)))]:
        other = "test" if name == "train" else "train"
        assert now[f"{name}_sha256"] != saved[f"{name}_sha256"]
        assert now[f"{other}_sha256"] == saved[f"{other}_sha256"]
        assert datasets.fingerprint_changes(saved, now) == [f"{name} image or label content (same count, different SHA-256)"]
        ckpt = {"data": {"dataset": "synthetic", "classes": list(ds.classes), "fingerprint": saved}}
        with pytest.raises(SystemExit, match=rf"--resume with different data than .*checkpoint\.pt was trained on: "
                                             rf"{name} image or label content"):
            run_mod.check_resume_data(ckpt, now, tmp_path / "checkpoint.pt")
        run_mod.check_resume_data(ckpt, saved, tmp_path / "checkpoint.pt")  # the original data resumes
