"""LayerNorm and the pre-LN block's fused residual add + LayerNorm, as torch ops (namespace vit_fast).

Public API (the same math as ``vit_fast.reference.layer_norm`` / ``add_layer_norm``):

    layer_norm(x, weight, bias, eps=1e-6, out_dtype=None) -> y
    add_layer_norm(x, residual, weight, bias, eps=1e-6, out_dtype=None, scale=None) -> (y, s)
        s = residual + scale[sample] * x, y = LN(s); scale is stochastic depth's (B,) keep/scale vector
    aot_launches(rows, width, dtype, residual, weight_dtype=None, ...)   the GPU's kernel launches,
        for vit_fast.aot's compile tests
    launch_plan(op, args, outputs, target)   the launches of one call of a registered op (run by the
                                        op, counted by vit_fast.cost)
    LayerNormConfig, choose_config(rows, width, dtype, *, max_programs, interpret=None)
        the kernels' tiles and the backward's grid (no autotuning)

Registered ops (``torch.library.custom_op``, each with a fake implementation; the two forward ops
have autograd formulas that call the backward op):

    vit_fast::layer_norm(x, weight, bias?, eps, out_dtype?) -> (y, mean, rstd)
    vit_fast::add_layer_norm(x, residual, weight, bias?, eps, out_dtype?, scale?) -> (y, s, mean, rstd)
    vit_fast::layer_norm_backward(dy, ds?, x, weight, mean, rstd, scale?, branch_dtype?)
        -> (dx, dbranch, dweight, dbias)                                              both forwards

Fusing the residual add saves a full read and write of the activation tensor per LayerNorm: the
unfused block reads x and residual, writes s, then reads s again to normalize it. In the backward
the gradient of s (the next residual stream) is added to dx inside the same kernel.

Inputs: x of any shape (..., N), normalized over the last dimension; leading dimensions are
flattened into rows without a copy whenever a single row stride describes them. fp32, fp16, bf16
(and fp64, computed in fp64, for gradcheck). weight and bias (N,) share one dtype, either x's or
fp32; bias may be None. eps must be finite and >= 0.

Mixed precision (what ``vit_fast.ops`` passes under autocast): the kernels convert every tensor
in registers, so no cast runs outside them. The residual may be fp32 while the branch x is 16-bit:
s then has the residual's dtype (the residual stream stays fp32, as on the torch backend) and so
does its gradient, while the branch's gradient comes back in x's dtype. y has ``out_dtype``
(default x's dtype): the autocast dtype, ready for the next GEMM. The parameters' gradients are
reduced in fp32 and returned in the parameters' dtype, never rounded through 16 bits. The
statistics are computed in fp32 (fp64 for fp64 inputs).

A little over 500 lines, on purpose: the two forward ops share one backward op, one tile choice
and the backward's two-launch parameter-gradient reduction, which a split by op would divide.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
from torch import Tensor

from vit_fast.fused.launch import (
    VIT_CIFAR_TOKENS, KernelConfig, Launch, accumulation_dtype, check_launchable, check_same_device, interpreting,
    meta_tensor, Target, planned_samples, rows_per_sample_of,
)
from vit_fast.kernels.layernorm import column_sum_kernel, layer_norm_bwd_kernel, layer_norm_fwd_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

__all__ = [
    "LayerNormConfig", "MAX_WIDTH", "add_layer_norm", "aot_launches", "aot_every_config", "choose_config",
    "launch_plan", "layer_norm",
]

# A whole row lives in one program's registers. Up to 4096 every configuration compiles without
# spills (the AOT test checks); wider rows would need a kernel that loops over the row. CIFAR ViTs
# use 192 to 768, and the widest common ViTs (ViT-G/14, ViT-bigG) 1664.
MAX_WIDTH = 4096

# Elements of x one program holds at a time. The backward keeps about seven live values per element
# (x, dy, ds, xhat, w * dy, two accumulators) against the forward's three, so it takes half the tile.
_FWD_TILE_ELEMENTS = 4096
_BWD_TILE_ELEMENTS = 2048
_MAX_ROWS_PER_TILE = 16


@dataclass(frozen=True)
class LayerNormConfig:
    """The launches of one forward or one backward: each kernel's tiles and the backward's grid.
    A pass uses its own part (the forward ``forward``; the backward the rest)."""

    forward: KernelConfig  # layer_norm_fwd_kernel: block_m rows per program, block_n >= width
    backward: KernelConfig  # layer_norm_bwd_kernel: block_m rows per tile, block_n >= width
    backward_programs: int  # its grid: each program writes its column of the partial sums
    rows_per_program: int  # whole tiles (a multiple of backward.block_m), so none straddles two programs
    column_sum: KernelConfig  # column_sum_kernel: block_m partial rows per program, block_n partials per step


def choose_config(rows: int, width: int, dtype: torch.dtype, *, max_programs: int,
                  interpret: bool | None = None) -> LayerNormConfig:
    """The launch configuration of a pass over ``rows`` x ``width`` (no autotuning, which the
    interpreter cannot run). ``dtype`` is that of the tensor the pass normalizes: x for the
    forward, and for the backward the tensor that was normalized (x, or ``add_layer_norm``'s s in
    the residual stream's dtype), so each pass asks with its own. ``max_programs`` caps the
    backward grid (``_max_backward_programs``: a few programs per SM on a GPU, 8 otherwise).
    ``interpret`` defaults to ``launch.interpreting()``.

    - forward: block_n = next_power_of_2(width); block_m = 4096 // block_n rows per program (1 to
      16), so narrow rows share a program (16 rows of 192, 8 of 384) instead of leaving most lanes
      idle; num_warps gives each thread two 16-byte vectors of the tile: 8 fp32 or 16 fp16/bf16
      elements per thread (1 to 16 warps). The same on a GPU and under the interpreter.
    - backward: the same with half the tile (2048 elements, block_m = 2048 // block_n), since the
      backward keeps more values live per element. With 8 fp16/bf16 elements per thread instead,
      ptxas caps some variants at 64 registers and spills (sm_90, width 384); the AOT test checks
      every choice for spills. Its grid: at most ``max_programs`` programs of whole tiles.
    - column sums, over the backward's (2 * width, programs) partial buffer: on a GPU about 256
      programs or more, so the reduction fills 100+ SMs at width 192 (384 rows, one per program; 2
      CTAs did it before): block_m = the power of two <= 2 * width / 256, 1 to 16 partial rows
      (columns of dweight and dbias) per program. Each step reads block_n = 256 contiguous
      partials per row (4 per thread of 2 warps, one 16-byte vector). Under the interpreter,
      whose cost is per program, 64 rows per program and every partial in one step.
    """
    if interpret is None:
        interpret = interpreting()
    per_thread = _elements_per_thread(dtype)
    backward = _row_tile(width, _BWD_TILE_ELEMENTS, per_thread)
    programs = max(1, min(triton.cdiv(rows, backward.block_m), max_programs))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), backward.block_m) * backward.block_m
    programs = triton.cdiv(rows, rows_per_program)
    return LayerNormConfig(forward=_row_tile(width, _FWD_TILE_ELEMENTS, per_thread), backward=backward,
                           backward_programs=programs, rows_per_program=rows_per_program,
                           column_sum=_column_sum_tile(width, programs, interpret))


def _row_tile(width: int, tile_elements: int, elements_per_thread: int) -> KernelConfig:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"LayerNorm width (the last dimension of x) must be in [1, {MAX_WIDTH}], got {width}")
    block_n = triton.next_power_of_2(width)
    block_m = max(1, min(_MAX_ROWS_PER_TILE, tile_elements // block_n))
    num_warps = max(1, min(16, block_m * block_n // (32 * elements_per_thread)))
    return KernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps)


def _elements_per_thread(dtype: torch.dtype) -> int:
    # Two 16-byte vectors of every tensor a thread loads: 8 fp32 or 16 fp16/bf16 elements. Fewer
    # spends issue slots on address math and reductions; more raises register pressure.
    return 2 * 16 // torch.empty((), dtype=dtype).element_size()


def _column_sum_tile(width: int, programs: int, interpret: bool) -> KernelConfig:
    if interpret:
        return KernelConfig(block_m=64, block_n=triton.next_power_of_2(programs), num_warps=1)
    block_m = 1
    while block_m < 16 and 2 * block_m * 256 <= 2 * width:
        block_m *= 2
    return KernelConfig(block_m=block_m, block_n=256, num_warps=2)


def _max_backward_programs(target: Target) -> int:
    """Most programs of the backward grid. Each writes one row of weight/bias partial sums, so the
    count trades the second reduction's size against parallelism: a few programs per SM on a GPU
    (``target.multiprocessors``), a fixed 8 elsewhere (the interpreter). It depends only on the
    target, never on timing, so the summation order (and the result) is the same on every run."""
    if target.device_type == "cuda":
        return 4 * target.multiprocessors
    return 8


# ---------------------------------------------------------------------------------------------
# Input checks, shared by the real and the fake implementations so torch.compile raises them too.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, out_dtype: torch.dtype | None,
                  residual: Tensor | None = None, scale: Tensor | None = None) -> None:
    if x.dim() < 1:
        raise ValueError("layer_norm expects x of shape (..., N) with at least one dimension, got a scalar")
    width = x.shape[-1]
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"layer_norm: the last dimension of x {tuple(x.shape)} must be in [1, {MAX_WIDTH}], got {width}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"layer_norm: eps must be a finite number >= 0, got {eps}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != width):
            raise ValueError(
                f"layer_norm: {name} must have shape ({width},) to match the last dimension of x "
                f"{tuple(x.shape)}, got {tuple(p.shape)}"
            )
    if x.dtype not in _FLOATS:
        raise TypeError(f"layer_norm: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"layer_norm: weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"layer_norm: weight and bias must be {x.dtype} (like x) or torch.float32, got {weight.dtype}")
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise TypeError(f"layer_norm: out_dtype must be float32, float16, bfloat16 or float64, got {out_dtype}")
    tensors = {"x": x, "weight": weight, "bias": bias}
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"add_layer_norm: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype and not (residual.dtype == torch.float32 and x.dtype.itemsize == 2):
            raise TypeError(f"add_layer_norm: residual must have the dtype of x ({x.dtype}), or be torch.float32 "
                            f"when x is 16-bit (an fp32 residual stream), got {residual.dtype}")
        tensors["residual"] = residual
    if scale is not None:
        if residual is None:
            raise ValueError("add_layer_norm: scale (stochastic depth) needs a residual")
        if x.dim() < 2 or tuple(scale.shape) != (x.shape[0],):
            raise ValueError(f"add_layer_norm: scale must have shape (B,) = ({x.shape[0] if x.dim() else '?'},) for "
                             f"x of shape (B, ..., N) {tuple(x.shape)}, got {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise TypeError(f"add_layer_norm: scale must be a floating tensor, got {scale.dtype}")
        tensors["scale"] = scale
    check_same_device(tensors)


def _check_backward(dy: Tensor, ds: Tensor | None, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                    scale: Tensor | None, branch_dtype: torch.dtype | None) -> None:
    """The backward op's metadata, the same in the real and the fake implementation."""
    _check_inputs(x, weight, None, 0.0, branch_dtype)
    if scale is not None and (x.dim() < 2 or tuple(scale.shape) != (x.shape[0],)):
        raise ValueError(f"layer_norm_backward: scale must have shape ({x.shape[0] if x.dim() else '?'},) for x of "
                         f"shape {tuple(x.shape)}, got {tuple(scale.shape)}")
    stats = (*x.shape[:-1],)
    for name, t in (("dy", dy), ("ds", ds)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"layer_norm_backward: {name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t is not None and t.dtype not in _FLOATS:
            raise TypeError(f"layer_norm_backward: {name} must be a floating tensor, got {t.dtype}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if tuple(t.shape) != stats or t.dtype != accumulation_dtype(x.dtype):
            raise ValueError(f"layer_norm_backward: {name} must have shape {stats} and dtype "
                             f"{accumulation_dtype(x.dtype)}, got {tuple(t.shape)} {t.dtype}")
    check_same_device({"dy": dy, "ds": ds, "x": x, "weight": weight, "mean": mean, "rstd": rstd, "scale": scale})


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N), a view whenever one exists (so expanded or sliced tensors aren't copied)."""
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------------------------------------
# Launch builders: one Launch per kernel call, run by the ops and compiled by aot_launches


def _forward_launch(x2: Tensor, res2: Tensor, scale: Tensor | None, weight: Tensor, bias: Tensor | None, y: Tensor,
                    s: Tensor, mean: Tensor, rstd: Tensor, eps: float, has_residual: bool, rows_per_sample: int,
                    config: LayerNormConfig, interpret: bool) -> Launch:
    """The forward kernel's launch on (M, N) rows; y and s are contiguous (M, N) outputs."""
    rows, width = x2.shape
    cfg = config.forward
    # Absent tensors get a valid pointer the kernel never reads (its flag is off).
    args = dict(
        X=x2, RES=res2, Scale=scale if scale is not None else mean, W=weight,
        B=bias if bias is not None else weight, Y=y, S=s, Mean=mean, Rstd=rstd,
        stride_xm=x2.stride(0), stride_xn=x2.stride(1), stride_resm=res2.stride(0), stride_resn=res2.stride(1),
        stride_ym=width, stride_sm=width, M=rows, N=width, rows_per_sample=rows_per_sample, eps=eps,
    )
    constexprs = dict(HAS_RESIDUAL=has_residual, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, INTERPRETING=interpret)
    return Launch(layer_norm_fwd_kernel, (triton.cdiv(rows, cfg.block_m),), args, constexprs, cfg.num_warps,
                  cfg.num_stages)


def _backward_launches(x2: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, dy2: Tensor, ds2: Tensor | None,
                       scale: Tensor | None, dx: Tensor, dbranch: Tensor | None, dweight: Tensor, dbias: Tensor,
                       rows_per_sample: int, config: LayerNormConfig, interpret: bool) -> list[Launch]:
    """The backward's two launches on (M, N) rows: per-program partial sums of the weight and bias
    gradients (and dx, contiguous (M, N), and the branch's dbranch when given), then their column
    sums. Allocates the partial buffer."""
    rows, width = x2.shape
    cfg, programs, rows_per_program = config.backward, config.backward_programs, config.rows_per_program
    partial = torch.empty((2, width, programs), dtype=mean.dtype, device=x2.device)
    ds_arg = ds2 if ds2 is not None else dy2  # as for absent forward inputs: never read
    args = dict(
        X=x2, W=weight, Mean=mean, Rstd=rstd, DY=dy2, DS=ds_arg, Scale=scale if scale is not None else mean,
        DX=dx, DBranch=dbranch if dbranch is not None else dx, Partial=partial,
        stride_xm=x2.stride(0), stride_xn=x2.stride(1), stride_dym=dy2.stride(0), stride_dyn=dy2.stride(1),
        stride_dsm=ds_arg.stride(0), stride_dsn=ds_arg.stride(1),
        M=rows, N=width, P=programs, rows_per_program=rows_per_program, rows_per_sample=rows_per_sample,
    )
    constexprs = dict(HAS_DS=ds2 is not None, HAS_SCALE=scale is not None, WRITE_DBRANCH=dbranch is not None,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, INTERPRETING=interpret)
    partial_sums = Launch(layer_norm_bwd_kernel, (programs,), args, constexprs, cfg.num_warps, cfg.num_stages)
    red = config.column_sum
    args = dict(Partial=partial, DW=dweight, DB=dbias, P=programs, N=width)
    constexprs = dict(BLOCK_C=red.block_m, BLOCK_P=red.block_n, INTERPRETING=interpret)
    column_sums = Launch(column_sum_kernel, (triton.cdiv(2 * width, red.block_m),), args, constexprs, red.num_warps,
                         red.num_stages)
    return [partial_sums, column_sums]


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation

# Multiprocessors of the AOT targets' GPUs, A100 (sm_80) and H100 SXM (sm_90): the backward grid
# scales with them, and so does the divisibility Triton sees in its row counts.
_AOT_MULTIPROCESSORS = (108, 132)


def _plans(rows: int, width: int, dtype: torch.dtype, residual: bool, weight_dtype: torch.dtype | None,
           residual_dtype: torch.dtype | None, out_dtype: torch.dtype | None, scale: bool, bias: bool,
           multiprocessors: tuple[int, ...]) -> list[Launch]:
    weight_dtype = weight_dtype or dtype
    stream_dtype = (residual_dtype or dtype) if residual else dtype  # s's dtype: what is normalised

    t = functools.partial(meta_tensor, dtype=dtype)
    x2, w = t(rows, width), t(width, dtype=weight_dtype)
    b = w if bias else None
    stats = t(rows, dtype=accumulation_dtype(stream_dtype))
    samples, rows_per_sample = planned_samples(rows)
    scale_t = t(samples) if scale and residual else None
    rows_per_sample = rows_per_sample if scale_t is not None else 1
    # As the launchers do: an absent residual (ds) is passed as x (dy), never read.
    res2 = t(rows, width, dtype=stream_dtype) if residual else x2
    y = t(rows, width, dtype=out_dtype or dtype)
    s = t(rows, width, dtype=stream_dtype)
    config = choose_config(rows=rows, width=width, dtype=dtype, max_programs=4 * multiprocessors[0], interpret=False)
    launches = [_forward_launch(x2, res2, scale_t, w, b, y, s, stats, stats, 1e-6, has_residual=residual,
                                rows_per_sample=rows_per_sample, config=config, interpret=False)]
    normalised = t(rows, width, dtype=stream_dtype)
    dy2 = t(rows, width, dtype=out_dtype or dtype)
    ds2 = t(rows, width, dtype=stream_dtype) if residual else None
    dbranch = t(rows, width) if residual and (scale_t is not None or stream_dtype != dtype) else None
    for sms in multiprocessors:
        config = choose_config(rows=rows, width=width, dtype=stream_dtype, max_programs=4 * sms, interpret=False)
        launches += _backward_launches(normalised, w, stats, stats, dy2, ds2, scale_t, t(rows, width, dtype=stream_dtype),
                                       dbranch, w, w, rows_per_sample, config=config, interpret=False)
    return launches


def aot_launches(rows: int, width: int, dtype: torch.dtype, residual: bool, weight_dtype: torch.dtype | None = None,
                 residual_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None,
                 scale: bool = False, bias: bool = True) -> list[KernelLaunch]:
    """The kernels a GPU runs for ``add_layer_norm`` (``residual``) or ``layer_norm`` on x of
    ``rows`` x ``width`` in ``dtype`` (weight and bias in ``weight_dtype``, default ``dtype``; the
    residual stream in ``residual_dtype``, default ``dtype``; y in ``out_dtype``, default
    ``dtype``; with stochastic depth's scale when ``scale``), forward and backward (with ds
    exactly when ``residual``), as the launchers build them, for an A100's and an H100's
    backward grid (distinct launches only)."""
    launches = _plans(rows, width, dtype, residual, weight_dtype, residual_dtype, out_dtype, scale, bias,
                      _AOT_MULTIPROCESSORS)
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches(launches)


def aot_every_config(rows: int = 128 * VIT_CIFAR_TOKENS, widths: tuple[int, ...] = (192,)) -> list[KernelLaunch]:
    """The distinct launches of the fused model's LayerNorms in training, for
    ``python -m vit_fast.aot --op layernorm``: at ``rows`` (vit-cifar's 128 images x 65 tokens)
    and each width, under bf16 autocast (``add_layer_norm``: bf16 branch, fp32 residual stream
    and parameters, stochastic depth's scale, bf16 output; ``layer_norm``: the fp32 stream in,
    bf16 out) and in fp32 (``--no-amp``)."""
    launches = []
    for width in widths:
        launches += aot_launches(rows, width, torch.bfloat16, True, weight_dtype=torch.float32,
                                 residual_dtype=torch.float32, out_dtype=torch.bfloat16, scale=True)
        launches += aot_launches(rows, width, torch.float32, False, out_dtype=torch.bfloat16)
        launches += aot_launches(rows, width, torch.float32, True, scale=True)
        launches += aot_launches(rows, width, torch.float32, False)
    return list({launch.key: launch for launch in launches}.values())


def launch_plan(op: str, args: tuple, outputs: tuple, target: Target) -> list[Launch]:
    """The launches of one call of ``vit_fast::<op>`` (layer_norm, add_layer_norm,
    layer_norm_backward) with ``args`` (the op's arguments, in its schema's order) writing
    ``outputs`` (what the op returns), on ``target``: its config, and the backward's program count
    from ``target``'s multiprocessors. The real implementations run them; ``vit_fast.cost`` counts them."""
    if op in ("layer_norm", "add_layer_norm"):
        if op == "layer_norm":
            (x, weight, bias, eps, out_dtype), residual, scale = args, None, None
            y, mean, rstd = outputs
            s = y
        else:
            x, residual, weight, bias, eps, out_dtype, scale = args
            y, s, mean, rstd = outputs
        x2 = _rows(x)
        res2 = _rows(residual) if residual is not None else x2
        rows = x2.shape[0]
        if rows == 0:
            return []
        config = choose_config(rows=rows, width=x2.shape[1], dtype=x.dtype,
                               max_programs=_max_backward_programs(target), interpret=target.interpret)
        return [_forward_launch(x2, res2, scale.contiguous() if scale is not None else None, weight.contiguous(),
                                bias.contiguous() if bias is not None else None, y, s, mean, rstd, eps,
                                has_residual=residual is not None, rows_per_sample=rows_per_sample_of(x, scale),
                                config=config, interpret=target.interpret)]
    if op == "layer_norm_backward":
        dy, ds, x, weight, mean, rstd, scale, branch_dtype = args
        dx, placeholder, dweight, dbias = outputs
        dbranch = placeholder if branch_dtype is not None else None
        x2, dy2 = _rows(x), _rows(dy)
        ds2 = _rows(ds) if ds is not None else None
        rows = x2.shape[0]
        if rows == 0:
            return []
        config = choose_config(rows=rows, width=x2.shape[1], dtype=x.dtype,
                               max_programs=_max_backward_programs(target), interpret=target.interpret)
        return _backward_launches(x2, weight.contiguous(), mean, rstd, dy2, ds2,
                                  scale.contiguous() if scale is not None else None, dx, dbranch, dweight, dbias,
                                  rows_per_sample_of(x, scale), config=config, interpret=target.interpret)
    raise ValueError(f"vit_fast::{op} is not a LayerNorm op")


# ---------------------------------------------------------------------------------------------
# Registered ops: vit_fast::layer_norm, vit_fast::add_layer_norm, vit_fast::layer_norm_backward


def _stats(x: Tensor, stream_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    mean = torch.empty(x.shape[:-1], dtype=accumulation_dtype(stream_dtype), device=x.device)
    return mean, torch.empty_like(mean)


def _forward(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float,
             out_dtype: torch.dtype | None, scale: Tensor | None):
    _check_inputs(x, weight, bias, eps, out_dtype, residual, scale)
    check_launchable("x", x)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=residual.dtype, device=x.device) if residual is not None else y
    mean, rstd = _stats(x, residual.dtype if residual is not None else x.dtype)
    if residual is None:
        plan = launch_plan("layer_norm", (x, weight, bias, eps, out_dtype), (y, mean, rstd), Target.of(x))
    else:
        plan = launch_plan("add_layer_norm", (x, residual, weight, bias, eps, out_dtype, scale), (y, s, mean, rstd),
                           Target.of(x))
    for launch in plan:
        launch.run()
    return y, s, mean, rstd


@torch.library.custom_op("vit_fast::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float,
                   out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of x over its last dimension, in out_dtype (default x's); also returns the fp32
    mean and rstd, shape x.shape[:-1]."""
    y, _, mean, rstd = _forward(x, None, weight, bias, eps, out_dtype, None)
    return y, mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, out_dtype=None):
    _check_inputs(x, weight, bias, eps, out_dtype)
    mean, rstd = _stats(x, x.dtype)
    return torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device), mean, rstd


@torch.library.custom_op("vit_fast::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float,
    out_dtype: torch.dtype | None = None, scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """s = residual + scale[sample] * x and LayerNorm(s) in one pass; returns (y, s, mean, rstd)."""
    return _forward(x, residual, weight, bias, eps, out_dtype, scale)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype=None, scale=None):
    _check_inputs(x, weight, bias, eps, out_dtype, residual, scale)
    mean, rstd = _stats(x, residual.dtype)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
    return y, s, mean, rstd


@torch.library.custom_op("vit_fast::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: Tensor, ds: Tensor | None, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
    scale: Tensor | None = None, branch_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dbranch, dweight, dbias) of y = LayerNorm(x), given dy and, for the fused
    residual variant, ds, the gradient reaching s = residual + scale * branch directly (added to
    dx). ``x`` is the tensor that was normalized (s in the residual variant); mean and rstd are the
    forward's statistics. dx (in x's dtype) is the residual's gradient; with ``branch_dtype`` the
    branch's, scale * dx in that dtype, comes back as dbranch (else an empty placeholder: the
    branch's gradient is dx itself). dweight and dbias are in weight's dtype."""
    _check_backward(dy, ds, x, weight, mean, rstd, scale, branch_dtype)
    check_launchable("x", x)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dbranch = torch.empty(x.shape, dtype=branch_dtype, device=x.device) if branch_dtype is not None else None
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)
    placeholder = dbranch if dbranch is not None else x.new_empty((0,))
    if _rows(x).shape[0] == 0:
        return dx, placeholder, dweight.zero_(), dbias.zero_()
    for launch in launch_plan("layer_norm_backward", (dy, ds, x, weight, mean, rstd, scale, branch_dtype),
                              (dx, placeholder, dweight, dbias), Target.of(x)):
        launch.run()
    return dx, placeholder, dweight, dbias


@_layer_norm_backward_op.register_fake
def _(dy, ds, x, weight, mean, rstd, scale=None, branch_dtype=None):
    _check_backward(dy, ds, x, weight, mean, rstd, scale, branch_dtype)
    dbranch = (torch.empty(x.shape, dtype=branch_dtype, device=x.device) if branch_dtype is not None
               else x.new_empty((0,)))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, dbranch, torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, _bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    # mean and rstd never receive gradients: without this, autograd would launch a zero-fill for
    # each of them on every backward.
    ctx.set_materialize_grads(False)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # y's gradient is undefined (zero): so are the inputs'
        return None, None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, _, dweight, dbias = _layer_norm_backward_op(dy, None, x, weight, mean, rstd, None, None)
    return dx, dweight, dbias if ctx.needs_input_grad[2] else None, None, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


def _add_layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, _bias, _eps, _out_dtype, scale = inputs
    _y, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd, scale)
    # The branch's gradient is a tensor of its own when it is scaled or has another dtype.
    ctx.branch_dtype = x.dtype if scale is not None or x.dtype != residual.dtype else None
    ctx.set_materialize_grads(False)  # no zero-fills for mean, rstd (and s, when it is unused)


def _add_layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
    if dy is None and ds is None:
        return (None,) * 7
    s, weight, mean, rstd, scale = ctx.saved_tensors
    if dy is None:  # only s was used downstream: LayerNorm's own gradient is zero
        dy = torch.zeros_like(s)
    dres, dbranch, dweight, dbias = _layer_norm_backward_op(dy, ds, s, weight, mean, rstd, scale, ctx.branch_dtype)
    # Unscaled and of one dtype, x and the residual receive the same gradient. Returning one
    # tensor for both is safe; autograd copies it before accumulating into either input's .grad.
    dx = dbranch if ctx.branch_dtype is not None else dres
    return dx, dres, dweight, dbias if ctx.needs_input_grad[3] else None, None, None, None


_add_layer_norm_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-6,
               out_dtype: torch.dtype | None = None) -> Tensor:
    """LayerNorm of x over its last dimension (fused Triton kernels), y in ``out_dtype`` (default
    x's dtype); see ``vit_fast.reference``."""
    return _layer_norm_op(x, weight, bias, eps, out_dtype)[0]


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-6,
    out_dtype: torch.dtype | None = None, scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """s = residual + scale[sample] * x, y = LayerNorm(s) in one kernel; returns (y, s). s has the
    residual's dtype (fp32 residual with 16-bit x: the mixed-precision stream), y ``out_dtype``
    (default x's). ``scale`` (B,), optional: stochastic depth's keep/scale vector for x (B, ..., N).
    Gradients flow through x, residual, weight and bias."""
    y, s, _mean, _rstd = _add_layer_norm_op(x, residual, weight, bias, eps, out_dtype, scale)
    return y, s
