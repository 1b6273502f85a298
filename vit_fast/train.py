"""Train a ViT on CIFAR-100 (or CIFAR-10, an image folder, a synthetic task).

    python -m vit_fast.train                      # vit-cifar on CIFAR-100, the published recipe
    python -m vit_fast.train --dataset synthetic --epochs 2 --preset vit-cifar --depth 2
    python -m vit_fast.train --recipe fast --ema 0.999 --keep-best
    torchrun --nproc_per_node=4 -m vit_fast.train  # data parallel: --batch-size is the global batch

The default recipe (``--recipe lee2021``, vit_fast.recipes) is the setup Lee et al. 2021 ("Vision
Transformer for Small-Size Datasets") published for their CIFAR ViT: AutoAugment, repeated
augmentation, random erasing, mixup/cutmix, label smoothing, stochastic depth, AdamW (lr 1e-3,
weight decay 0.05) at batch 128, 10 warm-up epochs then cosine decay, 100 epochs. Any recipe flag
given on the command line overrides the preset's value.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import data as data_mod
from . import distributed as dist_mod
from . import recipes
from .checkpoint import load_checkpoint, save_checkpoint
from .config import BACKENDS, PRESETS, ViTConfig, get_preset
from .ema import EMA
from .evaluate import evaluate
from .model import ViTClassifier
from .runtime import autocast, check_backend_device, rank_seed, resolve_device, restore_rng, rng_state, synchronize

CHECKPOINT_FILE, METRICS_FILE, BEST_FILE = "checkpoint.pt", "metrics.jsonl", "best.pt"

# Arguments that must not change when a run is resumed: the resolved recipe (the schedule, the
# augmentation and the data order depend on it), the dataset and the seed.
RECIPE_ARGS = ("dataset", "seed", *recipes.FIELDS)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: a recipe flag's help lists the presets' values instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _recipe_flag(group, flag: str, help: str = "", **kw) -> None:
    field = flag.lstrip("-").replace("-", "_")
    group.add_argument(flag, default=None, help=f"{help} {recipes.preset_help(field)}".strip(), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vit_fast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    recipes.add_recipe_argument(p)
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="vit-cifar", choices=sorted(PRESETS))
    m.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="reference: the math written out; torch: PyTorch built-ins; fused: our kernels")
    m.add_argument("--fused", action="store_true", help="shorthand for --backend fused (needs an NVIDIA GPU)")
    m.add_argument("--depth", type=int, help="override the preset's depth")
    m.add_argument("--dim", type=int, help="override the preset's width")
    m.add_argument("--heads", type=int, help="override the preset's number of heads")
    m.add_argument("--patch-size", type=int, help="override the preset's patch size (must divide the image size)")
    _recipe_flag(m, "--drop-path", "stochastic depth rate of the last block", type=float)
    _recipe_flag(m, "--dropout", type=float)
    m.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="cifar100", choices=data_mod.DATASETS)
    d.add_argument("--data-dir", default="./data", help="where the dataset is (or is downloaded to)")
    d.add_argument("--no-download", action="store_true", help="never try to download a missing dataset")
    d.add_argument("--image-size", type=int, default=32, help="image folder and synthetic data are resized to this")
    d.add_argument("--synthetic-size", type=int, default=2048, help="training images of --dataset synthetic")
    d.add_argument("--synthetic-classes", type=int, default=10)
    recipes.add_augment_arguments(p.add_argument_group("augmentation (recipe)"))
    o = p.add_argument_group("optimisation (recipe)")
    _recipe_flag(o, "--epochs", type=int)
    _recipe_flag(o, "--batch-size", "global batch: under torchrun each of the N ranks takes batch-size / N images "
                 "per step", type=int)
    _recipe_flag(o, "--lr", "peak learning rate", type=float)
    _recipe_flag(o, "--min-lr", "learning rate at the end of the cosine", type=float)
    _recipe_flag(o, "--warmup-epochs", type=float)
    _recipe_flag(o, "--weight-decay", type=float)
    _recipe_flag(o, "--beta1", type=float)
    _recipe_flag(o, "--beta2", type=float)
    _recipe_flag(o, "--clip-grad", "max gradient norm (0 = off)", type=float)
    _recipe_flag(o, "--ema", "keep an exponential moving average of the weights with this decay, evaluated "
                 "and checkpointed beside them (0 = off)", type=float)
    o.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out-dir", default="runs/vit", help="checkpoint.pt and metrics.jsonl go here")
    r.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    r.add_argument("--overwrite", action="store_true", help="start afresh even if OUT_DIR has a checkpoint")
    r.add_argument("--keep-best", action="store_true",
                   help="also keep the weights of the best epoch (top-1; raw or EMA) in OUT_DIR/best.pt")
    r.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many epochs in this invocation (time-sliced jobs; continue with --resume)")
    r.add_argument("--eval-batch-size", type=int, default=512, help="per rank")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The training arguments of ``argv``, the recipe resolved (see ``resolve_recipe``)."""
    args = build_parser().parse_args(argv)
    resolve_recipe(args)
    return args


