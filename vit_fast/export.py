"""Export a trained checkpoint for inference outside this package.

    python -m vit_fast.export runs/vit/checkpoint.pt export/vit --format safetensors
    python -m vit_fast.export runs/vit/checkpoint.pt export/vit-onnx --format onnx --weights ema
    python -m vit_fast.export runs/vit/best.pt export/vit-pt2 --format torch-export --overwrite

Every format writes a directory OUT holding the model file, ``config.json`` and ``README.md``:

  safetensors    model.safetensors: the state dict under timm's ``VisionTransformer`` names, in the
                 dtype it was trained in; loads strictly into timm (see below) or ``--model`` of predict
  torch-export   model.pt2: a ``torch.export`` ExportedProgram with a dynamic batch (torch.export.load)
  onnx           model.onnx: an ONNX graph with a dynamic batch (torch.onnx's torch.export-based
                 exporter; needs onnx and onnxscript)

The graphs take normalised float32 images (B, C, H, W) and return logits (B, classes), as timm's
model does; the normalisation (mean, std, input size) is in ``config.json`` under "preprocessing".
What is exported is the torch backend's math (PyTorch built-ins only), whatever backend trained
the weights: the fused kernels need Triton and a GPU, which an inference runtime does not have.

``config.json`` is timm's Hugging Face layout (``architecture``, ``model_args``,
``pretrained_cfg``, ``label_names``), so ``timm.create_model("local-dir:OUT", pretrained=True)``
builds and loads a safetensors export; ``timm.models.VisionTransformer(**config["model_args"])``
takes the weights with ``strict=True``. Its "vit_fast" entry holds this package's ``ViTConfig``, the
class names and where the weights came from. ``README.md`` is a model card: the architecture, the
recipe and epochs, the dataset and its fingerprint, the final metrics, the input format and how to
load the export.

Before a directory is kept, the export reloads what it wrote and runs it on a random batch against
the model (the safetensors weights in a fresh model, the program with ``torch.export.load``, the
ONNX graph in onnxruntime when it is installed); the directory is built beside OUT and renamed onto
it, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from .checkpoint import WEIGHTS, CheckpointError, load_model
from .cli import UsageError, errors_handled
from .config import ViTConfig
from .evaluate import checkpoint_data

EXPORT_FORMAT = "vit_fast-export/1"
FORMATS = {"safetensors": "model.safetensors", "torch-export": "model.pt2", "onnx": "model.onnx"}
CONFIG_FILE, CARD_FILE = "config.json", "README.md"
ONNX_OPSET = 18  # pinned, so that an export does not change with torch.onnx's default
# The example batch the graphs are traced with (not 1: torch.export specialises a size of 1) and the
# batch they are checked on (another size, so a batch fixed by mistake fails the check).
TRACE_BATCH, CHECK_BATCH = 2, 3
# How far the reloaded program and the ONNX graph may be from the model on the check batch: the same
# math, in other kernels (onnxruntime's GEMMs sum in another order); logits are O(1) to O(10).
CHECK_ATOL = 1e-4


class ExportError(RuntimeError):
    pass


def require(module: str, purpose: str):
    """Import the optional ``module`` or stop with an error that names its pip install command."""
    package = module.split(".")[0]  # each optional module's pip name is its top-level package's
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExportError(f"{purpose} needs the Python package {package!r}, which is not installed ({err}); "
                          f"install it with: pip install {package} (or, in a checkout, everything the export "
                          "uses: pip install --no-build-isolation -e '.[export]')") from None


# ----------------------------------------------------------------------------- config and card

def timm_model_args(cfg: ViTConfig) -> dict:
    """Keyword arguments of ``timm.models.VisionTransformer`` that build our model: class-token
    pooling, learned positions over the class token too, no norm before the head, timm's
    LayerNorm eps of 1e-6 (another eps has no JSON form: see ``export_config``)."""
    args = {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_channels,
            "num_classes": cfg.num_classes, "embed_dim": cfg.dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
            "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias, "class_token": True, "global_pool": "token",
            "fc_norm": False, "no_embed_class": False, "pre_norm": False}
    if cfg.gelu_approximate == "tanh":
        args["act_layer"] = "gelu_tanh"
    return args


def export_config(ckpt: dict, path, cfg: ViTConfig, fmt: str) -> dict:
    """config.json: timm's layout plus our "vit_fast" entry (see the module docstring)."""
    info = checkpoint_data(ckpt, path)
    classes = list(info["classes"])
    if len(classes) != cfg.num_classes:
        raise CheckpointError(f"checkpoint {path} names {len(classes)} classes but its model predicts {cfg.num_classes}")
    input_size = [cfg.in_channels, cfg.image_size, cfg.image_size]
    preprocessing = {"input_size": input_size, "mean": [float(v) for v in info["mean"]],
                     "std": [float(v) for v in info["std"]], "pixel_range": "RGB divided by 255, in [0, 1]",
                     "resize": "the whole image to input_size, bicubic, no crop", "layout": "NCHW float32"}
    config = {
        # timm (Hugging Face hub layout; read by timm.create_model("local-dir:OUT"))
        "architecture": "vit_tiny_patch16_224",  # a registered timm ViT; model_args override all its sizes
        "num_classes": cfg.num_classes, "num_features": cfg.dim, "global_pool": "token",
        "model_args": timm_model_args(cfg),
        "pretrained_cfg": {"input_size": input_size, "fixed_input_size": True, "interpolation": "bicubic",
                           "crop_pct": 1.0, "crop_mode": "center", "mean": preprocessing["mean"],
                           "std": preprocessing["std"], "num_classes": cfg.num_classes,
                           "first_conv": "patch_embed.proj", "classifier": "head"},
        "label_names": classes,
        # ours
        "vit_fast": {"format": EXPORT_FORMAT, "export_format": fmt, "file": FORMATS[fmt], "config": cfg.to_dict(),
                     "classes": classes, "preprocessing": preprocessing, "weights": ckpt["weights"],
                     "checkpoint": str(path), "epoch": ckpt.get("epoch"), "step": ckpt.get("step"),
                     "epochs_planned": (ckpt.get("recipe") or {}).get("epochs", (ckpt.get("args") or {}).get("epochs")),
                     "dataset": info["dataset"], "fingerprint": info.get("fingerprint"),
                     "recipe": ckpt.get("recipe"), "metrics": ckpt.get("metrics")},
    }
    if cfg.layer_norm_eps != 1e-6:
        config["vit_fast"]["timm_note"] = (f"layer_norm_eps is {cfg.layer_norm_eps}, not timm's 1e-6: also pass "
                                           f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={cfg.layer_norm_eps})")
    return config


