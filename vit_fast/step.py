"""The training step: what one optimizer step does, eagerly or replayed from a CUDA graph.

A step is four phases, ``PHASES = ("data", "forward_backward", "clip", "optimizer")``, and this is
how code that measures it (``python -m vit_fast.cost``, ``benchmarks/bench_train.py``) runs it:

    run = vit_fast.run.setup(config, world, device)   # a TrainingRun: model, optimizer, schedule, loaders
    batches = epoch_batches(run, epoch)             # the epoch's batch iterator (epoch set-up happens here)
    x, y = next_batch(batches, phase)               # "data": DeviceLoader draws, augments, normalises a batch
    loss = train_step(run, x, y, phase)             # "forward_backward", "clip", "optimizer"; loss (0-dim, device)

``phase`` is a callable ``phase(name) -> context manager`` entered around each phase (default
``no_phase``: nothing); ``vit_fast.syncs.HostSyncCounter.phase`` is one. ``train_step`` runs
forward under bf16 autocast (``run.amp``), the label-smoothed cross-entropy, the non-finite-loss
watch and backward ("forward_backward"); gradient clipping ("clip"); ``optimizer.step()`` and the
learning-rate update on the device ("optimizer"). ``train_step(..., loss_scale=s)`` backpropagates
``loss * s`` (data parallel: see ``vit_fast.run.train_one_epoch``). No phase reads anything back
to the host: the learning rate is a device tensor written by ``LRSchedule.step`` from a device
step counter, the optimizer (``make_optimizer``) is AdamW with ``fused=True`` (and
``capturable=True`` on CUDA), a non-finite loss sets a device flag (``NonFiniteWatch``) that
``LossReadback`` reads only at log points and epoch ends. ``GraphedStep`` (``--cuda-graphs``)
captures the data phase and ``train_step`` whole in one CUDA graph.

The step reads the run's resolved configuration (``run.config``, a ``vit_fast.train.TrainConfig``)
and nothing else of the command line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import ops
from .runtime import autocast

if TYPE_CHECKING:
    from .run import TrainingRun

PHASES = ("data", "forward_backward", "clip", "optimizer")
GRAPH_WARMUP_STEPS = 3  # eager steps before capture: lazy state (optimizer moments, compiled code) exists by then
# Under DDP: PyTorch's CUDA semantics notes ask for at least 11 DDP-enabled eager iterations before
# capturing a whole network with DistributedDataParallel (its buckets are rebuilt in the first ones).
DDP_GRAPH_WARMUP_STEPS = 11


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
        with autocast(run.device, run.amp, cache_enabled=not run.config.cuda_graphs):
            logits = run.forward(x)
        # The backend's loss, or on "fused" the library's where the run's kernel choice says so.
        loss = ops.cross_entropy(logits, y, run.config.label_smoothing, run.model.backend_for("cross_entropy"))
        run.watch.update(loss.detach(), run.scheduler.steps)
        run.optimizer.zero_grad(set_to_none=True)
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    with phase("clip"):
        if run.config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.clip_grad)
    with phase("optimizer"):
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update()
    return loss.detach()


class GraphedStep:
    """The whole step, data phase included, captured in one CUDA graph and replayed for every
    batch (--cuda-graphs): the batch's draws, the step's advance of the loader's ``position``, the
    batch itself (``DeviceLoader.train_batch``), forward, backward, clip, optimizer, lr update and
    the epoch's loss sum (``loss_sum``).

    A replay reads everything from device memory: the epoch's order (copied in place once per
    epoch by ``DeviceLoader.begin_epoch``), (epoch, step) from ``position``, the parameters and
    optimizer state. So the host work of a step is the replay call and a few integer updates in
    the epoch loop: no tensor is created and no Python loop over images or parameters runs, but
    for the loss read-back at --log-every points and the epoch's end (``tests/test_step.py``
    counts the ops dispatched between replays: none). With the images in host memory
    (``--data-device cpu``) the host also gathers the batch's images and queues their copy into
    the graph's static staging buffer before each replay, and records an event after it
    (``DeviceLoader.stage`` and ``release``); the captured data phase reads that buffer.

    The first ``warmup_steps`` calls are ordinary eager steps on a side stream (as capture
    requires: the optimizer's moments, cuBLAS workspaces and compiled code get allocated there,
    not inside the graph); the next call captures the step and replays it, later calls only
    replay. Warm-up steps are real training steps on real batches, so a graphed run takes exactly
    the steps an eager one does. Under DDP (torchrun) the warm-up is DDP_GRAPH_WARMUP_STEPS
    eager steps and DDP was built on a side stream, as PyTorch's notes on whole-network capture
    with DistributedDataParallel ask: the gradient buckets exist before capture, and the NCCL
    all-reduces are captured in the graph (every rank captures and replays the same graph).
    Dropout and stochastic depth draw from the CUDA default generator, which advances its Philox
    offset on every replay. Everything the step updates lives in tensors updated in place, so a
    resumed run, which restores those before the capture, continues exactly."""

    def __init__(self, run: TrainingRun, warmup_steps: int | None = None) -> None:
        if warmup_steps is None:
            warmup_steps = DDP_GRAPH_WARMUP_STEPS if run.world.is_distributed else GRAPH_WARMUP_STEPS
        self.run, self.warmup_steps = run, warmup_steps
        self.eager_steps = 0
        self.side: torch.cuda.Stream | None = None  # the warm-up steps' stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.rows: int | None = None  # the captured batch's images on this rank
        self.loss: Tensor | None = None
        self.loss_sum: Tensor | None = None  # sum of loss x rows since the last reset (epoch start)

    def data_and_step(self, rows: int) -> Tensor:
        """What the graph holds: the next batch, the step on it, the loss added to ``loss_sum``."""
        x, y = self.run.train_loader.train_batch(rows, stage=False)  # staged by __call__, outside the graph
        loss = train_step(self.run, x, y)
        self.loss_sum.add_(loss * rows)
        return loss

    def __call__(self, rows: int) -> Tensor:
        """One training step on the loader's next batch of ``rows`` images; returns its loss (a
        static device tensor, overwritten by the next call)."""
        if self.rows is None:
            self.rows = rows
            self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.run.device)
        elif rows != self.rows:
            raise RuntimeError(f"the CUDA graph was captured for batches of {self.rows} images per rank, got {rows}")
        loader = self.run.train_loader
        loader.stage(rows)  # host-resident data: the batch's images to the graph's static staging buffer
        if self.graph is not None:
            self.graph.replay()
        elif self.eager_steps < self.warmup_steps:
            self.side = self.side or torch.cuda.Stream(self.run.device)
            self.side.wait_stream(torch.cuda.current_stream(self.run.device))
            with torch.cuda.stream(self.side):
                self.loss = self.data_and_step(rows)
            torch.cuda.current_stream(self.run.device).wait_stream(self.side)
            self.eager_steps += 1
        else:
            self.graph = torch.cuda.CUDAGraph()
            # Gradients are allocated afresh inside the capture, from the graph's memory pool.
            self.run.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.loss = self.data_and_step(rows)
            self.graph.replay()  # capture only records: this runs the batch
        loader.release()
        return self.loss


def run_step(run: TrainingRun, x: Tensor, y: Tensor, loss_scale: float = 1.0) -> Tensor:
    """An eager training step as the epoch loop takes it (under --cuda-graphs the loop calls
    ``run.graph(rows)`` instead, which makes the batch inside the graph)."""
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
        first_bad = world_first_bad(self.run)
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


def world_first_bad(run: TrainingRun) -> Tensor:
    """The first non-finite step over all ranks (every rank calls this at the same steps)."""
    first_bad = run.watch.first_bad.clone()
    if run.world.is_distributed:
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    return first_bad
