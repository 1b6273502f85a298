"""`python -m vit_fast.export`: safetensors that timm loads strictly with the same logits, a
torch.export program and an ONNX graph with a dynamic batch, the EMA weights, predict from an
export, the model card, and the errors.

The checkpoint is written here by the project's own save function (a tiny model with random
weights, an EMA beside them, a synthetic dataset's fingerprint): no training run is needed."""

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit_fast import evaluate, export, predict, recipes
from vit_fast.augment.pipeline import normalize
from vit_fast.checkpoint import save_checkpoint
from vit_fast.config import ViTConfig
from vit_fast.datasets import channel_stats, fingerprint, load_split
from vit_fast.model import ViTClassifier

# Stochastic depth and dropout on, as the recipes train: the exports are of the eval-mode model.
CFG = ViTConfig(dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5, drop_path=0.1, dropout=0.1)
SPLIT = {"image_size": 32, "synthetic_size": 64, "synthetic_classes": 5, "seed": 3}


def random_state(seed: int) -> dict:
    """A model state with weights large enough that logits differ by whole units: a comparison of
    logits then has teeth (timm's initialisation gives logits near zero)."""
    torch.manual_seed(seed)
    model = ViTClassifier(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.state_dict()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(checkpoint with EMA weights, checkpoint without), written by save_checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    train, test = (load_split("synthetic", root / "data", t, **SPLIT) for t in (True, False))
    mean, std = channel_stats(train.images)
    recipe = recipes.get_recipe("fast")
    state = {"config": CFG.to_dict(), "model": random_state(0), "ema": random_state(1), "epoch": 3, "step": 12,
             "args": {"dataset": "synthetic", "epochs": 20, "backend": "fused", **SPLIT},
             "data": {"dataset": "synthetic", "classes": list(train.classes), "mean": mean, "std": std,
                      "fingerprint": fingerprint("synthetic", train, test)},
             "recipe": recipe.to_dict(),
             "metrics": {"epoch": 3, "train_loss": 1.25, "val_loss": 1.5, "top1": 43.75, "top5": 100.0,
                         "ema_val_loss": 1.4, "ema_top1": 50.0, "ema_top5": 100.0},
             "kernels": {"attention": "ours"}}  # a --fused run's: the export still runs the torch math
    with_ema = save_checkpoint(state, root / "checkpoint.pt")
    without = save_checkpoint({k: v for k, v in state.items() if k != "ema"}, root / "no_ema.pt")
    return with_ema, without, state


def exported(ckpt_path, out, fmt, *extra):
    return export.main([str(ckpt_path), str(out), "--format", fmt, *extra])


def our_logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    model = ViTClassifier(CFG, backend="torch").eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_safetensors_loads_strictly_into_timm_with_the_same_logits(ckpts, tmp_path):
    timm = pytest.importorskip("timm", reason="timm is the loader this format is for (pip install timm)")
    st = pytest.importorskip("safetensors.torch", reason="pip install safetensors")
    ckpt_path, _, state = ckpts
    config = exported(ckpt_path, tmp_path / "out", "safetensors")
    on_disk = json.loads((tmp_path / "out" / "config.json").read_text())
    assert on_disk == json.loads(json.dumps(config))
    ours = on_disk["vit_fast"]
    assert {k: ours["config"][k] for k in ("image_size", "patch_size", "num_classes", "dim", "depth", "num_heads",
                                          "mlp_ratio")} == {"image_size": 32, "patch_size": 4, "num_classes": 5,
                                                            "dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    assert ours["classes"] == on_disk["label_names"] == state["data"]["classes"] and ours["weights"] == "raw"
    assert ours["preprocessing"]["mean"] == pytest.approx(state["data"]["mean"])
    assert ours["preprocessing"]["std"] == pytest.approx(state["data"]["std"])
    assert ours["preprocessing"]["input_size"] == [3, 32, 32]

    weights = st.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert weights.keys() == state["model"].keys()
    assert all(torch.equal(weights[k], v) and weights[k].dtype == v.dtype for k, v in state["model"].items())
    theirs = timm.models.VisionTransformer(**on_disk["model_args"]).eval()
    theirs.load_state_dict(weights, strict=True)
    x = images(4)
    want = our_logits(state["model"], x)
    with torch.no_grad():
        got = theirs(x)
    assert want.abs().max() > 1 and want.std() > 0.3  # logits far from zero: the comparison has teeth
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # timm's own loader reads the directory as a Hugging Face style model folder.
    hub = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hub(x), want, rtol=0, atol=1e-5)
    assert list(hub.pretrained_cfg["mean"]) == ours["preprocessing"]["mean"]
    assert list(hub.pretrained_cfg["input_size"]) == [3, 32, 32]


def test_torch_export_program_has_a_dynamic_batch_and_the_torch_math(ckpts, tmp_path):
    ckpt_path, _, state = ckpts
    exported(ckpt_path, tmp_path / "out", "torch-export")
    program = torch.export.load(tmp_path / "out" / "model.pt2")
    # Trained on --fused (the checkpoint's kernels entry), exported as PyTorch built-ins only.
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets and not [t for t in targets if "vit_fast" in t], targets
    for batch in (1, 5):
        x = images(batch, seed=batch)
        torch.testing.assert_close(program.module()(x), our_logits(state["model"], x), rtol=0, atol=1e-5)


def test_onnx_graph_matches_the_model_in_onnxruntime(ckpts, tmp_path):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason=f"the onnx format needs {module} (pip install -e '.[export]')")
    import onnx
    import onnxruntime

    ckpt_path, _, state = ckpts
    exported(ckpt_path, tmp_path / "out", "onnx", "--weights", "ema")
    path = tmp_path / "out" / "model.onnx"
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and out.name == "logits" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    for batch in (1, 6):
        x = images(batch, seed=10 + batch)
        (logits,) = session.run(None, {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), our_logits(state["ema"], x), rtol=0, atol=1e-5)


