"""A training run: set-up and resume, the epoch loop, evaluation, checkpoints and metrics.

``setup(config, world, device)`` builds a ``TrainingRun`` from a resolved ``TrainConfig``
(``vit_fast.train``): the data on the device, the model, AdamW and the learning-rate schedule, and,
with ``--resume``, restores all of them from ``OUT_DIR/checkpoint.pt``; ``run_epochs(run)`` trains,
evaluates and checkpoints epoch after epoch. The step itself is ``vit_fast.step``.

Files in ``OUT_DIR``: ``checkpoint.pt`` (every epoch, written atomically by
``vit_fast.checkpoint``), ``metrics.jsonl`` (a JSON line per epoch), ``best.pt`` (``--keep-best``)
and ``curves.png``. A fresh run over an existing one (``--overwrite``) leaves the previous run's
files as they are until it writes its own first checkpoint (``TrainingRun.replacing``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import datasets
from . import distributed as dist_mod
from . import recipes
from .checkpoint import RESUME_ENTRIES, CheckpointError, load_checkpoint, save_checkpoint
from .cli import UsageError
from .config import ViTConfig, get_preset
from .ema import EMA
from .evaluate import evaluate
from .kernel_choice import KernelChoice, Workload, choose_for_run
from .loader import DATA_SHARE_OF_FREE, DeviceLoader, data_on_host
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
from .runtime import rank_seed, restore_rng, rng_state, synchronize
from .step import GraphedStep, LossReadback, epoch_batches, run_step, world_first_bad

if TYPE_CHECKING:
    from .train import TrainConfig

CHECKPOINT_FILE, METRICS_FILE, BEST_FILE = "checkpoint.pt", "metrics.jsonl", "best.pt"

# Settings that must not change when a run is resumed: the resolved recipe (the schedule, the
# augmentation and the data order depend on it), the dataset and the seed.
RECIPE_ARGS = ("dataset", "seed", *recipes.FIELDS)


def check_graph_device(config: TrainConfig, world: dist_mod.World, device: torch.device) -> None:
    """--cuda-graphs needs a CUDA device (checked once the device is known); under torchrun each
    rank captures its own step, NCCL's all-reduce included (``vit_fast.step.GraphedStep``)."""
    if not config.cuda_graphs:
        return
    if device.type != "cuda":
        raise SystemExit(f"--cuda-graphs captures the training step in a CUDA graph and needs a CUDA device, "
                         f"but the device is {device}; drop --cuda-graphs on this machine")


def check_data_device(config: TrainConfig, device: torch.device) -> None:
    """--data-device cuda needs a CUDA device (checked once the device is known, before any data is
    loaded); auto and cpu hold on any device (``vit_fast.loader.data_on_host``)."""
    try:
        data_on_host(config.data_device, device, 0, free_bytes=0)
    except ValueError as err:
        raise UsageError(str(err)) from None


def data_options(config: TrainConfig) -> dict:
    """data.load_split's keyword options from the data arguments of a training run."""
    return dict(download=not config.no_download, image_size=config.image_size, synthetic_size=config.synthetic_size,
                synthetic_classes=config.synthetic_classes, seed=config.seed,
                cache_dir=getattr(config, "cache_dir", None))


def per_rank_batch(global_batch: int, world: dist_mod.World) -> int:
    """The images each rank takes per step when ``global_batch`` is shared by ``world.size`` ranks."""
    if global_batch % world.size:
        raise UsageError(
            f"--batch-size {global_batch} is the global batch and must be divisible by the number of "
            f"processes ({world.size}); use e.g. {max(1, round(global_batch / world.size)) * world.size}"
        )
    return global_batch // world.size


def model_config(config, num_classes: int, image_size: int):
    overrides = dict(num_classes=num_classes, image_size=image_size, drop_path=config.drop_path, dropout=config.dropout)
    for arg, field in (("depth", "depth"), ("dim", "dim"), ("heads", "num_heads"), ("patch_size", "patch_size")):
        if getattr(config, arg) is not None:
            overrides[field] = getattr(config, arg)
    try:
        return get_preset(config.preset, **overrides)
    except ValueError as err:
        raise UsageError(f"invalid model configuration: {err}") from None


