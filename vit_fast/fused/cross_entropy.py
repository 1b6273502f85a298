"""Cross-entropy with label smoothing and soft targets, mean over the batch, as torch ops (namespace vit_fast).

Public API (the loss of ``F.cross_entropy(logits.float(), target, label_smoothing=s)``):

    cross_entropy(logits, target, label_smoothing=0.0) -> loss    0-dim, fp32 (fp64 for fp64 logits)
    choose_config(classes, dtype, *, interpret=None)
                                                the kernels' tile (CrossEntropyConfig), a function of K
    aot_launches(batch, classes, dtype, soft)   the GPU's kernel launches, for vit_fast.aot's compile tests
    aot_every_config()                          the launches the AOT test compiles, for ``python -m vit_fast.aot``

Registered ops (``torch.library.custom_op``, each with a fake implementation; the forward has an
autograd formula that calls the backward op):

    vit_fast::cross_entropy(logits, target, label_smoothing) -> loss
    vit_fast::cross_entropy_backward(grad, logits, target, label_smoothing) -> dlogits

One kernel each way (see ``kernels/cross_entropy.py``): the forward is one program that walks the
rows in a fixed order, so the loss is deterministic; the backward writes dlogits in the logits'
dtype. Neither reads anything back to the host: the incoming gradient is read by the kernel. The
forward saves nothing for the backward, which recomputes the row statistics from the logits.

Inputs: logits (B, K) in fp16, bf16, fp32 or fp64, read in their dtype (under autocast the head's
bf16 logits go in as they are: no ``logits.float()`` and no cast of its gradient). ``target`` is
either int64 class labels (B,) or soft targets (B, K) (mixup/cutmix) in fp32 or the logits' dtype;
soft targets receive no gradient (one that requires grad is refused). ``label_smoothing`` s in
[0, 1] mixes the target as (1 - s) * t + s / K, as PyTorch does. K <= MAX_CLASSES (a whole row
lives in registers).

Where it differs from ``F.cross_entropy`` (decided here, and what the tests pin):
  * labels are not range-checked on the host (that would be a sync): a label outside [0, K) makes
    its row's loss and gradient NaN, so the batch loss is NaN and the training loop's non-finite
    watch reports the step. ``ignore_index`` does not exist here (-100 is out of range too);
  * a class whose mixed target weight is 0 contributes 0, not 0 * log 0: a -inf logit there is a
    masked class and the loss stays finite (PyTorch's soft-target path gives NaN for it). A -inf
    logit with a positive weight gives +inf, and a row of all -inf logits NaN, as in PyTorch;
  * soft targets that do not sum to 1 are used as given (loss -sum m log p, gradient
    p * sum(m) - m), as in PyTorch; an empty batch gives a NaN loss (0 / 0), as in PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import triton
from torch import Tensor

from vit_fast.fused.launch import (
    SUPPORTED_DTYPES, Launch, Target, accumulation_dtype, check_launchable, check_same_device, meta_tensor,
)
from vit_fast.kernels.cross_entropy import cross_entropy_bwd_kernel, cross_entropy_fwd_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

__all__ = ["CrossEntropyConfig", "MAX_CLASSES", "aot_every_config", "aot_launches", "choose_config", "cross_entropy"]

# A whole row lives in one program's registers: at 8192 classes a forward thread holds 32 fp32
# logits of its tile (the AOT test compiles the vit-cifar shape). CIFAR-100 has 100, ImageNet-1k 1000.
MAX_CLASSES = 8192

# Logits one program holds per step.
_TILE_ELEMENTS = 4096
_MAX_ROWS_PER_TILE = 32


@dataclass(frozen=True)
class CrossEntropyConfig:
    """Launch configuration of the forward and the backward kernel."""

    block_b: int  # rows per step of the forward's one program; rows per program of the backward
    block_k: int  # next power of two >= K: the whole row is one block
    num_warps: int
    num_stages: int = 3  # Triton's default; the kernels' loop has nothing to pipeline


def choose_config(classes: int, dtype: torch.dtype, *, interpret: bool | None = None) -> CrossEntropyConfig:
    """The tile of both kernels, a pure function of K (the interpreter cannot autotune):
    block_k = next_power_of_2(K), block_b = 4096 // block_k rows (1 to 32), 8 warps, so a thread
    holds 16 logits of the tile (the forward's one program keeps more loads in flight; with 4
    warps the backward needs up to 196 registers on sm_90, with 8 about half). ``dtype`` (the
    logits') and ``interpret`` are taken as every op's ``choose_config`` takes them
    (CONTRIBUTING.md) and change nothing here."""
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"cross_entropy: the number of classes K must be in [1, {MAX_CLASSES}], got {classes}")
    block_k = triton.next_power_of_2(classes)
    return CrossEntropyConfig(block_b=max(1, min(_MAX_ROWS_PER_TILE, _TILE_ELEMENTS // block_k)), block_k=block_k,
                              num_warps=8)


# ---------------------------------------------------------------------------------------------
# Input checks, shared by the real and the fake implementations so torch.compile raises them too.


def _check_inputs(logits: Tensor, target: Tensor, label_smoothing: float) -> None:
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must have shape (B, K), got {tuple(logits.shape)}")
    batch, classes = logits.shape
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"cross_entropy: the number of classes K must be in [1, {MAX_CLASSES}], got {classes} "
                         f"(logits of shape {tuple(logits.shape)})")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cross_entropy: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if not (math.isfinite(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if target.dtype == torch.int64:
        if tuple(target.shape) != (batch,):
            raise ValueError(f"cross_entropy: labels must have shape (B,) = ({batch},) for logits of shape "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    elif target.is_floating_point():
        if tuple(target.shape) != (batch, classes):
            raise ValueError(f"cross_entropy: soft targets must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        if target.dtype not in (torch.float32, logits.dtype):
            raise TypeError(f"cross_entropy: soft targets must be float32 or the logits' dtype ({logits.dtype}), "
                            f"got {target.dtype}")
    else:
        raise TypeError(f"cross_entropy: target must be int64 labels (B,) or floating soft targets (B, K), "
                        f"got dtype {target.dtype}")
    check_same_device({"logits": logits, "target": target})


def _check_backward(grad: Tensor, logits: Tensor, target: Tensor, label_smoothing: float) -> None:
    _check_inputs(logits, target, label_smoothing)
    acc = accumulation_dtype(logits.dtype)
    if grad.dim() != 0 or grad.dtype != acc:
        raise ValueError(f"cross_entropy_backward: grad must be a 0-dim {acc} tensor (the loss's gradient), "
                         f"got shape {tuple(grad.shape)} dtype {grad.dtype}")
    check_same_device({"grad": grad, "logits": logits, "target": target})


# ---------------------------------------------------------------------------------------------
# Launch builders: one Launch per kernel call, run by the ops and compiled by aot_launches


def _target_args(logits: Tensor, target: Tensor) -> dict:
    """The label and soft-target arguments; the absent one gets a valid pointer never read."""
    soft = target.is_floating_point()
    return dict(Labels=logits if soft else target, Target=target if soft else logits,
                stride_tb=target.stride(0) if soft else 0, stride_tk=target.stride(1) if soft else 0)


def _forward_launch(logits: Tensor, target: Tensor, loss: Tensor, label_smoothing: float, interpret: bool) -> Launch:
    batch, classes = logits.shape
    cfg = choose_config(classes=classes, dtype=logits.dtype, interpret=interpret)
    args = dict(Logits=logits, **_target_args(logits, target), Loss=loss,
                stride_lb=logits.stride(0), stride_lk=logits.stride(1), B=batch, K=classes,
                smoothing=float(label_smoothing))
    constexprs = dict(SOFT=target.is_floating_point(), BLOCK_B=cfg.block_b, BLOCK_K=cfg.block_k)
    return Launch(cross_entropy_fwd_kernel, (1,), args, constexprs, cfg.num_warps, cfg.num_stages)


def _backward_launch(grad: Tensor, logits: Tensor, target: Tensor, dlogits: Tensor, label_smoothing: float,
                     interpret: bool) -> Launch:
    batch, classes = logits.shape
    cfg = choose_config(classes=classes, dtype=logits.dtype, interpret=interpret)
    args = dict(Logits=logits, **_target_args(logits, target), Grad=grad, DLogits=dlogits,
                stride_lb=logits.stride(0), stride_lk=logits.stride(1), B=batch, K=classes,
                smoothing=float(label_smoothing))
    constexprs = dict(SOFT=target.is_floating_point(), BLOCK_B=cfg.block_b, BLOCK_K=cfg.block_k,
                      INTERPRETING=interpret)
    return Launch(cross_entropy_bwd_kernel, (triton.cdiv(batch, cfg.block_b),), args, constexprs, cfg.num_warps,
                  cfg.num_stages)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation


def aot_launches(batch: int, classes: int, dtype: torch.dtype, soft: bool) -> list[KernelLaunch]:
    """The forward and backward kernels a GPU runs for logits (batch, classes) in ``dtype`` with
    soft fp32 targets (``soft``) or int64 labels, as the launchers build them."""
    t = partial(meta_tensor, dtype=dtype)
    acc = accumulation_dtype(dtype)
    logits = t(batch, classes)
    target = t(batch, classes, dtype=torch.float32) if soft else t(batch, dtype=torch.int64)
    launches = [_forward_launch(logits, target, t(dtype=acc), 0.1, interpret=False),
                _backward_launch(t(dtype=acc), logits, target, t(batch, classes), 0.1, interpret=False)]
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches(launches)


def aot_every_config() -> list[KernelLaunch]:
    """The training loss at vit-cifar's shape (batch 128, 100 classes, bf16 logits under autocast)
    with mixup/cutmix's soft targets (the CLI's default) and with labels, vit-64's on Tiny-ImageNet
    (200 classes), then the widest tiles: 1000 classes (ImageNet, ImageNet 64x64) in bf16 and
    MAX_CLASSES in fp32. The tile depends on K only."""
    shapes = [(100, torch.bfloat16, True), (100, torch.bfloat16, False), (200, torch.bfloat16, True),
              (1000, torch.bfloat16, True), (MAX_CLASSES, torch.float32, True)]
    return [launch for classes, dtype, soft in shapes for launch in aot_launches(128, classes, dtype, soft)]


# ---------------------------------------------------------------------------------------------
# Registered ops: vit_fast::cross_entropy, vit_fast::cross_entropy_backward


def launch_plan(op: str, args: tuple, outputs: tuple, target: Target) -> list[Launch]:
    """The launches of one call of ``vit_fast::<op>`` (cross_entropy, cross_entropy_backward) with
    ``args`` (the op's arguments, in its schema's order) writing ``outputs`` (what the op returns),
    on ``target``. The real implementations run them; ``vit_fast.cost`` counts them."""
    if op == "cross_entropy":
        logits, target_, label_smoothing = args
        return [_forward_launch(logits, target_, outputs[0], label_smoothing, target.interpret)]
    if op == "cross_entropy_backward":
        grad, logits, target_, label_smoothing = args
        if logits.shape[0] == 0:
            return []
        return [_backward_launch(grad, logits, target_, outputs[0], label_smoothing, interpret=target.interpret)]
    raise ValueError(f"vit_fast::{op} is not a cross-entropy op")


def _loss(logits: Tensor) -> Tensor:
    return torch.empty((), dtype=accumulation_dtype(logits.dtype), device=logits.device)


@torch.library.custom_op("vit_fast::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """The batch-mean cross-entropy of logits (B, K) against labels (B,) or soft targets (B, K)
    with label smoothing."""
    _check_inputs(logits, target, label_smoothing)
    check_launchable("logits", logits)
    loss = _loss(logits)
    for launch in launch_plan("cross_entropy", (logits, target, label_smoothing), (loss,), Target.of(logits)):
        launch.run()
    return loss


@_cross_entropy_op.register_fake
def _(logits, target, label_smoothing):
    _check_inputs(logits, target, label_smoothing)
    return _loss(logits)


@torch.library.custom_op("vit_fast::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad: Tensor, logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """dlogits = (softmax(logits) * sum(m) - m) * grad / B in the logits' dtype, m the mixed target."""
    _check_backward(grad, logits, target, label_smoothing)
    check_launchable("logits", logits)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    for launch in launch_plan("cross_entropy_backward", (grad, logits, target, label_smoothing), (dlogits,),
                              Target.of(logits)):
        launch.run()
    return dlogits


@_cross_entropy_backward_op.register_fake
def _(grad, logits, target, label_smoothing):
    _check_backward(grad, logits, target, label_smoothing)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, target, label_smoothing = inputs
    ctx.save_for_backward(logits, target)
    ctx.label_smoothing = label_smoothing


def _backward(ctx, grad):
    logits, target = ctx.saved_tensors
    return _cross_entropy_backward_op(grad, logits, target, ctx.label_smoothing), None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The batch-mean cross-entropy of logits (B, K) against int64 labels (B,) or soft targets
    (B, K), with label smoothing (see the module docstring): a 0-dim fp32 tensor (fp64 for fp64
    logits). One kernel forward, one backward; differentiable in the logits only."""
    if target.is_floating_point() and target.requires_grad:
        raise ValueError("cross_entropy: soft targets receive no gradient here; pass target.detach()")
    return _cross_entropy_op(logits, target, float(label_smoothing))