def test_ema_weights_are_first_class(ckpts, tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="pip install safetensors")
    ckpt_path, no_ema, state = ckpts
    config = exported(ckpt_path, tmp_path / "ema", "safetensors", "--weights", "ema")
    assert config["vit_fast"]["weights"] == "ema"
    weights = st.load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in state["ema"].items())
    assert "exponential moving average" in (tmp_path / "ema" / "README.md").read_text()

    # evaluate --weights ema scores the EMA model (its loss, recomputed here image by image).
    report = evaluate.main(["--checkpoint", str(ckpt_path), "--device", "cpu", "--weights", "ema"])
    raw = evaluate.main(["--checkpoint", str(ckpt_path), "--device", "cpu"])
    test = load_split("synthetic", "unused", False, **SPLIT)
    x = normalize(test.images, state["data"]["mean"], state["data"]["std"])
    for rep, key in ((report, "ema"), (raw, "model")):
        loss = torch.nn.functional.cross_entropy(our_logits(state[key], x), test.labels).item()
        assert rep["loss"] == pytest.approx(loss, rel=1e-5) and rep["weights"] == ("ema" if key == "ema" else "raw")

    # best.pt keeps whichever weights scored higher as its model; its "weights" entry says which.
    best = save_checkpoint({**{k: v for k, v in state.items() if k != "ema"}, "model": state["ema"], "weights": "ema"},
                           tmp_path / "best.pt")
    assert exported(best, tmp_path / "best", "safetensors")["vit_fast"]["weights"] == "ema"
    with pytest.raises(SystemExit, match=r"checkpoint .*best.pt holds only the EMA weights .*use --weights ema"):
        evaluate.main(["--checkpoint", str(best), "--device", "cpu", "--weights", "raw"])
    best_raw = save_checkpoint({**{k: v for k, v in state.items() if k != "ema"}, "weights": "raw"},
                               tmp_path / "best_raw.pt")
    with pytest.raises(SystemExit, match=r"checkpoint .*best_raw.pt holds only the raw weights .*use --weights raw"):
        exported(best_raw, tmp_path / "none", "safetensors", "--weights", "ema")

    # Asked of a checkpoint without them, every command names the checkpoint.
    message = r"checkpoint .*no_ema.pt has no EMA weights \(it was trained without --ema\)"
    with pytest.raises(SystemExit, match=message):
        exported(no_ema, tmp_path / "none", "safetensors", "--weights", "ema")
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--checkpoint", str(no_ema), "--device", "cpu", "--weights", "ema"])


def test_predict_from_an_export_gives_the_checkpoints_top5(ckpts, tmp_path):
    ckpt_path, _, _ = ckpts
    exported(ckpt_path, tmp_path / "out", "safetensors")
    test = load_split("synthetic", "unused", False, **SPLIT)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"img_{i}.png"))
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    from_ckpt = predict.main(["--checkpoint", str(ckpt_path), "--device", "cpu", *paths])
    # The checkpoint is not needed: the export alone, moved away from it.
    moved = tmp_path / "elsewhere"
    (tmp_path / "out").rename(moved)
    ckpt_path.rename(ckpt_path.with_suffix(".hidden"))
    try:
        from_export = predict.main(["--model", str(moved), "--device", "cpu", *paths])
    finally:
        ckpt_path.with_suffix(".hidden").rename(ckpt_path)
    assert [[n for n, _ in r["top"]] for r in from_export] == [[n for n, _ in r["top"]] for r in from_ckpt]
    assert all(len(r["top"]) == 5 for r in from_export)
    for a, b in zip(from_export, from_ckpt):
        np.testing.assert_allclose([p for _, p in a["top"]], [p for _, p in b["top"]], rtol=1e-6, atol=1e-7)
    with pytest.raises(SystemExit, match=r"--weights applies to --checkpoint"):
        predict.main(["--model", str(moved), "--weights", "ema", *paths])


