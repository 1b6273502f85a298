"""Hostile and careless inputs: damaged, forged or mismatched data, checkpoints and paths.

Every case ends in one error that names the file or argument and what was expected, before any
long work starts, and nothing in a forged file is executed. Tiny everything: 8x8 images, a
depth-1 model, one epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vit_fast import checkpoint as ckpt_mod
from vit_fast import datasets, evaluate, predict
from vit_fast import train as train_mod
from vit_fast.config import ViTConfig

TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "--synthetic-classes", "3", "--image-size", "8",
        "--dim", "16", "--heads", "2", "--depth", "1", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "1",
        "--device", "cpu"]


def train_args(out_dir, *extra, base=TINY):
    return train_mod.parse_args([*base, "--out-dir", str(out_dir), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The checkpoint (its path) after epoch 1 of a 2-epoch TINY run: RESUME continues it."""
    out = tmp_path_factory.mktemp("run")
    train_mod.train(train_args(out, *RESUME))
    return out / "checkpoint.pt"


RESUME = ["--epochs", "2", "--stop-after", "1"]


def image_folder(root, splits: dict[str, list[str]], per_class: int = 2, size: int = 8):
    """root/<split>/<class>/<i>.png, each class a solid colour of its own (from its name, the same in
    every split)."""
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            red, green = zlib.crc32(cls.encode()).to_bytes(4, "big")[:2]
            for i in range(per_class):
                Image.new("RGB", (size, size), (red, green, 7 * i)).save(root / split / cls / f"{i}.png")
    return root


def folder_args(root, out_dir, *extra):
    return ["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "8", "--dim", "16", "--heads", "2",
            "--depth", "1", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "1", "--device", "cpu",
            "--out-dir", str(out_dir), *extra]


# --- CIFAR files ----------------------------------------------------------------------------------