def _metrics_lines(metrics: dict | None, weights: str) -> list[str]:
    if not metrics:
        return ["- not recorded in the checkpoint"]
    lines = []
    for prefix, name in (("", "raw weights"), ("ema_", "EMA weights")):
        if f"{prefix}top1" in metrics:
            mark = " (the exported weights)" if (prefix == "ema_") == (weights == "ema") else ""
            lines.append(f"- {name}{mark}: top-1 {metrics[f'{prefix}top1']:.2f}%, top-5 {metrics[f'{prefix}top5']:.2f}%, "
                         f"loss {metrics[f'{prefix}val_loss']:.4f} on the test split")
    if "train_loss" in metrics:
        lines.append(f"- training loss of the last epoch: {metrics['train_loss']:.4f}")
    return lines or [f"- {json.dumps(metrics)}"]


# How each format loads, for the model card: a sentence, a runnable snippet (OUT: the export
# directory; ``images`` the normalised input) and, for the cards of the other formats, the load in short.
_LOADING = {"safetensors": "With timm (`pip install timm safetensors`), or with vit_fast "
                           "(`python -m vit_fast.predict --model OUT image.jpg`):",
            "torch-export": "With PyTorch alone, any batch size:",
            "onnx": f"With ONNX Runtime (`pip install onnxruntime`), opset {ONNX_OPSET}, any batch size; the input is "
                    "named `images`, the output `logits`:"}
