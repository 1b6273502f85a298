"""The augmentation policy's pixel work (crop + flip, then every policy step) as one Triton launch.

Public API:

    augment_policy(images, index, padding, oy, ox, flipped, op, magnitude) -> uint8 (B, C, H, W)
        images[index] cropped at (oy, ox) of the zero-padded image, mirrored where ``flipped``, then
        ``vit_fast.augment.image_ops.apply_ops(x, op[s], magnitude[s])`` for each step s: bit for bit the
        torch implementation (see kernels/augment_policy.py for the exactness notes)
    AugmentPolicyConfig, choose_config(channels, height, width, dtype, *, interpret=None)
        the launch configuration
    aot_launches(batch, channels, height, width, steps=2, flip=True)   the GPU's launch, for
        vit_fast.aot's compile tests (aot_every_config: the vit-cifar shape)

Registered op (``torch.library.custom_op`` with a fake implementation; no autograd: data):

    vit_fast::augment_policy(images, index, padding, oy, ox, flipped?, op, magnitude) -> out

Inputs:
- ``images`` uint8 (N, C, H, W), contiguous: the device-resident dataset (not copied per batch);
- ``index`` int (B,): the batch's dataset indices;
- ``oy``, ``ox`` int (B,) or (B, 1) (as ``vit_fast.augment.pipeline.crop_flip_offsets`` draws them): the
  crop offsets into the image zero-padded by ``padding`` on every side;
- ``flipped`` bool (B,) or (B, 1), or None for no flips;
- ``op`` int (S, B), ids of ``vit_fast.augment.image_ops.OPS`` (Identity = 0), and ``magnitude`` float32
  (S, B), signed, torchvision's AutoAugment convention: what ``augment.policies.Policy.draw`` returns.
  S may be 0 (crop and flip only). Steps with S > 0 need RGB images (C = 3), as the torch
  implementation's grey-level ops do.

Checks read metadata only (dtypes, shapes, devices), so the fake implementation raises them too
and the op never reads a value back to the host (it can be captured in a CUDA graph). What would
need a host read is defined instead: an index outside [0, N) gives a black image (the kernel
masks the read, so nothing outside the dataset is touched), an op id outside OPS leaves that
step's image as it is, and offsets past the padding read zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
from torch import Tensor

from vit_fast.fused.launch import Launch, Target, check_launchable, check_same_device, meta_tensor
from vit_fast.kernels.augment_policy import augment_policy_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

__all__ = ["AugmentPolicyConfig", "MAX_PIXELS", "aot_every_config", "aot_launches", "augment_policy",
           "choose_config"]

# One program handles a whole image, one channel of BLOCK pixels at a time, the image kept in its
# output row between operations. 64 x 64 is 16 pixels per thread at 8 warps; the AOT test checks
# CIFAR's 32 x 32 for spills. Larger images would need a kernel that loops over pixel blocks.
MAX_PIXELS = 64 * 64
# Policy steps need the grey level of an RGB image (augment.image_ops._gray_floor).
_POLICY_CHANNELS = 3
_PIXELS_PER_THREAD = 8


@dataclass(frozen=True)
class AugmentPolicyConfig:
    """Launch configuration: one program per image."""

    block: int  # next power of two >= height * width: the pixels of one channel
    num_warps: int  # block / (32 * 8): 8 pixels per thread, 1 to 8 warps
    num_stages: int = 1  # the loops over steps and channels carry no loads to pipeline


def choose_config(channels: int, height: int, width: int, dtype: torch.dtype, *,
                  interpret: bool | None = None) -> AugmentPolicyConfig:
    """The configuration for (channels, height, width) images: a pure function of the shape, the
    same on a GPU and under the interpreter. For 32 x 32: block 1024, 4 warps. ``dtype`` (the op
    takes uint8) and ``interpret`` are taken as every op's ``choose_config`` takes them
    (CONTRIBUTING.md) and change nothing here."""
    if channels < 1 or not 1 <= height * width <= MAX_PIXELS:
        raise ValueError(f"augment_policy takes images of >= 1 channel and 1 to {MAX_PIXELS} pixels, got "
                         f"{channels} x {height} x {width}")
    block = triton.next_power_of_2(height * width)
    num_warps = max(1, min(8, block // (32 * _PIXELS_PER_THREAD)))
    return AugmentPolicyConfig(block=block, num_warps=num_warps)


# ---------------------------------------------------------------------------------------------
# Input checks (metadata only: the fake implementation runs them too)

_INDEX_DTYPES = (torch.int32, torch.int64)


def _per_image(name: str, t: Tensor, batch: int) -> Tensor:
    """A (B,) or (B, 1) tensor as a (B,) view (never a copy)."""
    if t.shape not in ((batch,), (batch, 1)):
        raise ValueError(f"{name} must have shape ({batch},) or ({batch}, 1), one value per image of the batch, "
                         f"got {tuple(t.shape)}")
    return t if t.ndim == 1 else t[:, 0]


def _check_inputs(images: Tensor, index: Tensor, padding: int, oy: Tensor, ox: Tensor, flipped: Tensor | None,
                  op: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Check every input; return index, oy, ox, flipped as (B,) views."""
    check_same_device(dict(images=images, index=index, oy=oy, ox=ox, flipped=flipped, op=op, magnitude=magnitude))
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if not images.is_contiguous():
        raise ValueError(f"images must be contiguous (the dataset is read in place, never copied), got strides "
                         f"{images.stride()} for shape {tuple(images.shape)}")
    _, C, H, W = images.shape
    choose_config(channels=C, height=H, width=W, dtype=images.dtype)  # raises for sizes the kernel can't hold
    if index.ndim != 1 or index.dtype not in _INDEX_DTYPES:
        raise ValueError(f"index must be int32 or int64 (B,), got {index.dtype} {tuple(index.shape)}")
    B = index.shape[0]
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    for name, t in (("oy", oy), ("ox", ox)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    oy, ox = _per_image("oy", oy, B), _per_image("ox", ox, B)
    if flipped is not None:
        if flipped.dtype != torch.bool:
            raise ValueError(f"flipped must be bool (or None for no flips), got {flipped.dtype}")
        flipped = _per_image("flipped", flipped, B)
    if op.ndim != 2 or op.shape[1] != B or op.dtype not in _INDEX_DTYPES:
        raise ValueError(f"op must be int32 or int64 (S, {B}): an op id per step and image, got {op.dtype} "
                         f"{tuple(op.shape)}")
    if magnitude.dtype != torch.float32 or magnitude.shape != op.shape:
        raise ValueError(f"magnitude must be float32 of op's shape {tuple(op.shape)}, got {magnitude.dtype} "
                         f"{tuple(magnitude.shape)}")
    if op.shape[0] > 0 and C != _POLICY_CHANNELS:
        raise ValueError(f"policy steps need RGB images ({_POLICY_CHANNELS} channels: the grey-level ops), got "
                         f"{C} channels; with op of shape (0, {B}) any channel count is cropped and flipped")
    return index, oy, ox, flipped


# ---------------------------------------------------------------------------------------------
# Launch builder


def _launch(images: Tensor, index: Tensor, padding: int, oy: Tensor, ox: Tensor, flipped: Tensor | None,
            op: Tensor, magnitude: Tensor, out: Tensor, interpret: bool) -> Launch:
    """The one launch: a program per image of ``out`` (B, C, H, W); per-image inputs as (B,) views."""
    N, C, H, W = images.shape
    cfg = choose_config(channels=C, height=H, width=W, dtype=images.dtype, interpret=interpret)
    args = dict(
        Images=images, Index=index, OY=oy, OX=ox, Flipped=flipped if flipped is not None else index, Op=op,
        Magnitude=magnitude, Out=out,
        stride_index=index.stride(0), stride_oy=oy.stride(0), stride_ox=ox.stride(0),
        stride_flip=flipped.stride(0) if flipped is not None else 0,
        stride_op_s=op.stride(0), stride_op_b=op.stride(1), stride_mag_s=magnitude.stride(0),
        stride_mag_b=magnitude.stride(1), N=N, C=C, H=H, W=W, padding=padding, S=op.shape[0],
    )
    constexprs = dict(HAS_FLIP=flipped is not None, BLOCK=cfg.block, INTERPRETING=interpret)
    return Launch(augment_policy_kernel, (out.shape[0],), args, constexprs, cfg.num_warps, cfg.num_stages)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation


def aot_launches(batch: int, channels: int, height: int, width: int, steps: int = 2,
                 flip: bool = True) -> list[KernelLaunch]:
    """The launch a GPU makes for a batch of ``batch`` images of (channels, height, width) with
    ``steps`` policy steps, built by the launcher's own builder on meta tensors (a dataset of
    50000 images, int64 indices and offsets as the data pipeline draws them)."""
    images = meta_tensor(50000, channels, height, width, dtype=torch.uint8)
    index, oy, ox = (meta_tensor(batch, dtype=torch.int64) for _ in range(3))
    flipped = meta_tensor(batch, dtype=torch.bool) if flip else None
    op, magnitude = meta_tensor(steps, batch, dtype=torch.int64), meta_tensor(steps, batch, dtype=torch.float32)
    out = meta_tensor(batch, channels, height, width, dtype=torch.uint8)
    launch = _launch(images, index, 4, oy, ox, flipped, op, magnitude, out, interpret=False)
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches([launch])


def aot_every_config() -> list[KernelLaunch]:
    """The vit-cifar launch (batch 128 of 3 x 32 x 32, two steps, flips): ``python -m vit_fast.aot
    --op augment_policy`` reports it."""
    return aot_launches(128, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Registered op: vit_fast::augment_policy


def launch_plan(op: str, args: tuple, outputs: tuple, target: Target) -> list[Launch]:
    """The launches of one call of ``vit_fast::augment_policy`` with ``args`` (the op's arguments,
    in its schema's order) writing ``outputs`` (what the op returns), on ``target``. The real
    implementation runs them; ``vit_fast.cost`` counts them."""
    if op != "augment_policy":
        raise ValueError(f"vit_fast::{op} is not the augment_policy op")
    images, index, padding, oy, ox, flipped, policy_op, magnitude = args
    index, oy, ox, flipped = _check_inputs(images, index, padding, oy, ox, flipped, policy_op, magnitude)
    (out,) = outputs
    if out.shape[0] == 0:
        return []
    return [_launch(images, index, padding, oy, ox, flipped, policy_op, magnitude, out, target.interpret)]


def _empty_out(images: Tensor, index: Tensor) -> Tensor:
    _, C, H, W = images.shape
    return torch.empty((index.shape[0], C, H, W), dtype=torch.uint8, device=images.device)


@torch.library.custom_op("vit_fast::augment_policy", mutates_args=())
def _augment_policy_op(images: Tensor, index: Tensor, padding: int, oy: Tensor, ox: Tensor, flipped: Tensor | None,
                       op: Tensor, magnitude: Tensor) -> Tensor:
    """Crop + flip of images[index], then each policy step; uint8 (B, C, H, W)."""
    index, oy, ox, flipped = _check_inputs(images, index, padding, oy, ox, flipped, op, magnitude)
    check_launchable("images", images)
    out = _empty_out(images, index)
    for launch in launch_plan("augment_policy", (images, index, padding, oy, ox, flipped, op, magnitude), (out,),
                              Target.of(images)):
        launch.run()
    return out


@_augment_policy_op.register_fake
def _(images, index, padding, oy, ox, flipped, op, magnitude):
    _check_inputs(images, index, padding, oy, ox, flipped, op, magnitude)
    return _empty_out(images, index)


# ---------------------------------------------------------------------------------------------
# Public API


def augment_policy(images: Tensor, index: Tensor, padding: int, oy: Tensor, ox: Tensor, flipped: Tensor | None,
                   op: Tensor, magnitude: Tensor) -> Tensor:
    """images[index] (uint8 (N, C, H, W) dataset, (B,) indices) cropped at (oy, ox) of the image
    zero-padded by ``padding``, mirrored where ``flipped`` (None: never), then the policy's steps
    ``op``/``magnitude`` (S, B) applied in order, in one kernel launch and without host syncs.
    Equal, bit for bit, to ``image_ops.apply_ops`` over ``pipeline.apply_crop_flip(images[index], ...)``."""
    return _augment_policy_op(images, index, padding, oy, ox, flipped, op, magnitude)
