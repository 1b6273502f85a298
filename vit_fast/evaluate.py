"""Evaluate a checkpoint on the test split of its dataset.

    python -m vit_fast.evaluate --checkpoint runs/vit/checkpoint.pt
    python -m vit_fast.evaluate --checkpoint runs/vit/checkpoint.pt --json eval.json --device cpu
    python -m vit_fast.evaluate --checkpoint runs/vit/checkpoint.pt --weights ema   # a run with --ema

Reports top-1 and top-5 accuracy, the accuracy of every class and the class pairs the model
confuses most (true class predicted as another), as a table and optionally as JSON. The dataset
and its preparation come from the checkpoint: its name, the training arguments that define it
(so a synthetic checkpoint is evaluated on the very test split it was trained beside), the
class names and the normalisation statistics of its training set.

``predict_topk`` and ``evaluate`` are the evaluation the training loop runs after every epoch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import datasets
from . import distributed as dist_mod
from .checkpoint import WEIGHTS, CheckpointError, load_model
from .cli import UsageError, errors_handled
from .loader import DeviceLoader
from .paths import check_output_file
from .runtime import autocast, check_backend_device, resolve_device

# The training arguments that, with the dataset and its directory, define a split (datasets.load_split's options).
SPLIT_ARGS = ("image_size", "synthetic_size", "synthetic_classes", "seed", "cache_dir")


@torch.no_grad()
def predict_topk(model, loader, device, amp: bool, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The model's k best classes (N, k) and the labels (N,) of every image of ``loader``, and
    the summed cross-entropy; the model is left in eval mode."""
    model.eval()
    loss_sum, tops, labels = 0.0, [], []
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        tops.append(logits.topk(min(k, logits.shape[1]), dim=1).indices)
        labels.append(y)
    if not labels:  # a rank whose shard of a tiny test set is empty
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty.view(0, 1).expand(0, k), empty, 0.0
    return torch.cat(tops), torch.cat(labels), loss_sum


def evaluate(model, loader, device, amp: bool, world: dist_mod.World = dist_mod.World()) -> dict:
    """Loss, top-1 and top-5 (%) over the test set; under torchrun each rank evaluates its shard
    and the sums are all-reduced, so every rank returns the figures of the whole test set."""
    top, labels, loss_sum = predict_topk(model, loader, device, amp)
    sums = torch.tensor([loss_sum, (top[:, 0] == labels).sum().item(), (top == labels[:, None]).any(dim=1).sum().item(),
                         labels.numel()], dtype=torch.float64, device=device)
    loss_sum, top1, top5, n = dist_mod.all_reduce_sum(sums, world).tolist()
    return {"val_loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def checkpoint_data(ckpt: dict, path) -> dict:
    """The checkpoint's data entry (dataset, classes, mean, std), or a clear error."""
    info = ckpt.get("data")
    if not isinstance(info, dict) or not {"dataset", "classes", "mean", "std"} <= info.keys():
        raise CheckpointError(f"checkpoint {path} has no data entry with the dataset, class names, mean and std; "
                              "it was not written by vit_fast.train")
    return info


def split_options(ckpt: dict) -> dict:
    """datasets.load_split's options as the training run that wrote ``ckpt`` used them; an option its
    arguments lack keeps load_split's default, which is the training command's default."""
    saved = ckpt.get("args", {})
    return {key: saved[key] for key in SPLIT_ARGS if key in saved}


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def summarize(top: torch.Tensor, labels: torch.Tensor, loss_sum: float, classes: list[str], num_pairs: int = 10) -> dict:
    """Accuracy figures from the top-k predictions (N, k) and labels (N,)."""
    n, k = labels.numel(), len(classes)
    top, labels = top.cpu(), labels.cpu()
    conf = confusion_matrix(top[:, 0], labels, k)
    per_class_total = conf.sum(dim=1)
    per_class = {
        name: (100.0 * conf[i, i].item() / per_class_total[i].item() if per_class_total[i] else None)
        for i, name in enumerate(classes)
    }
    off = conf.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)
    pairs = []
    for count, f in zip(counts.tolist()[:num_pairs], flat.tolist()[:num_pairs]):
        if count == 0:
            break
        t, p = divmod(f, k)
        pairs.append({"true": classes[t], "predicted": classes[p], "count": count,
                      "percent_of_true": 100.0 * count / per_class_total[t].item()})
    return {
        "num_images": n,
        "loss": loss_sum / n,
        "top1": 100.0 * (top[:, 0] == labels).sum().item() / n,
        "top5": 100.0 * (top == labels[:, None]).any(dim=1).sum().item() / n,
        "per_class": per_class,
        "confused_pairs": pairs,
    }