_SNIPPETS = {
    "safetensors": "import json, timm, safetensors.torch\n"
                   "config = json.load(open('OUT/config.json'))\n"
                   "model = timm.models.VisionTransformer(**config['model_args']).eval()\n"
                   "model.load_state_dict(safetensors.torch.load_file('OUT/model.safetensors'), strict=True)\n"
                   "# or: model = timm.create_model('local-dir:OUT', pretrained=True).eval()",
    "torch-export": "import torch\n"
                    "program = torch.export.load('OUT/model.pt2')\n"
                    "logits = program.module()(images)  # images: float32 tensor (B, {c}, {h}, {w}), normalised",
    "onnx": "import onnxruntime\n"
            "session = onnxruntime.InferenceSession('OUT/model.onnx')\n"
            "logits, = session.run(None, {{'images': images}})  # images: float32 numpy (B, {c}, {h}, {w}), normalised",
}
_IN_SHORT = {"safetensors": ("timm", "timm.create_model('local-dir:OUT', pretrained=True)"),
             "torch-export": ("PyTorch alone", "torch.export.load('OUT/model.pt2').module()"),
             "onnx": ("ONNX Runtime", "onnxruntime.InferenceSession('OUT/model.onnx')")}


def model_card(config: dict) -> str:
    """README.md of an export, from its config.json."""
    ours = config["vit_fast"]
    cfg, pre, fmt = ViTConfig.from_dict(ours["config"]), ours["preprocessing"], ours["export_format"]
    params = sum(v for v in _parameter_counts(cfg).values())
    recipe = ours.get("recipe") or {}
    planned = ours.get("epochs_planned")
    fingerprint = ours.get("fingerprint") or {}
    classes = ours["classes"]
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    c, h, w = pre["input_size"]
    lines = [
        f"# ViT ({cfg.num_classes} classes, {cfg.image_size}x{cfg.image_size}), exported by vit_fast", "",
        f"`{ours['file']}` ({fmt}) holds the {'exponential moving average (EMA) of the' if ours['weights'] == 'ema' else 'raw'} "
        f"weights of `{ours['checkpoint']}` after epoch {ours['epoch']}"
        + (f" (step {ours['step']})." if ours.get("step") is not None else "."),
        "`config.json` holds the same facts for programs.", "",
        "## Architecture", "",
        f"A Vision Transformer (Dosovitskiy et al. 2021) in timm's `VisionTransformer` layout: {cfg.patch_size}x"
        f"{cfg.patch_size} patches ({cfg.num_patches} patches + a class token = {cfg.num_tokens} tokens), width "
        f"{cfg.dim}, {cfg.depth} pre-LN block{'s' if cfg.depth > 1 else ''} of {cfg.num_heads} heads, MLP hidden width {cfg.mlp_hidden} "
        f"({'tanh-approximated' if cfg.gelu_approximate == 'tanh' else 'exact'} GELU), LayerNorm eps "
        f"{cfg.layer_norm_eps:g}, qkv bias {'on' if cfg.qkv_bias else 'off'}; the class token's final "
        f"normalised state goes through a linear head. {params:,} parameters.", "",
        "## Training", "",
        f"- recipe `{recipe.get('name', 'not recorded')}`, {ours['epoch']} of {planned if planned else '?'} "
        "epochs" + (f": batch {recipe.get('batch_size')}, lr {recipe.get('lr')}, weight decay "
                    f"{recipe.get('weight_decay')}, label smoothing {recipe.get('label_smoothing')}, drop path "
                    f"{recipe.get('drop_path')}, EMA decay {recipe.get('ema')}" if recipe else ""),
        f"- full recipe: the `recipe` entry of config.json's `vit_fast`" if recipe else "- the checkpoint records no recipe",
        "", "## Data", "",
        f"- dataset `{ours['dataset']}`; classes: {shown}",
    ]
    if fingerprint:
        lines += [f"- fingerprint: {fingerprint.get('train_count')} training and {fingerprint.get('test_count')} test "
                  f"images; SHA-256 of the training split `{fingerprint.get('train_sha256')}`, of the test split "
                  f"`{fingerprint.get('test_sha256')}`"]
    else:
        lines += ["- fingerprint: not recorded (a checkpoint older than dataset fingerprints)"]
    lines += ["", "## Final metrics", "", *_metrics_lines(ours.get("metrics"), ours["weights"]), "",
              "## Input", "",
              f"float32 images (B, {c}, {h}, {w}), RGB, pixel values divided by 255 and then normalised per channel "
              f"with mean {pre['mean']} and std {pre['std']}: x = (rgb / 255 - mean) / std. Resize the whole image "
              f"to {h}x{w} (bicubic, no crop). The output is logits (B, {cfg.num_classes}); softmax gives the "
              "probabilities, in the order of `label_names` in config.json.", "",
              "## Loading", "", f"`OUT` below is this directory. {_LOADING[fmt]}", "", "```python",
              *_SNIPPETS[fmt].format(c=c, h=h, w=w).splitlines(), "```", ""]
    if fmt == "safetensors" and "timm_note" in ours:
        lines += [f"Note: {ours['timm_note']}.", ""]
    lines += ["Other runtimes take another export of the same checkpoint "
              "(`python -m vit_fast.export CHECKPOINT OUT --format FORMAT`):", ""]
    lines += [f"- {_IN_SHORT[other][0]}: `--format {other}`, then `{_IN_SHORT[other][1]}`" for other in FORMATS
              if other != fmt]
    lines.append("")
    return "\n".join(lines)


