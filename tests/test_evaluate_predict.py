"""`python -m vit_fast.evaluate` and `python -m vit_fast.predict` on a checkpoint trained here."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vit_fast import evaluate, predict
from vit_fast import run as run_mod
from vit_fast import train as train_mod
from vit_fast.checkpoint import load_checkpoint, load_model
from vit_fast.augment.pipeline import normalize
from vit_fast.datasets import load_split

TINY = ["--dataset", "synthetic", "--synthetic-size", "256", "--synthetic-classes", "4", "--dim", "32", "--heads", "2",
        "--depth", "1", "--batch-size", "64", "--warmup-epochs", "1", "--lr", "3e-3", "--epochs", "2",
        "--device", "cpu", "--seed", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_mod.train(train_mod.parse_args([*TINY, "--out-dir", str(out)]))
    ckpt_path = out / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    # The synthetic test split the run evaluated on, rebuilt from the training arguments.
    args = train_mod.parse_args(TINY)
    test_set = load_split(args.dataset, args.data_dir, False, **run_mod.data_options(args))
    return ckpt_path, ckpt, test_set


def model_probs(ckpt_path, images):
    model, ckpt = load_model(ckpt_path)
    with torch.no_grad():
        return model(normalize(images, ckpt["data"]["mean"], ckpt["data"]["std"])).softmax(dim=1)


def test_evaluate_report_matches_the_model(trained, tmp_path, capsys):
    ckpt_path, ckpt, test_set = trained
    out_json = tmp_path / "eval.json"
    report = evaluate.main(["--checkpoint", str(ckpt_path), "--device", "cpu", "--json", str(out_json), "--pairs", "3"])
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(report))
    # The same test split and model as the training run's own last evaluation.
    assert report["num_images"] == len(test_set) == 64 and report["dataset"] == "synthetic" and report["epoch"] == 2
    assert report["top1"] == ckpt["metrics"]["top1"] and report["top5"] == ckpt["metrics"]["top5"]
    assert report["loss"] == pytest.approx(ckpt["metrics"]["val_loss"], rel=1e-6)

    # Per-class accuracy and confusions, counted here image by image from the model's predictions.
    pred = model_probs(ckpt_path, test_set.images).argmax(dim=1).tolist()
    labels = test_set.labels.tolist()
    for c, name in enumerate(test_set.classes):
        mine = [p == y for p, y in zip(pred, labels) if y == c]
        assert report["per_class"][name] == pytest.approx(100.0 * sum(mine) / len(mine))
    confusions = Counter((y, p) for p, y in zip(pred, labels) if p != y)
    expected = sorted(confusions.items(), key=lambda kv: -kv[1])[:3]
    got = [((p["true"], p["predicted"]), p["count"]) for p in report["confused_pairs"]]
    assert [n for _, n in got] == [n for _, n in expected]
    for (true, predicted), n in got:
        assert confusions[(int(true.split("_")[1]), int(predicted.split("_")[1]))] == n
    table = capsys.readouterr().out
    assert "top-1" in table and f"{report['top1']:6.2f}%" in table and "predicted as" in table


def test_evaluate_cli(trained):
    ckpt_path, ckpt, _ = trained
    proc = subprocess.run([sys.executable, "-m", "vit_fast.evaluate", "--checkpoint", str(ckpt_path), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"top-1 {ckpt['metrics']['top1']:6.2f}%" in proc.stdout and "synthetic test split, 64 images" in proc.stdout


def test_predict_png_gives_the_models_probabilities(trained, tmp_path, capsys):
    ckpt_path, _, test_set = trained
    paths = []
    for i in range(3):  # lossless and already at the model's size: the pixels reach the model unchanged
        paths.append(tmp_path / f"test_{i}.png")
        Image.fromarray(test_set.images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    results = predict.main(["--checkpoint", str(ckpt_path), "--device", "cpu", *map(str, paths)])
    probs = model_probs(ckpt_path, test_set.images[:3])
    for r, p in zip(results, probs):
        best = p.topk(4)
        assert [name for name, _ in r["top"]] == [f"class_{i}" for i in best.indices.tolist()]
        torch.testing.assert_close(torch.tensor([q for _, q in r["top"]]), best.values, atol=1e-6, rtol=1e-5)
    out = capsys.readouterr().out
    assert str(paths[0]) in out and f"1. {results[0]['top'][0][0]}" in out


def test_predict_jpeg_and_other_modes_are_resized_and_converted(trained, tmp_path):
    ckpt_path, _, test_set = trained
    rgb = test_set.images[5].permute(1, 2, 0).numpy()
    big = Image.fromarray(rgb).resize((96, 72), Image.Resampling.NEAREST)
    files = {"photo.jpg": big, "gray.png": big.convert("L"), "alpha.png": big.convert("RGBA"),
             "palette.png": big.convert("P")}
    for name, img in files.items():
        img.save(tmp_path / name)
    assert predict.load_image(tmp_path / "photo.jpg", 32).shape == (3, 32, 32)
    results = predict.main(["--checkpoint", str(ckpt_path), "--device", "cpu", "--top-k", "2",
                            *(str(tmp_path / n) for n in files)])
    for r in results:
        values = [q for _, q in r["top"]]
        assert len(values) == 2 and values[0] >= values[1] > 0
    # Scaled back to 32x32, the enlarged JPEG is nearer the image it was made from than any other
    # image of the set (resampling and JPEG blur the per-pixel noise, so not equal).
    back = predict.load_image(tmp_path / "photo.jpg", 32).float()
    distance = lambda i: (back - test_set.images[i].float()).abs().mean().item()  # noqa: E731
    assert distance(5) < 0.7 * min(distance(i) for i in range(len(test_set)) if i != 5)


def test_predict_cli(trained, tmp_path):
    ckpt_path, _, test_set = trained
    Image.fromarray(test_set.images[0].permute(1, 2, 0).numpy()).save(tmp_path / "a.jpg", quality=95)
    proc = subprocess.run([sys.executable, "-m", "vit_fast.predict", "--checkpoint", str(ckpt_path), "--device", "cpu",
                           str(tmp_path / "a.jpg")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("a.jpg") and [ln.split(".")[0].strip() for ln in lines[1:]] == ["1", "2", "3", "4"]
    assert all(ln.rstrip().endswith("%") for ln in lines[1:])


def test_missing_checkpoint(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match=r"error: checkpoint .*missing.pt does not exist"):
        evaluate.main(["--checkpoint", str(tmp_path / "missing.pt"), "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"error: checkpoint .*missing.pt does not exist"):
        predict.main(["--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path / "a.png")])


def test_bad_image_files(trained, tmp_path):
    ckpt_path, _, _ = trained
    (tmp_path / "notes.png").write_text("not an image at all\n")
    with pytest.raises(SystemExit, match=r"notes.png is not an image Pillow can read"):
        predict.main(["--checkpoint", str(ckpt_path), "--device", "cpu", str(tmp_path / "notes.png")])
    with pytest.raises(SystemExit, match=r"image .*nowhere.jpg does not exist"):
        predict.main(["--checkpoint", str(ckpt_path), "--device", "cpu", str(tmp_path / "nowhere.jpg")])


def test_checkpoints_of_another_configuration(trained, tmp_path):
    ckpt_path, ckpt, _ = trained
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")

    def write(name, **changes):
        path = tmp_path / name
        torch.save({**ckpt, **changes}, path)
        return str(path)

    wider = write("wider.pt", config={**ckpt["config"], "dim": 48})  # weights of a dim-32 model
    for cmd in (evaluate.main, predict.main):
        args = ["--checkpoint", wider, "--device", "cpu"] + ([str(tmp_path / "a.png")] if cmd is predict.main else [])
        with pytest.raises(SystemExit, match=r"(?s)wider.pt does not match its own config.*size mismatch for cls_token"):
            cmd(args)
    # The data the checkpoint describes no longer fits its model.
    small = write("small.pt", args={**ckpt["args"], "image_size": 16})
    with pytest.raises(SystemExit, match=r"synthetic images are \(3, 16, 16\) but the model in .*small.pt expects \(3, 32, 32\)"):
        evaluate.main(["--checkpoint", small, "--device", "cpu"])
    renamed = write("renamed.pt", data={**ckpt["data"], "classes": ["cat", "dog", "ship", "frog"]})
    with pytest.raises(SystemExit, match=r"class names of synthetic differ from those .*renamed.pt was trained on"):
        evaluate.main(["--checkpoint", renamed, "--device", "cpu"])
    short = write("short.pt", data={**ckpt["data"], "classes": ["cat", "dog"]})
    with pytest.raises(SystemExit, match=r"short.pt names 2 classes but its model predicts 4"):
        predict.main(["--checkpoint", short, "--device", "cpu", str(tmp_path / "a.png")])
    bare = write("bare.pt", data=None)
    with pytest.raises(SystemExit, match=r"bare.pt has no data entry"):
        predict.main(["--checkpoint", bare, "--device", "cpu", str(tmp_path / "a.png")])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match=r"foreign.pt is not a vit_fast checkpoint"):
        evaluate.main(["--checkpoint", str(tmp_path / "foreign.pt"), "--device", "cpu"])


def test_evaluate_on_a_dataset_with_other_classes(trained, tmp_path, monkeypatch):
    """A 4-class synthetic checkpoint asked to evaluate on CIFAR-100 (official-format files written here)."""
    from test_data import md5_table, write_cifar100

    from vit_fast import datasets

    ckpt_path, _, _ = trained
    write_cifar100(tmp_path / "data", n_train=4, n_test=4)
    monkeypatch.setitem(datasets.CIFAR_MD5, "cifar100", md5_table(tmp_path / "data" / "cifar-100-python"))
    with pytest.raises(SystemExit, match=r"cifar100 has 100 classes but the model in .* predicts 4"):
        evaluate.main(["--checkpoint", str(ckpt_path), "--device", "cpu", "--dataset", "cifar100",
                       "--data-dir", str(tmp_path / "data"), "--no-download"])
    with pytest.raises(SystemExit, match=r"error: cifar10 not found in"):
        evaluate.main(["--checkpoint", str(ckpt_path), "--device", "cpu", "--dataset", "cifar10",
                       "--data-dir", str(tmp_path / "data"), "--no-download"])
