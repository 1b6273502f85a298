"""The end of the training data phase as one torch op (namespace vit_fast): normalise, random
erasing, mixup / cutmix and the targets, from the augmentation policy's uint8 batch.

Public API (the same arithmetic as ``vit_fast.augment``'s ``normalize -> apply_erasing ->
smooth_targets -> apply_mix``, bit for bit on the same device):

    augment_finish(images, mean, std, labels, num_classes, smoothing=0.0, erase=None, erase_values=None,
                   mix=None, mix_applied=None) -> (x, targets)
    choose_config(image_size, num_classes, dtype, *, interpret=None) -> AugmentFinishConfig
    aot_launches(batch, channels, height, width, num_classes, erase_values, mix_per_image, mix_applied)
        the GPU's launch at that shape, for vit_fast.aot's compile tests
    aot_every_config()   the launches of the vit-cifar training batch (``python -m vit_fast.aot``)

Registered op (``torch.library.custom_op``, with a fake implementation; no autograd: the data
phase has no gradient):

    vit_fast::augment_finish(images, mean, std, labels, num_classes, smoothing, erase_top?, erase_left?,
        erase_height?, erase_width?, erase_on?, erase_values?, mix_use_cut?, mix_lam_mix?, mix_y0?, mix_y1?,
        mix_x0?, mix_x1?, mix_lam?, mix_applied?) -> (x, targets)

Inputs: ``images`` (B, C, H, W) uint8 (any strides); ``mean``, ``std`` (C,) float32; ``labels``
(B,) int64 (a label outside [0, num_classes) gets no hot class: it is never read back to check).
``erase`` = (top, left, height, width, on), each (B,) or (B, 1) (float32; ``on`` bool) as
``vit_fast.augment.erasing.draw_erase_boxes`` draws them; ``erase_values`` float32 broadcastable to
(B, C, H, W) (``"rand"``: (B, C, 1, 1), ``"pixel"``: (B, C, H, W)), None for ``"const"`` (zeros).
``mix`` = (use_cut, lam_mix, y0, y1, x0, x1, lam), each (n,) with n = 1 (one draw for the batch)
or B (one per image), as ``vit_fast.augment.mixing.draw_mix`` draws them; ``mix_applied`` (n,) bool or
None (always mixed). Outputs: x (B, C, H, W) float32 and targets (B, num_classes) float32, the
one-hot labels smoothed by ``smoothing`` and mixed with the partner's (image i's partner is
B-1-i); ``num_classes`` 0 writes no targets (a (B, 0) tensor: the caller keeps its labels).

One kernel launch, sync-free: every parameter stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import triton
from torch import Tensor

from vit_fast.fused.launch import (
    Launch, check_launchable, check_same_device, interpreting, meta_tensor, Target,
)
from vit_fast.kernels.augment_finish import augment_finish_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

__all__ = ["AugmentFinishConfig", "aot_every_config", "aot_launches", "augment_finish", "choose_config"]

# 32-bit offsets in the kernel: larger tensors are refused.
_MAX_ELEMENTS = 2**31 - 1
_ERASE_NAMES = ("erase_top", "erase_left", "erase_height", "erase_width", "erase_on")
_MIX_NAMES = ("mix_use_cut", "mix_lam_mix", "mix_y0", "mix_y1", "mix_x0", "mix_x1", "mix_lam")


@dataclass(frozen=True)
class AugmentFinishConfig:
    """Launch configuration: elements of one image per program and target columns per step."""

    block_n: int  # image elements per program (a power of two)
    block_k: int  # target columns per step (a power of two)
    num_warps: int
    num_stages: int = 1  # no loop worth pipelining


def choose_config(image_size: int, num_classes: int, dtype: torch.dtype, *,
                  interpret: bool | None = None) -> AugmentFinishConfig:
    """A pure function of the shapes (the interpreter cannot autotune). ``dtype`` (the op takes
    uint8) is taken as every op's ``choose_config`` takes it (CONTRIBUTING.md) and changes
    nothing; ``interpret`` defaults to ``launch.interpreting()``.

    On a GPU 1024 elements per program, 8 per thread of 4 warps: the vit-cifar batch (3 x 32 x 32
    images, 128 of them) makes 64 pairs x 3 tiles = 192 programs, enough to spread its 0.4 MB of
    uint8 reads over the SMs. Under the interpreter, whose cost is per program, a whole image
    (up to 16384 elements) per program."""
    if image_size < 1:
        raise ValueError(f"augment_finish: images must have at least one element each, got {image_size}")
    if interpret is None:
        interpret = interpreting()
    cap = 16384 if interpret else 1024
    block_n = min(cap, triton.next_power_of_2(image_size))
    block_k = min(1024, triton.next_power_of_2(max(num_classes, 1)))
    return AugmentFinishConfig(block_n=block_n, block_k=block_k, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Input checks, shared by the real and the fake implementations so torch.compile raises them too.


def _span(t: Tensor) -> int:
    """Elements from a tensor's first to its last one in memory: the largest offset the kernel forms."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def _check_per_image(name: str, t: Tensor, batch: int, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"augment_finish: {name} must be {dtype}, got {t.dtype}")
    if t.numel() != batch or t.dim() not in (1, 2) or t.shape[0] != batch:
        raise ValueError(f"augment_finish: {name} must have shape ({batch},) or ({batch}, 1), got {tuple(t.shape)}")