def resolve_recipe(args: argparse.Namespace) -> recipes.Lee2021:
    """Fill the recipe arguments left None from ``--recipe`` (in place) and check them."""
    try:
        recipe = recipes.resolve(args)
        recipes.check(recipe)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return recipe


def check_args(args: argparse.Namespace) -> None:
    resolve_recipe(args)

    def positive(name):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    for name in ("eval_batch_size", "synthetic_size", "synthetic_classes", "image_size", "depth", "dim", "heads",
                 "patch_size", "stop_after"):
        positive(name)


def data_options(args: argparse.Namespace) -> dict:
    """data.load_split's keyword options from the data arguments of a training run."""
    return dict(download=not args.no_download, image_size=args.image_size, synthetic_size=args.synthetic_size,
                synthetic_classes=args.synthetic_classes, seed=args.seed)


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


def _progress(iterable, total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    # Quiet when stderr is not a terminal (CI logs, nohup): the per-epoch summary line remains.
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0: only rank 0 prints."""


@dataclass
class TrainingRun:
    """What a training job carries from epoch to epoch; ``setup`` builds it."""

    args: argparse.Namespace
    world: dist_mod.World
    device: torch.device
    cfg: ViTConfig
    model: ViTClassifier  # the parameters: what is checkpointed and evaluated
    forward: Callable[[Tensor], Tensor]  # the model, or its DDP / torch.compile wrapper: what a step calls
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: data_mod.DeviceLoader
    test_loader: data_mod.DeviceLoader
    data_info: dict  # the checkpoint's "data" entry: dataset, classes, mean, std
    out_dir: Path  # checkpoint.pt, metrics.jsonl and curves.png
    amp: bool = False  # bf16 autocast (CUDA only)
    start_epoch: int = 0  # epochs completed before this invocation
    step: int = 0  # optimizer steps taken, over all invocations
    log: Callable[..., None] = print
    recipe: recipes.Lee2021 | None = None  # the resolved recipe (also in args); the checkpoint records it
    ema: EMA | None = None  # --ema: the averaged weights, updated after every optimizer step
    best: dict | None = None  # --keep-best: {"epoch", "top1", "weights"} of the best epoch so far

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST_FILE


def _resume_state(args: argparse.Namespace, ckpt_path: Path) -> dict | None:
    """The checkpoint to continue from (``--resume``), checked against this run's recipe; None for a
    fresh run, which must not replace a checkpoint unless asked to."""
    if args.resume:
        state = load_checkpoint(ckpt_path)  # every rank reads it
        saved = state["args"]
        changed = {k: (saved.get(k), getattr(args, k)) for k in RECIPE_ARGS if saved.get(k) != getattr(args, k)}
        if changed:
            raise SystemExit(f"--resume with a different recipe than {ckpt_path} was trained with "
                             f"(name: (checkpoint, now)): {changed}")
        return state
    if ckpt_path.exists() and not args.overwrite:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, --overwrite to replace it, "
                         "or choose another --out-dir")
    return None


def setup(args: argparse.Namespace, world: dist_mod.World, device: torch.device) -> TrainingRun:
    """Load the data, build the model, optimizer and schedule, and restore them all when resuming.

    The order of the steps that draw from torch's global generator (model initialisation, the
    per-rank reseed, the restored state) is what makes a resumed run bit-identical to an
    uninterrupted one."""
    out_dir = Path(args.out_dir)
    resume_state = _resume_state(args, out_dir / CHECKPOINT_FILE)
    torch.manual_seed(args.seed)
    train_set, test_set = data_mod.load_data(args.dataset, args.data_dir, **data_options(args))
    cfg = model_config(args, len(train_set.classes), train_set.images.shape[-1])
    if resume_state is not None and resume_state["config"] != cfg.to_dict():
        diff = {k: (v, cfg.to_dict()[k]) for k, v in resume_state["config"].items() if cfg.to_dict().get(k) != v}
        raise SystemExit(f"--resume: the model configuration differs from {out_dir / CHECKPOINT_FILE} "
                         f"(checkpoint, now): {diff}")
    mean, std = data_mod.channel_stats(train_set.images)
    recipe = recipes.resolve(args)
    shard = dict(rank=world.rank, world_size=world.size)
    train_loader = data_mod.DeviceLoader(train_set.to(device), per_rank_batch(args.batch_size, world), mean, std,
                                         train=True, augment=recipes.augment_config(recipe), seed=args.seed,
                                         repeats=recipe.repeats, **shard)
    test_loader = data_mod.DeviceLoader(test_set.to(device), args.eval_batch_size, mean, std, train=False, **shard)

    model = ViTClassifier(cfg, backend=args.backend).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(args.beta1, args.beta2))
    steps_per_epoch = len(train_loader)
    factor = warmup_cosine(round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch,
                           args.min_lr / args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if world.is_distributed:
        # Every rank built the same initial weights; from here on each rank draws its own
        # stochastic-depth and dropout masks, so it gets a generator of its own.
        torch.manual_seed(rank_seed(args.seed, world.rank))
    run = TrainingRun(
        args=args, world=world, device=device, cfg=cfg, model=model, forward=model, optimizer=optimizer,
        scheduler=scheduler, train_loader=train_loader, test_loader=test_loader,
        data_info={"dataset": args.dataset, "classes": list(train_set.classes), "mean": mean, "std": std},
        out_dir=out_dir, amp=device.type == "cuda" and not args.no_amp, log=print if world.is_main else _silent,
        recipe=recipe, ema=EMA(model, args.ema) if args.ema > 0 else None,
    )
    if resume_state is not None:
        _resume(run, resume_state)
    elif run.metrics_path.exists() and world.is_main:
        run.metrics_path.unlink()  # --overwrite, or a run that died before its first checkpoint
    run.forward = _wrap(model, args.compile, world, device)
    _log_start(run)
    return run


def _resume(run: TrainingRun, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.start_epoch, run.step = state["epoch"], state["step"]
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.best = state.get("best")
    restore_rng(state, run.world, run.device, run.args.seed, run.start_epoch, run.log)
    if run.world.is_main:
        _truncate_metrics(run.metrics_path, run.start_epoch)


def _wrap(model: ViTClassifier, compile_model: bool, world: dist_mod.World,
          device: torch.device) -> Callable[[Tensor], Tensor]:
    """What the training step calls: the model, under DDP with several ranks, compiled if asked."""
    trained = model
    if world.is_distributed:
        # DDP broadcasts rank 0's weights, then averages gradients over the ranks in backward
        # (NCCL or gloo all-reduce); the backend choice inside the model is untouched.
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(trained) if compile_model else trained


def _log_start(run: TrainingRun) -> None:
    args, world = run.args, run.world
    n_params = sum(p.numel() for p in run.model.parameters())
    if world.is_distributed:
        batch = (f"global batch {args.batch_size} = {world.size} ranks x {run.train_loader.batch_size} per rank "
                 f"({torch.distributed.get_backend()})")
    else:
        batch = f"batch {args.batch_size}"
    run.log(f"vit_fast: {args.preset} ({n_params / 1e6:.2f}M parameters, backend {args.backend}) on {run.device}, "
            f"{args.dataset}: {len(run.train_loader.data)} train / {len(run.test_loader.data)} test images, {batch}, "
            f"peak lr {args.lr:.2e}, {args.epochs} epochs of {len(run.train_loader)} steps, recipe {args.recipe}"
            + (f", EMA {args.ema}" if run.ema is not None else "")
            + (f", resuming after epoch {run.start_epoch}" if run.start_epoch else ""))


def train_step(run: TrainingRun, x: Tensor, y: Tensor, loss_scale: float = 1.0) -> Tensor:
    """One optimizer step on the batch ``x`` (B, C, H, W), ``y`` (B,) or soft (B, K); returns the
    batch's mean loss, detached. Backward runs on ``loss * loss_scale`` (see train_one_epoch)."""
    with autocast(run.device, run.amp):
        logits = run.forward(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=run.args.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    if run.args.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.clip_grad)
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update()
    return loss.detach()


