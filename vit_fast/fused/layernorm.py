"""LayerNorm and the pre-LN block's fused residual add + LayerNorm, as torch ops (namespace vit_fast).

Public API (the same math as ``vit_fast.reference.layer_norm`` / ``add_layer_norm``):

    layer_norm(x, weight, bias, eps=1e-6) -> y
    add_layer_norm(x, residual, weight, bias, eps=1e-6) -> (y, s)     s = x + residual, y = LN(s)
    aot_launches(rows, width, dtype, residual, weight_dtype=None)    the GPU's kernel launches,
                                                                     for vit_fast.aot's compile tests

Registered ops (``torch.library.custom_op``, each with a fake implementation; the two forward ops
have autograd formulas that call the backward op):

    vit_fast::layer_norm(x, weight, bias, eps) -> (y, mean, rstd)
    vit_fast::add_layer_norm(x, residual, weight, bias, eps) -> (y, s, mean, rstd)
    vit_fast::layer_norm_backward(dy, ds?, x, weight, mean, rstd) -> (dx, dweight, dbias)   both forwards

Fusing the residual add saves a full read and write of the activation tensor per LayerNorm: the
unfused block reads x and residual, writes s, then reads s again to normalize it. In the backward
the gradient of s (the next residual stream) is added to dx inside the same kernel.

Inputs: x of any shape (..., N), normalized over the last dimension; leading dimensions are
flattened into rows without a copy whenever a single row stride describes them. fp32, fp16, bf16
(and fp64, computed in fp64, for gradcheck). weight and bias (N,) share one dtype, either x's or
fp32 (fp32 parameters with bf16 activations is what mixed-precision training hands a LayerNorm).
Outputs are in x's dtype; the statistics are computed in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
from torch import Tensor

from vit_fast.fused.launch import Launch, accumulation_dtype, check_launchable, check_same_device, interpreting
from vit_fast.kernels.layernorm import column_sum_kernel, layer_norm_bwd_kernel, layer_norm_fwd_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

__all__ = [
    "LayerNormConfig", "MAX_WIDTH", "add_layer_norm", "aot_launches", "backward_config", "forward_config", "layer_norm",
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
    """Launch configuration of the forward kernel or of the backward kernel."""

    block_m: int  # rows per tile: several narrow rows share one program
    block_n: int  # next power of two >= width: the whole row is one block
    num_warps: int
    num_stages: int = 3  # Triton's default; the kernels have no loop to pipeline, so it is moot


def _config(width: int, tile_elements: int, elements_per_thread: int) -> LayerNormConfig:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"LayerNorm width (the last dimension of x) must be in [1, {MAX_WIDTH}], got {width}")
    block_n = triton.next_power_of_2(width)
    block_m = max(1, min(_MAX_ROWS_PER_TILE, tile_elements // block_n))
    num_warps = max(1, min(16, block_m * block_n // (32 * elements_per_thread)))
    return LayerNormConfig(block_m=block_m, block_n=block_n, num_warps=num_warps)


def _elements_per_thread(dtype: torch.dtype) -> int:
    # Two 16-byte vectors of every tensor a thread loads: 8 fp32 or 16 fp16/bf16 elements. Fewer
    # spends issue slots on address math and reductions; more raises register pressure.
    return 2 * 16 // torch.empty((), dtype=dtype).element_size()


def forward_config(width: int, dtype: torch.dtype) -> LayerNormConfig:
    """Forward launch configuration: a pure function of (width, dtype), the same on a GPU and
    under the interpreter (no autotuning, which the interpreter cannot run).

    block_n = next_power_of_2(width). block_m = 4096 // block_n rows per program (1 to 16), so
    narrow rows share a program (16 rows of 192, 8 of 384) instead of leaving most lanes idle.
    num_warps gives each thread two 16-byte vectors of the tile: 8 fp32 or 16 fp16/bf16 elements
    per thread (1 to 16 warps).
    """
    return _config(width, _FWD_TILE_ELEMENTS, _elements_per_thread(dtype))


def backward_config(width: int, dtype: torch.dtype) -> LayerNormConfig:
    """Backward launch configuration: as ``forward_config`` with half the tile (2048 elements,
    block_m = 2048 // block_n), since the backward keeps more values live per element. With 8
    fp16/bf16 elements per thread instead, ptxas caps some variants at 64 registers and spills
    (sm_90, width 384); the AOT test checks every choice for spills."""
    return _config(width, _BWD_TILE_ELEMENTS, _elements_per_thread(dtype))


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _max_backward_programs(device: torch.device) -> int:
    """Most programs of the backward grid. Each writes one row of weight/bias partial sums, so the
    count trades the second reduction's size against parallelism: a few programs per SM on a GPU, a
    fixed 8 under the interpreter. It depends only on the device, never on timing, so the
    summation order (and the result) is the same on every run."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _multiprocessor_count(index)
    return 8


def column_sum_config(width: int) -> LayerNormConfig:
    """The partial-sum reduction reads a (programs, N) fp32 buffer of a few hundred rows: 32 rows
    by 128 columns per step (block_m here counts partial rows), 4 warps, one program per 128 columns."""
    return LayerNormConfig(block_m=32, block_n=min(128, triton.next_power_of_2(width)), num_warps=4)


# ---------------------------------------------------------------------------------------------
# Input checks, shared by the real and the fake implementations so torch.compile raises them too.


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None = None) -> None:
    if x.dim() < 1:
        raise ValueError("layer_norm expects x of shape (..., N) with at least one dimension, got a scalar")
    width = x.shape[-1]
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"layer_norm: the last dimension of x {tuple(x.shape)} must be in [1, {MAX_WIDTH}], got {width}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p.dim() != 1 or p.shape[0] != width:
            raise ValueError(
                f"layer_norm: {name} must have shape ({width},) to match the last dimension of x "
                f"{tuple(x.shape)}, got {tuple(p.shape)}"
            )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"layer_norm: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if weight.dtype != bias.dtype:
        raise TypeError(f"layer_norm: weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"layer_norm: weight and bias must be {x.dtype} (like x) or torch.float32, got {weight.dtype}")
    tensors = {"x": x, "weight": weight, "bias": bias}
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"add_layer_norm: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"add_layer_norm: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
        tensors["residual"] = residual
    check_same_device(tensors)


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N), a view whenever one exists (so expanded or sliced tensors aren't copied)."""
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------------------------------------
# Launch builders: one Launch per kernel call, run by the ops and compiled by aot_launches


def _forward_launch(x2: Tensor, res2: Tensor, weight: Tensor, bias: Tensor, y: Tensor, s: Tensor, mean: Tensor,
                    rstd: Tensor, eps: float, has_residual: bool, interpret: bool) -> Launch:
    """The forward kernel's launch on (M, N) rows; y and s are contiguous (M, N) outputs."""
    rows, width = x2.shape
    cfg = forward_config(width, x2.dtype)
    args = dict(
        X=x2, RES=res2, W=weight, B=bias, Y=y, S=s, Mean=mean, Rstd=rstd,
        stride_xm=x2.stride(0), stride_xn=x2.stride(1), stride_resm=res2.stride(0), stride_resn=res2.stride(1),
        stride_ym=width, stride_sm=width, M=rows, N=width, eps=eps,
    )
    constexprs = dict(HAS_RESIDUAL=has_residual, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BF16_RNE_IN_SOFTWARE=interpret)
    return Launch(layer_norm_fwd_kernel, (triton.cdiv(rows, cfg.block_m),), args, constexprs, cfg.num_warps,
                  cfg.num_stages)


def _backward_launches(x2: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, dy2: Tensor, ds2: Tensor,
                       dx: Tensor, dweight: Tensor, dbias: Tensor, has_ds: bool, max_programs: int,
                       interpret: bool) -> list[Launch]:
    """The backward's two launches on (M, N) rows: per-program partial sums of the weight and bias
    gradients (and dx, contiguous (M, N)), then their column sums. Allocates the partial buffers."""
    rows, width = x2.shape
    cfg = backward_config(width, x2.dtype)
    programs = max(1, min(triton.cdiv(rows, cfg.block_m), max_programs))
    # Whole tiles per program, so no tile straddles two programs.
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), cfg.block_m) * cfg.block_m
    programs = triton.cdiv(rows, rows_per_program)
    dw_partial = torch.empty((programs, width), dtype=mean.dtype, device=x2.device)
    db_partial = torch.empty_like(dw_partial)
    args = dict(
        X=x2, W=weight, Mean=mean, Rstd=rstd, DY=dy2, DS=ds2, DX=dx, DW_partial=dw_partial, DB_partial=db_partial,
        stride_xm=x2.stride(0), stride_xn=x2.stride(1), stride_dym=dy2.stride(0), stride_dyn=dy2.stride(1),
        stride_dsm=ds2.stride(0), stride_dsn=ds2.stride(1), stride_dxm=width,
        M=rows, N=width, rows_per_program=rows_per_program,
    )
    constexprs = dict(HAS_DS=has_ds, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BF16_RNE_IN_SOFTWARE=interpret)
    partial_sums = Launch(layer_norm_bwd_kernel, (programs,), args, constexprs, cfg.num_warps, cfg.num_stages)
    red = column_sum_config(width)
    args = dict(DW_partial=dw_partial, DB_partial=db_partial, DW=dweight, DB=dbias, P=programs, N=width)
    constexprs = dict(BLOCK_P=red.block_m, BLOCK_N=red.block_n, BF16_RNE_IN_SOFTWARE=interpret)
    column_sums = Launch(column_sum_kernel, (triton.cdiv(width, red.block_n),), args, constexprs, red.num_warps,
                         red.num_stages)
    return [partial_sums, column_sums]


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation

