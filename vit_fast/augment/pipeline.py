"""The training batch in the recipe's order, on the device: crop (from the zero-padded image) and
horizontal flip, the per-image policy (uint8), normalisation, random erasing (on the normalised
batch), then the targets and mixup / cutmix.

Every draw of a batch is made apart from its application, by the same code and in the same order
whatever builds the batch (``draw_batch`` -> ``BatchDraws``; a data-parallel rank slices the
global batch's draws with ``BatchDraws.rows``). ``build_batch`` then builds the batch from the
draws with torch ops, or with two fused kernels (``fused_batch``: ``vit_fast::augment_policy``
for the pixel work up to the policy, ``vit_fast::augment_finish`` for the rest), bit for bit the
same batch. ``normalize`` also prepares evaluation batches; ``random_crop_flip`` draws and
applies crop and flip at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import AugmentConfig
from .erasing import EraseDraw, apply_erasing, draw_erasing
from .mixing import MixDraw, apply_mix, draw_mix, smooth_targets
from .policies import Policy


def normalize(images: Tensor, mean: Tensor | list[float], std: Tensor | list[float]) -> Tensor:
    """uint8 (B, C, H, W) -> float32, (x/255 - mean) / std per channel.

    ``mean`` and ``std`` (C,) are best float32 tensors on the images' device, as DeviceLoader keeps
    them: lists are copied to the device on every call."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def crop_flip_offsets(
    batch: int, padding: int, flip: bool, generator: torch.Generator, device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The random draws of ``random_crop_flip`` for ``batch`` images: crop offsets oy, ox (B, 1)
    into the image padded by ``padding``, and the flip decisions (B, 1) bool (None without flips).

    Kept apart from applying them so that data-parallel ranks can draw for the whole global batch
    and each apply its own rows: the images then match a single-process run exactly."""
    oy = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator, device=device)
    ox = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator, device=device)
    flipped = torch.rand(batch, 1, generator=generator, device=device) < 0.5 if flip else None
    return oy, ox, flipped


def apply_crop_flip(images: Tensor, padding: int, oy: Tensor, ox: Tensor, flipped: Tensor | None) -> Tensor:
    """Crop each image (B, C, H, W) at (oy, ox) of its zero-padded copy, mirror where flipped, as one gather."""
    B, C, H, W = images.shape
    dev = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    rows = (oy + torch.arange(H, device=dev)).view(B, 1, H, 1)
    cols = ox + torch.arange(W, device=dev)  # (B, W)
    if flipped is not None:
        cols = torch.where(flipped, cols.flip(1), cols)
    cols = cols.view(B, 1, 1, W)
    batch = torch.arange(B, device=dev).view(B, 1, 1, 1)
    chan = torch.arange(C, device=dev).view(1, C, 1, 1)
    return padded[batch, chan, rows, cols]  # (B, C, H, W): one gather


def random_crop_flip(images: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-image random crop from the zero-padded image and random horizontal flip, as one gather."""
    if padding == 0 and not flip:
        return images
    offsets = crop_flip_offsets(images.shape[0], padding, flip, generator, images.device)
    return apply_crop_flip(images, padding, *offsets)


@dataclass
class BatchDraws:
    """Every random draw of one training batch, in the order ``draw_batch`` makes them; None where
    the step is off."""

    crop: tuple[Tensor, Tensor, Tensor | None] | None  # oy, ox (B, 1) int64, flipped (B, 1) bool or None
    op: Tensor | None  # (steps, B) int64: the policy's op ids
    magnitude: Tensor | None  # (steps, B) float32: their signed magnitudes
    erase: EraseDraw | None
    mix: MixDraw | None  # drawn for the mixing batch (see ``draw_batch``), not sliced by ``rows``

    def rows(self, rows: slice) -> "BatchDraws":
        """The per-image draws of the images ``rows`` of the batch (views); the mix draws as they are."""
        crop = None
        if self.crop is not None:
            oy, ox, flipped = self.crop
            crop = (oy[rows], ox[rows], None if flipped is None else flipped[rows])
        return BatchDraws(
            crop=crop, op=None if self.op is None else self.op[:, rows],
            magnitude=None if self.magnitude is None else self.magnitude[:, rows],
            erase=None if self.erase is None else self.erase.rows(rows), mix=self.mix,
        )


def draw_batch(config: AugmentConfig, policy: Policy | None, shape: tuple[int, int, int, int],
               generator: torch.Generator, device, mix_batch: int | None = None, erase: bool = True,
               mix: bool = True) -> BatchDraws:
    """Every draw of a training batch of ``shape`` (B, C, H, W) under ``config``, in DeiT's order:
    crop and flip, the policy, random erasing, mixup / cutmix. ``mix_batch``: the batch the images
    are mixed within (default B; a data-parallel rank mixes within its own rows of the global
    batch). ``erase`` / ``mix`` False leave those steps out even when ``config`` has them."""
    c = config
    B, C, H, W = shape
    crop = crop_flip_offsets(B, c.crop_padding, c.flip, generator, device) if c.crop_padding or c.flip else None
    op = magnitude = None
    if policy is not None:
        op, magnitude = policy.draw(B, H, W, generator, device)
    erasing = None
    if erase and c.erase > 0:
        erasing = draw_erasing(shape, generator, device, c.erase, c.erase_mode, scale=(0.02, c.erase_max_area))
    mixing = None
    if mix and c.mixing:
        mixing = draw_mix(B if mix_batch is None else mix_batch, H, W, c.mixup, c.cutmix, c.mix_switch_prob,
                          c.mix_mode, generator, device, c.mix_prob)
    return BatchDraws(crop, op, magnitude, erasing, mixing)