def train_one_epoch(run: TrainingRun, epoch: int) -> dict:
    """Train on every batch of epoch ``epoch`` (0-based); returns the epoch's training metrics, summed
    over the ranks."""
    args, world, device = run.args, run.world, run.device
    run.model.train()
    run.train_loader.set_epoch(epoch)
    global_sizes = run.train_loader.global_batch_sizes()
    loss_sum, seen = torch.zeros((), device=device), 0
    synchronize(device)
    t0 = time.perf_counter()
    bar = _progress(run.train_loader, len(run.train_loader), f"epoch {epoch + 1}/{args.epochs}", enabled=world.is_main)
    for i, (x, y) in enumerate(bar):
        # DDP averages the ranks' gradients. Weighting each rank's mean loss by its share of the
        # global batch makes that average the gradient of the global batch's mean loss, as a
        # single process computes it (the factor is exactly 1 unless the last batch is uneven).
        scale = x.shape[0] * world.size / global_sizes[i] if world.is_distributed else 1.0
        loss = train_step(run, x, y, scale)
        run.step += 1
        loss_sum += loss * x.shape[0]
        seen += x.shape[0]
        if not bar.disable and run.step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen * world.size / (time.perf_counter() - t0):.0f}")
    synchronize(device)
    elapsed = time.perf_counter() - t0
    totals = torch.stack([loss_sum.double(), torch.tensor(seen, device=device, dtype=torch.float64)])
    train_loss, seen_all = dist_mod.all_reduce_sum(totals, world).tolist()
    return {"epoch": epoch + 1, "step": run.step, "train_loss": train_loss / seen_all,
            "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": seen_all / elapsed, "epoch_time_s": elapsed}


