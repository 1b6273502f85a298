"""The command lines' errors and the values they refuse or adjust (vit_fast.cli).

A value that cannot be meant is one line ``error: ...`` naming it, exit status 2 (as argparse's own
errors), before any data is loaded; a runtime failure (a missing file, a diverged run) is one line,
status 1; never a traceback. ``--overwrite`` loses nothing of the previous run until the new run has
written its first checkpoint. The commands are called in-process (``main(argv)``): the status is
the SystemExit's code (an int for usage errors, the message for runtime errors, which Python prints
and exits 1 on); two subprocess runs check what a shell sees.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from vit_fast import aot, cost, data, evaluate, optim, predict, preview, recipes
from vit_fast import run as run_mod
from vit_fast import train as train_mod
from vit_fast.checkpoint import load_checkpoint
from vit_fast.cli import UsageError, errors_handled

TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "--synthetic-classes", "3", "--image-size", "8",
        "--dim", "16", "--heads", "2", "--depth", "1", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "1",
        "--recipe", "basic", "--device", "cpu"]


def fails(main, argv, capsys) -> tuple[int, str]:
    """(exit status, the error line) of ``main(argv)``, which must exit with one line and no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code
    status, message = (1, code) if isinstance(code, str) else (code, str(exc.value))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message.startswith("error: ") and "\n" not in message, message
    if status == 2:  # errors_handled printed it
        assert message in err
    return status, message


# --- usage errors: exit 2, before any work --------------------------------------------------------


USAGE = {
    "min-lr above lr": (["--min-lr", "1", "--lr", "1e-3"],
                        r"--min-lr must be at most --lr \(0.001\), got 1.0: the cosine decays from --lr to --min-lr"),
    "warm-up longer than the run": (["--warmup-epochs", "5", "--epochs", "1"],
                                    r"--warmup-epochs must be at most --epochs \(1\), got 5.0"),
    "crop padding of the image size": (["--crop-padding", "8"], r"--crop-padding 8 is at least the image size \(8 pixels\)"),
    "crop padding of CIFAR's size": (["--dataset", "cifar100", "--data-dir", "nowhere", "--crop-padding", "1000"],
                                     r"--crop-padding 1000 is at least the image size \(32 pixels\)"),
    "beta1 of 1.5": (["--beta1", "1.5"], r"--beta1 must be in \[0, 1\), got 1.5"),
    "beta2 NaN": (["--beta2", "nan"], r"--beta2 must be a finite number, got nan"),
    "beta2 of 1": (["--beta2", "1"], r"--beta2 must be in \[0, 1\), got 1.0"),
    "lr NaN": (["--lr", "nan"], r"--lr must be a finite number, got nan"),
    "lr infinite": (["--lr", "inf"], r"--lr must be a finite number, got inf"),
    "lr negative": (["--lr=-1e-3"], r"--lr must be positive, got -0.001"),
    "weight decay NaN": (["--weight-decay", "nan"], r"--weight-decay must be a finite number, got nan"),
    "weight decay negative": (["--weight-decay", "-0.1"], r"--weight-decay must be >= 0, got -0.1"),
    "unknown device": (["--device", "bogus"], r"--device 'bogus' is not a device; expected auto, cpu, cuda or cuda:N"),
    "one synthetic class": (["--synthetic-classes", "1"],
                            r"--synthetic-classes must be at least 2, got 1: a classifier of one class learns nothing"),
    "patch size": (["--patch-size", "3"], r"invalid model configuration: patch_size=3 does not divide image_size=8"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_a_value_that_cannot_be_meant_is_a_usage_error(case, tmp_path, capsys, monkeypatch):
    extra, expected = USAGE[case]

    def must_not_load(*args, **kwargs):
        raise AssertionError("the data was loaded before the arguments were checked")

    monkeypatch.setattr(run_mod.datasets, "load_data", must_not_load)
    status, message = fails(train_mod.main, [*TINY, "--out-dir", str(tmp_path / "run"), *extra], capsys)
    assert status == 2
    assert re.search(expected, message), message
    assert not (tmp_path / "run").exists()  # refused before the output directory was made


def test_the_recipe_warm_up_is_fitted_to_a_shortened_run(capsys):
    args = train_mod.parse_args(["--epochs", "5"])  # lee2021: 10 warm-up epochs of 100
    assert args.warmup_epochs == 0.5
    assert ("warning: recipe lee2021's 10 warm-up epochs are at least --epochs 5: warming up for 0.5 epochs instead"
            in capsys.readouterr().err)
    assert train_mod.parse_args(["--recipe", "fast", "--epochs", "2"]).warmup_epochs == pytest.approx(0.2)
    assert train_mod.parse_args(["--epochs", "10"]).warmup_epochs == 1.0  # as long as the run: fitted too
    capsys.readouterr()
    # A run longer than the warm-up keeps it, an explicit value is kept, both without a warning.
    assert train_mod.parse_args(["--epochs", "11"]).warmup_epochs == 10.0
    assert train_mod.parse_args(["--epochs", "2", "--warmup-epochs", "2"]).warmup_epochs == 2.0
    assert capsys.readouterr().err == ""
    assert recipes.fit_warmup(recipes.Lee2021()) == recipes.Lee2021()
    assert "--epochs is at most the recipe's warm-up" in " ".join(train_mod.build_parser().format_help().split())


def test_a_fitted_warm_up_reaches_the_peak_learning_rate():
    args = train_mod.parse_args(["--epochs", "2"])  # lee2021's warm-up: 10 epochs, fitted to 0.2
    opt = optim.make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], args.lr, (0.9, 0.999),
                               torch.device("cpu"))
    schedule = run_mod.make_schedule(args, opt, steps_per_epoch=50)  # 100 steps, 10 of them warm-up
    assert schedule.table.max().item() == pytest.approx(args.lr)
    assert int(schedule.table.argmax()) == 9 and schedule.table[-1].item() == pytest.approx(args.min_lr)


