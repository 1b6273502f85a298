"""Train a ViT on CIFAR-100 (or CIFAR-10, an image folder, a synthetic task).

    python -m vit_fast.train                      # vit-cifar on CIFAR-100, the published recipe
    python -m vit_fast.train --dataset synthetic --epochs 2 --preset vit-cifar --depth 2
    torchrun --nproc_per_node=4 -m vit_fast.train  # data parallel: --batch-size is the global batch

The default recipe follows the setup Lee et al. 2021 ("Vision Transformer for Small-Size
Datasets") report for their CIFAR ViT: AdamW (lr 1e-3, weight decay 0.05), batch 128, linear
warm-up then cosine decay, label smoothing 0.1, stochastic depth 0.1, 100 epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import distributed as dist_mod
from .checkpoint import RESUME_ENTRIES, CheckpointError, load_checkpoint, save_checkpoint
from .config import BACKENDS, PRESETS, get_preset
from .model import ViTClassifier
from .paths import check_output_dir

# Arguments that must not change when a run is resumed: the schedule and data order depend on them.
RECIPE_ARGS = (
    "dataset", "epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing",
    "mixup", "cutmix", "crop_padding", "no_flip", "clip_grad", "seed", "beta1", "beta2",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vit_fast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="vit-cifar", choices=sorted(PRESETS))
    m.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="reference: the math written out; torch: PyTorch built-ins; fused: our kernels")
    m.add_argument("--fused", action="store_true", help="shorthand for --backend fused (needs an NVIDIA GPU)")
    m.add_argument("--depth", type=int, help="override the preset's depth")
    m.add_argument("--dim", type=int, help="override the preset's width")
    m.add_argument("--heads", type=int, help="override the preset's number of heads")
    m.add_argument("--patch-size", type=int, help="override the preset's patch size (must divide the image size)")
    m.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="cifar100", choices=data_mod.DATASETS)
    d.add_argument("--data-dir", default="./data", help="where the dataset is (or is downloaded to)")
    d.add_argument("--no-download", action="store_true", help="never try to download a missing dataset")
    d.add_argument("--image-size", type=int, default=32, help="image folder and synthetic data are resized to this")
    d.add_argument("--synthetic-size", type=int, default=2048, help="training images of --dataset synthetic")
    d.add_argument("--synthetic-classes", type=int, default=10)
    d.add_argument("--crop-padding", type=int, default=4, help="random crop from the image padded by this (0 = off)")
    d.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    d.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(alpha, alpha); 0 = off")
    d.add_argument("--cutmix", type=float, default=0.0, help="cutmix Beta(alpha, alpha); 0 = off")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=100)
    o.add_argument("--batch-size", type=int, default=128,
                   help="global batch: under torchrun each of the N ranks takes batch-size / N images per step")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    o.add_argument("--warmup-epochs", type=float, default=10.0)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.999)
    o.add_argument("--label-smoothing", type=float, default=0.1)
    o.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 = off)")
    o.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out-dir", default="runs/vit", help="checkpoint.pt and metrics.jsonl go here")
    r.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    r.add_argument("--overwrite", action="store_true", help="start afresh even if OUT_DIR has a checkpoint")
    r.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many epochs in this invocation (time-sliced jobs; continue with --resume)")
    r.add_argument("--eval-batch-size", type=int, default=512, help="per rank")
    return p


def check_args(args: argparse.Namespace) -> None:
    def positive(name):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    for name in ("epochs", "batch_size", "lr", "eval_batch_size", "synthetic_size", "synthetic_classes",
                 "image_size", "depth", "dim", "heads", "patch_size", "stop_after"):
        positive(name)
    for name in ("min_lr", "weight_decay", "warmup_epochs", "clip_grad", "mixup", "cutmix", "crop_padding"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.label_smoothing < 1:
        raise SystemExit(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    check_output_dir(args.out_dir, "--out-dir")  # now, not when the first epoch's checkpoint is due


def check_backend_device(backend: str, device: torch.device) -> None:
    if backend == "fused" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            f"--fused runs our Triton and CUDA kernels, which need an NVIDIA GPU, but the device is {device}. "
            "Use --backend torch on this machine, or set TRITON_INTERPRET=1 to run the kernels in Triton's "
            "interpreter on the CPU (very slow; for debugging only)."
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def load_split(args, train: bool) -> data_mod.ImageDataset:
    """The training or the test split of ``args.dataset`` (the fields of the data argument group)."""
    if args.dataset in ("cifar100", "cifar10"):
        return data_mod.load_cifar(args.data_dir, args.dataset, train, not args.no_download)
    if args.dataset == "imagefolder":
        return data_mod.load_image_folder(args.data_dir, train, args.image_size)
    n, k, s = args.synthetic_size, args.synthetic_classes, args.image_size
    # One draw split in two, so that train and test share the class patterns.
    both = data_mod.synthetic(n + max(n // 4, 1), k, s, seed=args.seed)
    sl = slice(0, n) if train else slice(n, None)
    return data_mod.ImageDataset(both.images[sl], both.labels[sl], both.classes)


def load_data(args) -> tuple[data_mod.ImageDataset, data_mod.ImageDataset]:
    train_set = load_split(args, True)
    return train_set, data_mod.align_classes(load_split(args, False), train_set.classes,
                                             f"the test split of {args.dataset} in {args.data_dir}")


def per_rank_batch(global_batch: int, world: dist_mod.World) -> int:
    """The images each rank takes per step when ``global_batch`` is shared by ``world.size`` ranks."""
    if global_batch % world.size:
        raise SystemExit(
            f"--batch-size {global_batch} is the global batch and must be divisible by the number of "
            f"processes ({world.size}); use e.g. {max(1, round(global_batch / world.size)) * world.size}"
        )
    return global_batch // world.size


def model_config(args, num_classes: int, image_size: int):
    overrides = dict(num_classes=num_classes, image_size=image_size, drop_path=args.drop_path, dropout=args.dropout)
    for arg, field in (("depth", "depth"), ("dim", "dim"), ("heads", "num_heads"), ("patch_size", "patch_size")):
        if getattr(args, arg) is not None:
            overrides[field] = getattr(args, arg)
    try:
        return get_preset(args.preset, **overrides)
    except ValueError as err:
        raise SystemExit(f"invalid model configuration: {err}") from err


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, LayerNorm parameters, the class token and positional embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step ``s``: linear warm-up, then cosine to min_ratio."""
    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        t = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