def _parameter_counts(cfg: ViTConfig) -> dict:
    """Parameters per part, counted from the configuration (no model built)."""
    d, p, c = cfg.dim, cfg.patch_size, cfg.in_channels
    block = 2 * 2 * d + (3 * d * d + (3 * d if cfg.qkv_bias else 0)) + (d * d + d) \
        + (d * cfg.mlp_hidden + cfg.mlp_hidden) + (cfg.mlp_hidden * d + d)
    return {"patch_embed": c * p * p * d + d, "tokens": d + cfg.num_tokens * d, "blocks": cfg.depth * block,
            "head": 2 * d + d * cfg.num_classes + cfg.num_classes}


# ----------------------------------------------------------------------------- writers and checks

def _check_batch(cfg: ViTConfig, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> float:
    diff = (got.float() - want.float()).abs().max().item()
    if not diff <= atol:
        raise ExportError(f"the exported {name} computes logits up to {diff:.3g} away from the model's (allowed "
                          f"{atol:g}); nothing was written")
    return diff


def write_safetensors(state: dict, model, directory: Path) -> float:
    """model.safetensors, reloaded into a fresh model and run on the check batch (exact)."""
    st = require("safetensors.torch", "--format safetensors")
    path = directory / FORMATS["safetensors"]
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    st.save_file(tensors, str(path), metadata={"format": "pt", "vit_fast": EXPORT_FORMAT})
    fresh = _fresh_model(model.cfg, st.load_file(str(path)), path)
    x = _check_batch(model.cfg, CHECK_BATCH)
    with torch.no_grad():
        return _compare(path.name, fresh(x), model(x), 0.0)


def _trace(model) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (_check_batch(model.cfg, TRACE_BATCH),), dynamic_shapes=({0: batch},))


def write_torch_export(model, directory: Path) -> float:
    """model.pt2, reloaded with torch.export.load and run on the check batch."""
    path = directory / FORMATS["torch-export"]
    torch.export.save(_trace(model), path)
    x = _check_batch(model.cfg, CHECK_BATCH)
    with torch.no_grad():
        return _compare(path.name, torch.export.load(path).module()(x), model(x), CHECK_ATOL)


def write_onnx(model, directory: Path) -> float | None:
    """model.onnx with a dynamic batch, run in onnxruntime on the check batch when it is installed
    (None otherwise)."""
    require("onnx", "--format onnx")
    require("onnxscript", "--format onnx (torch.onnx's exporter)")
    path = directory / FORMATS["onnx"]
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes on torch internals
        program = torch.onnx.export(model, (_check_batch(model.cfg, TRACE_BATCH),), dynamo=True, verbose=False,
                                    input_names=["images"], output_names=["logits"], opset_version=ONNX_OPSET,
                                    dynamic_shapes=({0: batch},), external_data=False)
    program.save(str(path), external_data=False)
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return None
    x = _check_batch(model.cfg, CHECK_BATCH)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        return _compare(path.name, torch.from_numpy(logits), model(x), CHECK_ATOL)


def _fresh_model(cfg: ViTConfig, state: dict, path, backend: str = "torch"):
    from .model import ViTClassifier

    model = ViTClassifier(cfg, backend=backend)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{path} does not match the model of its config.json: {err}") from None
    return model.eval()


# ----------------------------------------------------------------------------- the export