def test_errors_handled_statuses(capsys):
    with pytest.raises(SystemExit) as exc:
        with errors_handled(KeyError):
            raise UsageError("--x 3 is wrong")
    assert exc.value.code == 2 and str(exc.value) == "error: --x 3 is wrong"
    assert capsys.readouterr().err == "error: --x 3 is wrong\n"
    for raised, expected in ((KeyError("k"), "error: 'k'"), (SystemExit("plain"), "error: plain"),
                             (SystemExit("error: once"), "error: once")):
        with pytest.raises(SystemExit) as exc:
            with errors_handled(KeyError):
                raise raised
        assert exc.value.code == expected
    with pytest.raises(ValueError):  # not a listed type: a bug's traceback stays
        with errors_handled(KeyError):
            raise ValueError("bug")


# --- runtime errors: exit 1 -----------------------------------------------------------------------


def test_resume_without_a_checkpoint_is_one_line(tmp_path, capsys):
    status, message = fails(train_mod.main, [*TINY, "--out-dir", str(tmp_path / "run"), "--resume"], capsys)
    assert status == 1
    assert f"--resume: there is no checkpoint to continue from at {tmp_path / 'run' / 'checkpoint.pt'}" in message


def test_cuda_devices_this_machine_lacks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, message = fails(train_mod.main, [*TINY, "--out-dir", str(tmp_path), "--device", "cuda"], capsys)
    assert status == 1 and "--device cuda: CUDA is not available on this machine" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match=r"error: --device cuda:2: this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        train_mod.resolve_device("cuda:2")


def test_an_image_folder_of_one_class_is_refused(tmp_path, capsys):
    from test_hostile_inputs import folder_args, image_folder

    root = image_folder(tmp_path / "folder", {"train": ["cat"], "val": ["cat"]})
    status, message = fails(train_mod.main, folder_args(root, tmp_path / "run"), capsys)
    assert status == 1 and "has a single class ('cat'): a classifier of one class learns nothing" in message


# --- evaluate, predict, data, cost, aot -----------------------------------------------------------