# Multiprocessors of the AOT targets' GPUs, A100 (sm_80) and H100 SXM (sm_90): the backward grid
# scales with them, and so does the divisibility Triton sees in its row counts.
_AOT_MULTIPROCESSORS = (108, 132)


def aot_launches(rows: int, width: int, dtype: torch.dtype, residual: bool,
                 weight_dtype: torch.dtype | None = None) -> list[KernelLaunch]:
    """The kernels a GPU runs for ``add_layer_norm`` (``residual``) or ``layer_norm`` on x of
    ``rows`` x ``width`` in ``dtype`` (weight and bias in ``weight_dtype``, default ``dtype``),
    forward and backward (with ds exactly when ``residual``), as the launchers build them, for an
    A100's and an H100's backward grid (distinct launches only)."""
    weight_dtype = weight_dtype or dtype

    def t(*shape, dtype=dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    x2, w = t(rows, width), t(width, dtype=weight_dtype)
    stats = t(rows, dtype=accumulation_dtype(x2.dtype))
    # As the launchers do: an absent residual (ds) is passed as x (dy), never read.
    res2 = t(rows, width) if residual else x2
    launches = [_forward_launch(x2, res2, w, w, t(rows, width), t(rows, width), stats, stats, 1e-6,
                                has_residual=residual, interpret=False)]
    dy2 = t(rows, width)
    ds2 = t(rows, width) if residual else dy2
    for multiprocessors in _AOT_MULTIPROCESSORS:
        launches += _backward_launches(x2, w, stats, stats, dy2, ds2, t(rows, width), w, w, has_ds=residual,
                                       max_programs=4 * multiprocessors, interpret=False)
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches(launches)


# ---------------------------------------------------------------------------------------------
# Registered ops: vit_fast::layer_norm, vit_fast::add_layer_norm, vit_fast::layer_norm_backward


def _forward(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float):
    _check_inputs(x, weight, bias, residual)
    check_launchable("x", x)
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else x2
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    mean = torch.empty(x.shape[:-1], dtype=accumulation_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    if rows > 0:
        _forward_launch(x2, res2, weight.contiguous(), bias.contiguous(), y, s, mean, rstd, eps,
                        has_residual=residual is not None, interpret=interpreting()).run()
    return y, s, mean, rstd


@torch.library.custom_op("vit_fast::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of x over its last dimension; also returns the fp32 mean and rstd, shape x.shape[:-1]."""
    y, _, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    _check_inputs(x, weight, bias)
    mean = x.new_empty(x.shape[:-1], dtype=accumulation_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), mean, torch.empty_like(mean)


@torch.library.custom_op("vit_fast::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """s = x + residual and LayerNorm(s) in one pass; returns (y, s, mean, rstd)."""
    return _forward(x, residual, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    _check_inputs(x, weight, bias, residual)
    mean = x.new_empty(x.shape[:-1], dtype=accumulation_dtype(x.dtype))
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, s, mean, torch.empty_like(mean)


@torch.library.custom_op("vit_fast::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: Tensor, ds: Tensor | None, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias) of y = LayerNorm(x), given dy and, for the fused residual
    variant, ds, the gradient reaching s = x + residual directly (added to dx). ``x`` is the tensor
    that was normalized (s in the residual variant); mean and rstd are the forward's statistics."""
    check_launchable("x", x)
    x2, dy2 = _rows(x), _rows(dy)
    ds2 = _rows(ds) if ds is not None else dy2
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)
    if rows == 0:
        return dx, dweight.zero_(), dbias.zero_()

    for launch in _backward_launches(x2, weight.contiguous(), mean, rstd, dy2, ds2, dx, dweight, dbias,
                                     has_ds=ds is not None, max_programs=_max_backward_programs(x.device),
                                     interpret=interpreting()):
        launch.run()
    return dx, dweight, dbias


@_layer_norm_backward_op.register_fake
def _(dy, ds, x, weight, mean, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    # mean and rstd never receive gradients: without this, autograd would launch a zero-fill for
    # each of them on every backward.
    ctx.set_materialize_grads(False)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # y's gradient is undefined (zero): so are the inputs'
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_backward_op(dy, None, x, weight, mean, rstd)
    return dx, dweight, dbias, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


def _add_layer_norm_setup_context(ctx, inputs, output):
    _x, _residual, weight, _bias, _eps = inputs
    _y, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-fills for mean, rstd (and s, when it is unused)


def _add_layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
    if dy is None and ds is None:
        return None, None, None, None, None
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only s was used downstream: LayerNorm's own gradient is zero
        dy = torch.zeros_like(s)
    dx, dweight, dbias = _layer_norm_backward_op(dy, ds, s, weight, mean, rstd)
    # s = x + residual: both receive the same gradient. Returning one tensor for both is safe;
    # autograd copies it before accumulating into either input's .grad.
    return dx, dx, dweight, dbias, None


_add_layer_norm_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm of x over its last dimension (fused Triton kernels); see ``vit_fast.reference``."""
    return _layer_norm_op(x, weight, bias, eps)[0]


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """s = x + residual, y = LayerNorm(s) in one kernel; returns (y, s). Gradients flow through both."""
    y, s, _mean, _rstd = _add_layer_norm_op(x, residual, weight, bias, eps)
    return y, s
