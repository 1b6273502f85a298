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

The training step, as code that measures it (``python -m vit_fast.cost``) uses it
-------------------------------------------------------------------------------
A step is four phases, ``PHASES = ("data", "forward_backward", "clip", "optimizer")``:

    run = setup(args, world, device)            # a TrainingRun: model, optimizer, schedule, loaders
    batches = epoch_batches(run, epoch)         # the epoch's batch iterator (epoch set-up happens here)
    x, y = next_batch(batches, phase)           # "data": DeviceLoader draws, augments, normalises a batch
    loss = train_step(run, x, y, phase)         # "forward_backward", "clip", "optimizer"; loss (0-dim, device)

``phase`` is a callable ``phase(name) -> context manager`` entered around each phase (default
``no_phase``: nothing); ``vit_fast.syncs.HostSyncCounter.phase`` is one. ``train_step`` runs
forward under bf16 autocast (``run.amp``), the label-smoothed cross-entropy, the non-finite-loss
watch and backward ("forward_backward"); gradient clipping ("clip"); ``optimizer.step()`` and the
learning-rate update on the device ("optimizer"). ``train_step(..., loss_scale=s)`` backpropagates
``loss * s`` (data parallel: see train_one_epoch). No phase reads anything back to the host: the
learning rate is a device tensor written by ``LRSchedule.step`` from a device step counter, the
optimizer (``make_optimizer``) is AdamW with ``fused=True`` (and ``capturable=True`` on CUDA), a
non-finite loss sets a device flag (``NonFiniteWatch``) read only at log points and epoch ends.
``GraphedStep`` (``--cuda-graphs``) captures ``train_step`` whole in one CUDA graph.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import data as data_mod
from . import distributed as dist_mod
from . import ops
from . import recipes
from .checkpoint import RESUME_ENTRIES, CheckpointError, load_checkpoint, save_checkpoint
from .cli import UsageError, errors_handled
from .config import BACKENDS, PRESETS, ViTConfig, get_preset
from .ema import EMA
from .evaluate import evaluate
from .model import ViTClassifier
from .optim import (
    NO_BAD_STEP,
    LRSchedule,
    NonFiniteWatch,
    make_optimizer,
    optimizer_state,
    param_groups,
    restore_optimizer,
    warmup_cosine,
)
from .paths import check_output_dir
from .runtime import (autocast, check_backend_device, check_device_name, rank_seed, resolve_device, restore_rng,
                      rng_state, synchronize)

