"""Training curves: a real PNG from a metrics log, on demand and at the end of training."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vit_fast import plots
from vit_fast import train as train_mod

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(path, epochs=12):
    with open(path, "w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({
                "epoch": e, "step": 40 * e, "train_loss": 4.6 * math.exp(-e / 5), "val_loss": 4.4 * math.exp(-e / 6),
                "top1": 90 * (1 - math.exp(-e / 4)), "top5": 99 * (1 - math.exp(-e / 2)),
                "lr": 1e-3 * min(1.0, e / 3) * 0.5 * (1 + math.cos(math.pi * e / epochs)) + 1e-5,
                "images_per_s": 21000 + 500 * (-1) ** e, "epoch_time_s": 2.4,
            }) + "\n")
    return path


def assert_real_png(path):
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and len(raw) > 20_000  # five panels of lines and text, not an empty canvas
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1500, 800)
        pixels = np.asarray(img.convert("RGB"))
    # Drawn curves: many distinct colours (the default cycle's blue and orange among them).
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50
    assert (np.abs(pixels.astype(int) - (31, 119, 180)).sum(axis=-1) < 30).sum() > 500  # matplotlib's C0 blue


def test_plot_from_a_metrics_log(tmp_path, capsys):
    log = write_log(tmp_path / "metrics.jsonl")
    plots.main([str(log)])  # default output: curves.png beside the log
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"
    assert_real_png(tmp_path / "curves.png")
    plots.main([str(log), "-o", str(tmp_path / "sub" / "other.png")])
    assert_real_png(tmp_path / "sub" / "other.png")


def test_plot_cli(tmp_path):
    log = write_log(tmp_path / "metrics.jsonl", epochs=3)
    proc = subprocess.run([sys.executable, "-m", "vit_fast.plots", str(log), "-o", str(tmp_path / "c.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_real_png(tmp_path / "c.png")


def test_bad_metrics_logs(tmp_path):
    with pytest.raises(SystemExit, match=r"error: metrics log .*missing.jsonl does not exist"):
        plots.main([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match=r"empty.jsonl has no epochs to plot"):
        plots.main([str(tmp_path / "empty.jsonl")])
    (tmp_path / "broken.jsonl").write_text(json.dumps({"epoch": 1, "top1": 3.0}) + "\n{oops\n")
    with pytest.raises(SystemExit, match=r"broken.jsonl:1 lacks \['train_loss', 'val_loss', 'top5', 'lr', 'images_per_s'\]"):
        plots.main([str(tmp_path / "broken.jsonl")])


def test_training_writes_curves_and_survives_a_failing_plot(tmp_path, monkeypatch, capsys):
    args = ["--dataset", "synthetic", "--synthetic-size", "64", "--synthetic-classes", "3", "--dim", "16", "--heads", "2",
            "--depth", "1", "--batch-size", "32", "--epochs", "2", "--device", "cpu"]
    train_mod.train(train_mod.parse_args([*args, "--out-dir", str(tmp_path / "a")]))
    assert_real_png(tmp_path / "a" / "curves.png")

    def broken(*_):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr(plots, "plot_metrics", broken)
    metrics = train_mod.train(train_mod.parse_args([*args, "--out-dir", str(tmp_path / "b")]))
    assert metrics["epoch"] == 2 and (tmp_path / "b" / "checkpoint.pt").exists()
    assert not (tmp_path / "b" / "curves.png").exists()
    assert "warning: could not plot the training curves" in capsys.readouterr().err