def fake_cifar100(root, n=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": [1] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return folder


def md5s(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_cifar_files_that_are_not_the_official_ones_are_refused(tmp_path):
    fake_cifar100(tmp_path)
    with pytest.raises(datasets.DatasetIntegrityError, match=r"cifar-100-python/train is not the official file: MD5 "
                                                         r"[0-9a-f]{32}, expected 16019d7e3df5f24257cddd939b257f8d"):
        datasets.load_cifar(tmp_path, "cifar100", train=True, download=False)


def test_cifar_md5_is_checked_by_the_training_command(tmp_path):
    fake_cifar100(tmp_path / "data")
    with pytest.raises(SystemExit, match=r"error: .*cifar-100-python/train is not the official file"):
        train_mod.main(["--data-dir", str(tmp_path / "data"), "--no-download", "--out-dir", str(tmp_path / "run"),
                        "--device", "cpu", "--depth", "1", "--epochs", "1"])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


class _Exploit:
    """Unpickling this calls os.system: what a forged dataset file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_cifar_pickle_runs_nothing(tmp_path, monkeypatch):
    folder = fake_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "train", "wb") as f:
        pickle.dump({"data": _Exploit(marker), "fine_labels": [0]}, f)
    # Its MD5 is "known" here, so the unpickler itself is what must stop it.
    monkeypatch.setattr(datasets, "CIFAR_MD5", {"cifar100": md5s(folder)}, raising=False)
    with pytest.raises(Exception) as err:
        datasets.load_cifar(tmp_path, "cifar100", train=True, download=False)
    assert not marker.exists(), "the pickle ran its payload"
    assert isinstance(err.value, datasets.DatasetIntegrityError)
    assert re.search(r"cifar-100-python/train is not a CIFAR python-pickle file: UnpicklingError: forbidden global "
                     r"(posix|os)\.system", str(err.value))


def test_cifar_data_of_the_wrong_dtype_is_refused(tmp_path):
    folder = fake_cifar100(tmp_path)
    with open(folder / "train", "wb") as f:  # int64 rows would wrap silently in a uint8 cast
        pickle.dump({"data": np.full((2, 3072), 300, np.int64), "fine_labels": [0, 1]}, f)
    with pytest.raises(datasets.DatasetIntegrityError, match=r"train: 'data' should be a uint8 numpy array, got int64"):
        datasets.load_cifar(tmp_path, "cifar100", train=True, download=False, md5=md5s(folder))


# --- image files ----------------------------------------------------------------------------------


def bad_image(path, kind):
    """Write a damaged image file of the given kind at ``path``."""
    if kind == "truncated":
        buf = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(buf).save(path, format="JPEG", quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file with a .jpg name\n")
    return path


BAD_IMAGE_MESSAGES = {
    "truncated": r"bad\.jpg is not an image Pillow can read .*truncated",
    "empty": r"bad\.jpg is empty \(0 bytes\)",
    "text": r"bad\.jpg is not an image Pillow can read",
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGE_MESSAGES))
def test_a_damaged_image_is_one_error_naming_it(kind, trained, tmp_path):
    root = image_folder(tmp_path / "folder", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    bad_image(root / "train" / "dog" / "bad.jpg", kind)
    with pytest.raises(SystemExit, match=rf"error: .*train/dog/{BAD_IMAGE_MESSAGES[kind]}"):
        train_mod.main(folder_args(root, tmp_path / "run"))
    with pytest.raises(SystemExit, match=rf"error: .*{BAD_IMAGE_MESSAGES[kind]}"):
        predict.main(["--checkpoint", str(trained), "--device", "cpu", str(root / "train" / "dog" / "bad.jpg")])


def test_predict_on_a_directory_says_so(trained, tmp_path):
    (tmp_path / "pictures").mkdir()
    with pytest.raises(SystemExit, match=r"error: .*pictures is a directory; expected an image file"):
        predict.main(["--checkpoint", str(trained), "--device", "cpu", str(tmp_path / "pictures")])


def png_header_only(path, width, height):
    """A valid PNG signature and header claiming width x height pixels, with one empty data chunk."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 30_000])  # above Pillow's limit, and above twice it (its own error)
def test_predict_refuses_a_decompression_bomb(side, trained, tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(SystemExit, match=rf"error: .*bomb\.png (is {side}x{side} pixels|is refused as a decompression bomb)"):
        predict.main(["--checkpoint", str(trained), "--device", "cpu", str(bomb)])


def test_predict_scales_16_bit_images(tmp_path):
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)  # (4, 4)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    img = predict.load_image(tmp_path / "deep.png", 4)
    assert img.shape == (3, 4, 4)
    assert img[:, :, 0].eq(0).all() and img[:, :, -1].eq(255).all()
    assert img[0, 0].tolist() == [0, 64, 128, 255]


def test_predict_scales_float_images_in_0_1_and_refuses_others(trained, tmp_path):
    ramp = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32).repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    assert predict.load_image(tmp_path / "float.tif", 4)[1, 0].tolist() == [0, 64, 128, 255]
    Image.fromarray(ramp * 1000).save(tmp_path / "hdr.tif")
    with pytest.raises(SystemExit, match=r"error: .*hdr\.tif has float pixels in \[0\.0, 1000\.0\]; expected values in \[0, 1\]"):
        predict.main(["--checkpoint", str(trained), "--device", "cpu", str(tmp_path / "hdr.tif")])
    Image.fromarray(np.arange(16, dtype=np.int32).reshape(4, 4)).save(tmp_path / "int32.tif")
    with pytest.raises(SystemExit, match=r"error: .*int32\.tif has pixel mode 'I', whose value range is unknown"):
        predict.main(["--checkpoint", str(trained), "--device", "cpu", str(tmp_path / "int32.tif")])


# --- image-folder class sets ----------------------------------------------------------------------


def test_val_classes_outside_the_training_classes_stop_training_before_it_starts(tmp_path):
    root = image_folder(tmp_path / "folder", {"train": ["cat", "dog", "frog"], "val": ["cat", "frog", "zebra"]})
    with pytest.raises(SystemExit, match=r"error: .*classes the model was not trained on: \['zebra'\] "
                                         r"\(training classes missing there: \['dog'\]\)"):
        train_mod.main(folder_args(root, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_load_data_maps_a_val_subset_by_name(tmp_path):
    root = image_folder(tmp_path / "folder", {"train": ["cat", "dog", "frog"], "val": ["cat", "frog"]})
    train, val = datasets.load_data("imagefolder", root, image_size=8)
    assert train.classes == val.classes == ["cat", "dog", "frog"]
    assert val.labels.tolist() == [0, 0, 2, 2]  # frog is class 2 of training, not val's position 1
    assert torch.equal(val.images[2], train.images[4])  # the same frog picture as in train/


def test_a_val_subset_is_mapped_by_name_in_training_and_evaluation(tmp_path):
    root = image_folder(tmp_path / "folder", {"train": ["cat", "dog", "frog"], "val": ["cat", "frog"]})
    train_mod.main(folder_args(root, tmp_path / "run"))
    report = evaluate.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--device", "cpu",
                            "--data-dir", str(root)])
    assert report["num_images"] == 4 and report["per_class"]["dog"] is None  # no val/dog images
    assert report["per_class"]["cat"] is not None and report["per_class"]["frog"] is not None
    metrics = ckpt_mod.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["metrics"]
    assert report["top1"] == metrics["top1"] and report["loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)


def test_an_empty_class_folder_is_one_line(tmp_path):
    root = image_folder(tmp_path / "folder", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    (root / "train" / "emu").mkdir()
    with pytest.raises(SystemExit, match=r"error: image folder .*folder/train: Found no valid file for the classes emu"):
        train_mod.main(folder_args(root, tmp_path / "run"))


def test_align_classes_maps_by_name():
    val = datasets.ImageDataset(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 1]), ["cat", "frog"])
    aligned = datasets.align_classes(val, ["cat", "dog", "frog"], "val")
    assert aligned.classes == ["cat", "dog", "frog"] and aligned.labels.tolist() == [0, 2, 2]
    with pytest.raises(datasets.DatasetIntegrityError, match=r"val has classes the model was not trained on: \['frog'\]"):
        datasets.align_classes(val, ["cat", "dog"], "val")


# --- checkpoints ----------------------------------------------------------------------------------


def tensor_record_offset(path):
    """Where the bytes of the largest tensor record start in a checkpoint's zip container."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def copy_run(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (out / name).write_bytes((trained.parent / name).read_bytes())
    return out


def test_a_checkpoint_with_a_flipped_byte_is_refused_and_kept(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    path = out / "checkpoint.pt"
    start, size = tensor_record_offset(path)
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt_mod.CheckpointError, match=r"checkpoint .*checkpoint\.pt is corrupt: record .* does not "
                                                       r"match its stored CRC-32"):
        ckpt_mod.load_checkpoint(path)
    with pytest.raises(SystemExit, match=r"error: checkpoint .*checkpoint\.pt is corrupt"):
        train_mod.main([*TINY, *RESUME, "--out-dir", str(out), "--resume"])
    assert path.read_bytes() == bytes(raw)  # the run that started from it wrote nothing over it


def test_a_checkpoint_with_non_finite_weights_is_refused(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name].clone().fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")  # a valid container holding a diverged state
    with pytest.raises(SystemExit, match=rf"error: checkpoint .*nan\.pt is corrupt: 1 tensor\(s\) hold NaN or "
                                         rf"infinity, first model\['{name}'\]"):
        evaluate.main(["--checkpoint", str(tmp_path / "nan.pt"), "--device", "cpu"])


def test_a_non_finite_state_never_replaces_the_last_good_checkpoint(trained, tmp_path):
    good = torch.load(trained, weights_only=True)
    good.pop("format")
    path = ckpt_mod.save_checkpoint(good, tmp_path / "checkpoint.pt")
    before = path.read_bytes()
    opt_state = good["optimizer"]["state"]
    first = next(iter(opt_state))
    bad = {**good, "optimizer": {**good["optimizer"], "state": {**opt_state, first: {
        **opt_state[first], "exp_avg": torch.full_like(opt_state[first]["exp_avg"], float("inf"))}}}}
    with pytest.raises(ckpt_mod.CheckpointError, match=rf"refusing to write .*checkpoint\.pt: 1 tensor\(s\) hold NaN "
                                                       rf"or infinity, first optimizer state\[{first}\]\['exp_avg'\] "
                                                       rf"\(the training diverged\); .*checkpoint\.pt still holds the last good"):
        ckpt_mod.save_checkpoint(bad, path)
    assert path.read_bytes() == before


def test_a_diverging_run_stops_with_a_clear_error_instead_of_saving_nan(tmp_path):
    # The non-finite loss is caught on the device and the run stops at the end of the epoch, before
    # save_checkpoint would refuse the diverged state (tested above).
    with pytest.raises(SystemExit, match=r"error: the training loss of optimizer step \d+ .* was not finite \(the "
                                         r"training diverged\); .*no checkpoint was written"):
        train_mod.main([*TINY, "--out-dir", str(tmp_path), "--lr", "1e30"])
    assert not (tmp_path / "checkpoint.pt").exists()


def test_checkpoints_are_written_with_crcs_even_when_torch_is_told_not_to(trained, tmp_path):
    state = torch.load(trained, weights_only=True)
    state.pop("format")
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        path = ckpt_mod.save_checkpoint(state, tmp_path / "checkpoint.pt")
    finally:
        torch.serialization.set_crc32_options(was)
    assert torch.serialization.get_crc32_options() == was
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None and all(i.CRC != 0 for i in z.infolist() if i.file_size)


def test_a_checkpoint_missing_an_entry_is_one_line(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"error: checkpoint .*checkpoint\.pt is incomplete: it has no 'optimizer' entry"):
        train_mod.main([*TINY, *RESUME, "--out-dir", str(out), "--resume"])


def test_a_checkpoint_of_the_wrong_structure_is_one_line(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    torch.save({**ckpt, "model": [t for t in ckpt["model"].values()]}, tmp_path / "list.pt")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit, match=r"error: checkpoint .*list\.pt: entry 'model' should be a dict, got list"):
        predict.main(["--checkpoint", str(tmp_path / "list.pt"), "--device", "cpu", str(tmp_path / "x.png")])


def test_a_metrics_file_cut_short_by_a_crash_is_repaired_on_resume(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    epoch1 = (out / "metrics.jsonl").read_text()
    # A crash after the checkpoint was saved, while its metrics line was being appended.
    (out / "metrics.jsonl").write_text(epoch1[: len(epoch1) // 2])
    train_mod.main([*TINY, *RESUME, "--out-dir", str(out), "--resume"])
    assert "metrics.jsonl (line 1) is cut short" in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == epoch1.strip() and [json.loads(ln)["epoch"] for ln in lines] == [1, 2]


def test_a_damaged_metrics_line_before_the_last_is_an_error(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    epoch1 = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text("{not json\n" + epoch1)
    with pytest.raises(SystemExit, match=r"error: .*metrics\.jsonl line 1 is not a metrics record"):
        train_mod.main([*TINY, *RESUME, "--out-dir", str(out), "--resume"])
    assert (out / "metrics.jsonl").read_text() == "{not json\n" + epoch1


def test_resume_refuses_another_synthetic_size(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    with pytest.raises(SystemExit, match=r"--resume with different data than .*checkpoint\.pt was trained on: "
                                         r"train images 64 -> 80; test images 16 -> 20"):
        train_mod.main([*TINY, *RESUME, "--out-dir", str(out), "--resume", "--synthetic-size", "80"])


@pytest.mark.parametrize("change", ["added", "edited"])
def test_resume_refuses_an_image_folder_that_changed(change, tmp_path):
    root = image_folder(tmp_path / "folder", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    args = folder_args(root, tmp_path / "run", "--epochs", "2", "--stop-after", "1")
    train_mod.main(args)
    if change == "added":
        Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "train" / "dog" / "new.png")
        expected = r"train images 4 -> 5"
    else:
        Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "train" / "dog" / "0.png")
        expected = r"train image or label content \(same count, different SHA-256\)"
    with pytest.raises(SystemExit, match=rf"--resume with different data than .*checkpoint\.pt was trained on: {expected}"):
        train_mod.main([*args, "--resume"])


def test_resume_from_a_checkpoint_without_a_fingerprint_warns(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["data"]["fingerprint"]
    torch.save(ckpt, out / "checkpoint.pt")
    train_mod.main([*TINY, *RESUME, "--out-dir", str(out), "--resume"])
    assert "records no dataset fingerprint" in capsys.readouterr().out
    assert ckpt_mod.load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    renamed = {**ckpt, "data": {**ckpt["data"], "classes": ["a", "b", "c"]}}
    torch.save(renamed, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"different data than .* classes \(added \['class_0', 'class_1', 'class_2'\], "
                                         r"removed \['a', 'b', 'c'\]\)"):
        train_mod.main([*TINY, *RESUME, "--out-dir", str(out), "--resume"])


# --- output paths ---------------------------------------------------------------------------------


def test_evaluate_json_pointing_at_a_directory_fails_before_evaluating(trained, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation ran before --json was checked")

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", must_not_run)
    (tmp_path / "reports").mkdir()
    with pytest.raises(SystemExit, match=r"error: --json .*reports is a directory; expected a file name"):
        evaluate.main(["--checkpoint", str(trained), "--device", "cpu", "--json", str(tmp_path / "reports")])


def test_train_out_dir_that_cannot_be_written_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("a file where a directory should be\n")
    with pytest.raises(SystemExit, match=r"error: --out-dir .*file/run is not a writable directory"):
        train_mod.main([*TINY, "--out-dir", str(tmp_path / "file" / "run")])
    with pytest.raises(SystemExit, match=r"error: --out-dir .*file is a file; expected a directory"):
        train_mod.main([*TINY, "--out-dir", str(tmp_path / "file")])


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [-1e-6, 0.0, float("nan")])
def test_layer_norm_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match=r"layer_norm_eps must be a positive finite number"):
        ViTConfig(layer_norm_eps=eps)