@torch.no_grad()
def predict_topk(model, loader, device, amp: bool, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The model's k best classes (N, k) and the labels (N,) of every image of ``loader``, and
    the summed cross-entropy; the model is left in eval mode."""
    model.eval()
    loss_sum, tops, labels = 0.0, [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
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


def rng_state(device: torch.device | None = None) -> dict:
    """The random state to checkpoint. A data-parallel rank passes its GPU: reading every GPU's
    state (the single-process default) would open a CUDA context on each GPU from each rank."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif device is None and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)


def _progress(iterable, total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    # Quiet when stderr is not a terminal (CI logs, nohup): the per-epoch summary line remains.
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def train(args: argparse.Namespace) -> dict:
    """Run the training job described by ``args``; returns the last epoch's metrics.

    Started by torchrun, this process is one rank of a data-parallel job (see vit_fast.distributed);
    otherwise it trains alone, with no process group.
    """
    check_args(args)
    if args.fused:
        args.backend = "fused"
    world = dist_mod.world_from_env()
    device = dist_mod.device_for(world, args.device) if world.is_distributed else resolve_device(args.device)
    check_backend_device(args.backend, device)
    per_rank_batch(args.batch_size, world)
    dist_mod.init(world, device)
    try:
        metrics = _train(args, world, device)
        dist_mod.barrier(world)  # rank 0 has written its last checkpoint and plot
        return metrics
    finally:
        dist_mod.shutdown()


def _train(args: argparse.Namespace, world: dist_mod.World, device: torch.device) -> dict:
    log = print if world.is_main else (lambda *a, **k: None)
    out_dir = Path(args.out_dir)
    ckpt_path, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.jsonl"
    resume_state = None
    if args.resume:
        resume_state = load_checkpoint(ckpt_path, required=RESUME_ENTRIES)  # every rank reads it
        saved = resume_state["args"]
        changed = {k: (saved.get(k), getattr(args, k)) for k in RECIPE_ARGS if saved.get(k) != getattr(args, k)}
        if changed:
            raise SystemExit(f"--resume with a different recipe than {ckpt_path} was trained with "
                             f"(name: (checkpoint, now)): {changed}")
    elif ckpt_path.exists() and not args.overwrite:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, --overwrite to replace it, "
                         "or choose another --out-dir")

    torch.manual_seed(args.seed)
    train_set, test_set = load_data(args)
    fingerprint = data_mod.fingerprint(args.dataset, train_set, test_set)  # on the host, before .to(device)
    if resume_state is not None:
        check_resume_data(resume_state, fingerprint, ckpt_path, log)
    image_size = train_set.images.shape[-1]
    cfg = model_config(args, len(train_set.classes), image_size)
    if resume_state is not None and resume_state["config"] != cfg.to_dict():
        diff = {k: (v, cfg.to_dict()[k]) for k, v in resume_state["config"].items() if cfg.to_dict().get(k) != v}
        raise SystemExit(f"--resume: the model configuration differs from {ckpt_path} (checkpoint, now): {diff}")
    mean, std = data_mod.channel_stats(train_set.images)
    train_set, test_set = train_set.to(device), test_set.to(device)
    augment = data_mod.Augment(args.crop_padding, not args.no_flip, args.mixup, args.cutmix)
    shard = dict(rank=world.rank, world_size=world.size)
    train_loader = data_mod.DeviceLoader(train_set, per_rank_batch(args.batch_size, world), mean, std, train=True,
                                         augment=augment, seed=args.seed, **shard)
    test_loader = data_mod.DeviceLoader(test_set, args.eval_batch_size, mean, std, train=False, **shard)

    model = ViTClassifier(cfg, backend=args.backend).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(args.beta1, args.beta2))
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    factor = warmup_cosine(round(args.warmup_epochs * steps_per_epoch), total_steps, args.min_lr / args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if world.is_distributed:
        # Every rank built the same initial weights; from here on each rank draws its own
        # stochastic-depth and dropout masks, so it gets a generator of its own.
        torch.manual_seed(rank_seed(args.seed, world.rank))
    start_epoch, step = 0, 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start_epoch, step = resume_state["epoch"], resume_state["step"]
        _restore_rng(resume_state, world, device, args.seed, start_epoch, log)
        if world.is_main:
            _truncate_metrics(metrics_path, start_epoch, resume_state.get("metrics"), log)
    elif metrics_path.exists() and world.is_main:
        metrics_path.unlink()  # --overwrite, or a run that died before its first checkpoint
    trained = model
    if world.is_distributed:
        # DDP broadcasts rank 0's weights, then averages gradients over the ranks in backward
        # (NCCL or gloo all-reduce); the backend switch inside the model is untouched.
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(trained) if args.compile else trained
    amp = device.type == "cuda" and not args.no_amp
    n_params = sum(p.numel() for p in model.parameters())
    if world.is_distributed:
        backend = torch.distributed.get_backend()
        batch = (f"global batch {args.batch_size} = {world.size} ranks x {train_loader.batch_size} per rank "
                 f"({backend})")
    else:
        batch = f"batch {args.batch_size}"
    log(f"vit_fast: {args.preset} ({n_params / 1e6:.2f}M parameters, backend {args.backend}) on {device}, "
        f"{args.dataset}: {len(train_set)} train / {len(test_set)} test images, {batch}, peak lr {args.lr:.2e}, "
        f"{args.epochs} epochs of {steps_per_epoch} steps" + (f", resuming after epoch {start_epoch}" if start_epoch else ""))

    metrics = {}
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after is not None and epoch - start_epoch >= args.stop_after:
            log(f"stopping after {args.stop_after} epoch(s) as asked; continue with --resume")
            break
        model.train()
        train_loader.set_epoch(epoch)
        global_sizes = train_loader.global_batch_sizes()
        loss_sum, seen = torch.zeros((), device=device), 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        bar = _progress(train_loader, steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", enabled=world.is_main)
        for i, (x, y) in enumerate(bar):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            # DDP averages the ranks' gradients. Weighting each rank's mean loss by its share of the
            # global batch makes that average the gradient of the global batch's mean loss, as a
            # single process computes it (the factor is exactly 1 unless the last batch is uneven).
            scale = x.shape[0] * world.size / global_sizes[i] if world.is_distributed else 1.0
            optimizer.zero_grad(set_to_none=True)
            (loss * scale if scale != 1.0 else loss).backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.detach() * x.shape[0]
            seen += x.shape[0]
            if not bar.disable and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen * world.size / (time.perf_counter() - t0):.0f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        totals = torch.stack([loss_sum.double(), torch.tensor(seen, device=device, dtype=torch.float64)])
        train_loss, seen_all = dist_mod.all_reduce_sum(totals, world).tolist()
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": train_loss / seen_all,
                   "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen_all / elapsed, "epoch_time_s": elapsed,
                   **evaluate(model, test_loader, device, amp, world)}
        # A collective: every rank takes part, rank 0 saves them all.
        rng_ranks = dist_mod.all_gather_objects(rng_state(device if world.is_distributed else None), world)
        if world.is_main:
            state = {
                "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step, "rng": rng_ranks[0],
                "args": {k: v for k, v in vars(args).items()},
                "data": {"dataset": args.dataset, "classes": list(train_set.classes), "mean": mean, "std": std,
                         "fingerprint": fingerprint},
                "metrics": metrics,
            }
            if world.is_distributed:
                state["rng_ranks"] = rng_ranks
            save_checkpoint(state, ckpt_path)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        log(f"epoch {epoch + 1:3d}/{args.epochs}  loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}  "
            f"top1 {metrics['top1']:5.2f}%  top5 {metrics['top5']:5.2f}%  lr {metrics['lr']:.2e}  "
            f"{metrics['images_per_s']:.0f} img/s", flush=True)
    if world.is_main and metrics_path.exists():
        write_curves(metrics_path, out_dir / "curves.png")
    return metrics


def check_resume_data(ckpt: dict, fingerprint: dict, ckpt_path: Path, log=print) -> None:
    """``--resume`` continues only on the data the checkpoint was trained on: the schedule's step
    count, the data order and the metrics all depend on it (data.fingerprint)."""
    saved = ckpt["data"].get("fingerprint")
    if saved is None:
        # Written before fingerprints existed: refusing would strand every such run, so it goes on,
        # with the one data fact such a checkpoint records compared.
        log(f"warning: {ckpt_path} records no dataset fingerprint (it predates them), so a change in the data's "
            "content or size cannot be detected; only the class names are compared")
        saved = {**fingerprint, "classes": list(ckpt["data"].get("classes", []))}
    changes = data_mod.fingerprint_changes(saved, fingerprint)
    if changes:
        raise SystemExit(f"--resume with different data than {ckpt_path} was trained on: {'; '.join(changes)}. "
                         "Resume with the original data, or start a new run (--overwrite or another --out-dir)")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s torch generator in a data-parallel run."""
    return seed * 1_000_003 + rank + 1


def _restore_rng(ckpt: dict, world: dist_mod.World, device: torch.device, seed: int, epoch: int, log) -> None:
    """Each rank continues its own random stream when the world size is unchanged."""
    ranks = ckpt.get("rng_ranks")
    if not world.is_distributed:
        set_rng_state(ckpt["rng"])
    elif ranks is not None and len(ranks) == world.size:
        set_rng_state(ranks[world.rank], device)
    else:
        saved = len(ranks) if ranks is not None else 1
        torch.manual_seed(rank_seed(seed, world.rank) + 7919 * epoch)
        log(f"note: the checkpoint was written by {saved} process(es), this run has {world.size}: the data order "
            "and augmentation continue exactly, stochastic depth and dropout masks from fresh per-rank seeds")


def write_curves(metrics_path: Path, png: Path) -> None:
    """Plot the training curves; a failure here never fails the training run."""
    try:
        from .plots import plot_metrics

        plot_metrics(metrics_path, png)
    except Exception as err:  # noqa: BLE001 - a plot is a convenience, the checkpoint is what matters
        print(f"warning: could not plot the training curves to {png}: {type(err).__name__}: {err}", file=sys.stderr)


def _truncate_metrics(path: Path, epochs_done: int, last: dict | None = None, log=print) -> None:
    """Drop metric lines of epochs after the checkpoint (they will be recomputed).

    A crash while a line was appended leaves the file's last line cut short: that line is dropped
    and reported, and ``last`` (the checkpoint's own metrics, the line a crash right after saving
    loses) restores the checkpoint's epoch if it is missing. A damaged line anywhere else is not a
    crash's doing: it is an error naming the file and line, and the file is left as it is."""
    if not path.exists():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    kept: list[dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            epoch = record["epoch"]
            if not isinstance(epoch, int):
                raise TypeError(f"epoch {epoch!r} is not an integer")
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            if number == len(lines):
                log(f"note: the last line of {path} (line {number}) is cut short, as a crash while writing it "
                    "leaves it; dropped")
                continue
            raise SystemExit(f"error: {path} line {number} is not a metrics record ({type(err).__name__}: {err}); "
                             "repair or delete that line, then --resume again") from None
        if epoch <= epochs_done:
            kept.append(record)
    if last is not None and epochs_done not in {r["epoch"] for r in kept}:
        kept.append(last)
        log(f"note: {path} had no line for epoch {epochs_done}; restored it from the checkpoint")
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (data_mod.DatasetNotFoundError, data_mod.DatasetIntegrityError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
