"""``DeviceLoader``: the batches of an epoch from a device-resident dataset, in an order drawn
from (seed, epoch), sharded over data-parallel ranks, with repeated augmentation
(``repeated_indices``); each training batch's draws made from counters on the device
(``vit_fast.augment.draws``) and the batch built by ``vit_fast.augment.pipeline``. A dataset
larger than the GPU stays in host memory (``host_images``), each batch's images staged to the
device asynchronously through pinned buffers; ``data_on_host`` decides where a run keeps its data
(``--data-device``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .augment.config import AugmentConfig
from .config import BACKENDS
from .augment.draws import DrawSpec, counter_draws, draw_spec, policy_tables
from .augment.pipeline import build_batch, normalize, policy_of
from .datasets import ImageDataset

DATA_DEVICES = ("auto", "cuda", "cpu")
# --data-device auto keeps the uint8 set on the GPU when it takes at most this share of the GPU's
# free memory at start-up (torch.cuda.mem_get_info, read before the model is built). The other half
# must hold what training allocates after it: the weights, their gradients and AdamW's two moments,
# the batch's activations (several GB for a ViT at batch 1024), cuBLAS workspaces, a CUDA graph's
# memory pool and the caching allocator's slack. A set above it stays in host memory.
DATA_SHARE_OF_FREE = 0.5
# Host-resident data: pinned host buffers the batches are gathered into, used in turn; the host waits
# for buffer k's previous copy to the device (HOST_BUFFERS steps back) before refilling it.
HOST_BUFFERS = 2


def data_on_host(choice: str, device: torch.device, nbytes: int, free_bytes: int | None = None) -> bool:
    """Whether a run keeps its uint8 images in host memory (``DeviceLoader``'s ``host_images``) for
    ``--data-device`` ``choice`` on the training ``device``, the images taking ``nbytes``.

    On a CUDA device: "cuda" keeps them on the GPU, "cpu" in host memory, "auto" on the GPU
    when ``nbytes`` is at most DATA_SHARE_OF_FREE of ``free_bytes`` (default: the device's free
    memory now, ``torch.cuda.mem_get_info``), else on the host. On a CPU device the images are in
    host memory whatever the choice: "auto" indexes the set directly (as "cuda" would on a GPU),
    "cpu" takes the host path all the same (each batch gathered into a staging buffer, the same
    batches: a way to check that path without a GPU), and "cuda" is an error."""
    if choice not in DATA_DEVICES:
        raise ValueError(f"--data-device must be one of {DATA_DEVICES}, got {choice!r}")
    if device.type != "cuda":
        if choice == "cuda":
            raise ValueError(f"--data-device cuda keeps the dataset in GPU memory, but the training device is "
                             f"{device}; use --data-device auto or cpu")
        return choice == "cpu"
    if choice != "auto":
        return choice == "cpu"
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return nbytes > DATA_SHARE_OF_FREE * free_bytes


def repeated_indices(
    num_images: int, generator: torch.Generator, rank: int = 0, world_size: int = 1, repeats: int = 3,
    shuffle: bool = True, round_to: int = 256,
) -> Tensor:  # fmt: skip
    """Rank ``rank``'s image indices for one epoch of repeated augmentation, as DeiT's RASampler.

    The epoch's permutation (from ``generator``, the epoch's CPU generator, the same on every rank)
    is repeated element-wise ``repeats`` times ([a, a, a, b, b, b, ...]), padded with its own head
    to a multiple of world_size, and dealt round-robin: rank r takes positions r, r + W, ..., so the
    consecutive copies of an image go to different ranks (each augments its copy independently).
    Each rank then keeps its first floor(num_images // round_to * round_to / W) positions, so all
    ranks together still see about num_images images per epoch (DeiT: round_to 256): an epoch
    covers about 1/repeats of the distinct images, each ``repeats`` times. Returns int64 (n,) CPU."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of world_size {world_size}")
    if repeats < 1 or round_to < 1:
        raise ValueError(f"repeats and round_to must be >= 1, got {repeats} and {round_to}")
    order = torch.randperm(num_images, generator=generator) if shuffle else torch.arange(num_images)
    seq = order.repeat_interleave(repeats)
    total = math.ceil(num_images * repeats / world_size) * world_size
    if total > seq.numel():
        seq = torch.cat([seq, seq.repeat(math.ceil(total / max(seq.numel(), 1)))[: total - seq.numel()]])
    keep = int(num_images // round_to * round_to / world_size)
    return seq[rank:total:world_size][:keep]


class DeviceLoader:
    """Batches of a device-resident ImageDataset: shuffled, augmented and normalised on device.

    Every epoch's order comes from a CPU generator seeded with (seed, epoch), and is copied to the
    device once, when the epoch's iterator is made. Every draw of a training batch is a pure
    function of (seed, epoch, step, image position) (``vit_fast.augment.draws``: Philox counters),
    read from ``position``, an int64 (2,) device tensor (epoch, step) that each batch advances on
    the device. So an epoch is the same whether or not the run was interrupted before it, and a
    CUDA graph that captured ``train_batch`` draws the next batch at every replay with no host
    work (``vit_fast.step.GraphedStep``). On a CUDA device the draws are one fused launch
    (``vit_fast::augment_draw``) on the torch and fused backends; elsewhere, and on the reference
    backend, its torch twin, which computes the same bits (``uses_draw_kernel``).
    A training batch is then built in DeiT's order by ``vit_fast.augment.pipeline.build_batch``:
    crop and flip, the per-image policy (uint8), normalisation, random erasing, then mixup/cutmix,
    as ``augment`` (a vit_fast.augment.config.AugmentConfig; default: crop and flip only) says.
    Targets: the labels (B,), or with mixing the mixed one-hot targets (B, K), unsmoothed (the
    loss applies label smoothing).

    Repeated augmentation (``augment.repeats`` k > 1; Hoffer et al. 2020, DeiT's RASampler): the epoch's
    order is its permutation with each index repeated k times in a row, cut to the dataset's size,
    so an epoch holds about N / k distinct images, k differently augmented copies of each. (DeiT
    also rounds the epoch down to a multiple of 256 images; here it keeps N, so that small
    datasets still make whole steps.)

    Data parallel: with ``world_size`` ranks, ``batch_size`` is the per-rank batch. The epoch is
    cut into global batches of ``batch_size * world_size`` positions of one order (the same on
    every rank), and rank r takes positions r, r + world_size, ... of each: consecutive repeats of
    an image go to different ranks, as DeiT deals them. The draws of crop, flip, the policy and
    erasing are keyed by the image's position in the global batch, so the ranks together see
    exactly the images a single process with the global batch sees. Mixup and cutmix pair images
    within the rank's own batch (as data-parallel training usually does), keyed by the rank, so
    with them the multi-rank run is a different, equally valid, draw.

    A batch is produced without host syncs: the normalisation constants, the policy's tables, the
    epoch's order and ``position`` live on the device.
    ``drop_last`` drops an epoch's last partial global batch, so every batch has the same shape.

    ``backend`` is the model's (``vit_fast.config.BACKENDS``), so one string chooses for the model,
    the loss and the loader. With "fused" a training batch is built from the same draws by two fused
    kernels instead of the torch ops (``vit_fast.augment.pipeline.fused_batch``: gather + crop + flip
    + policy, then normalise + erase + mix + targets), with the same result (CUDA tensors, or CPU
    tensors under Triton's interpreter); "reference" and "torch" build it with torch ops.
    Evaluation batches are the same either way.

    Host-resident data (``host_images``; ``--data-device cpu``, or auto when the set is too big for
    the GPU): the uint8 images stay in host memory as given (not page-locked: a memory-mapped array
    works, and pinning a set of tens of GB would lock that much RAM, rounded up to a power of two by
    torch's pinned allocator), only the labels and the epoch's order go to ``device``. The host
    knows the epoch's order, so ``stage`` gathers a step's images itself (``index_select`` into one
    of HOST_BUFFERS pinned buffers, in turn) and copies them with ``non_blocking`` on a side stream
    into half ``step % 2`` of a static device staging buffer (2 batches); the compute stream waits for that copy's event, and the next copy
    into the same half waits for the event recorded after the batch that read it (``release``). The
    batch is built from the staging rows (their draws are the same: the draws are keyed by position,
    the labels read through the device's order), so the batches are the device-resident path's, bit
    for bit. The host waits only before refilling a pinned buffer, for that buffer's copy of
    HOST_BUFFERS steps before (so it runs at most a few steps ahead of the device); it never waits
    for the step it queues. Under a CUDA graph the copy stays outside the graph: the caller stages
    before each replay and releases after (``vit_fast.step.GraphedStep``); the captured data phase
    reads the staging half from ``position``.
    """

    def __init__(
        self,
        data: ImageDataset,
        batch_size: int,
        mean: list[float],
        std: list[float],
        train: bool,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        backend: str = "torch",
        device: torch.device | str | None = None,
        host_images: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of world_size {world_size}")
        augment = AugmentConfig() if augment is None else augment
        if augment.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {augment.repeats}")
        dev = data.images.device if device is None else torch.device(device)
        self.host_images = host_images
        data = self._placed(data, dev, host_images)
        self.device = dev
        self.data, self.batch_size, self.mean, self.std = data, batch_size, mean, std
        self.train, self.augment, self.seed, self.drop_last = train, augment, seed, drop_last
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.num_classes = len(data.classes)
        self.epoch = 0
        self._mean = torch.as_tensor(mean, dtype=torch.float32, device=dev)  # (C,)
        self._std = torch.as_tensor(std, dtype=torch.float32, device=dev)
        self._classes = torch.arange(self.num_classes, device=dev)  # (K,), for one-hot targets
        # The policy's magnitude tables come from host data: built here, so that no batch copies them.
        _, C, H, W = data.images.shape
        self.policy = policy_of(augment, dev, H, W) if train else None
        self._tables = policy_tables(self.policy, dev, H, W) if train else None
        self.position = torch.zeros(2, dtype=torch.int64, device=dev)  # (epoch, step): what the next batch draws
        self._order: Tensor | None = None  # the epoch's order on the device, filled in place every epoch
        self._specs: dict[int, DrawSpec] = {}
        # Whether the draws run as the fused kernel (None: on CUDA devices, for every backend but
        # "reference", when Triton is installed). The cost account sets True to count, on fake CPU
        # tensors, what a GPU runs.
        self.fused_draws: bool | None = None
        if host_images and train:
            self._init_staging(C, H, W)

    @staticmethod
    def _placed(data: ImageDataset, device: torch.device, host_images: bool) -> ImageDataset:
        """The dataset as the loader keeps it: all on ``device``, or (``host_images``) the images in
        host memory (pageable: only the batch buffers ``stage`` gathers into are pinned) and the
        labels on ``device``."""
        if not host_images:
            placed = data.images.device == device and data.labels.device == device
            return data if placed else data.to(device)
        return ImageDataset(data.images.cpu(), data.labels.to(device), data.classes)

    def _init_staging(self, C: int, H: int, W: int) -> None:
        """The host path's buffers, allocated once: the device staging buffer (two batches), the
        pinned host buffers, the copy stream and its events (CUDA only)."""
        B, dev = self.batch_size, self.device
        cuda = dev.type == "cuda"
        self._staging = torch.empty((2 * B, C, H, W), dtype=torch.uint8, device=dev)
        self._pinned = [torch.empty((B, C, H, W), dtype=torch.uint8, pin_memory=cuda) for _ in range(HOST_BUFFERS)]
        self._staging_rows = torch.arange(B, device=dev)
        self._copy_stream = torch.cuda.Stream(dev) if cuda else None
        self._copied: list[torch.cuda.Event | None] = [None] * HOST_BUFFERS  # after each pinned buffer's copy
        self._consumed: list[torch.cuda.Event | None] = [None, None]  # after each staging half's batch
        self._order_host: Tensor | None = None
        self._host_step = 0  # the step ``stage`` copies next (the device's ``position`` step, known on the host)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, generator: torch.Generator) -> Tensor:
        n = len(self.data)
        if not self.train:
            return torch.arange(n)
        if self.augment.repeats > 1:
            return repeated_indices(n, generator, repeats=self.augment.repeats, round_to=1)  # (n,)
        return torch.randperm(n, generator=generator, device="cpu")

    def _spans(self) -> list[tuple[int, int]]:
        """(start, stop) positions in the epoch's order of the global batches this rank takes part in."""
        n, g, w = len(self.data), self.batch_size * self.world_size, self.world_size
        spans = [(s, min(s + g, n)) for s in range(0, n, g)]
        if spans:
            last = spans[-1][1] - spans[-1][0]
            # Training ranks step together (every rank must run every step for the gradient
            # all-reduce), so a last global batch too small to give each rank an image is dropped.
            if (self.drop_last and last < g) or (self.train and w > 1 and last < w):
                spans.pop()
        return [(s, e) for s, e in spans if s + self.rank < e]

    def global_batch_sizes(self) -> list[int]:
        """Images in each global batch of an epoch (all ranks together), in step order."""
        return [e - s for s, e in self._spans()]

    def __len__(self) -> int:
        return len(self._spans())

    @property
    def mixing(self) -> bool:
        return self.train and self.augment.mixing

    def draw_spec(self, rows: int) -> DrawSpec:
        """The draws of a batch of ``rows`` images on this rank (cached: the batch size is fixed but
        for an epoch's last batch)."""
        if rows not in self._specs:
            _, C, H, W = self.data.images.shape
            self._specs[rows] = draw_spec(self.augment, self.policy, self.seed, rows, (C, H, W), self.rank,
                                          self.world_size, self.batch_size * self.world_size)
        return self._specs[rows]

    def begin_epoch(self) -> None:
        """Copy the epoch's order to the device and set ``position`` to (epoch, 0): the once-per-epoch
        host work of a training epoch (``train_batch`` then needs none)."""
        order = self._indices(torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        dev = self.device
        if self._order is None or self._order.shape != order.shape:
            self._order = torch.empty(order.shape, dtype=torch.int64, device=dev)
        if dev.type == "cuda":
            order = order.pin_memory()  # an asynchronous copy; the caching host allocator keeps it alive
        self._order.copy_(order, non_blocking=True)
        self.position[0].fill_(self.epoch)
        self.position[1].zero_()
        if self.host_images:
            self._order_host, self._host_step = order, 0

    def stage(self, rows: int) -> None:
        """Host path: bring the next step's ``rows`` images to the device staging buffer (half
        ``step % 2``), asynchronously, and make the current stream wait for them. The host gathers
        them (dataset rows ``order[s * G + rank + j * world_size]``, j < rows, G the global batch)
        into pinned buffer ``s % HOST_BUFFERS``, first waiting for that buffer's previous copy to
        finish; the copy waits (on the device) for the batch that last read the staging half
        (``release``). No device value is read. A no-op for device-resident data."""
        if not self.host_images:
            return
        if self._order_host is None:
            raise RuntimeError("stage before begin_epoch: the epoch's order is not known yet")
        s, B, G = self._host_step, self.batch_size, self.batch_size * self.world_size
        if rows > B:
            raise ValueError(f"a batch of {rows} rows does not fit the staging buffer of {B}")
        start = s * G + self.rank
        index = self._order_host[start:start + (rows - 1) * self.world_size + 1:self.world_size]
        if index.numel() != rows:
            raise RuntimeError(f"step {s} of the epoch asks for {rows} images past the epoch's end")
        k, half = s % HOST_BUFFERS, s % 2
        pinned, dest = self._pinned[k][:rows], self._staging[half * B:half * B + rows]
        if self._copy_stream is None:  # CPU: host and device memory are one
            torch.index_select(self.data.images, 0, index, out=pinned)
            dest.copy_(pinned)
        else:
            if self._copied[k] is not None:
                self._copied[k].synchronize()  # buffer k's copy HOST_BUFFERS steps back has read it
            torch.index_select(self.data.images, 0, index, out=pinned)
            if self._consumed[half] is not None:
                self._copy_stream.wait_event(self._consumed[half])
            with torch.cuda.stream(self._copy_stream):
                dest.copy_(pinned, non_blocking=True)
                if self._copied[k] is None:
                    self._copied[k] = torch.cuda.Event()
                self._copied[k].record(self._copy_stream)
            torch.cuda.current_stream(self.device).wait_event(self._copied[k])
        self._host_step += 1

    def release(self) -> None:
        """Host path on CUDA: mark the staging half of the step last staged as read, on the current
        stream (after the batch's work, or after a graph replay that built it), so that the copy two
        steps on may overwrite it. A no-op elsewhere."""
        if not self.host_images or self._copy_stream is None:
            return
        half = (self._host_step - 1) % 2
        if self._consumed[half] is None:
            self._consumed[half] = torch.cuda.Event()
        self._consumed[half].record(torch.cuda.current_stream(self.device))

    def train_batch(self, rows: int, stage: bool = True) -> tuple[Tensor, Tensor]:
        """The training batch at ``position`` (``rows`` images on this rank), advancing ``position``
        to the next step: the draws (one fused launch on CUDA), the step's increment, the batch
        (crop and flip + policy, then normalise + erase + mix: two fused launches on "fused").
        Reads nothing back to the host, so a CUDA graph can capture it. Host-resident data: the
        images come from the staging half ``step % 2``; ``stage`` True stages them first and
        releases them after (an eager step); False when the caller does both around a CUDA graph
        that holds this batch (a capture cannot hold the host's gather)."""
        if self._order is None:
            raise RuntimeError("train_batch before begin_epoch: the epoch's order is not on the device yet")
        if self.host_images and stage:
            self.stage(rows)
        spec = self.draw_spec(rows)
        if self.uses_draw_kernel:
            from .fused.augment_draw import augment_draw  # needs Triton

            index, labels, draws = augment_draw(spec, self._order, self.data.labels, self.position, self._tables)
        else:
            index, labels, draws = counter_draws(spec, self._order, self.data.labels, self.position, self._tables)
        images = self.data.images
        if self.host_images:  # the staged rows of this step's half: (step % 2) * B + j
            index = self._staging_rows[:rows] + (self.position[1] % 2) * self.batch_size
            images = self._staging
        self.position[1:].add_(1)
        batch = build_batch(images, index, labels, draws, self.augment, self.policy, self._mean, self._std,
                            self._classes if self.mixing else None, fused=self.backend == "fused")
        if self.host_images and stage:
            self.release()
        return batch

    @property
    def uses_draw_kernel(self) -> bool:
        """Whether a batch's draws are the fused kernel's (else its torch twin's: the same bits).
        The reference backend keeps the twin, the plain-torch statement of the draws, so that on a
        GPU it checks the kernel rather than sharing it."""
        if self.fused_draws is not None:
            return self.fused_draws
        return self.position.is_cuda and self.backend != "reference" and importlib.util.find_spec("triton") is not None

    def batch_rows(self) -> list[int]:
        """This rank's images in each batch of an epoch, in step order."""
        return [len(range(start + self.rank, stop, self.world_size)) for start, stop in self._spans()]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not self.train:
            return self._eval_batches()
        self.begin_epoch()
        return (self.train_batch(rows) for rows in self.batch_rows())

    def _eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.host_images:
            yield from self._host_eval_batches()
            return
        idx = torch.arange(len(self.data), device=self.data.images.device)
        mine = slice(self.rank, None, self.world_size)
        for start, stop in self._spans():
            sel = idx[start:stop][mine]
            yield normalize(self.data.images[sel], self._mean, self._std), self.data.labels[sel]

    def _host_eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Evaluation batches of host-resident images: each rank's rows of a batch copied to the
        device (through pinned memory on CUDA, asynchronously), the labels indexed on the device."""
        cuda = self.device.type == "cuda"
        for start, stop in self._spans():
            rows = slice(start + self.rank, stop, self.world_size)
            images = self.data.images[rows].contiguous()
            if cuda:
                images = images.pin_memory()  # the caching host allocator keeps it until the copy is done
            yield (normalize(images.to(self.device, non_blocking=True), self._mean, self._std),
                   self.data.labels[rows])