CHECKPOINT_FILE, METRICS_FILE, BEST_FILE = "checkpoint.pt", "metrics.jsonl", "best.pt"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
PHASES = ("data", "forward_backward", "clip", "optimizer")
GRAPH_WARMUP_STEPS = 3  # eager steps before capture: lazy state (optimizer moments, compiled code) exists by then

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
    m.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode (needs --compile; default: 'default')")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="cifar100", choices=data_mod.DATASETS)
    d.add_argument("--data-dir", default="./data", help="where the dataset is (or is downloaded to)")
    d.add_argument("--no-download", action="store_true", help="never try to download a missing dataset")
    d.add_argument("--image-size", type=int, default=32, help="image folder and synthetic data are resized to this")
    d.add_argument("--synthetic-size", type=int, default=2048, help="training images of --dataset synthetic")
    d.add_argument("--synthetic-classes", type=int, default=10, help="at least 2")
    recipes.add_augment_arguments(p.add_argument_group("augmentation (recipe)"))
    o = p.add_argument_group("optimisation (recipe)")
    _recipe_flag(o, "--epochs", type=int)
    _recipe_flag(o, "--batch-size", "global batch: under torchrun each of the N ranks takes batch-size / N images "
                 "per step", type=int)
    _recipe_flag(o, "--lr", "peak learning rate", type=float)
    _recipe_flag(o, "--min-lr", "learning rate at the end of the cosine, at most --lr", type=float)
    _recipe_flag(o, "--warmup-epochs", "linear warm-up, at most --epochs; when --epochs is at most the recipe's "
                 "warm-up and this flag is not given, the warm-up keeps its share of the recipe's own schedule "
                 "(lee2021: 10 of 100 epochs, so --epochs 5 warms up for 0.5), with a warning", type=float)
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
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUT_DIR has a checkpoint; the previous run's checkpoint.pt, "
                        "metrics.jsonl and best.pt stay until this run writes its first checkpoint")
    r.add_argument("--keep-best", action="store_true",
                   help="also keep the weights of the best epoch (top-1; raw or EMA) in OUT_DIR/best.pt")
    r.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many epochs in this invocation (time-sliced jobs; continue with --resume)")
    r.add_argument("--eval-batch-size", type=int, default=512, help="per rank")
    r.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole training step in one CUDA graph and replay it (needs CUDA, one process; "
                        "drops each epoch's last partial batch so that every batch has the same shape)")
    r.add_argument("--log-every", type=int, default=20,
                   help="read the training loss back every this many steps, for the progress bar and the "
                        "non-finite-loss check (0 = at epoch ends only)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The training arguments of ``argv``, the recipe resolved (see ``resolve_recipe``)."""
    args = build_parser().parse_args(argv)
    resolve_recipe(args)
    return args


def resolve_recipe(args: argparse.Namespace) -> recipes.Lee2021:
    """Fill the recipe arguments left None from ``--recipe`` (in place) and check them; a value out
    of range is a UsageError. A warning (the preset's warm-up fitted to a shortened run:
    recipes.fit_warmup) goes to stderr, from the first rank only."""
    def warn(message: str) -> None:
        if dist_mod.world_from_env().is_main:
            print(message, file=sys.stderr)

    try:
        recipe = recipes.resolve(args, warn)
        recipes.check(recipe)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return recipe


def image_size_of(args: argparse.Namespace) -> int:
    """The side of the training images: CIFAR's 32, or --image-size (image folders and synthetic
    data are resized to it)."""
    return 32 if args.dataset in ("cifar100", "cifar10") else args.image_size


def check_args(args: argparse.Namespace) -> None:
    resolve_recipe(args)
    if args.fused:  # one place decides the backend: the model, the loss and the loader read args.backend
        args.backend = "fused"

    def positive(name):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    for name in ("eval_batch_size", "synthetic_size", "synthetic_classes", "image_size", "depth", "dim", "heads",
                 "patch_size", "stop_after"):
        positive(name)
    if args.dataset == "synthetic" and args.synthetic_classes < 2:
        raise UsageError(f"--synthetic-classes must be at least 2, got {args.synthetic_classes}: a classifier of "
                         "one class learns nothing (its loss is 0 from the start)")
    if args.crop_padding >= image_size_of(args):
        raise UsageError(f"--crop-padding {args.crop_padding} is at least the image size ({image_size_of(args)} "
                         "pixels): many random crops would be all padding; use a padding below it (lee2021: 4)")
    if args.log_every < 0:
        raise UsageError(f"--log-every must be >= 0, got {args.log_every}")
    if args.compile_mode is not None and not args.compile:
        raise UsageError(f"--compile-mode {args.compile_mode} needs --compile")
    if args.cuda_graphs and args.compile and args.compile_mode not in (None, "default"):
        raise UsageError(f"--cuda-graphs with --compile-mode {args.compile_mode}: that mode captures CUDA graphs "
                         "of its own; use --compile-mode default (or no --cuda-graphs)")
    check_device_name(args.device)
    model_config(args, 2, image_size_of(args))  # e.g. a patch size that does not divide the images, before loading
    ckpt_path = Path(args.out_dir) / CHECKPOINT_FILE
    if args.resume and not ckpt_path.exists():
        raise SystemExit(f"error: --resume: there is no checkpoint to continue from at {ckpt_path}; start a new "
                         "run without --resume (or give the --out-dir of the run to continue)")
    check_output_dir(args.out_dir, "--out-dir")  # now, not when the first epoch's checkpoint is due


def check_graph_device(args: argparse.Namespace, world: dist_mod.World, device: torch.device) -> None:
    """--cuda-graphs needs a CUDA device and a single process (checked once the device is known)."""
    if not args.cuda_graphs:
        return
    if device.type != "cuda":
        raise SystemExit(f"--cuda-graphs captures the training step in a CUDA graph and needs a CUDA device, "
                         f"but the device is {device}; drop --cuda-graphs on this machine")
    if world.is_distributed:
        raise SystemExit(f"--cuda-graphs runs in a single process; this job has {world.size} (torchrun): "
                         "drop --cuda-graphs or run one process")


def data_options(args: argparse.Namespace) -> dict:
    """data.load_split's keyword options from the data arguments of a training run."""
    return dict(download=not args.no_download, image_size=args.image_size, synthetic_size=args.synthetic_size,
                synthetic_classes=args.synthetic_classes, seed=args.seed)


def per_rank_batch(global_batch: int, world: dist_mod.World) -> int:
    """The images each rank takes per step when ``global_batch`` is shared by ``world.size`` ranks."""
    if global_batch % world.size:
        raise UsageError(
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
        raise UsageError(f"invalid model configuration: {err}") from None


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
    scheduler: LRSchedule
    train_loader: data_mod.DeviceLoader
    test_loader: data_mod.DeviceLoader
    data_info: dict  # the checkpoint's "data" entry: dataset, classes, mean, std, fingerprint
    out_dir: Path  # checkpoint.pt, metrics.jsonl and curves.png
    amp: bool = False  # bf16 autocast (CUDA only)
    start_epoch: int = 0  # epochs completed before this invocation
    step: int = 0  # optimizer steps taken, over all invocations
    log: Callable[..., None] = print
    recipe: recipes.Lee2021 | None = None  # the resolved recipe (also in args); the checkpoint records it
    ema: EMA | None = None  # --ema: the averaged weights, updated after every optimizer step
    best: dict | None = None  # --keep-best: {"epoch", "top1", "weights"} of the best epoch so far
    watch: NonFiniteWatch | None = None  # setup makes one on the device
    graph: GraphedStep | None = None  # --cuda-graphs: replays the captured step
    # A fresh run (not --resume) until its first checkpoint: the files in out_dir, if any, are still a
    # previous run's (--overwrite replaces them only then: save_epoch).
    replacing: bool = False

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
        state = load_checkpoint(ckpt_path, required=RESUME_ENTRIES)  # every rank reads it
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
    fingerprint = data_mod.fingerprint(args.dataset, train_set, test_set)  # on the host, before .to(device)
    if resume_state is not None:
        check_resume_data(resume_state, fingerprint, out_dir / CHECKPOINT_FILE, print if world.is_main else _silent)
    if len(train_set.classes) < 2:
        raise SystemExit(f"error: {args.dataset} in {args.data_dir} has a single class ({train_set.classes[0]!r}): "
                         "a classifier of one class learns nothing; an image folder needs a folder per class "
                         "under train/ (and val/)")
    cfg = model_config(args, len(train_set.classes), train_set.images.shape[-1])
    if resume_state is not None and resume_state["config"] != cfg.to_dict():
        diff = {k: (v, cfg.to_dict()[k]) for k, v in resume_state["config"].items() if cfg.to_dict().get(k) != v}
        raise SystemExit(f"--resume: the model configuration differs from {out_dir / CHECKPOINT_FILE} "
                         f"(checkpoint, now): {diff}")
    mean, std = data_mod.channel_stats(train_set.images)
    recipe = recipes.resolve(args)
    shard = dict(rank=world.rank, world_size=world.size)
    train_loader = make_train_loader(args, world, train_set.to(device), mean, std)
    test_loader = data_mod.DeviceLoader(test_set.to(device), args.eval_batch_size, mean, std, train=False, **shard)

    model = ViTClassifier(cfg, backend=args.backend).to(device)
    optimizer = make_optimizer(param_groups(model, args.weight_decay), args.lr, (args.beta1, args.beta2), device)
    scheduler = make_schedule(args, optimizer, len(train_loader))
    if world.is_distributed:
        # Every rank built the same initial weights; from here on each rank draws its own
        # stochastic-depth and dropout masks, so it gets a generator of its own.
        torch.manual_seed(rank_seed(args.seed, world.rank))
    run = TrainingRun(
        args=args, world=world, device=device, cfg=cfg, model=model, forward=model, optimizer=optimizer,
        scheduler=scheduler, train_loader=train_loader, test_loader=test_loader,
        data_info={"dataset": args.dataset, "classes": list(train_set.classes), "mean": mean, "std": std,
                   "fingerprint": fingerprint},
        out_dir=out_dir, amp=device.type == "cuda" and not args.no_amp, log=print if world.is_main else _silent,
        watch=NonFiniteWatch(device),
        recipe=recipe, ema=EMA(model, args.ema) if args.ema > 0 else None,
        # Nothing is deleted here: a previous run's files (--overwrite, or a run that died before its
        # first checkpoint) are replaced when this run writes its first checkpoint (save_epoch).
        replacing=resume_state is None,
    )
    if resume_state is not None:
        check_steps_per_epoch(resume_state, len(train_loader), out_dir / CHECKPOINT_FILE)
        _resume(run, resume_state)
    run.forward = _wrap(model, args.compile, world, device, args.compile_mode)
    if args.cuda_graphs:
        run.graph = GraphedStep(run)
    _log_start(run)
    return run


def make_train_loader(args: argparse.Namespace, world: dist_mod.World, train_set: data_mod.ImageDataset,
                      mean: list[float], std: list[float], log: Callable[..., None] = print) -> data_mod.DeviceLoader:
    """The training loader. Under --cuda-graphs every batch must have the graph's shape, so the last
    partial batch of each epoch is dropped (logged with its size). The fused backend builds its
    batches with the fused data kernels (the same batches: see DeviceLoader's ``fused``)."""
    recipe = recipes.resolve(args)
    loader = data_mod.DeviceLoader(train_set, per_rank_batch(args.batch_size, world), mean, std, train=True,
                                   augment=recipe.augmentation(), seed=args.seed, drop_last=args.cuda_graphs,
                                   rank=world.rank, world_size=world.size, fused=args.backend == "fused")
    dropped = len(train_set) - sum(loader.global_batch_sizes())
    if args.cuda_graphs and dropped and world.is_main:
        log(f"--cuda-graphs: every batch has the captured graph's shape, so each epoch's last partial batch of "
            f"{dropped} images is dropped ({len(loader)} steps of {args.batch_size} images per epoch)")
    return loader


def make_schedule(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRSchedule:
    """Linear warm-up over --warmup-epochs, cosine to --min-lr at the end of --epochs."""
    factor = warmup_cosine(round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch,
                           args.min_lr / args.lr)
    return LRSchedule(optimizer.param_groups[0]["lr"], args.lr, factor, args.epochs * steps_per_epoch)


def check_steps_per_epoch(state: dict, steps_per_epoch: int, ckpt_path: Path) -> None:
    """The schedule is laid out in steps: a resumed run must take as many steps per epoch as the
    checkpointed one did (--cuda-graphs, which drops partial batches, can change that)."""
    if state["step"] != state["epoch"] * steps_per_epoch:
        raise SystemExit(f"--resume: {ckpt_path} took {state['step']} steps in {state['epoch']} epoch(s), this run "
                         f"takes {steps_per_epoch} per epoch (was --cuda-graphs, which drops each epoch's last "
                         "partial batch, given to one run and not the other?)")


def _resume(run: TrainingRun, state: dict) -> None:
    try:
        run.model.load_state_dict(state["model"])
        restore_optimizer(run.optimizer, state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.start_epoch, run.step = state["epoch"], state["step"]
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"])
        run.best = state.get("best")
        restore_rng(state, run.world, run.device, run.args.seed, run.start_epoch, run.log)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:  # what load_state_dict and set_rng_state raise
        raise CheckpointError(f"checkpoint {run.ckpt_path} does not fit this run: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if run.world.is_main:
        _truncate_metrics(run.metrics_path, run.start_epoch, state.get("metrics"), run.log)


def _wrap(model: ViTClassifier, compile_model: bool, world: dist_mod.World,
          device: torch.device, compile_mode: str | None = None) -> Callable[[Tensor], Tensor]:
    """What the training step calls: the model, under DDP with several ranks, compiled if asked."""
    trained = model
    if world.is_distributed:
        # DDP broadcasts rank 0's weights, then averages gradients over the ranks in backward
        # (NCCL or gloo all-reduce); the backend choice inside the model is untouched.
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(trained, mode=compile_mode) if compile_model else trained


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


def no_phase(name: str) -> contextlib.AbstractContextManager:
    """The default ``phase`` of next_batch and train_step: marks nothing."""
    return contextlib.nullcontext()


def epoch_batches(run: TrainingRun, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches of epoch ``epoch`` (0-based); the epoch's shuffle is drawn here, once."""
    run.train_loader.set_epoch(epoch)
    return iter(run.train_loader)


def next_batch(batches: Iterator[tuple[Tensor, Tensor]],
               phase: Callable[[str], contextlib.AbstractContextManager] = no_phase) -> tuple[Tensor, Tensor]:
    """The "data" phase: the next batch (x (B, C, H, W) float32, y (B,) labels or (B, K) soft targets)."""
    with phase("data"):
        return next(batches)


def train_step(run: TrainingRun, x: Tensor, y: Tensor,
               phase: Callable[[str], contextlib.AbstractContextManager] = no_phase,
               loss_scale: float = 1.0) -> Tensor:
    """One optimizer step on the batch ``x`` (B, C, H, W), ``y`` (B,) or soft (B, K); returns the
    batch's mean loss (0-dim, on the device, detached). Backward runs on ``loss * loss_scale`` (see
    train_one_epoch). Reads nothing back to the host; see the module docstring for the phases."""
    with phase("forward_backward"):
        # A CUDA graph must recompute the bf16 copies of the weights on every replay, not keep
        # those cached while it was captured.
        with autocast(run.device, run.amp, cache_enabled=not run.args.cuda_graphs):
            logits = run.forward(x)
        loss = ops.cross_entropy(logits, y, run.args.label_smoothing, run.args.backend)
        run.watch.update(loss.detach(), run.scheduler.steps)
        run.optimizer.zero_grad(set_to_none=True)
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    with phase("clip"):
        if run.args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.clip_grad)
    with phase("optimizer"):
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update()
    return loss.detach()


class GraphedStep:
    """``train_step`` captured whole (forward, backward, clip, optimizer, lr update) in one CUDA
    graph and replayed for every batch (--cuda-graphs).

    Each batch is copied into static input buffers. The first GRAPH_WARMUP_STEPS calls are ordinary
    eager steps on a side stream (as capture requires: the optimizer's moments, cuBLAS workspaces
    and compiled code get allocated there, not inside the graph); the next call captures the step
    and replays it, later calls only replay. Warm-up steps are real training steps on real batches,
    so a graphed run takes exactly the steps an eager one does. Dropout and stochastic depth draw
    from the CUDA default generator, which advances its Philox offset on every replay. Everything
    the step updates lives in tensors updated in place (parameters, optimizer state, the lr tensor
    and step counter of LRSchedule, NonFiniteWatch), so a resumed run, which restores those before
    the capture, continues exactly."""

    def __init__(self, run: TrainingRun, warmup_steps: int = GRAPH_WARMUP_STEPS) -> None:
        self.run, self.warmup_steps = run, warmup_steps
        self.eager_steps = 0
        self.side: torch.cuda.Stream | None = None  # the warm-up steps' stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: Tensor | None = None
        self.static_y: Tensor | None = None
        self.loss: Tensor | None = None

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.static_x is None:
            self.static_x, self.static_y = x.clone(), y.clone()
        else:
            if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
                raise RuntimeError(f"the CUDA graph was captured for batches of {tuple(self.static_x.shape)} and "
                                   f"{tuple(self.static_y.shape)}, got {tuple(x.shape)} and {tuple(y.shape)}")
            self.static_x.copy_(x)
            self.static_y.copy_(y)
        if self.graph is not None:
            self.graph.replay()
        elif self.eager_steps < self.warmup_steps:
            self.side = self.side or torch.cuda.Stream(self.run.device)
            self.side.wait_stream(torch.cuda.current_stream(self.run.device))
            with torch.cuda.stream(self.side):
                self.loss = train_step(self.run, self.static_x, self.static_y)
            torch.cuda.current_stream(self.run.device).wait_stream(self.side)
            self.eager_steps += 1
        else:
            self.graph = torch.cuda.CUDAGraph()
            # Gradients are allocated afresh inside the capture, from the graph's memory pool.
            self.run.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.loss = train_step(self.run, self.static_x, self.static_y)
            self.graph.replay()  # capture only records: this runs the batch
        return self.loss


def run_step(run: TrainingRun, x: Tensor, y: Tensor, loss_scale: float = 1.0) -> Tensor:
    """A training step as the epoch loop takes it: replayed from the CUDA graph under --cuda-graphs."""
    if run.graph is not None:
        return run.graph(x, y)  # loss_scale is 1: one process, full batches
    return train_step(run, x, y, loss_scale=loss_scale)


class LossReadback:
    """Reads the loss and the first non-finite step back every --log-every steps without waiting
    for the device: each request is copied into pinned host memory behind the queued work, and
    read at the next request, by when the device is long past it."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        cuda = run.device.type == "cuda"
        self.loss = torch.zeros((), dtype=torch.float32, pin_memory=cuda)
        self.first_bad = torch.zeros((), dtype=torch.int64, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.pending: int | None = None  # the step the buffers (will) hold

    def request(self, step: int, loss: Tensor) -> None:
        first_bad = _world_first_bad(self.run)
        self.loss.copy_(loss, non_blocking=True)
        self.first_bad.copy_(first_bad, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending = step

    def take(self) -> tuple[int, float, int] | None:
        """(step, its loss, first non-finite step or NO_BAD_STEP) of the last request, or None."""
        if self.pending is None:
            return None
        if self.event is not None:
            self.event.synchronize()
        step, self.pending = self.pending, None
        return step, float(self.loss), int(self.first_bad)


def _world_first_bad(run: TrainingRun) -> Tensor:
    """The first non-finite step over all ranks (every rank calls this at the same steps)."""
    first_bad = run.watch.first_bad.clone()
    if run.world.is_distributed:
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    return first_bad


def _saved_epoch(path: Path) -> int | str:
    """The epoch count of the checkpoint at ``path``, read without loading its tensors (mmap), or
    "unknown" when it does not read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # noqa: BLE001 - only for an error message: a damaged file must not hide the real error
        return "unknown"


def stop_if_not_finite(run: TrainingRun, first_bad: int) -> None:
    """Leave the run (exit status 1) when a loss was not finite; nothing is checkpointed from that state."""
    if first_bad == NO_BAD_STEP:
        return
    steps = len(run.train_loader)
    if not run.ckpt_path.exists():
        kept = "no checkpoint was written"
    elif run.replacing:  # this run has written none: what is there is the previous run's, untouched
        kept = (f"{run.ckpt_path} is still the previous run's checkpoint (epoch {_saved_epoch(run.ckpt_path)}), "
                f"left as it was with its {METRICS_FILE} (--resume would continue that run)")
    else:  # every epoch end checks the flag: the last checkpoint is from before the bad step's epoch
        kept = f"{run.ckpt_path} still holds the last good checkpoint (epoch {first_bad // steps})"
    raise SystemExit(
        f"error: the training loss of optimizer step {first_bad + 1} (epoch {first_bad // steps + 1}, step "
        f"{first_bad % steps + 1} of {steps}) was not finite (the training diverged); stopping without "
        f"checkpointing this state: {kept}. Try a lower --lr, --clip-grad, or --no-amp"
    )


def train_one_epoch(run: TrainingRun, epoch: int) -> dict:
    """Train on every batch of epoch ``epoch`` (0-based); returns the epoch's training metrics, summed
    over the ranks. The host reads the device only at --log-every steps and at the end."""
    args, world, device = run.args, run.world, run.device
    run.model.train()
    global_sizes = run.train_loader.global_batch_sizes()
    batches = epoch_batches(run, epoch)
    readback = LossReadback(run)
    loss_sum, seen = torch.zeros((), device=device), 0
    synchronize(device)
    t0 = time.perf_counter()
    bar = _progress(batches, len(run.train_loader), f"epoch {epoch + 1}/{args.epochs}", enabled=world.is_main)
    for i, (x, y) in enumerate(bar):
        # DDP averages the ranks' gradients. Weighting each rank's mean loss by its share of the
        # global batch makes that average the gradient of the global batch's mean loss, as a
        # single process computes it (the factor is exactly 1 unless the last batch is uneven).
        # Batch sizes are known on the host: the factor costs no sync.
        scale = x.shape[0] * world.size / global_sizes[i] if world.is_distributed else 1.0
        loss = run_step(run, x, y, scale)
        run.step += 1
        loss_sum += loss * x.shape[0]
        seen += x.shape[0]
        if args.log_every and run.step % args.log_every == 0:
            done = readback.take()
            readback.request(run.step, loss)
            if done is not None:
                stop_if_not_finite(run, done[2])
                bar.set_postfix(loss=f"{done[1]:.3f}", img_s=f"{seen * world.size / (time.perf_counter() - t0):.0f}")
    synchronize(device)
    elapsed = time.perf_counter() - t0
    stop_if_not_finite(run, int(_world_first_bad(run)))
    totals = torch.stack([loss_sum.double(), torch.tensor(seen, device=device, dtype=torch.float64)])
    train_loss, seen_all = dist_mod.all_reduce_sum(totals, world).tolist()
    return {"epoch": epoch + 1, "step": run.step, "train_loss": train_loss / seen_all,
            "lr": float(run.scheduler.lr), "images_per_s": seen_all / elapsed, "epoch_time_s": elapsed}


def save_epoch(run: TrainingRun, epoch: int, metrics: dict) -> None:
    """Checkpoint the run after epoch ``epoch`` (0-based) and append its metrics to metrics.jsonl.

    A collective: every rank hands in its random state, rank 0 writes them all."""
    rng_ranks = dist_mod.all_gather_objects(rng_state(run.device if run.world.is_distributed else None), run.world)
    if not run.world.is_main:
        return
    state = {
        "config": run.cfg.to_dict(), "model": run.model.state_dict(), "optimizer": optimizer_state(run.optimizer),
        "scheduler": run.scheduler.state_dict(), "epoch": epoch + 1, "step": run.step, "rng": rng_ranks[0],
        "args": dict(vars(run.args)), "data": run.data_info, "metrics": metrics,
        "recipe": run.recipe.to_dict() if run.recipe is not None else None, "best": run.best,
    }
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    if run.world.is_distributed:
        state["rng_ranks"] = rng_ranks
    save_checkpoint(state, run.ckpt_path)
    # The first checkpoint of a fresh run replaces a previous run's files (--overwrite): its metrics
    # start afresh, and a best.pt this run did not write (--keep-best writes it before this) goes.
    with open(run.metrics_path, "w" if run.replacing else "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if run.replacing and run.best is None and run.best_path.exists():
        run.best_path.unlink()
    run.replacing = False


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
    check_args(args)  # resolves the recipe and --fused into args
    world = dist_mod.world_from_env()
    device = dist_mod.device_for(world, args.device) if world.is_distributed else resolve_device(args.device)
    check_backend_device(args.backend, device)
    check_graph_device(args, world, device)
    per_rank_batch(args.batch_size, world)
    dist_mod.init(world, device)
    try:
        metrics = run_epochs(setup(args, world, device))
        dist_mod.barrier(world)  # rank 0 has written its last checkpoint and plot
        return metrics
    finally:
        dist_mod.shutdown()


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
    loses) restores the checkpoint's epoch if it is missing, and a missing file from it too. A
    damaged line anywhere else is not a crash's doing: it is an error naming the file and line, and
    the file is left as it is."""
    missing = not path.exists()
    if missing and last is None:
        return
    lines = [] if missing else path.read_bytes().decode("utf-8", errors="replace").splitlines()
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
        if missing:
            lost = f" (the lines of epochs 1 to {epochs_done - 1} are lost)" if epochs_done > 1 else ""
            log(f"note: {path} is missing; restored the line of epoch {epochs_done} from the checkpoint{lost}")
        else:
            log(f"note: {path} had no line for epoch {epochs_done}; restored it from the checkpoint")
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def main(argv: list[str] | None = None) -> None:
    """The command: usage errors exit 2, missing or damaged files and a diverged run exit 1, each as
    one line ``error: ...`` (vit_fast.cli)."""
    with errors_handled(data_mod.DatasetNotFoundError, data_mod.DatasetIntegrityError, CheckpointError):
        train(parse_args(argv))


if __name__ == "__main__":
    main()