def save_epoch(run: TrainingRun, epoch: int, metrics: dict) -> None:
    """Checkpoint the run after epoch ``epoch`` (0-based) and append its metrics to metrics.jsonl.

    A collective: every rank hands in its random state, rank 0 writes them all."""
    rng_ranks = dist_mod.all_gather_objects(rng_state(run.device if run.world.is_distributed else None), run.world)
    if not run.world.is_main:
        return
    state = {
        "config": run.cfg.to_dict(), "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "epoch": epoch + 1, "step": run.step, "rng": rng_ranks[0],
        "args": dict(vars(run.args)), "data": run.data_info, "metrics": metrics,
        "recipe": run.recipe.to_dict() if run.recipe is not None else None, "best": run.best,
    }
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    if run.world.is_distributed:
        state["rng_ranks"] = rng_ranks
    save_checkpoint(state, run.ckpt_path)
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def keep_best(run: TrainingRun, epoch: int, metrics: dict) -> None:
    """Write best.pt when epoch ``epoch`` (0-based) beats the best top-1 so far, of the raw or the EMA
    weights, whichever scored higher. best.pt is a checkpoint that loads as any other (load_model,
    python -m vit_fast.evaluate); its "weights" entry says which weights it holds. Rank 0 writes it;
    every rank tracks the same (all-reduced) figures."""
    candidates = [("raw", metrics["top1"], run.model)]
    if run.ema is not None:
        candidates.append(("ema", metrics["ema_top1"], run.ema.model))
    weights, top1, model = max(candidates, key=lambda c: c[1])  # the raw weights win a tie
    if run.best is not None and top1 <= run.best["top1"]:
        return
    run.best = {"epoch": epoch + 1, "top1": top1, "weights": weights}
    if run.world.is_main:
        save_checkpoint({"config": run.cfg.to_dict(), "model": model.state_dict(), "epoch": epoch + 1,
                         "step": run.step, "args": dict(vars(run.args)), "data": run.data_info, "metrics": metrics,
                         "recipe": run.recipe.to_dict() if run.recipe is not None else None,
                         "weights": weights}, run.best_path)


