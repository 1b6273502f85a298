"""Train a ViT on CIFAR-100 (or CIFAR-10, an image folder, a synthetic task): the command line.

    python -m vit_fast.train                      # vit-cifar on CIFAR-100, the published recipe
    python -m vit_fast.train --dataset synthetic --epochs 2 --preset vit-cifar --depth 2
    python -m vit_fast.train --recipe fast --ema 0.999 --keep-best
    torchrun --nproc_per_node=4 -m vit_fast.train  # data parallel: --batch-size is the global batch

The default recipe (``--recipe lee2021``, vit_fast.recipes) is the setup Lee et al. 2021 ("Vision
Transformer for Small-Size Datasets") published for their CIFAR ViT: AutoAugment, repeated
augmentation, random erasing, mixup/cutmix, label smoothing, stochastic depth, AdamW (lr 1e-3,
weight decay 0.05) at batch 128, 10 warm-up epochs then cosine decay, 100 epochs. Any recipe flag
given on the command line overrides the preset's value.

This module parses and checks the flags and resolves them once into a frozen ``TrainConfig``
(``parse_args``); ``train(config)`` runs the job. The run (set-up, resume, epochs, checkpoints,
metrics) is ``vit_fast.run``; the training step is ``vit_fast.step``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import datasets
from . import distributed as dist_mod
from . import recipes
from .checkpoint import CheckpointError
from .cli import UsageError, errors_handled
from .config import BACKENDS, PRESETS
from .kernel_choice import MODES as KERNEL_MODES
from .paths import check_output_dir
from .loader import DATA_DEVICES
from .run import (CHECKPOINT_FILE, check_data_device, check_graph_device, model_config, per_rank_batch,
                  run_epochs, setup)
from .runtime import check_backend_device, check_device_name, resolve_device

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class TrainConfig:
    """A training job as the command line describes it, resolved once: every recipe value filled in
    from ``--recipe`` and checked, ``--fused`` folded into ``backend``. Field names are the flags'
    (``--min-lr`` -> ``min_lr``); ``to_dict()`` is what a checkpoint records as its ``args``. What
    a run and its step read; nothing changes it after ``parse_args``."""

    # model
    recipe: str  # the preset the recipe values below started from (vit_fast.recipes.RECIPES)
    preset: str
    backend: str  # "reference", "torch" or "fused": the model, the loss and the loader all read this
    fused: bool  # --fused was given (already folded into backend)
    kernels: str | None  # --kernels: auto, ours or library (vit_fast.kernel_choice); None: not given
    depth: int | None
    dim: int | None
    heads: int | None
    patch_size: int | None
    compile: bool
    compile_mode: str | None
    # data
    dataset: str
    data_dir: str
    no_download: bool
    image_size: int
    cache_dir: str | None  # an image folder's prepared cache (None: DATA_DIR/.vit_fast_cache)
    synthetic_size: int
    synthetic_classes: int
    # the recipe's values (vit_fast.recipes.FIELDS), resolved
    crop_padding: int
    flip: bool
    policy: str
    randaugment_ops: int
    randaugment_magnitude: int
    erase: float
    erase_max_area: float
    erase_mode: str
    mixup: float
    cutmix: float
    mix_prob: float
    mix_switch_prob: float
    mix_mode: str
    repeats: int
    label_smoothing: float
    drop_path: float
    dropout: float
    ema: float
    epochs: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    beta1: float
    beta2: float
    clip_grad: float
    # run
    no_amp: bool
    device: str
    seed: int
    out_dir: str
    resume: bool
    overwrite: bool
    keep_best: bool
    stop_after: int | None
    eval_batch_size: int
    data_device: str  # auto, cuda or cpu: where the uint8 images live (vit_fast.loader.data_on_host)
    cuda_graphs: bool
    log_every: int

    @cached_property
    def recipe_values(self) -> recipes.Lee2021:
        """The resolved recipe as its dataclass (what the checkpoint records as ``recipe``)."""
        return recipes.get_recipe(self.recipe, **{f: getattr(self, f) for f in recipes.FIELDS})

    @property
    def image_side(self) -> int:
        """The side of the training images: CIFAR's 32, or --image-size (image folders and synthetic
        data are resized to it)."""
        return 32 if self.dataset in ("cifar100", "cifar10") else self.image_size

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


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
    m.add_argument("--kernels", choices=KERNEL_MODES, default=None,
                   help="with --fused, our kernel or the library's (SDPA, F.layer_norm, cuBLAS, ...) per op: auto "
                        "times both at start-up on this run's shapes on a CUDA device and keeps the faster (ours "
                        "on a CPU, untimed); ours or library force every op. Default: auto, or on --resume the "
                        "checkpoint's choice. Logged at start-up, recorded in the checkpoint; ignored, with a "
                        "note, on the other backends")
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
    d.add_argument("--dataset", default="cifar100", choices=datasets.DATASETS)
    d.add_argument("--data-dir", default="./data", help="where the dataset is (or is downloaded to)")
    d.add_argument("--no-download", action="store_true", help="never try to download a missing dataset")
    d.add_argument("--image-size", type=int, default=32, help="image folder and synthetic data are resized to this")
    d.add_argument("--cache-dir", default=None,
                   help="--dataset imagefolder: keep the decoded images' cache here (for a read-only --data-dir) "
                        "instead of DATA_DIR/.vit_fast_cache (python -m vit_fast.data prepare makes it ahead)")
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
    r.add_argument("--data-device", default="auto", choices=DATA_DEVICES,
                   help="where the uint8 training and test images live: cuda (GPU memory), cpu (host memory, "
                        "each batch's images copied to the GPU asynchronously through pinned buffers: for "
                        "datasets larger than the GPU), auto (the GPU when the images take at most half of its "
                        "free memory, else the host). On a CPU run the images are in host memory either way "
                        "(cuda is an error)")
    r.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole training step in one CUDA graph and replay it (needs CUDA, one process; "
                        "drops each epoch's last partial batch so that every batch has the same shape)")
    r.add_argument("--log-every", type=int, default=20,
                   help="read the training loss back every this many steps, for the progress bar and the "
                        "non-finite-loss check (0 = at epoch ends only)")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The training configuration of ``argv``: parsed, every value checked (a value that cannot be
    meant is a UsageError naming it) and the recipe resolved, once. Touches no file."""
    return resolve(build_parser().parse_args(argv))