def policy_of(config: AugmentConfig, device=None, height: int = 0, width: int = 0) -> Policy | None:
    """The per-image policy ``config`` names (None for "none"). With ``device``, its magnitude
    tables for (height, width) images are built there now: they come from host data, so a
    batch built later copies nothing to the device (and can be captured in a CUDA graph)."""
    if config.policy == "none":
        return None
    policy = Policy(config.policy, num_ops=config.randaugment_ops, magnitude=config.randaugment_magnitude)
    if device is not None:
        policy._tables(torch.device(device), height, width)
    return policy


def apply_geometry_and_policy(images: Tensor, draws: BatchDraws, padding: int, policy: Policy | None) -> Tensor:
    """Crop, flip and the policy of drawn ``draws`` on the uint8 batch ``images`` (torch ops)."""
    if draws.crop is not None:
        images = apply_crop_flip(images, padding, *draws.crop)
    if draws.op is not None:
        images = policy.apply(images, draws.op, draws.magnitude)
    return images


def fused_batch(images: Tensor, index: Tensor, labels: Tensor, draws: BatchDraws, padding: int, mean: Tensor,
                std: Tensor, num_classes: int, smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """The training batch from drawn ``draws`` in two fused kernels: gather + crop + flip + policy
    of ``images[index]`` (``images`` the (N, C, H, W) uint8 dataset, ``index`` (B,) int64), then
    ``vit_fast::augment_finish`` (normalise, erase, mix, targets). Returns (x (B, C, H, W) float32,
    targets (B, num_classes) float32, smoothed by ``smoothing`` and mixed); ``num_classes`` 0
    returns (x, an empty (B, 0) tensor). Equal to the torch path of the same draws."""
    from vit_fast.fused.augment_finish import augment_finish
    from vit_fast.fused.augment_policy import augment_policy

    B = index.shape[0]
    if draws.crop is not None:
        oy, ox, flipped = (None if t is None else t.view(B) for t in draws.crop)
    else:  # no crop, no flip: the identity window
        oy = ox = torch.zeros(B, dtype=torch.int64, device=images.device)
        flipped = None
    op, magnitude = draws.op, draws.magnitude
    if op is None:  # no policy: zero steps
        op = torch.empty((0, B), dtype=torch.int64, device=images.device)
        magnitude = torch.empty((0, B), dtype=torch.float32, device=images.device)
    batch = augment_policy(images, index, padding, oy, ox, flipped, op, magnitude)
    erase = values = None
    if draws.erase is not None:
        e = draws.erase
        erase = (e.top, e.left, e.height, e.width, e.on)
        values = e.values if e.values.ndim else None  # "const": zeros, the kernel's default
    mix = applied = None
    if draws.mix is not None:
        m = draws.mix
        mix, applied = (m.use_cut, m.lam_mix, m.y0, m.y1, m.x0, m.x1, m.lam), m.applied
    return augment_finish(batch, mean, std, labels, num_classes, smoothing, erase, values, mix, applied)


def build_batch(images: Tensor, index: Tensor, labels: Tensor, draws: BatchDraws, config: AugmentConfig,
                policy: Policy | None, mean: Tensor, std: Tensor, classes: Tensor | None = None,
                smoothing: float = 0.0, fused: bool = False) -> tuple[Tensor, Tensor]:
    """The training batch of ``images[index]`` (``images`` the (N, C, H, W) uint8 dataset, ``index``
    (B,) int64) from drawn ``draws``, in DeiT's order: crop + flip and the policy (uint8), normalise
    (``mean``, ``std`` (C,) float32 on the device, in [0, 1] units), random erasing (on the
    normalised batch), then the targets and mixup / cutmix.

    Returns (x (B, C, H, W) float32, targets). With ``classes`` (arange(K) on the device, made once
    by the caller) the targets are (B, K) float32 one-hot rows, smoothed by ``smoothing`` and mixed
    as drawn; with None they are ``labels`` themselves (``draws`` must then hold no mixing).
    ``fused``: the same batch from the same draws by two fused kernels (``fused_batch``; CUDA
    tensors, or CPU tensors under Triton's interpreter), bit for bit."""
    if classes is None and draws.mix is not None:
        raise ValueError("mixing needs targets to mix: pass classes")
    if fused:
        x, targets = fused_batch(images, index, labels, draws, config.crop_padding, mean, std,
                                 0 if classes is None else classes.shape[0], smoothing)
        return x, labels if classes is None else targets
    x = normalize(apply_geometry_and_policy(images[index], draws, config.crop_padding, policy), mean, std)
    if draws.erase is not None:
        x = apply_erasing(x, draws.erase)
    if classes is None:
        return x, labels
    targets = smooth_targets(labels, classes.shape[0], smoothing, classes)
    if draws.mix is not None:
        x, targets = apply_mix(x, targets, draws.mix)
    return x, targets
