"""``DeviceLoader``: the batches of an epoch from a device-resident dataset, in an order drawn
from (seed, epoch), sharded over data-parallel ranks, with repeated augmentation
(``repeated_indices``); each training batch's draws made from counters on the device
(``vit_fast.augment.draws``) and the batch built by ``vit_fast.augment.pipeline``.
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
        self.data, self.batch_size, self.mean, self.std = data, batch_size, mean, std
        self.train, self.augment, self.seed, self.drop_last = train, augment, seed, drop_last
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.num_classes = len(data.classes)
        self.epoch = 0
        dev = data.images.device
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
        dev = self.data.images.device
        if self._order is None or self._order.shape != order.shape:
            self._order = torch.empty(order.shape, dtype=torch.int64, device=dev)
        if dev.type == "cuda":
            order = order.pin_memory()  # an asynchronous copy; the caching host allocator keeps it alive
        self._order.copy_(order, non_blocking=True)
        self.position[0].fill_(self.epoch)
        self.position[1].zero_()

    def train_batch(self, rows: int) -> tuple[Tensor, Tensor]:
        """The training batch at ``position`` (``rows`` images on this rank), advancing ``position``
        to the next step: the draws (one fused launch on CUDA), the step's increment, the batch
        (crop and flip + policy, then normalise + erase + mix: two fused launches on "fused").
        Reads nothing back to the host, so a CUDA graph can capture it."""
        if self._order is None:
            raise RuntimeError("train_batch before begin_epoch: the epoch's order is not on the device yet")
        spec = self.draw_spec(rows)
        if self.uses_draw_kernel:
            from .fused.augment_draw import augment_draw  # needs Triton

            index, labels, draws = augment_draw(spec, self._order, self.data.labels, self.position, self._tables)
        else:
            index, labels, draws = counter_draws(spec, self._order, self.data.labels, self.position, self._tables)
        self.position[1:].add_(1)
        return build_batch(self.data.images, index, labels, draws, self.augment, self.policy, self._mean, self._std,
                           self._classes if self.mixing else None, fused=self.backend == "fused")

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
        idx = torch.arange(len(self.data), device=self.data.images.device)
        mine = slice(self.rank, None, self.world_size)
        for start, stop in self._spans():
            sel = idx[start:stop][mine]
            yield normalize(self.data.images[sel], self._mean, self._std), self.data.labels[sel]