def resolve(args: argparse.Namespace) -> TrainConfig:
    """``args`` (build_parser's namespace) checked and resolved into a TrainConfig. A warning (the
    preset's warm-up fitted to a shortened run: recipes.fit_warmup) goes to stderr, from the first
    rank only."""
    def warn(message: str) -> None:
        if dist_mod.world_from_env().is_main:
            print(message, file=sys.stderr)

    try:
        recipes.check(recipes.resolve(args, warn))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.fused:  # one place decides the backend: the model, the loss and the loader read it
        args.backend = "fused"
    config = TrainConfig(**vars(args))
    check_values(config)
    return config


def check_values(config: TrainConfig) -> None:
    """The checks of values that need no file and no device (a UsageError naming the value)."""
    def positive(name):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")

    for name in ("eval_batch_size", "synthetic_size", "synthetic_classes", "image_size", "depth", "dim", "heads",
                 "patch_size", "stop_after"):
        positive(name)
    if config.dataset == "synthetic" and config.synthetic_classes < 2:
        raise UsageError(f"--synthetic-classes must be at least 2, got {config.synthetic_classes}: a classifier of "
                         "one class learns nothing (its loss is 0 from the start)")
    if config.crop_padding >= config.image_side:
        raise UsageError(f"--crop-padding {config.crop_padding} is at least the image size ({config.image_side} "
                         "pixels): many random crops would be all padding; use a padding below it (lee2021: 4)")
    if config.log_every < 0:
        raise UsageError(f"--log-every must be >= 0, got {config.log_every}")
    if config.compile_mode is not None and not config.compile:
        raise UsageError(f"--compile-mode {config.compile_mode} needs --compile")
    if config.cuda_graphs and config.compile and config.compile_mode not in (None, "default"):
        raise UsageError(f"--cuda-graphs with --compile-mode {config.compile_mode}: that mode captures CUDA graphs "
                         "of its own; use --compile-mode default (or no --cuda-graphs)")
    check_device_name(config.device)
    model_config(config, 2, config.image_side)  # e.g. a patch size that does not divide the images, before loading


def check_paths(config: TrainConfig) -> None:
    """The checks of the run's files, before any data is loaded: the checkpoint --resume continues
    exists, and --out-dir can be written."""
    ckpt_path = Path(config.out_dir) / CHECKPOINT_FILE
    if config.resume and not ckpt_path.exists():
        raise SystemExit(f"error: --resume: there is no checkpoint to continue from at {ckpt_path}; start a new "
                         "run without --resume (or give the --out-dir of the run to continue)")
    check_output_dir(config.out_dir, "--out-dir")  # now, not when the first epoch's checkpoint is due


def train(config: TrainConfig) -> dict:
    """Run the training job described by ``config`` (``parse_args``); returns the last epoch's metrics.

    Started by torchrun, this process is one rank of a data-parallel job (see vit_fast.distributed);
    otherwise it trains alone, with no process group.
    """
    check_paths(config)
    world = dist_mod.world_from_env()
    device = dist_mod.device_for(world, config.device) if world.is_distributed else resolve_device(config.device)
    check_backend_device(config.backend, device)
    check_graph_device(config, world, device)
    check_data_device(config, device)
    per_rank_batch(config.batch_size, world)
    dist_mod.init(world, device)
    try:
        metrics = run_epochs(setup(config, world, device))
        dist_mod.barrier(world)  # rank 0 has written its last checkpoint and plot
        return metrics
    finally:
        dist_mod.shutdown()


def main(argv: list[str] | None = None) -> None:
    """The command: usage errors exit 2, missing or damaged files and a diverged run exit 1, each as
    one line ``error: ...`` (vit_fast.cli)."""
    with errors_handled(datasets.DatasetNotFoundError, datasets.DatasetIntegrityError, CheckpointError):
        train(parse_args(argv))


if __name__ == "__main__":
    main()