def test_evaluate_and_predict_refuse_an_unknown_device_before_reading(tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")  # the device is checked first
    for main, argv in ((evaluate.main, ["--checkpoint", missing, "--device", "bogus"]),
                       (predict.main, ["--checkpoint", missing, "--device", "cuda:x", "a.png"])):
        status, message = fails(main, argv, capsys)
        assert status == 2 and "is not a device; expected auto, cpu, cuda or cuda:N" in message
    assert fails(evaluate.main, ["--checkpoint", missing, "--batch-size", "0"], capsys)[0] == 2
    assert fails(predict.main, ["--checkpoint", missing, "--top-k", "0", "a.png"], capsys)[0] == 2
    assert fails(evaluate.main, ["--checkpoint", missing, "--device", "cpu"], capsys) == (
        1, f"error: checkpoint {missing} does not exist")


def test_preview_output_paths(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("a file where a directory should be\n")
    synthetic = ["--dataset", "synthetic", "--count", "4"]
    status, message = fails(data.main, ["--preview", str(tmp_path / "afile" / "x.png"), *synthetic], capsys)
    assert status == 1 and "afile is a file; expected a directory" in message
    load_split = preview.load_split

    def must_not_load(*args, **kwargs):
        raise AssertionError("the data was loaded before --preview was checked")

    monkeypatch.setattr(preview, "load_split", must_not_load)
    status, message = fails(data.main, ["--preview", str(tmp_path / "grid.txt"), *synthetic], capsys)
    assert status == 2 and "grid.txt: '.txt' is not an image format matplotlib writes; use .png" in message
    status, message = fails(data.main, ["--preview", str(tmp_path), *synthetic], capsys)
    assert status == 1 and "is a directory; expected a file name" in message
    # A name without a suffix gets .png, and the message names the file written.
    monkeypatch.setattr(preview, "load_split", load_split)
    out = data.main(["--preview", str(tmp_path / "grid"), *synthetic])
    assert out == tmp_path / "grid.png" and out.is_file()
    assert f"wrote {tmp_path / 'grid.png'}: 4 training images" in capsys.readouterr().out


@pytest.mark.parametrize("extra, expected", [
    (["--count", "100000"], r"--count 100000: a preview grid holds at most 256 images \(data.MAX_PREVIEW_IMAGES\)"),
    (["--crop-padding", "32"], r"--crop-padding 32 is at least the image size \(32 pixels\)"),
    (["--erase", "1.5"], r"--erase must be in \[0, 1\], got 1.5"),
])
def test_preview_usage_errors(extra, expected, tmp_path, capsys):
    status, message = fails(data.main, ["--preview", str(tmp_path / "g.png"), "--dataset", "synthetic", *extra], capsys)
    assert status == 2 and re.search(expected, message), message
    assert not (tmp_path / "g.png").exists()


def test_cost_and_aot_errors(tmp_path, capsys, monkeypatch):
    assert fails(cost.main, ["--batch-size", "0"], capsys)[0] == 2
    status, message = fails(cost.main, ["--mixup", "nan"], capsys)
    assert status == 2 and "--mixup must be a finite number, got nan" in message
    with pytest.raises(SystemExit) as exc:  # argparse's own: an unknown preset or recipe
        cost.main(["--preset", "vit-huge"])
    assert exc.value.code == 2

    def no_compiler(ops):
        raise aot.CompileError("ahead-of-time compilation failed:\nno cuobjdump here")

    monkeypatch.setattr(aot, "report", no_compiler)
    with pytest.raises(SystemExit, match="error: ahead-of-time compilation failed") as exc:
        aot.main(["--op", sorted(aot.REPORT_OPS)[0]])
    assert isinstance(exc.value.code, str)  # status 1


def test_a_shell_sees_one_line_and_the_status(tmp_path):
    for extra, status, expected in ((["--min-lr", "1", "--lr", "1e-3"], 2, "error: --min-lr must be at most --lr"),
                                    (["--resume"], 1, "error: --resume: there is no checkpoint")):
        proc = subprocess.run([sys.executable, "-m", "vit_fast.train", *TINY, "--out-dir", str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == status, proc.stderr
        assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# --- --overwrite and --resume keep the metrics whole ----------------------------------------------


def _files(out):
    return {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "best.pt")}


def test_overwrite_keeps_the_previous_run_until_the_new_one_checkpoints(tmp_path, capsys):
    old = [*TINY, "--out-dir", str(tmp_path), "--epochs", "2", "--stop-after", "1", "--keep-best"]
    train_mod.main(old)
    before = _files(tmp_path)

    # The new run diverges before its first checkpoint: the old run's files are untouched, and the
    # error says whose checkpoint is there and its real epoch.
    status, message = fails(train_mod.main, [*TINY, "--out-dir", str(tmp_path), "--overwrite", "--lr", "1e30"], capsys)
    assert status == 1 and "was not finite (the training diverged)" in message
    assert f"{tmp_path / 'checkpoint.pt'} is still the previous run's checkpoint (epoch 1)" in message
    assert _files(tmp_path) == before
    # So --resume continues the old run, its metrics whole.
    train_mod.main([*TINY, "--out-dir", str(tmp_path), "--epochs", "2", "--keep-best", "--resume"])
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]

    # A new run that checkpoints replaces them: its own metrics only, and no best.pt it did not write.
    train_mod.main([*TINY, "--out-dir", str(tmp_path), "--overwrite", "--seed", "7"])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["args"]["seed"] == 7
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(ckpt["metrics"]) + "\n"
    assert not (tmp_path / "best.pt").exists()


def test_resume_restores_a_missing_metrics_file_from_the_checkpoint(tmp_path, capsys):
    args = [*TINY, "--out-dir", str(tmp_path), "--epochs", "2"]
    train_mod.main([*args, "--stop-after", "1"])
    epoch1 = load_checkpoint(tmp_path / "checkpoint.pt")["metrics"]
    (tmp_path / "metrics.jsonl").unlink()
    train_mod.main([*args, "--resume"])
    assert "metrics.jsonl is missing; restored the line of epoch 1 from the checkpoint" in capsys.readouterr().out
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == epoch1 and [m["epoch"] for m in lines] == [1, 2]
    # Nothing to restore from (a checkpoint without metrics): no file is made up.
    (tmp_path / "metrics.jsonl").unlink()
    run_mod._truncate_metrics(tmp_path / "metrics.jsonl", 2, None)
    assert not (tmp_path / "metrics.jsonl").exists()