def _check_inputs(images: Tensor, mean: Tensor, std: Tensor, labels: Tensor, num_classes: int, smoothing: float,
                  erase: tuple[Tensor | None, ...], erase_values: Tensor | None,
                  mix: tuple[Tensor | None, ...], mix_applied: Tensor | None) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"augment_finish: images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    B, C, H, W = images.shape
    if max(images.numel(), _span(images)) > _MAX_ELEMENTS:
        raise ValueError(f"augment_finish: images spanning {_span(images)} elements; at most {_MAX_ELEMENTS} are "
                         "supported (32-bit offsets)")
    for name, t in (("mean", mean), ("std", std)):
        if t.dtype != torch.float32 or tuple(t.shape) != (C,):
            raise ValueError(f"augment_finish: {name} must be float32 of shape ({C},), got {t.dtype} {tuple(t.shape)}")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (B,):
        raise ValueError(f"augment_finish: labels must be int64 of shape ({B},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if num_classes < 0 or num_classes * B > _MAX_ELEMENTS:
        raise ValueError(f"augment_finish: num_classes must be >= 0 with num_classes * B <= {_MAX_ELEMENTS}, "
                         f"got {num_classes} for B = {B}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"augment_finish: smoothing must lie in [0, 1], got {smoothing}")
    tensors = {"images": images, "mean": mean, "std": std, "labels": labels}
    present = [t is not None for t in erase]
    if any(present) and not all(present):
        missing = [n for n, t in zip(_ERASE_NAMES, erase) if t is None]
        raise ValueError(f"augment_finish: erasing needs all of {_ERASE_NAMES}, missing {missing}")
    if all(present):
        for name, t in zip(_ERASE_NAMES, erase):
            _check_per_image(name, t, B, torch.bool if name == "erase_on" else torch.float32)
            tensors[name] = t
    if erase_values is not None:
        if not all(present):
            raise ValueError("augment_finish: erase_values given without the erase boxes")
        if erase_values.dtype != torch.float32 or erase_values.dim() != 4:
            raise ValueError(f"augment_finish: erase_values must be float32 (B, C, H, W) or (B, C, 1, 1), got "
                             f"{erase_values.dtype} {tuple(erase_values.shape)}")
        try:
            torch.broadcast_shapes(erase_values.shape, images.shape)
        except RuntimeError:
            raise ValueError(f"augment_finish: erase_values of shape {tuple(erase_values.shape)} does not broadcast "
                             f"to the images' {tuple(images.shape)}") from None
        if _span(erase_values) > _MAX_ELEMENTS:
            raise ValueError(f"augment_finish: erase_values spanning {_span(erase_values)} elements; at most "
                             f"{_MAX_ELEMENTS} are supported (32-bit offsets)")
        tensors["erase_values"] = erase_values
    present = [t is not None for t in mix]
    if any(present) and not all(present):
        missing = [n for n, t in zip(_MIX_NAMES, mix) if t is None]
        raise ValueError(f"augment_finish: mixing needs all of {_MIX_NAMES}, missing {missing}")
    if all(present):
        if num_classes == 0:
            raise ValueError("augment_finish: mixing needs targets to mix, got num_classes 0")
        n = mix[0].shape[0] if mix[0].dim() == 1 else -1
        if n not in (1, B):
            raise ValueError(f"augment_finish: mix parameters must have shape (1,) or ({B},), got "
                             f"{tuple(mix[0].shape)}")
        for name, t in zip(_MIX_NAMES, mix):
            _check_per_image(name, t, n, torch.bool if name == "mix_use_cut" else torch.float32)
            if t.dim() != 1:
                raise ValueError(f"augment_finish: {name} must have shape ({n},), got {tuple(t.shape)}")
            tensors[name] = t
        if mix_applied is not None:
            _check_per_image("mix_applied", mix_applied, n, torch.bool)
            tensors["mix_applied"] = mix_applied
    elif mix_applied is not None:
        raise ValueError("augment_finish: mix_applied given without the mixing parameters")
    check_same_device(tensors)


# ---------------------------------------------------------------------------------------------
# Launch builder


def _targets_values(num_classes: int, smoothing: float) -> tuple[float, float]:
    """The label's and the other classes' target, float32 as torch computes
    one_hot.float() * (1 - s) + s / K (the Python scalars rounded to float32, one add)."""
    off = np.float32(smoothing / max(num_classes, 1))
    return float(np.float32(np.float32(1.0 - smoothing) + off)), float(off)


def _launch(images: Tensor, mean: Tensor, std: Tensor, labels: Tensor, num_classes: int, smoothing: float,
            erase: tuple[Tensor, ...] | None, erase_values: Tensor | None, mix: tuple[Tensor, ...] | None,
            mix_applied: Tensor | None, x: Tensor, targets: Tensor, interpret: bool, cuda_arithmetic: bool) -> Launch:
    """The kernel's launch; ``x`` (B, C, H, W) and ``targets`` (B, K) are contiguous float32 outputs.
    ``cuda_arithmetic``: follow torch's CUDA arithmetic (see the kernel's module docstring)."""
    B, C, H, W = images.shape
    cfg = choose_config(image_size=C * H * W, num_classes=num_classes, dtype=images.dtype, interpret=interpret)
    # Absent tensors get a valid pointer the kernel never reads (its flag is off).
    unused = mean
    if erase is not None:
        erase = tuple(t.reshape(B) for t in erase)  # (B, 1) -> (B,): views
        box_strides = {t.stride(0) for t in erase[:4]}
        if len(box_strides) > 1:
            erase = tuple(t.contiguous() for t in erase[:4]) + erase[4:]
    top, left, height, width, on = erase if erase is not None else (unused,) * 5
    values = erase_values.expand(B, C, H, W) if erase_values is not None else unused
    value_strides = values.stride() if erase_values is not None else (0, 0, 0, 0)
    if mix is not None:  # (n,) draws of the local batch: contiguous already, so no copy
        mix = tuple(t.contiguous() for t in mix)
        mix_applied = mix_applied.contiguous() if mix_applied is not None else None
    use_cut, lam_mix, y0, y1, x0, x1, lam = mix if mix is not None else (unused,) * 7
    # One set for the batch is read by every image: stride 0.
    stride_mix = 1 if mix is not None and mix[0].shape[0] > 1 else 0
    on_value, off_value = _targets_values(num_classes, smoothing)
    args = dict(
        Images=images, Mean=mean, Std=std, Labels=labels, X=x, Targets=targets if num_classes else x,
        Top=top, Left=left, EHeight=height, EWidth=width, EOn=on, Values=values,
        UseCut=use_cut, LamMix=lam_mix, Y0=y0, Y1=y1, X0=x0, X1=x1, Lam=lam,
        Applied=mix_applied if mix_applied is not None else unused,
        B=B, C=C, H=H, W=W, K=num_classes,
        stride_ib=images.stride(0), stride_ic=images.stride(1), stride_ih=images.stride(2), stride_iw=images.stride(3),
        stride_label=labels.stride(0), stride_box=top.stride(0) if erase is not None else 0,
        stride_on=on.stride(0) if erase is not None else 0,
        stride_vb=value_strides[0], stride_vc=value_strides[1], stride_vh=value_strides[2], stride_vw=value_strides[3],
        stride_mix=stride_mix, inv_255=float(np.float32(1.0) / np.float32(255.0)),
        on_value=on_value, off_value=off_value,
    )
    constexprs = dict(ERASE=erase is not None, ERASE_VALUES=erase_values is not None, MIX=mix is not None,
                      MIX_APPLIED=mix_applied is not None, TARGETS=num_classes > 0,
                      DIVIDE_BY_RECIPROCAL=cuda_arithmetic, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    grid = ((B + 1) // 2, triton.cdiv(C * H * W, cfg.block_n))
    # No FMA contraction: torch rounds lam * a and (1 - lam) * b before adding them.
    return Launch(augment_finish_kernel, grid, args, constexprs, cfg.num_warps, cfg.num_stages,
                  options={"enable_fp_fusion": False})


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation


def aot_launches(batch: int, channels: int, height: int, width: int, num_classes: int,
                 erase_values: str | None = "pixel", mix_per_image: bool | None = False,
                 mix_applied: bool = False) -> list[KernelLaunch]:
    """The kernel a GPU runs for a batch of that shape: erasing with ``erase_values`` "pixel",
    "rand", "const" (or None: no erasing), mixing one set per batch (``mix_per_image`` False),
    per image (True) or not at all (None), with ``mix_applied`` (mix probability below 1)."""
    t = partial(meta_tensor, dtype=torch.float32)
    B = batch
    images = t(B, channels, height, width, dtype=torch.uint8)
    erase = None
    values = None
    if erase_values is not None:
        # As the loader passes them: (B, 1) draws, and the values of a "pixel" or "rand" draw.
        erase = (t(B, 1), t(B, 1), t(B, 1), t(B, 1), t(B, 1, dtype=torch.bool))
        if erase_values != "const":
            values = t(B, channels, height, width) if erase_values == "pixel" else t(B, channels, 1, 1)
    mix = applied = None
    if mix_per_image is not None:
        n = B if mix_per_image else 1
        mix = (t(n, dtype=torch.bool), *(t(n) for _ in range(6)))
        applied = t(n, dtype=torch.bool) if mix_applied else None
    launch = _launch(images, t(channels), t(channels), t(B, dtype=torch.int64), num_classes, 0.0, erase, values,
                     mix, applied, t(B, channels, height, width), t(B, num_classes), interpret=False,
                     cuda_arithmetic=True)
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches([launch])


def aot_every_config() -> list[KernelLaunch]:
    """The launches of the vit-cifar training batch (B 128, 3 x 32 x 32, 100 classes): the lee2021
    recipe's (const erasing, one mix per batch applied with probability 0.5) and DeiT's (pixel
    erasing, always mixed). The configuration depends only on the shapes, so these are its
    configurations at that shape."""
    return [*aot_launches(128, 3, 32, 32, 100, "const", False, True),
            *aot_launches(128, 3, 32, 32, 100, "pixel", False, False)]


# ---------------------------------------------------------------------------------------------
# Registered op: vit_fast::augment_finish


def launch_plan(op: str, args: tuple, outputs: tuple, target: Target) -> list[Launch]:
    """The launches of one call of ``vit_fast::augment_finish`` with ``args`` (the op's arguments,
    in its schema's order) writing ``outputs`` (x, targets), on ``target``: torch's CUDA division
    (``cuda_arithmetic``) exactly when ``target.device_type`` is "cuda". The real implementation
    runs them; ``vit_fast.cost`` counts them."""
    if op != "augment_finish":
        raise ValueError(f"vit_fast::{op} is not the augment_finish op")
    images, mean, std, labels, num_classes, smoothing = args[:6]
    erase, erase_values, mix, mix_applied = tuple(args[6:11]), args[11], tuple(args[12:19]), args[19]
    x, targets = outputs
    if images.numel() == 0:
        return []
    return [_launch(images, mean.contiguous(), std.contiguous(), labels, num_classes, smoothing,
                    erase if erase[0] is not None else None, erase_values, mix if mix[0] is not None else None,
                    mix_applied, x, targets, interpret=target.interpret,
                    cuda_arithmetic=target.device_type == "cuda")]


def _outputs(images: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    B = images.shape[0]
    x = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    return x, torch.empty((B, num_classes), dtype=torch.float32, device=images.device)


@torch.library.custom_op("vit_fast::augment_finish", mutates_args=())
def _augment_finish_op(
    images: Tensor, mean: Tensor, std: Tensor, labels: Tensor, num_classes: int, smoothing: float,
    erase_top: Tensor | None, erase_left: Tensor | None, erase_height: Tensor | None, erase_width: Tensor | None,
    erase_on: Tensor | None, erase_values: Tensor | None,
    mix_use_cut: Tensor | None, mix_lam_mix: Tensor | None, mix_y0: Tensor | None, mix_y1: Tensor | None,
    mix_x0: Tensor | None, mix_x1: Tensor | None, mix_lam: Tensor | None, mix_applied: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Normalise, erase and mix the uint8 batch ``images``; returns (x, targets) (see the module docstring)."""
    erase = (erase_top, erase_left, erase_height, erase_width, erase_on)
    mix = (mix_use_cut, mix_lam_mix, mix_y0, mix_y1, mix_x0, mix_x1, mix_lam)
    _check_inputs(images, mean, std, labels, num_classes, smoothing, erase, erase_values, mix, mix_applied)
    check_launchable("images", images)
    x, targets = _outputs(images, num_classes)
    args = (images, mean, std, labels, num_classes, smoothing, *erase, erase_values, *mix, mix_applied)
    for launch in launch_plan("augment_finish", args, (x, targets), Target.of(images)):
        launch.run()
    return x, targets


@_augment_finish_op.register_fake
def _(images, mean, std, labels, num_classes, smoothing, erase_top, erase_left, erase_height, erase_width, erase_on,
      erase_values, mix_use_cut, mix_lam_mix, mix_y0, mix_y1, mix_x0, mix_x1, mix_lam, mix_applied):
    erase = (erase_top, erase_left, erase_height, erase_width, erase_on)
    mix = (mix_use_cut, mix_lam_mix, mix_y0, mix_y1, mix_x0, mix_x1, mix_lam)
    _check_inputs(images, mean, std, labels, num_classes, smoothing, erase, erase_values, mix, mix_applied)
    return _outputs(images, num_classes)


# ---------------------------------------------------------------------------------------------
# Public API


def augment_finish(
    images: Tensor, mean: Tensor, std: Tensor, labels: Tensor, num_classes: int, smoothing: float = 0.0,
    erase: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None, erase_values: Tensor | None = None,
    mix: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] | None = None,
    mix_applied: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The training batch x (B, C, H, W) float32 and its targets (B, num_classes) float32 from the
    policy's uint8 batch, in one kernel (see the module docstring for the arguments)."""
    erase = tuple(erase) if erase is not None else (None,) * 5
    mix = tuple(mix) if mix is not None else (None,) * 7
    if len(erase) != 5 or len(mix) != 7:
        raise ValueError(f"augment_finish: erase must be (top, left, height, width, on) and mix (use_cut, lam_mix, "
                         f"y0, y1, x0, x1, lam), got {len(erase)} and {len(mix)} tensors")
    return _augment_finish_op(images, mean, std, labels, num_classes, float(smoothing), *erase, erase_values, *mix,
                              mix_applied)
