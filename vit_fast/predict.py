"""Classify image files with a trained checkpoint.

    python -m vit_fast.predict --checkpoint runs/vit/checkpoint.pt cat.jpg truck.png

Any file Pillow reads (PNG, JPEG, ...) is converted to RGB, resized to the model's image size
(the whole image, squashed to a square: CIFAR images are whole scenes, so nothing is cropped
away) and normalised with the mean and std of the checkpoint's training set; the five most
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
from .checkpoint import CheckpointError, load_model
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


def predict_files(paths, checkpoint: str | Path, device: str = "auto", top_k: int = 5, backend: str = "torch") -> list[dict]:
    """[{"image", "top": [(class name, probability), ...]}] for each image file, best class first."""
    dev = resolve_device(device)
    check_backend_device(backend, dev)
    model, ckpt = load_model(checkpoint, backend=backend)
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
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by vit_fast.train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, anything Pillow reads)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="torch", choices=("reference", "torch", "fused"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    with errors_handled(FileNotFoundError, CheckpointError, ImageReadError):  # a UsageError exits 2
        if args.top_k <= 0:
            raise UsageError(f"--top-k must be positive, got {args.top_k}")
        results = predict_files(args.images, args.checkpoint, args.device, args.top_k, args.backend)
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