def test_model_card_names_what_a_reader_needs(ckpts, tmp_path):
    pytest.importorskip("timm", reason="the card's first snippet loads the export into timm")
    ckpt_path, _, state = ckpts
    exported(ckpt_path, tmp_path / "st", "safetensors")
    card = (tmp_path / "st" / "README.md").read_text()
    fp = state["data"]["fingerprint"]
    for needle in ("Vision Transformer", "width 32", "2 pre-LN blocks of 2 heads", "recipe `fast`", "3 of 20 epochs",
                   "dataset `synthetic`", fp["train_sha256"], fp["test_sha256"], "top-1 43.75%", "top-1 50.00%",
                   "(B, 3, 32, 32)", f"{state['data']['mean']}", "timm.models.VisionTransformer",
                   "local-dir:OUT", "python -m vit_fast.predict --model OUT"):
        assert needle in card, needle
    n_params = sum(v.numel() for v in state["model"].values())
    assert f"{n_params:,} parameters" in card
    # The card's timm snippet runs as written (OUT replaced by the directory).
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("OUT", str(tmp_path / "st"))
    scope = {}
    exec(snippet, scope)  # noqa: S102 - our own generated text
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](x), our_logits(state["model"], x), rtol=0, atol=1e-5)

    pytest.importorskip("onnxruntime", reason="the ONNX card's snippet runs in onnxruntime")
    pytest.importorskip("onnxscript", reason="the onnx format needs onnxscript")
    exported(ckpt_path, tmp_path / "ox", "onnx")
    card = (tmp_path / "ox" / "README.md").read_text()
    assert "onnxruntime.InferenceSession" in card and "opset" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("OUT", str(tmp_path / "ox"))
    scope = {"images": images(3).numpy()}
    exec(snippet, scope)  # noqa: S102
    torch.testing.assert_close(torch.from_numpy(scope["logits"]), our_logits(state["model"], images(3)),
                               rtol=0, atol=1e-5)