def evaluate_checkpoint(
    path: str | Path, data_dir: str = "./data", dataset: str | None = None, device: str = "auto",
    batch_size: int = 512, backend: str = "torch", download: bool = True, num_pairs: int = 10,
    weights: str | None = None,
) -> dict:
    """Evaluate the checkpoint at ``path`` on its dataset's test split; returns the report dict.
    ``weights``: "raw", "ema" or None (the checkpoint's model entry), see checkpoint.select_weights."""
    dev = resolve_device(device)
    check_backend_device(backend, dev)
    model, ckpt = load_model(path, backend=backend, weights=weights)
    info = checkpoint_data(ckpt, path)
    dataset = dataset or info["dataset"]
    test_set = datasets.load_split(dataset, data_dir, False, download=download, **split_options(ckpt))
    cfg = model.cfg
    if len(test_set.classes) > cfg.num_classes:
        raise CheckpointError(f"{dataset} has {len(test_set.classes)} classes but the model in {path} "
                              f"predicts {cfg.num_classes}")
    try:  # the same rule as training's: the training classes or a subset, matched by name
        test_set = datasets.align_classes(test_set, list(info["classes"]), f"the {dataset} test split")
    except datasets.DatasetIntegrityError as err:
        raise CheckpointError(f"the class names of {dataset} differ from those {path} was trained on: "
                              f"{err}") from None
    shape = tuple(test_set.images.shape[1:])
    if shape != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise CheckpointError(f"{dataset} images are {shape} but the model in {path} expects "
                              f"{(cfg.in_channels, cfg.image_size, cfg.image_size)}")
    loader = DeviceLoader(test_set.to(dev), batch_size, info["mean"], info["std"], train=False)
    amp = dev.type == "cuda"
    top, labels, loss_sum = predict_topk(model.to(dev), loader, dev, amp)
    report = summarize(top, labels, loss_sum, test_set.classes, num_pairs)
    return {"checkpoint": str(path), "weights": ckpt["weights"], "dataset": dataset, "epoch": ckpt.get("epoch"),
            **report}


def format_report(report: dict, worst: int = 10) -> str:
    weights = " EMA weights" if report.get("weights") == "ema" else ""
    lines = [f"{report['checkpoint']}{weights} (epoch {report['epoch']}) on the {report['dataset']} test split, "
             f"{report['num_images']} images",
             f"  top-1 {report['top1']:6.2f}%   top-5 {report['top5']:6.2f}%   loss {report['loss']:.4f}", ""]
    scored = sorted(((acc, name) for name, acc in report["per_class"].items() if acc is not None))
    width = max([len("predicted as"), *(len(name) for name in report["per_class"])])
    lines.append(f"  {'class':<{width}}  top-1   (the {min(worst, len(scored))} weakest and strongest classes)")
    shown = scored if len(scored) <= 2 * worst else scored[:worst] + [None] + scored[-worst:]
    for row in shown:
        lines.append(f"  {'...':<{width}}" if row is None else f"  {row[1]:<{width}}  {row[0]:6.2f}%")
    if report["confused_pairs"]:
        lines += ["", f"  {'true class':<{width}}  {'predicted as':<{width}}  count  % of true class"]
        for p in report["confused_pairs"]:
            lines.append(f"  {p['true']:<{width}}  {p['predicted']:<{width}}  {p['count']:5d}  {p['percent_of_true']:6.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vit_fast.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by vit_fast.train")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--dataset", choices=datasets.DATASETS, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--no-download", action="store_true", help="never try to download a missing dataset")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="torch", choices=("reference", "torch", "fused"))
    p.add_argument("--weights", choices=WEIGHTS, help="the trained weights or their moving average (a run with "
                   "--ema); default: the checkpoint's model entry (raw; for best.pt, whichever it kept)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--pairs", type=int, default=10, help="how many confused class pairs to list")
    p.add_argument("--json", help="also write the report (with every class's accuracy) to this JSON file")
    args = p.parse_args(argv)
    # DatasetNotFoundError is a FileNotFoundError; a UsageError (e.g. an unknown --device) exits 2.
    with errors_handled(FileNotFoundError, CheckpointError, datasets.DatasetIntegrityError):
        if args.batch_size <= 0 or args.pairs < 0:
            raise UsageError(f"--batch-size must be positive and --pairs >= 0, got {args.batch_size} and {args.pairs}")
        resolve_device(args.device)  # an unknown device before anything is read
        if args.json:
            check_output_file(args.json, "--json")  # before the evaluation, not after it
        report = evaluate_checkpoint(args.checkpoint, args.data_dir, args.dataset, args.device, args.batch_size,
                                     args.backend, not args.no_download, args.pairs, args.weights)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