def _progress(iterable, total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    # Quiet when stderr is not a terminal (CI logs, nohup): the per-epoch summary line remains.
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def _silent(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: only rank 0 prints."""


@dataclass
class TrainingRun:
    """What a training job carries from epoch to epoch; ``setup`` builds it."""

    config: TrainConfig
    world: dist_mod.World
    device: torch.device
    cfg: ViTConfig
    model: ViTClassifier  # the parameters: what is checkpointed and evaluated
    forward: Callable[[Tensor], Tensor]  # the model, or its DDP / torch.compile wrapper: what a step calls
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    data_info: dict  # the checkpoint's "data" entry: dataset, classes, mean, std, fingerprint
    out_dir: Path  # checkpoint.pt, metrics.jsonl and curves.png
    amp: bool = False  # bf16 autocast (CUDA only)
    start_epoch: int = 0  # epochs completed before this invocation
    step: int = 0  # optimizer steps taken, over all invocations
    log: Callable[..., None] = print
    ema: EMA | None = None  # --ema: the averaged weights, updated after every optimizer step
    best: dict | None = None  # --keep-best: {"epoch", "top1", "weights"} of the best epoch so far
    watch: NonFiniteWatch | None = None  # setup makes one on the device
    graph: GraphedStep | None = None  # --cuda-graphs: replays the captured step
    kernels: KernelChoice | None = None  # --fused: ours or the library's per op (set on the model; checkpointed)
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


def _resume_state(config: TrainConfig, ckpt_path: Path) -> dict | None:
    """The checkpoint to continue from (``--resume``), checked against this run's recipe; None for a
    fresh run, which must not replace a checkpoint unless asked to."""
    if config.resume:
        state = load_checkpoint(ckpt_path, required=RESUME_ENTRIES)  # every rank reads it
        saved = state["args"]  # the checkpoint's name for the training configuration
        changed = {k: (saved.get(k), getattr(config, k)) for k in RECIPE_ARGS if saved.get(k) != getattr(config, k)}
        if changed:
            raise SystemExit(f"--resume with a different recipe than {ckpt_path} was trained with "
                             f"(name: (checkpoint, now)): {changed}")
        return state
    if ckpt_path.exists() and not config.overwrite:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, --overwrite to replace it, "
                         "or choose another --out-dir")
    return None


def setup(config: TrainConfig, world: dist_mod.World, device: torch.device) -> TrainingRun:
    """Load the data, build the model, optimizer and schedule, and restore them all when resuming.

    The order of the steps that draw from torch's global generator (model initialisation, the
    per-rank reseed, the restored state) is what makes a resumed run bit-identical to an
    uninterrupted one."""
    out_dir = Path(config.out_dir)
    resume_state = _resume_state(config, out_dir / CHECKPOINT_FILE)
    torch.manual_seed(config.seed)
    log = print if world.is_main else _silent
    if config.dataset == "imagefolder" and world.is_distributed:
        # One process per machine decodes a folder that has no cache yet; the others wait and load it.
        if world.local_rank == 0:
            datasets.load_data(config.dataset, config.data_dir, **data_options(config), log=log, progress=world.is_main)
        dist_mod.barrier(world)
    train_set, test_set = datasets.load_data(config.dataset, config.data_dir, **data_options(config), log=log,
                                             progress=world.is_main)
    fingerprint = datasets.fingerprint(config.dataset, train_set, test_set)  # on the host, before .to(device)
    if resume_state is not None:
        check_resume_data(resume_state, fingerprint, out_dir / CHECKPOINT_FILE, print if world.is_main else _silent)
    if len(train_set.classes) < 2:
        raise SystemExit(f"error: {config.dataset} in {config.data_dir} has a single class ({train_set.classes[0]!r}): "
                         "a classifier of one class learns nothing; an image folder needs a folder per class "
                         "under train/ (and val/)")
    cfg = model_config(config, len(train_set.classes), train_set.images.shape[-1])
    if resume_state is not None and resume_state["config"] != cfg.to_dict():
        diff = {k: (v, cfg.to_dict()[k]) for k, v in resume_state["config"].items() if cfg.to_dict().get(k) != v}
        raise SystemExit(f"--resume: the model configuration differs from {out_dir / CHECKPOINT_FILE} "
                         f"(checkpoint, now): {diff}")
    mean, std = datasets.channel_stats(train_set.images)
    shard = dict(rank=world.rank, world_size=world.size)
    on_host, data_line = data_placement(config, device, train_set, test_set)
    train_loader = make_train_loader(config, world, train_set, mean, std, device=device, host_images=on_host)
    test_loader = DeviceLoader(test_set, config.eval_batch_size, mean, std, train=False, device=device,
                               host_images=on_host, **shard)

    model = ViTClassifier(cfg, backend=config.backend).to(device)
    amp = device.type == "cuda" and not config.no_amp
    # Before anything copies, wraps, compiles or captures the model: the choice holds for the run.
    kernels, kernels_line = choose_run_kernels(config, world, device, cfg, train_loader, amp, resume_state,
                                               out_dir / CHECKPOINT_FILE)
    model.set_kernels(kernels)
    optimizer = make_optimizer(param_groups(model, config.weight_decay), config.lr, (config.beta1, config.beta2), device)
    scheduler = make_schedule(config, optimizer, len(train_loader))
    if world.is_distributed:
        # Every rank built the same initial weights; from here on each rank draws its own
        # stochastic-depth and dropout masks, so it gets a generator of its own.
        torch.manual_seed(rank_seed(config.seed, world.rank))
    run = TrainingRun(
        config=config, world=world, device=device, cfg=cfg, model=model, forward=model, optimizer=optimizer,
        scheduler=scheduler, train_loader=train_loader, test_loader=test_loader,
        data_info={"dataset": config.dataset, "classes": list(train_set.classes), "mean": mean, "std": std,
                   "fingerprint": fingerprint},
        out_dir=out_dir, amp=amp, log=print if world.is_main else _silent,
        watch=NonFiniteWatch(device), kernels=kernels,
        ema=EMA(model, config.ema) if config.ema > 0 else None,
        # Nothing is deleted here: a previous run's files (--overwrite, or a run that died before its
        # first checkpoint) are replaced when this run writes its first checkpoint (save_epoch).
        replacing=resume_state is None,
    )
    if resume_state is not None:
        check_steps_per_epoch(resume_state, len(train_loader), out_dir / CHECKPOINT_FILE)
        _resume(run, resume_state)
    run.forward = _wrap(model, config.compile, world, device, config.compile_mode, config.cuda_graphs)
    if config.cuda_graphs:
        run.graph = GraphedStep(run)
    _log_start(run)
    if data_line is not None:
        run.log(data_line)
    if kernels_line is not None:
        run.log(kernels_line)
    return run


def choose_run_kernels(config: TrainConfig, world: dist_mod.World, device: torch.device, cfg: ViTConfig,
                       train_loader: DeviceLoader, amp: bool, resume_state: dict | None,
                       ckpt_path: Path) -> tuple[KernelChoice | None, str | None]:
    """The run's kernel choice (``vit_fast.kernel_choice``) and its start-up log line: on "fused",
    the checkpoint's choice when resuming (unless --kernels names another mode), else --kernels'
    (default auto: timed on the run's shapes on a CUDA device); on another backend None, with a
    note when --kernels was given. Under torchrun every rank times, and all use rank 0's choice."""
    if config.backend != "fused":
        note = None if config.kernels is None else (
            f"note: --kernels {config.kernels} is ignored: it chooses between the fused backend's kernels and the "
            f"library's, and --backend {config.backend} runs none of ours")
        return None, note
    recorded = resume_state.get("kernels") if resume_state is not None else None
    if recorded is not None:
        try:
            KernelChoice.from_dict(recorded)
        except ValueError as err:
            raise CheckpointError(f"checkpoint {ckpt_path}: its 'kernels' entry does not read: {err}") from None
    workload = Workload(cfg, train_loader.batch_size, amp, config.label_smoothing, train_loader.mixing,
                        config.cuda_graphs)
    choice, line = choose_for_run(config.kernels, recorded, device, workload)
    if resume_state is not None and recorded is None:
        line += f"; {ckpt_path} records no kernel choice (written before it was recorded, or on another backend)"
    if world.is_distributed:
        choice = KernelChoice.from_dict(dist_mod.all_gather_objects(choice.to_dict(), world)[0])
        line += " (rank 0's choice, used by every rank)"
    return choice, line


def data_placement(config: TrainConfig, device: torch.device, train_set: datasets.ImageDataset,
                   test_set: datasets.ImageDataset, free_bytes: int | None = None) -> tuple[bool, str | None]:
    """Where the run keeps its images (--data-device, ``vit_fast.loader.data_on_host``: True for host
    memory), from the uint8 bytes of both splits, and the start-up line that says so (None on a CPU
    run that indexes its set directly). ``free_bytes``: the GPU's free memory (default: read from
    the device)."""
    nbytes = train_set.images.numel() + test_set.images.numel()
    if device.type == "cuda" and config.data_device == "auto" and free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    try:
        on_host = data_on_host(config.data_device, device, nbytes, free_bytes)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if device.type != "cuda" and not on_host:
        return on_host, None  # the usual CPU run: nothing to say
    where = "host memory, each batch copied to the device through pinned buffers" if on_host else f"{device} memory"
    if device.type != "cuda":
        where = "host memory, each batch gathered into a staging buffer"
    why = ""
    if device.type == "cuda" and config.data_device == "auto":
        share = f"{DATA_SHARE_OF_FREE:.0%} of the GPU's {free_bytes / 1e9:.1f} GB free"
        why = f" (auto: {'more' if on_host else 'no more'} than {share})"
    size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
    return on_host, f"data: {size} of uint8 images in {where}{why}"


def make_train_loader(config: TrainConfig, world: dist_mod.World, train_set: datasets.ImageDataset,
                      mean: list[float], std: list[float], log: Callable[..., None] = print,
                      device: torch.device | None = None, host_images: bool = False) -> DeviceLoader:
    """The training loader on ``device`` (default: the images' device), the images there or in host
    memory (``host_images``). Under --cuda-graphs every batch must have the graph's shape, so the last
    partial batch of each epoch is dropped (logged with its size). The fused backend builds its
    batches with the fused data kernels (the same batches: see DeviceLoader's ``backend``)."""
    recipe = config.recipe_values
    loader = DeviceLoader(train_set, per_rank_batch(config.batch_size, world), mean, std, train=True,
                          augment=recipe.augmentation(), seed=config.seed, drop_last=config.cuda_graphs,
                          rank=world.rank, world_size=world.size, backend=config.backend, device=device,
                          host_images=host_images)
    dropped = len(train_set) - sum(loader.global_batch_sizes())
    if config.cuda_graphs and dropped and world.is_main:
        log(f"--cuda-graphs: every batch has the captured graph's shape, so each epoch's last partial batch of "
            f"{dropped} images is dropped ({len(loader)} steps of {config.batch_size} images per epoch)")
    return loader


def make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRSchedule:
    """Linear warm-up over --warmup-epochs, cosine to --min-lr at the end of --epochs."""
    factor = warmup_cosine(round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch,
                           config.min_lr / config.lr)
    return LRSchedule(optimizer.param_groups[0]["lr"], config.lr, factor, config.epochs * steps_per_epoch)


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
        restore_rng(state, run.world, run.device, run.config.seed, run.start_epoch, run.log)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:  # what load_state_dict and set_rng_state raise
        raise CheckpointError(f"checkpoint {run.ckpt_path} does not fit this run: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if run.world.is_main:
        _truncate_metrics(run.metrics_path, run.start_epoch, state.get("metrics"), run.log)


def _wrap(model: ViTClassifier, compile_model: bool, world: dist_mod.World,
          device: torch.device, compile_mode: str | None = None, cuda_graphs: bool = False) -> Callable[[Tensor], Tensor]:
    """What the training step calls: the model, under DDP with several ranks, compiled if asked."""
    trained = model
    if world.is_distributed:
        # DDP broadcasts rank 0's weights, then averages gradients over the ranks in backward
        # (NCCL or gloo all-reduce); the backend choice inside the model is untouched. A step
        # captured whole in a CUDA graph needs DDP built on a side stream (PyTorch's CUDA
        # semantics notes on DistributedDataParallel with whole-network capture).
        from torch.nn.parallel import DistributedDataParallel

        side = torch.cuda.Stream(device) if cuda_graphs and device.type == "cuda" else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
    return torch.compile(trained, mode=compile_mode) if compile_model else trained


def _log_start(run: TrainingRun) -> None:
    config, world = run.config, run.world
    n_params = sum(p.numel() for p in run.model.parameters())
    if world.is_distributed:
        batch = (f"global batch {config.batch_size} = {world.size} ranks x {run.train_loader.batch_size} per rank "
                 f"({torch.distributed.get_backend()})")
    else:
        batch = f"batch {config.batch_size}"
    run.log(f"vit_fast: {config.preset} ({n_params / 1e6:.2f}M parameters, backend {config.backend}) on {run.device}, "
            f"{config.dataset}: {len(run.train_loader.data)} train / {len(run.test_loader.data)} test images, {batch}, "
            f"peak lr {config.lr:.2e}, {config.epochs} epochs of {len(run.train_loader)} steps, recipe {config.recipe}"
            + (f", EMA {config.ema}" if run.ema is not None else "")
            + (f", resuming after epoch {run.start_epoch}" if run.start_epoch else ""))


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
    config, world, device = run.config, run.world, run.device
    run.model.train()
    global_sizes = run.train_loader.global_batch_sizes()
    graph = run.graph
    if graph is None:
        batches = epoch_batches(run, epoch)
        loss_sum = torch.zeros((), device=device)
    else:  # the graph makes each batch itself: the epoch's order and position go to the device here
        run.train_loader.set_epoch(epoch)
        run.train_loader.begin_epoch()
        if graph.loss_sum is not None:
            graph.loss_sum.zero_()
    readback = LossReadback(run)
    seen = 0
    synchronize(device)
    t0 = time.perf_counter()
    rows_per_step = run.train_loader.batch_rows()
    bar = _progress(rows_per_step, len(rows_per_step), f"epoch {epoch + 1}/{config.epochs}", enabled=world.is_main)
    for i, rows in enumerate(bar):
        if graph is not None:  # a replay and integer updates: no tensor is made on the host
            loss = graph(rows)
        else:
            x, y = next(batches)
            # DDP averages the ranks' gradients. Weighting each rank's mean loss by its share of
            # the global batch makes that average the gradient of the global batch's mean loss,
            # as a single process computes it (the factor is exactly 1 unless the last batch is
            # uneven; under --cuda-graphs every batch is full). Batch sizes are known on the host:
            # the factor costs no sync.
            scale = rows * world.size / global_sizes[i] if world.is_distributed else 1.0
            loss = run_step(run, x, y, scale)
            loss_sum += loss * rows
        run.step += 1
        seen += rows
        if config.log_every and run.step % config.log_every == 0:
            done = readback.take()
            readback.request(run.step, loss)
            if done is not None:
                stop_if_not_finite(run, done[2])
                bar.set_postfix(loss=f"{done[1]:.3f}", img_s=f"{seen * world.size / (time.perf_counter() - t0):.0f}")
    synchronize(device)
    elapsed = time.perf_counter() - t0
    stop_if_not_finite(run, int(world_first_bad(run)))
    if graph is not None:
        loss_sum = graph.loss_sum if graph.loss_sum is not None else torch.zeros((), device=device)
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
        "args": run.config.to_dict(), "data": run.data_info, "metrics": metrics,
        "recipe": run.config.recipe_values.to_dict(), "best": run.best,
    }
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    if run.kernels is not None:
        state["kernels"] = run.kernels.to_dict()
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
                         "step": run.step, "args": run.config.to_dict(), "data": run.data_info, "metrics": metrics,
                         "recipe": run.config.recipe_values.to_dict(), "weights": weights,
                         **({"kernels": run.kernels.to_dict()} if run.kernels is not None else {})}, run.best_path)