def run_epochs(run: TrainingRun) -> dict:
    """Train, evaluate and checkpoint epoch after epoch; returns the last epoch's metrics."""
    args = run.args
    metrics = {}
    for epoch in range(run.start_epoch, args.epochs):
        if args.stop_after is not None and epoch - run.start_epoch >= args.stop_after:
            run.log(f"stopping after {args.stop_after} epoch(s) as asked; continue with --resume")
            break
        metrics = train_one_epoch(run, epoch)
        metrics.update(evaluate(run.model, run.test_loader, run.device, run.amp, run.world))
        if run.ema is not None:
            ema_metrics = evaluate(run.ema.model, run.test_loader, run.device, run.amp, run.world)
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        if args.keep_best:
            keep_best(run, epoch, metrics)
        save_epoch(run, epoch, metrics)
        run.log(f"epoch {epoch + 1:3d}/{args.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  top1 {metrics['top1']:5.2f}%  top5 {metrics['top5']:5.2f}%  "
                + (f"ema top1 {metrics['ema_top1']:5.2f}%  " if run.ema is not None else "")
                + f"lr {metrics['lr']:.2e}  {metrics['images_per_s']:.0f} img/s", flush=True)
    if run.world.is_main and run.metrics_path.exists():
        write_curves(run.metrics_path, run.out_dir / "curves.png")
    return metrics


def train(args: argparse.Namespace) -> dict:
    """Run the training job described by ``args``; returns the last epoch's metrics.

    Started by torchrun, this process is one rank of a data-parallel job (see vit_fast.distributed);
    otherwise it trains alone, with no process group.
    """
    check_args(args)  # resolves the recipe into args
    if args.fused:
        args.backend = "fused"
    world = dist_mod.world_from_env()
    device = dist_mod.device_for(world, args.device) if world.is_distributed else resolve_device(args.device)
    check_backend_device(args.backend, device)
    per_rank_batch(args.batch_size, world)
    dist_mod.init(world, device)
    try:
        metrics = run_epochs(setup(args, world, device))
        dist_mod.barrier(world)  # rank 0 has written its last checkpoint and plot
        return metrics
    finally:
        dist_mod.shutdown()


def write_curves(metrics_path: Path, png: Path) -> None:
    """Plot the training curves; a failure here never fails the training run."""
    try:
        from .plots import plot_metrics

        plot_metrics(metrics_path, png)
    except Exception as err:  # noqa: BLE001 - a plot is a convenience, the checkpoint is what matters
        print(f"warning: could not plot the training curves to {png}: {type(err).__name__}: {err}", file=sys.stderr)


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint (they will be recomputed)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epochs_done]
    path.write_text("".join(ln + "\n" for ln in lines))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except data_mod.DatasetNotFoundError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