def test_errors_are_clear(ckpts, tmp_path, monkeypatch, capsys):
    ckpt_path, _, _ = ckpts
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    with pytest.raises(SystemExit, match=r"checkpoint .*notes.pt is corrupt or not a torch checkpoint"):
        exported(tmp_path / "notes.pt", tmp_path / "a", "safetensors")
    with pytest.raises(SystemExit, match=r"checkpoint .*missing.pt does not exist"):
        exported(tmp_path / "missing.pt", tmp_path / "a", "safetensors")
    assert not (tmp_path / "a").exists()

    with pytest.raises(SystemExit) as err:
        exported(ckpt_path, tmp_path / "a", "tflite")
    assert err.value.code == 2 and "--format 'tflite' is not an export format; choose one of safetensors, " \
        "torch-export, onnx" in capsys.readouterr().err

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"taken already exists; choose a new directory or pass --overwrite"):
        exported(ckpt_path, tmp_path / "taken", "torch-export")
    with pytest.raises(SystemExit, match=r"taken is not an export of vit_fast .* remove it yourself"):
        exported(ckpt_path, tmp_path / "taken", "torch-export", "--overwrite")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"
    # --overwrite replaces an earlier export, whole: no file of the old format is left behind.
    exported(ckpt_path, tmp_path / "again", "torch-export")
    exported(ckpt_path, tmp_path / "again", "safetensors", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    exported(ckpt_path, tmp_path / "pt2", "torch-export")
    with pytest.raises(SystemExit, match=r"pt2 holds a torch-export export, without model.safetensors"):
        predict.main(["--model", str(tmp_path / "pt2"), str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match=r"\S+notes.pt is a file; expected an export directory"):
        predict.main(["--model", str(tmp_path / "notes.pt"), str(tmp_path / "x.png")])

    # A missing optional package is named with its install command (None in sys.modules: not importable).
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(SystemExit, match=r"--format safetensors needs the Python package 'safetensors'.*"
                                         r"install it with: pip install safetensors"):
        exported(ckpt_path, tmp_path / "b", "safetensors")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(SystemExit, match=r"needs the Python package 'onnxscript'.*pip install onnxscript"):
        exported(ckpt_path, tmp_path / "b", "onnx")
    assert not (tmp_path / "b").exists()


def test_export_cli(ckpts, tmp_path):
    ckpt_path, _, _ = ckpts
    proc = subprocess.run([sys.executable, "-m", "vit_fast.export", str(ckpt_path), str(tmp_path / "out"),
                           "--format", "safetensors"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors (raw weights, epoch 3)" in proc.stdout and "max |logit difference| 0" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "vit_fast.export", str(ckpt_path), str(tmp_path / "out"),
                           "--format", "safetensors"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_the_readme_export_commands_run_as_shown(ckpts, tmp_path, monkeypatch):
    """The python commands of the README's Export section, verbatim, where a default training run left
    its checkpoint (runs/vit/checkpoint.pt) and beside an image cat.jpg."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Export\n\n```bash\n(.*?)```", readme, re.S).group(1)
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("python -m vit_fast.")]
    assert [c[2] for c in commands] == ["vit_fast.export", "vit_fast.export", "vit_fast.predict"], commands
    ckpt_path, _, _ = ckpts
    (tmp_path / "runs" / "vit").mkdir(parents=True)
    shutil.copy(ckpt_path, tmp_path / "runs" / "vit" / "checkpoint.pt")
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    mains = {"vit_fast.export": export.main, "vit_fast.predict": predict.main}
    for argv in commands:
        if "onnx" in argv and any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript")):
            continue  # the ONNX case of test_onnx_graph_matches_the_model_in_onnxruntime says why it skips
        mains[argv[2]](argv[3:])
    assert (tmp_path / "export" / "vit" / "model.safetensors").is_file()


def test_a_trained_ema_checkpoint_evaluates_and_exports_its_ema_weights(tmp_path):
    """A real --ema run (one epoch of a tiny model, a few seconds): evaluate --weights ema gives the
    run's own EMA figures, and the export holds the checkpoint's EMA tensors."""
    from vit_fast import train as train_mod
    from vit_fast.checkpoint import load_checkpoint

    st = pytest.importorskip("safetensors.torch", reason="pip install safetensors")
    train_mod.train(train_mod.parse_args([
        "--dataset", "synthetic", "--synthetic-size", "128", "--synthetic-classes", "3", "--dim", "16", "--heads", "2",
        "--depth", "1", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "1", "--recipe", "basic",
        "--ema", "0.5", "--device", "cpu", "--seed", "2", "--out-dir", str(tmp_path / "run")]))
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    report = evaluate.main(["--checkpoint", str(ckpt_path), "--device", "cpu", "--weights", "ema"])
    assert report["weights"] == "ema" and report["top1"] == ckpt["metrics"]["ema_top1"]
    assert report["loss"] == pytest.approx(ckpt["metrics"]["ema_val_loss"], rel=1e-6)
    exported(ckpt_path, tmp_path / "out", "safetensors", "--weights", "ema")
    weights = st.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert weights.keys() == ckpt["ema"].keys() and all(torch.equal(weights[k], v) for k, v in ckpt["ema"].items())
    assert not all(torch.equal(ckpt["ema"][k], v) for k, v in ckpt["model"].items())  # not the raw weights
    card = (tmp_path / "out" / "README.md").read_text()
    assert "recipe `basic`, 1 of 1 epochs" in card and f"top-1 {ckpt['metrics']['ema_top1']:.2f}%" in card


def test_timm_model_args_cover_the_tanh_gelu():
    """config.json's model_args for a model with the tanh GELU (act_layer "gelu_tanh") build a timm
    model that computes our logits."""
    timm = pytest.importorskip("timm", reason="timm is the loader model_args are for (pip install timm)")
    cfg = CFG.replace(gelu_approximate="tanh")
    torch.manual_seed(4)
    ours = ViTClassifier(cfg, backend="torch").eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.3 * torch.randn_like(p))
    theirs = timm.models.VisionTransformer(**json.loads(json.dumps(export.timm_model_args(cfg)))).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = images(3)
    with torch.no_grad():
        want = ours(x)
        assert want.abs().max() > 1
        torch.testing.assert_close(theirs(x), want, rtol=0, atol=1e-5)
        # The exact GELU's model_args build a model that differs from this one: the argument matters.
        exact = timm.models.VisionTransformer(**export.timm_model_args(CFG)).eval()
        exact.load_state_dict(ours.state_dict(), strict=True)
        assert (exact(x) - want).abs().max() > 1e-5
