"""Classify image files with a trained checkpoint.

    python -m vit_fast.predict --checkpoint runs/vit/checkpoint.pt cat.jpg truck.png
    python -m vit_fast.predict --model export/vit cat.jpg       # a safetensors export (vit_fast.export)

Any file Pillow reads (PNG, JPEG, ...) is converted to RGB, resized to the model's image size
(the whole image, squashed to a square: CIFAR images are whole scenes, so nothing is cropped
away) and normalised with the mean and std of the checkpoint's training set (an export's config.json
holds them, with the class names, so the training checkpoint is not needed); the five most
probable classes are printed with their probabilities. 16-bit images are scaled to 8 bits and
float images (values in [0, 1]) to 0..255; other pixel formats, damaged or truncated files,
directories and images of more than datasets.MAX_IMAGE_PIXELS pixels are refused with an error that
names the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .augment.pipeline import normalize
from .checkpoint import WEIGHTS, CheckpointError, load_model
from .cli import UsageError, errors_handled
from .datasets import ImageReadError, read_image
from .evaluate import checkpoint_data
from .runtime import check_backend_device, resolve_device


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """The image at ``path`` as uint8 (3, image_size, image_size) RGB (see datasets.read_image)."""
    from PIL import Image

    # Pillow's resize filters are antialiased, so a large photo is averaged, not aliased.
    rgb = read_image(path).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


@torch.no_grad()
def class_probabilities(model, images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Softmax probabilities (B, K) of uint8 images (B, 3, H, W) normalised with (mean, std)."""
    device = next(model.parameters()).device
    logits = model.eval()(normalize(images.to(device), mean, std))
    return logits.float().softmax(dim=1)


def predict_files(paths, checkpoint: str | Path | None, device: str = "auto", top_k: int = 5, backend: str = "torch",
                  model_dir: str | Path | None = None, weights: str | None = None) -> list[dict]:
    """[{"image", "top": [(class name, probability), ...]}] for each image file, best class first;
    the model comes from ``checkpoint`` (its ``weights``, see checkpoint.select_weights) or from
    the safetensors export in ``model_dir``."""
    dev = resolve_device(device)
    check_backend_device(backend, dev)
    if model_dir is not None:
        from .export import load_export

        model, config = load_export(model_dir, backend=backend)
        info = config["vit_fast"]["preprocessing"]
        classes = list(config["vit_fast"]["classes"])
    else:
        model, ckpt = load_model(checkpoint, backend=backend, weights=weights)
        info = checkpoint_data(ckpt, checkpoint)
        classes = list(info["classes"])
        if len(classes) != model.cfg.num_classes:
            raise CheckpointError(f"checkpoint {checkpoint} names {len(classes)} classes but its model predicts "
                                  f"{model.cfg.num_classes}")
    images = torch.stack([load_image(p, model.cfg.image_size) for p in paths])  # read all before computing
    probs = class_probabilities(model.to(dev), images, info["mean"], info["std"]).cpu()
    best = probs.topk(min(top_k, len(classes)), dim=1)
    return [{"image": str(path), "top": [(classes[i], p) for p, i in zip(values.tolist(), indices.tolist())]}
            for path, values, indices in zip(paths, best.values, best.indices)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m vit_fast.predict", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint.pt written by vit_fast.train")
    source.add_argument("--model", metavar="EXPORT_DIR", help="a safetensors export written by vit_fast.export")
    p.add_argument("--weights", choices=WEIGHTS, help="with --checkpoint: the trained weights or their moving "
                   "average (a run with --ema); default: the checkpoint's model entry")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, anything Pillow reads)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="torch", choices=("reference", "torch", "fused"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from .export import ExportError

    with errors_handled(FileNotFoundError, CheckpointError, ImageReadError, ExportError):  # a UsageError exits 2
        if args.top_k <= 0:
            raise UsageError(f"--top-k must be positive, got {args.top_k}")
        if args.model is not None and args.weights is not None:
            raise UsageError("--weights applies to --checkpoint; an export holds one set of weights")
        results = predict_files(args.images, args.checkpoint, args.device, args.top_k, args.backend,
                                model_dir=args.model, weights=args.weights)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"])
            for rank, (name, prob) in enumerate(r["top"], 1):
                print(f"  {rank}. {name:<24} {100 * prob:6.2f}%")
    return results


if __name__ == "__main__":
    main()
