"""Every random draw of a training batch, from counters on the device, as one Triton launch (two
when erasing writes noise).

Public API:

    augment_draw(spec, order, labels, position, tables) -> (index, labels, BatchDraws)
        the rank's batch at ``position`` = (epoch, step) of the epoch's ``order``: what
        ``vit_fast.augment.draws.counter_draws`` computes with torch ops, bit for bit (see
        kernels/augment_draw.py for the exactness notes)
    aot_launches(spec), aot_every_config()   the GPU's launches, for vit_fast.aot's compile tests

Registered op (``torch.library.custom_op`` with a fake implementation; no autograd: data):

    vit_fast::augment_draw(order, labels, position, op_table, prob_table, mag_table, sign_table,
                           spec_ints, spec_floats) -> 21 tensors (see ``OUTPUTS``)

Inputs: ``order`` int64 (n,), the epoch's dataset indices (a data-parallel rank's global batches
are consecutive runs of it); ``labels`` int64 (N,), the dataset's; ``position`` int64 (2,),
(epoch, step), read on the device (a CUDA graph replays the draw with the step it finds there);
the policy's tables (``vit_fast.augment.draws.policy_tables``); the ``DrawSpec`` as its int and
float fields (``DrawSpec.to_args``). The checks read metadata only, so the op can be captured in
a CUDA graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vit_fast.augment.draws import ERASE_MIN_AREA, LOG_RATIO, DrawSpec, gamma_constants
from vit_fast.augment.erasing import EraseDraw
from vit_fast.augment.mixing import MixDraw
from vit_fast.augment.pipeline import BatchDraws
from vit_fast.fused.launch import Launch, Target, check_launchable, check_same_device, meta_tensor
from vit_fast.kernels.augment_draw import augment_draw_kernel, normal_fill_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

__all__ = ["OUTPUTS", "aot_every_config", "aot_launches", "augment_draw", "launch_plan"]

OUTPUTS = ("index", "labels", "oy", "ox", "flipped", "op", "magnitude", "top", "left", "height", "width", "on",
           "values", "use_cut", "lam_mix", "y0", "y1", "x0", "x1", "lam", "applied")
BLOCK_B = 128  # rows per program: a vit-cifar step's images in one program, its mix rows in another
NOISE_BLOCK = 256  # noise quads (4 values each) per program


def _outputs(spec: DrawSpec, device) -> tuple[Tensor, ...]:
    """Every output, allocated (no kernel): per-image (B,), per-step (S, B), mix rows (n,)."""
    B, S, n = spec.batch, spec.steps, spec.mix_rows

    def e(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    i64, b8 = torch.int64, torch.bool
    return (e(B, dtype=i64), e(B, dtype=i64), e(B, dtype=i64), e(B, dtype=i64), e(B, dtype=b8),
            e(S, B, dtype=i64), e(S, B), e(B), e(B), e(B), e(B), e(B, dtype=b8), e(*spec.noise_shape),
            e(n, dtype=b8), e(n), e(n), e(n), e(n), e(n), e(n), e(n, dtype=b8))


def _check_inputs(order: Tensor, labels: Tensor, position: Tensor, tables: tuple[Tensor, ...], spec: DrawSpec) -> None:
    check_same_device(dict(order=order, labels=labels, position=position, op_table=tables[0], prob_table=tables[1],
                           mag_table=tables[2], sign_table=tables[3]))
    for name, t in (("order", order), ("labels", labels)):
        if t.dtype != torch.int64 or t.ndim != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous int64 (n,), got {t.dtype} {tuple(t.shape)}")
    if position.dtype != torch.int64 or position.shape != (2,):
        raise ValueError(f"position must be int64 (2,): (epoch, step), got {position.dtype} {tuple(position.shape)}")
    if not 1 <= spec.batch <= spec.global_batch or not 0 <= spec.rank < spec.world:
        raise ValueError(f"a rank's batch must hold 1 to global_batch rows and rank lie in [0, world), got batch "
                         f"{spec.batch} of {spec.global_batch}, rank {spec.rank} of {spec.world}")
    if spec.mix_rows not in (0, 1, spec.batch):
        raise ValueError(f"mix_rows must be 0, 1 or the batch ({spec.batch}), got {spec.mix_rows}")


def _launches(order: Tensor, labels: Tensor, position: Tensor, tables: tuple[Tensor, ...], spec: DrawSpec,
              outs: tuple[Tensor, ...]) -> list[Launch]:
    op_tab, prob_tab, mag_tab, sign_tab = tables
    o = dict(zip(OUTPUTS, outs))
    image_programs = (spec.batch + BLOCK_B - 1) // BLOCK_B
    mix_programs = (spec.mix_rows + BLOCK_B - 1) // BLOCK_B
    lo, hi = spec.seed_words
    mixup, cutmix = gamma_constants(spec.mixup), gamma_constants(spec.cutmix)
    args = dict(
        Order=order, Labels=labels, Position=position, OpTab=op_tab, ProbTab=prob_tab, MagTab=mag_tab,
        SignTab=sign_tab, Index=o["index"], LabelsOut=o["labels"], OY=o["oy"], OX=o["ox"], Flip=o["flipped"],
        Op=o["op"], Mag=o["magnitude"], ETop=o["top"], ELeft=o["left"], EH=o["height"], EW=o["width"], EOn=o["on"],
        Values0=o["values"], UseCut=o["use_cut"], LamMix=o["lam_mix"], Y0=o["y0"], Y1=o["y1"], X0=o["x0"], X1=o["x1"], Lam=o["lam"],
        Applied=o["applied"],
        # The key's words as int32 bit patterns would change sign; both halves fit an int64 argument.
        seed_lo=lo, seed_hi=hi, rank=spec.rank, world=spec.world, global_batch=spec.global_batch,
        n_order=order.shape[0], B=spec.batch, MIX_ROWS=spec.mix_rows, image_programs=image_programs, H=spec.height, W=spec.width, padding=spec.padding, n_choices=spec.n_choices,
        fixed_bin=spec.fixed_bin, num_bins=spec.num_bins, stride_tab=mag_tab.stride(0) if mag_tab.ndim == 2 else 0,
        erase_p=spec.erase_p, area_lo=ERASE_MIN_AREA, area_span=spec.erase_span, log_ratio_lo=LOG_RATIO[0],
        log_ratio_span=LOG_RATIO[1] - LOG_RATIO[0], mixup_d=mixup[0], mixup_c=mixup[1], mixup_inv=mixup[2],
        cutmix_d=cutmix[0], cutmix_c=cutmix[1], cutmix_inv=cutmix[2], switch_prob=spec.switch_prob,
        mix_prob=spec.mix_prob,
    )
    constexprs = dict(POLICY=spec.policy, S=spec.steps, CROP=spec.crop, FLIP=spec.flip, ERASE=spec.erase_p > 0,
                      ZERO_VALUES=spec.erase_p > 0 and o["values"].ndim == 0, TRIES=10, MIXUP=spec.mix_rows > 0 and spec.mixup > 0, CUTMIX=spec.mix_rows > 0 and spec.cutmix > 0,
                      BLOCK_B=BLOCK_B)
    # No fma contraction: every product rounds on its own, as torch's float32 ops round it.
    exact = {"enable_fp_fusion": False}
    grid = (image_programs + mix_programs,)
    launches = [Launch(augment_draw_kernel, grid, args, constexprs, num_warps=4, num_stages=1, options=exact)]
    values = o["values"]
    if spec.erase_p > 0 and values.ndim:
        per_row = values[0].numel()
        quads = (per_row + 3) // 4
        noise_args = dict(Out=values, Position=position, seed_lo=lo, seed_hi=hi, rank=spec.rank, world=spec.world,
                          B=spec.batch, E=per_row)
        launches.append(Launch(normal_fill_kernel, (spec.batch, (quads + NOISE_BLOCK - 1) // NOISE_BLOCK), noise_args,
                               dict(BLOCK=NOISE_BLOCK), num_warps=4, num_stages=1, options=exact))
    return launches


def launch_plan(op: str, args: tuple, outputs: tuple, target: Target) -> list[Launch]:
    """The launches of one call of ``vit_fast::augment_draw`` with ``args`` (in its schema's order)
    writing ``outputs``, on ``target``. The real implementation runs them; ``vit_fast.cost`` counts them."""
    if op != "augment_draw":
        raise ValueError(f"vit_fast::{op} is not the augment_draw op")
    order, labels, position, *tables, ints, floats = args
    spec = DrawSpec.from_args(ints, floats)
    _check_inputs(order, labels, position, tuple(tables), spec)
    return _launches(order, labels, position, tuple(tables), spec, tuple(outputs))


@torch.library.custom_op("vit_fast::augment_draw", mutates_args=())
def _augment_draw_op(order: Tensor, labels: Tensor, position: Tensor, op_table: Tensor, prob_table: Tensor,
                     mag_table: Tensor, sign_table: Tensor, spec_ints: list[int],
                     spec_floats: list[float]) -> list[Tensor]:
    """The batch's indices, labels and every draw (``OUTPUTS``)."""
    spec = DrawSpec.from_args(spec_ints, spec_floats)
    tables = (op_table, prob_table, mag_table, sign_table)
    _check_inputs(order, labels, position, tables, spec)
    check_launchable("order", order)
    outs = _outputs(spec, order.device)
    for launch in _launches(order, labels, position, tables, spec, outs):
        launch.run()
    return list(outs)


@_augment_draw_op.register_fake
def _(order, labels, position, op_table, prob_table, mag_table, sign_table, spec_ints, spec_floats):
    spec = DrawSpec.from_args(spec_ints, spec_floats)
    _check_inputs(order, labels, position, (op_table, prob_table, mag_table, sign_table), spec)
    return list(_outputs(spec, order.device))


def augment_draw(spec: DrawSpec, order: Tensor, labels: Tensor, position: Tensor,
                 tables: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, BatchDraws]:
    """(index (B,), labels (B,), the draws) of the rank's batch at ``position``, in one launch (two
    with per-channel or per-pixel erasing noise), without host syncs: ``counter_draws``'s result."""
    o = dict(zip(OUTPUTS, _augment_draw_op(order, labels, position, *tables, *spec.to_args())))
    B = spec.batch
    crop = (o["oy"].view(B, 1), o["ox"].view(B, 1), o["flipped"].view(B, 1) if spec.flip else None) if spec.crop else None
    op = magnitude = erase = mix = None
    if spec.policy:
        op, magnitude = o["op"], o["magnitude"]
    if spec.erase_p > 0:
        erase = EraseDraw(*(o[k].view(B, 1) for k in ("top", "left", "height", "width", "on")), values=o["values"])
    if spec.mix_rows:
        mix = MixDraw(*(o[k] for k in ("use_cut", "lam_mix", "y0", "y1", "x0", "x1", "lam")),
                      applied=o["applied"] if spec.mix_prob < 1.0 else None)
    return o["index"], o["labels"], BatchDraws(crop, op, magnitude, erase, mix)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation


def aot_launches(spec: DrawSpec) -> list[KernelLaunch]:
    """The launches a GPU makes for ``spec``, built by the launcher's own builder on meta tensors
    (a dataset of 50000 images, the AutoAugment tables' shapes)."""
    from vit_fast.aot import kernel_launches  # the compile tests' path only

    order, labels = meta_tensor(50000, dtype=torch.int64), meta_tensor(50000, dtype=torch.int64)
    position = meta_tensor(2, dtype=torch.int64)
    tables = (meta_tensor(25, 2, dtype=torch.int64), meta_tensor(25, 2, dtype=torch.float32),
              meta_tensor(25, 2, dtype=torch.float32), meta_tensor(25, 2, dtype=torch.bool))
    outs = _outputs(spec, "meta")
    return kernel_launches(_launches(order, labels, position, tables, spec, outs))


def aot_every_config() -> list[KernelLaunch]:
    """The lee2021 recipe's draws for a vit-cifar batch of 128 (AutoAugment, erasing, mixup and
    cutmix per batch), with per-pixel noise: ``python -m vit_fast.aot --op augment_draw``."""
    spec = DrawSpec(seed=0, rank=0, world=1, global_batch=128, batch=128, mix_rows=1, channels=3, height=32, width=32,
                    padding=4, crop=True, flip=True, policy=1, steps=2, n_choices=25, fixed_bin=-1, num_bins=1,
                    erase_p=0.25, erase_span=0.38, erase_mode=2, mixup=1.0, cutmix=1.0, switch_prob=0.5, mix_prob=0.5)
    return aot_launches(spec)