def run_epochs(run: TrainingRun) -> dict:
    """Train, evaluate and checkpoint epoch after epoch; returns the last epoch's metrics."""
    config = run.config
    metrics = {}
    for epoch in range(run.start_epoch, config.epochs):
        if config.stop_after is not None and epoch - run.start_epoch >= config.stop_after:
            run.log(f"stopping after {config.stop_after} epoch(s) as asked; continue with --resume")
            break
        metrics = train_one_epoch(run, epoch)
        metrics.update(evaluate(run.model, run.test_loader, run.device, run.amp, run.world))
        if run.ema is not None:
            ema_metrics = evaluate(run.ema.model, run.test_loader, run.device, run.amp, run.world)
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        if config.keep_best:
            keep_best(run, epoch, metrics)
        save_epoch(run, epoch, metrics)
        run.log(f"epoch {epoch + 1:3d}/{config.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  top1 {metrics['top1']:5.2f}%  top5 {metrics['top5']:5.2f}%  "
                + (f"ema top1 {metrics['ema_top1']:5.2f}%  " if run.ema is not None else "")
                + f"lr {metrics['lr']:.2e}  {metrics['images_per_s']:.0f} img/s", flush=True)
    if run.world.is_main and run.metrics_path.exists():
        write_curves(run.metrics_path, run.out_dir / "curves.png")
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
    changes = datasets.fingerprint_changes(saved, fingerprint)
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
