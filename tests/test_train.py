"""The training command: learning, checkpoints, exact resume, and its errors."""

import json
import subprocess
import sys

import pytest
import torch

from vit_fast import train as train_mod
from vit_fast.checkpoint import CheckpointError, load_checkpoint, load_model

# A small but real ViT on the learnable synthetic task: seconds per epoch on a CPU.
SMALL = ["--dataset", "synthetic", "--synthetic-size", "512", "--synthetic-classes", "10", "--dim", "64",
         "--heads", "4", "--depth", "2", "--batch-size", "64", "--warmup-epochs", "1", "--device", "cpu"]


def run(tmp, *extra):
    args = train_mod.parse_args([*SMALL, "--out-dir", str(tmp), *extra])
    return train_mod.train(args)


def test_training_learns_the_synthetic_task(tmp_path):
    # Crop and flip only (--recipe basic): lee2021's mixing and heavy augmentation hold the training
    # loss up by design, which would hide whether the model learns.
    metrics = run(tmp_path, "--recipe", "basic", "--epochs", "6", "--lr", "3e-3", "--synthetic-size", "1024",
                  "--label-smoothing", "0")
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    assert metrics["val_loss"] < 0.5 and metrics["top1"] > 90  # chance is 10% and log(10) = 2.3
    assert all(m["images_per_s"] > 0 for m in lines)


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    run(tmp_path, "--epochs", "1")
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"config", "model", "optimizer", "scheduler", "epoch", "step", "rng", "args", "data"} <= raw.keys()
    assert raw["epoch"] == 1 and raw["step"] == 8
    model, _ = load_model(tmp_path / "checkpoint.pt")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    # Stochastic depth, dropout and the default recipe's augmentation (AutoAugment, repeated
    # augmentation, erasing, mixup/cutmix) make every RNG stream matter.
    extra = ["--epochs", "3", "--drop-path", "0.2", "--dropout", "0.1", "--mixup", "0.8", "--seed", "5"]
    run(tmp_path / "whole", *extra)
    run(tmp_path / "split", *extra, "--stop-after", "1")
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 1
    run(tmp_path / "split", *extra, "--resume", "--stop-after", "1")
    run(tmp_path / "split", *extra, "--resume")
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert (tmp_path / "whole" / "metrics.jsonl").read_text().count("\n") == 3
    assert (tmp_path / "split" / "metrics.jsonl").read_text().count("\n") == 3


def test_existing_checkpoint_is_never_overwritten_silently(tmp_path):
    run(tmp_path, "--epochs", "1")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="checkpoint.pt exists: pass --resume"):
        run(tmp_path, "--epochs", "1")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_with_another_recipe_is_refused(tmp_path):
    run(tmp_path, "--epochs", "2", "--stop-after", "1")
    with pytest.raises(SystemExit, match=r"different recipe.*'lr': \(0.001, 0.005\)"):
        run(tmp_path, "--epochs", "2", "--resume", "--lr", "5e-3")
    with pytest.raises(SystemExit, match=r"model configuration differs.*'depth': \(2, 3\)"):
        run(tmp_path, "--epochs", "2", "--resume", "--depth", "3")


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint .*checkpoint.pt is corrupt"):
        run(tmp_path, "--epochs", "1", "--resume")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vit_fast checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="patch_size=5 does not divide image_size=32"):
        run(tmp_path, "--patch-size", "5")
    with pytest.raises(SystemExit, match="--batch-size must be positive, got 0"):
        run(tmp_path, "--batch-size", "0")
    with pytest.raises(SystemExit):  # argparse: invalid choice
        train_mod.parse_args(["--preset", "vit-huge"])


def test_cli_missing_cifar_offline_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vit_fast.train", "--data-dir", str(tmp_path / "data"), "--no-download",
         "--out-dir", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "cifar100 not found in" in proc.stderr and "cifar-100-python.tar.gz" in proc.stderr


# `python -m vit_fast.train` with the official MD5 sums replaced by those of fake files (the first
# argument): the command itself always checks, so the test swaps the table, not the check.
RUN_TRAIN_WITH_MD5 = ("import json, runpy, sys; from vit_fast import datasets; "
                      "datasets.CIFAR_MD5['cifar100'] = json.loads(sys.argv.pop(1)); "
                      "runpy.run_module('vit_fast.train', run_name='__main__', alter_sys=True)")


def test_cli_trains_cifar100_files(tmp_path):
    """The real loader end to end: official-format files on disk, `python -m vit_fast.train`."""
    from test_data import md5_table, write_cifar100

    write_cifar100(tmp_path / "data", n_train=64, n_test=16)
    md5 = json.dumps(md5_table(tmp_path / "data" / "cifar-100-python"))
    proc = subprocess.run(
        [sys.executable, "-c", RUN_TRAIN_WITH_MD5, md5, "--data-dir", str(tmp_path / "data"), "--no-download",
         "--out-dir", str(tmp_path / "run"), "--device", "cpu", "--epochs", "1", "--depth", "1", "--batch-size", "32"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cifar100: 64 train / 16 test images" in proc.stdout and "epoch   1/1" in proc.stdout
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["num_classes"] == 100


def test_fused_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="--fused runs our Triton and CUDA kernels, which need an NVIDIA GPU"):
        run(tmp_path, "--fused", "--epochs", "1")