def check_out(out: str | Path, overwrite: bool) -> Path:
    """OUT as a path the export may (re)place: absent, or with ``overwrite`` an earlier export or an
    empty directory; anything else is refused, so --overwrite never deletes foreign files."""
    out = Path(out)
    if not out.exists():
        return out
    if not overwrite:
        raise ExportError(f"{out} already exists; choose a new directory or pass --overwrite to replace it")
    if not out.is_dir():
        raise ExportError(f"{out} is a file; expected a directory to write the export into")
    marker = out / CONFIG_FILE
    try:
        is_export = json.loads(marker.read_text()).get("vit_fast", {}).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        is_export = False
    if not is_export and any(out.iterdir()):
        raise ExportError(f"{out} is not an export of vit_fast (no {CONFIG_FILE} of ours) and not empty; "
                          "--overwrite replaces only an earlier export, so remove it yourself if it should go")
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str, weights: str | None = None,
                      overwrite: bool = False, log=print) -> dict:
    """Export ``checkpoint`` to the directory ``out`` in ``fmt`` (a key of FORMATS); returns its config."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = check_out(out, overwrite)
    if fmt == "safetensors":  # the optional packages before the checkpoint is read
        require("safetensors.torch", "--format safetensors")
    elif fmt == "onnx":
        require("onnx", "--format onnx")
        require("onnxscript", "--format onnx (torch.onnx's exporter)")
    model, ckpt = load_model(checkpoint, backend="torch", weights=weights)  # the portable math, on the CPU
    model.requires_grad_(False)
    config = export_config(ckpt, checkpoint, model.cfg, fmt)
    state = ckpt["model"]  # the weights chosen, as stored: their training dtype kept

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "safetensors":
            diff = write_safetensors(state, model, tmp)
        elif fmt == "torch-export":
            diff = write_torch_export(model, tmp)
        else:
            diff = write_onnx(model, tmp)
        config["vit_fast"]["check"] = {"batch": CHECK_BATCH, "max_abs_logit_diff": diff,
                                       "against": "the checkpoint's model on the torch backend"}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(config))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    checked = "not run (onnxruntime is not installed)" if diff is None else f"max |logit difference| {diff:.2g}"
    log(f"wrote {out / FORMATS[fmt]} ({ckpt['weights']} weights, epoch {ckpt.get('epoch')}), {CONFIG_FILE} and "
        f"{CARD_FILE}; check on a batch of {CHECK_BATCH}: {checked}")
    return config


def load_export(out: str | Path, backend: str = "torch"):
    """(model in eval mode, config.json) of a safetensors export in the directory ``out``."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"export directory {out} does not exist" if not out.exists()
                                else f"{out} is a file; expected an export directory written by vit_fast.export")
    try:
        config = json.loads((out / CONFIG_FILE).read_text())
        ours = config["vit_fast"]
        if ours.get("format") != EXPORT_FORMAT:
            raise KeyError("format")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ExportError(f"{out} is not an export of vit_fast: no readable {CONFIG_FILE} with a 'vit_fast' entry "
                          f"of format {EXPORT_FORMAT!r}") from None
    weights = out / FORMATS["safetensors"]
    if not weights.is_file():
        raise ExportError(f"{out} holds a {ours.get('export_format')} export, without {weights.name}; predict reads "
                          "the safetensors export (python -m vit_fast.export CHECKPOINT OUT --format safetensors)")
    st = require("safetensors.torch", "reading a safetensors export")
    try:
        cfg = ViTConfig.from_dict(ours["config"])
        state = st.load_file(str(weights))
    except (TypeError, ValueError, OSError) as err:
        raise ExportError(f"export {out} does not read: {err}") from None
    if len(ours.get("classes", [])) != cfg.num_classes:
        raise ExportError(f"export {out} names {len(ours.get('classes', []))} classes but its model predicts "
                          f"{cfg.num_classes}")
    return _fresh_model(cfg, state, weights, backend), config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vit_fast.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt or best.pt written by vit_fast.train")
    p.add_argument("out", metavar="OUT", help="the directory to write (refused if it exists, unless --overwrite)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--weights", choices=WEIGHTS, help="the trained weights or their moving average (a run with "
                   "--ema); default: the checkpoint's model entry (raw; for best.pt, whichever it kept)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier export")
    args = p.parse_args(argv)
    with errors_handled(FileNotFoundError, CheckpointError, ExportError):
        if args.format not in FORMATS:
            raise UsageError(f"--format {args.format!r} is not an export format; choose one of {', '.join(FORMATS)}")
        return export_checkpoint(args.checkpoint, args.out, args.format, args.weights, args.overwrite)


if __name__ == "__main__":
    main()
