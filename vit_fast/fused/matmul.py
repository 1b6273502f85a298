"""What the two matmul ops share: the autocast linear (``vit_fast.fused.linear``) and the MLP
(``vit_fast.fused.mlp``) run the same Triton kernels (``kernels/mlp.py``), configured, checked and
launched by the code here, which neither op module repeats.

Public API (for the two op modules, their tests and the benchmarks):

    MatmulConfig, INTERPRETER_CONFIG   one kernel's tiles; the interpreter's fixed tiles
    product_config(kernel, rows, columns, dtype, *, interpret=None)
                                       the tiles of ``linear_fwd_kernel`` ("linear") or
                                       ``gelu_bwd_kernel`` ("gelu_bwd") for a (rows, columns) output
    weight_grad_config(rows, weights, dtype, *, interpret=None), input_grad_config(weight_grad,
        dtype, *, interpret=None)      the weight- and input-gradient tiles of ``linear_bwd_kernel``
                                       (each op's ``choose_config`` composes these rules)
    weight_grad_split_rows(rows, tiles, block_m, *, interpret)   the slice of rows each
                                       weight-gradient program reduces (``MatmulConfig.split_rows``)
    check_linear_shapes(prefix, x_shape, weight, bias), check_dtypes(x, params, stream)
                                       input checks (metadata only)
    linear_launch(...)                 the Launch of one ``linear_fwd_kernel`` call
    linear_bwd_launch(layers, input_grad=None, ...)   ``linear_bwd_kernel``'s Launch, and
                                       ``weight_grad_reduce_kernel``'s when the rows are split
    row_scale_launch(scale, rows_per_sample, row_scale)   a per-sample scale expanded to rows
    tile_grid(M, N, cfg)               the grid of an (M, N) output tiled by cfg
    WeightGradOperands(grad_y2d, x2d, grad_w, grad_b), InputGradOperands(grad_y2d, weight, grad_x)
                                       what one linear_bwd_launch computes
    linear_grads_launches(layers, input_grad, interpret, row_scale=None)   a backward's weight,
                                       bias and input gradients of linear layers (linear_bwd_launch)

The launch builders pick each kernel's tiles with the rules above from the tensors they are
given (a backward that differentiates fewer weights picks its weight-gradient tiles from those),
so what an op launches is what its ``choose_config`` reports.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vit_fast.fused.launch import SUPPORTED_DTYPES, Launch, accumulation_dtype, interpreting, precision_constexprs
from vit_fast.kernels.mlp import linear_bwd_kernel, linear_fwd_kernel, row_scale_kernel, weight_grad_reduce_kernel

__all__ = [
    "INTERPRETER_CONFIG", "InputGradOperands", "MatmulConfig", "WeightGradOperands", "check_dtypes",
    "check_linear_shapes", "input_grad_config", "linear_bwd_launch", "linear_grads_launches", "linear_launch",
    "product_config", "row_scale_launch", "tile_grid", "weight_grad_config", "weight_grad_split_rows",
]

# ----------------------------------------------------------------------------- launch configs


@dataclass(frozen=True)
class MatmulConfig:
    """One launch configuration. For weight-gradient tiles the roles follow the layer's (M, N, K)
    (rows, output features, input features): block_m is the reduction step over the rows and
    block_n x block_k the tile of dW (N, K); group_m is unused there."""

    block_m: int  # rows of the output tile (dW tiles: rows reduced per step)
    block_n: int  # columns of the output tile (dW tiles: its rows)
    block_k: int  # reduction step per tl.dot, >= 16, the tensor-core minimum (dW tiles: its columns)
    group_m: int = 8  # row tiles per L2-friendly group (see _tile_coordinates in kernels/mlp.py)
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth of the K loop (shared-memory buffers)
    # Weight-gradient tiles only: the rows each program reduces (a multiple of block_m), its slice
    # of M; 0: all of them, one slice (``weight_grad_split_rows``).
    split_rows: int = 0


# In Triton's interpreter one fixed, modest config: tiles of 64 keep the number of programs (the
# interpreter's cost) low while test shapes still span several tiles and K steps.
INTERPRETER_CONFIG = MatmulConfig(block_m=64, block_n=64, block_k=32, group_m=4, num_warps=4, num_stages=1)

# One wave of 128x128 tiles covers the SMs of an A100 (108) or H100 (132); below that, halve the
# tile so the grid still fills the GPU.
_ONE_WAVE_TILES = 128


def _fixed_config(dtype: torch.dtype, interpret: bool | None, fp32: MatmulConfig,
                  fp64: MatmulConfig) -> MatmulConfig | None:
    """The configurations that do not depend on shapes: the interpreter's (``interpret`` defaults to
    ``launch.interpreting()``), and one each for the fp32 and fp64 accuracy paths; None for 16 bits."""
    if interpret is None:
        interpret = interpreting()
    if interpret:
        return INTERPRETER_CONFIG
    return {torch.float32: fp32, torch.float64: fp64}.get(dtype)


def product_config(kernel: str, rows: int, columns: int, dtype: torch.dtype, *,
                   interpret: bool | None = None) -> MatmulConfig:
    """The tiles of ``kernel`` ("linear": ``linear_fwd_kernel``; "gelu_bwd") for a (rows, columns)
    output, its operands in ``dtype``.

    - 16-bit inputs (the performance path): BLOCK_K = 64, a 128-byte row per pipeline stage.
    - "linear": 128x128 tiles with 8 warps when the grid has at least a wave of them, else 64x128
      with 4 warps and one more stage. Accumulator: 64 fp32 registers per thread either way.
    - "gelu_bwd" holds two accumulators (dY W2 and the recomputed pre-activation): 128x64 tiles
      with 8 warps (or 64x64 with 4) keep them at 64 fp32 registers per thread in total. The
      128x64 tiles take 2 stages: vit-cifar's K loops are 3 steps long, and a third stage's
      prologue cost 128 straight-line SASS instructions (sm_90) and 48 KB of shared memory.
    - fp32 and fp64 are accuracy paths (tests, gradcheck), not performance paths: one small
      config each (64x64x16 and 32x32x16) whose fp32/fp64 accumulators stay clear of spills.
    A heuristic from tile counts and register/shared-memory budgets, to be tuned on a GPU with
    benchmarks/bench_mlp.py; ``tests/test_mlp.py`` compiles every config it can return.
    ``interpret`` defaults to ``launch.interpreting()`` (then the fixed config).
    """
    if kernel not in ("linear", "gelu_bwd"):
        raise ValueError(f"kernel must be 'linear' or 'gelu_bwd', got {kernel!r}")
    fixed = _fixed_config(dtype, interpret, fp32=MatmulConfig(64, 64, 16, group_m=8, num_warps=4, num_stages=3),
                          fp64=MatmulConfig(32, 32, 16, group_m=8, num_warps=4, num_stages=2))
    if fixed is not None:
        return fixed
    block_k = 64
    big = math.ceil(rows / 128) * math.ceil(columns / 128) >= _ONE_WAVE_TILES
    if kernel == "linear":
        if big:
            return MatmulConfig(128, 128, block_k, group_m=8, num_warps=8, num_stages=3)
        return MatmulConfig(64, 128, block_k, group_m=8, num_warps=4, num_stages=4)
    if big:
        return MatmulConfig(128, 64, block_k, group_m=8, num_warps=8, num_stages=2)
    return MatmulConfig(64, 64, block_k, group_m=8, num_warps=4, num_stages=3)


# Sizing the weight-gradient grid (``weight_grad_split_rows``): an H100 SXM has 132 SMs (NVIDIA
# H100 Tensor Core GPU Architecture whitepaper, table "Comparison of NVIDIA Data Center GPUs");
# aim for two waves of weight-gradient programs, each 8 to 32 row steps long.
_H100_SMS = 132
_WEIGHT_GRAD_WAVES = 2
_WEIGHT_GRAD_MIN_STEPS = 8
_WEIGHT_GRAD_MAX_STEPS = 32
# The partials (slices x (N K + N) x 4 bytes, written once and read once) stay within this
# fraction of the bytes of the dY and X that they reduce.
_PARTIAL_BYTES_FRACTION = 0.5
# Under the interpreter each program reduces two row steps, so that test shapes span several slices.
_INTERPRETER_SLICE_STEPS = 2


def weight_grad_split_rows(rows: int, tiles: int, block_m: int, *, interpret: bool, max_slices: int | None = None
                           ) -> int:
    """The rows each weight-gradient program of ``linear_bwd_kernel`` reduces (its slice of the M
    rows, a multiple of ``block_m``), for ``tiles`` dW tiles over ``rows`` rows; 0 for one slice.

    Why slices: one program per tile reducing all M rows made vit-cifar's grids 9 to 72 tiles of
    64 x 64 long programs of 130 to 260 steps (the GPU mostly idle). With S slices each of the
    tiles x S programs reduces about M / S rows into an fp32 partial tile, and
    ``weight_grad_reduce_kernel`` sums the S partials in slice order. The rule: S is the larger of
    two waves of an H100's SMs (2 x 132 programs) and the slices that keep a program at most
    _WEIGHT_GRAD_MAX_STEPS (32) row steps, but no more than leave each program
    _WEIGHT_GRAD_MIN_STEPS (8) steps (below that the partial tile's store, 16 KB for 64 x 64,
    outweighs the rows' 8 x 12 KB of loads) and no more than ``max_slices`` (the caller's bound on
    the partials' bytes, S x (N x K + N) x 4, written once and read once). vit-cifar's figures are
    in ``weight_grad_config``. Under the interpreter every program reduces
    _INTERPRETER_SLICE_STEPS steps, so tests of a few row steps exercise the split."""
    steps = math.ceil(rows / block_m)
    if interpret:
        slices = math.ceil(steps / _INTERPRETER_SLICE_STEPS)
    else:
        slices = max(math.ceil(_WEIGHT_GRAD_WAVES * _H100_SMS / max(tiles, 1)),
                     math.ceil(steps / _WEIGHT_GRAD_MAX_STEPS))
        slices = min(slices, steps // _WEIGHT_GRAD_MIN_STEPS, max_slices if max_slices is not None else slices)
    if slices <= 1:
        return 0
    return math.ceil(steps / slices) * block_m


def weight_grad_config(rows: int, weights: list[tuple[int, int]], dtype: torch.dtype, *,
                       interpret: bool | None = None) -> MatmulConfig:
    """The weight-gradient tiles' configuration in ``linear_bwd_kernel`` for dW = dY^T X over ``rows`` rows,
    for the weights of shapes ``weights`` [(N, K), ...] in one grid (the MLP's fc2 and fc1: two), dY
    and X in ``dtype``; the launch's warps and stages are this config's.

    Each program owns one tile of one dW and one slice of the rows (``weight_grad_split_rows``);
    with more than one slice it writes an fp32 partial tile and ``weight_grad_reduce_kernel`` sums
    the slices in a fixed order (deterministic, no atomics). The bias sums ride along in the first
    column of tiles (pid_k == 0), stochastic depth's scale comes as a per-row vector (loaded
    contiguously, no division in the loop), dY is read in its own dtype and scaled and rounded in
    registers (no scaled 16-bit copy), and the parameter gradients are rounded once, from fp32.

    - 16-bit: 64 x 64 tiles (a warp group's wgmma M of 64 on sm_90), 32 rows per step, 4 warps,
      3 stages. The slices give the grid its size, so small weights no longer need the 32 x 32
      tiles of the unsplit kernel (4x the L2 traffic per FLOP, mma.sync only).
    - fp32 and fp64 (accuracy paths): one small config each, as ``product_config``, split alike.
    ``interpret`` defaults to ``launch.interpreting()`` (then INTERPRETER_CONFIG's tiles).

    vit-cifar's training step (M = 8,320 rows, bf16 autocast): SASS instructions per step of the
    weight-gradient loop on sm_90 (cuobjdump of the AOT compile; "bias" is the first column of
    tiles' loop), before and after this scheme; docs/kernels.md has the hand-estimated times.

    ======  ==================================  =============================================
    launch  before: 32 x 32 tiles, 64 rows a    after: 64 x 64 tiles, 32 rows a step, slices
            step, every program all M rows
    ======  ==================================  =============================================
    MLP     288 programs x 130 steps; fc2's     72 tiles x 9 slices = 648 programs x 29 steps;
            scaled loop 632 SASS, 8 HMMA;       fc2 188 (bias) / 162, fc1 138 / 87, 2 HGMMA;
            fc1's 125                           partials 10.7 MB against 35 MB of dY and X
    qkv     108 x 130; 113, 8 HMMA              27 x 10 = 270 x 26; 134 / 81; 4.4 MB (12.8 MB)
    proj    36 x 130; 113                       9 x 20 = 180 x 13; 134 / 81; 3.0 MB (6.4 MB)
    head    24 x 2 (128 rows)                   6 x 1 x 4 steps: one slice, no reduction
    ======  ==================================  =============================================
    """
    fixed = _fixed_config(dtype, interpret, fp32=MatmulConfig(16, 64, 64, group_m=1, num_warps=4, num_stages=3),
                          fp64=MatmulConfig(16, 32, 32, group_m=1, num_warps=4, num_stages=2))
    cfg = fixed or MatmulConfig(32, 64, 64, group_m=1, num_warps=4, num_stages=3)
    tiles = sum(math.ceil(n / cfg.block_n) * max(math.ceil(k / cfg.block_k), 1) for n, k in weights)
    interpret = interpreting() if interpret is None else interpret
    # dY and X at least in ``dtype`` (dY may be wider: the fp32 residual stream's gradient).
    operand_bytes = rows * sum(n + k for n, k in weights) * dtype.itemsize
    partial_bytes = sum(n * k + n for n, k in weights) * accumulation_dtype(dtype).itemsize
    max_slices = max(1, int(_PARTIAL_BYTES_FRACTION * operand_bytes / max(partial_bytes, 1)))
    split_rows = weight_grad_split_rows(rows, tiles, cfg.block_m, interpret=interpret, max_slices=max_slices)
    return dataclasses.replace(cfg, split_rows=split_rows)


def input_grad_config(weight_grad: MatmulConfig, dtype: torch.dtype, *,
                      interpret: bool | None = None) -> MatmulConfig:
    """The DX tiles' configuration inside a ``linear_bwd_launch``. A kernel's registers are the most
    any of its branches needs, so the DX tiles are kept as small as the weight-gradient ones: at
    64 x 128 x 64 (``product_config``'s "linear" for 4 warps) the kernel took 206 to 255 registers
    with an fp32 weight, at 64 x 64 x 32 96 to 128; fp32's 64 x 64 x 16 took up to 246 (32 x 64 here)
    and fp64's 32 x 32 x 16 a STACK frame on sm_90 (16 x 32 here). Warps and stages are the launch's
    (``weight_grad``'s). ``interpret`` defaults to ``launch.interpreting()`` (then INTERPRETER_CONFIG)."""
    if interpret is None:
        interpret = interpreting()
    if interpret:
        return INTERPRETER_CONFIG
    warps, stages = weight_grad.num_warps, weight_grad.num_stages
    if dtype == torch.float32:
        return MatmulConfig(32, 64, 16, group_m=8, num_warps=warps, num_stages=stages)
    if dtype == torch.float64:
        return MatmulConfig(16, 32, 16, group_m=8, num_warps=warps, num_stages=stages)
    return MatmulConfig(64, 64, 32, group_m=8, num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------- input checks


def check_linear_shapes(prefix: str, x_shape, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x_shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}weight of shape {tuple(weight.shape)} expects inputs of width {weight.shape[1]}, "
            f"got width {x_shape[-1]} (input shape {tuple(x_shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def check_dtypes(x: Tensor, params: dict[str, Tensor | None], stream: dict[str, Tensor | None]) -> None:
    """x: a supported float dtype (the compute dtype). The parameters share one dtype, x's or fp32
    (fp32 master weights under autocast); the residual-stream tensors are x's dtype or fp32."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    present = {name: t for name, t in {**params, **stream}.items() if t is not None}
    allowed = (x.dtype,) if x.dtype == torch.float64 else (x.dtype, torch.float32)
    for name, t in present.items():
        if t.dtype not in allowed:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; expected "
                            f"{' or '.join(map(str, dict.fromkeys(allowed)))}")
    first_name, first = next((name, t) for name, t in present.items() if name in params)
    for name, t in present.items():
        if name in params and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "the parameters must share one dtype")


# ----------------------------------------------------------------------------- launch builders

def tile_grid(M: int, N: int, cfg: MatmulConfig) -> tuple[int]:
    """The 1-D grid of an (M, N) output in ``cfg``'s tiles."""
    return (math.ceil(M / cfg.block_m) * math.ceil(N / cfg.block_n),)


def linear_launch(x2d: Tensor, weight: Tensor, bias: Tensor | None, residual2d: Tensor | None, out: Tensor,
                  activation: str, interpret: bool | None = None, scale: Tensor | None = None,
                  rows_per_sample: int = 1) -> Launch:
    """The launch computing out = residual2d + scale[row // rows_per_sample] * act(x2d W^T + bias);
    x2d (M, K), weight (N, K) (any strides: a transposed view is read as is), out (M, N)."""
    if interpret is None:
        interpret = interpreting()
    M, K = x2d.shape
    N = weight.shape[0]
    cfg = product_config("linear", rows=M, columns=N, dtype=x2d.dtype, interpret=interpret)
    # Unused pointer arguments get `out`: a valid pointer the kernel never reads (its flag is off).
    bias_arg = bias if bias is not None else out
    res_arg = residual2d if residual2d is not None else out
    args = dict(
        X=x2d, W=weight, Bias=bias_arg, Scale=scale if scale is not None else out, Residual=res_arg, Out=out,
        M=M, N=N, K=K, rows_per_sample=rows_per_sample,
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_rm=res_arg.stride(0), stride_rn=res_arg.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
    )
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_RESIDUAL=residual2d is not None,
        ACTIVATION=activation, **precision_constexprs(x2d.dtype), INTERPRETING=interpret,
        EVEN_K=K % cfg.block_k == 0,
    )
    return Launch(linear_fwd_kernel, tile_grid(M, N, cfg), args, constexprs, cfg.num_warps, cfg.num_stages)


@dataclass(frozen=True)
class WeightGradOperands:
    """One layer's weight and bias gradients in a ``linear_bwd_launch``: grad_w = grad_y2d^T x2d and
    grad_b = the column sums of grad_y2d (skipped when None)."""

    grad_y2d: Tensor  # (M, N) gradient of the layer's output, any float dtype and strides
    x2d: Tensor  # (M, K) the layer's input, in the compute dtype (the dot's operands' dtype)
    grad_w: Tensor  # (N, K) output, contiguous, the weight's dtype
    grad_b: Tensor | None  # (N,) output, contiguous, the bias's dtype; None: not computed


@dataclass(frozen=True)
class InputGradOperands:
    """A layer's input gradient in a ``linear_bwd_launch``: grad_x = grad_y2d @ weight."""

    grad_y2d: Tensor  # (M, N) gradient of the layer's output, in the compute dtype, any strides
    weight: Tensor  # (N, K) the layer's weight, in the compute dtype or fp32 (converted in registers)
    grad_x: Tensor  # (M, K) output, contiguous, in the compute dtype


def _weight_grad_tiles(layer: WeightGradOperands, cfg: MatmulConfig) -> int:
    n, k = layer.grad_w.shape
    return math.ceil(n / cfg.block_n) * max(math.ceil(k / cfg.block_k), 1)  # as _weight_grad_tiles_k


# Elements of the partials each weight_grad_reduce_kernel program sums (over every slice).
_REDUCE_BLOCK = 1024


def linear_bwd_launch(layers: list[WeightGradOperands], input_grad: InputGradOperands | None = None,
                      interpret: bool | None = None, row_scale: Tensor | None = None,
                      config: MatmulConfig | None = None) -> list[Launch]:
    """The launches computing the weight and bias gradients of ``layers`` (one or two, over the same
    rows; the first one's dY scaled per row by ``row_scale``, (M,) in the accumulation dtype, e.g.
    stochastic depth's per-sample scale expanded by ``gelu_bwd_kernel``) and ``input_grad``'s
    product: one ``linear_bwd_kernel`` launch, each tile (and slice of rows) by its own programs of
    one grid, followed by one ``weight_grad_reduce_kernel`` launch when the rows are split into
    slices (``config.split_rows``). ``config`` overrides ``weight_grad_config`` and
    ``input_grad_config`` (tests use small tiles so that small shapes span several)."""
    if interpret is None:
        interpret = interpreting()
    if not 0 <= len(layers) <= 2 or not (layers or input_grad):
        raise ValueError(f"linear_bwd_launch takes 0 to 2 layers and an input gradient, at least one; got "
                         f"{len(layers)} layers and input_grad={input_grad is not None}")
    outputs = [t for layer in layers for t in (layer.grad_w, layer.grad_b) if t is not None]
    outputs += [input_grad.grad_x] if input_grad else []
    if not all(t.is_contiguous() for t in outputs):
        raise ValueError(f"linear_bwd_launch writes contiguous outputs; got shapes and strides "
                         f"{[(tuple(t.shape), t.stride()) for t in outputs]}")
    first = layers[0] if layers else None
    M = first.x2d.shape[0] if first else input_grad.grad_x.shape[0]
    dtype = first.x2d.dtype if first else input_grad.grad_x.dtype
    if row_scale is not None and (tuple(row_scale.shape) != (M,) or row_scale.dtype != accumulation_dtype(dtype)):
        raise ValueError(f"row_scale must have shape ({M},) and dtype {accumulation_dtype(dtype)}, got "
                         f"{tuple(row_scale.shape)} {row_scale.dtype}")
    cfg = config or weight_grad_config(rows=M, weights=[tuple(layer.grad_w.shape) for layer in layers], dtype=dtype,
                                       interpret=interpret)
    dx_cfg = config or input_grad_config(weight_grad=cfg, dtype=dtype, interpret=interpret)
    if cfg.split_rows < 0 or cfg.split_rows % cfg.block_m:
        raise ValueError(f"split_rows must be 0 or a positive multiple of block_m = {cfg.block_m}, "
                         f"got {cfg.split_rows}")
    rows_per_slice = cfg.split_rows if 0 < cfg.split_rows < M and layers else M
    slices = math.ceil(M / rows_per_slice) if rows_per_slice else 1
    # Unused pointer, size and stride arguments repeat present ones (their flags are off).
    some = input_grad.grad_x if input_grad else first.grad_w
    first = first or WeightGradOperands(input_grad.grad_y2d, input_grad.grad_x, some, None)
    second = layers[1] if len(layers) == 2 else first
    dx = input_grad or InputGradOperands(first.grad_y2d, first.grad_w, some)
    # Each slice's row of partials: DW, DB, DW2, DB2 (the absent ones empty).
    segments = [0] * 4
    for index, layer in enumerate(layers):
        segments[2 * index] = layer.grad_w.numel()
        segments[2 * index + 1] = layer.grad_b.numel() if layer.grad_b is not None else 0
    part_db, part_dw2, part_db2, part_size = (sum(segments[:i]) for i in range(1, 5))
    split = slices > 1
    partial = torch.empty((slices, part_size), dtype=accumulation_dtype(dtype), device=some.device) if split else None

    def operands(layer: WeightGradOperands, suffix: str) -> dict:
        return {f"DY{suffix}": layer.grad_y2d, f"X{suffix}": layer.x2d, f"DW{suffix}": layer.grad_w,
                f"DB{suffix}": layer.grad_b if layer.grad_b is not None else some}

    def strides(layer: WeightGradOperands, suffix: str) -> dict:
        return {f"stride_dy{suffix}m": layer.grad_y2d.stride(0), f"stride_dy{suffix}n": layer.grad_y2d.stride(1),
                f"stride_x{suffix}m": layer.x2d.stride(0), f"stride_x{suffix}k": layer.x2d.stride(1)}

    first_ops, second_ops = operands(first, ""), operands(second, "2")
    args = dict(
        DY=first_ops["DY"], RowScale=row_scale if row_scale is not None else some, X=first_ops["X"],
        DW=first_ops["DW"], DB=first_ops["DB"], **second_ops,
        G=dx.grad_y2d, W=dx.weight, DX=dx.grad_x, Partial=partial if split else some,
        M=M, N=first.grad_w.shape[0], K=first.grad_w.shape[1], N2=second.grad_w.shape[0], K2=second.grad_w.shape[1],
        NX=dx.weight.shape[0], KX=dx.weight.shape[1], rows_per_slice=rows_per_slice, slices=slices,
        part_db=part_db, part_dw2=part_dw2, part_db2=part_db2, part_size=part_size,
        **strides(first, ""), **strides(second, "2"),
        stride_gm=dx.grad_y2d.stride(0), stride_gn=dx.grad_y2d.stride(1),
        stride_wn=dx.weight.stride(0), stride_wk=dx.weight.stride(1),
    )
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DX_BLOCK_M=dx_cfg.block_m, DX_BLOCK_N=dx_cfg.block_n, DX_BLOCK_K=dx_cfg.block_k, DX_GROUP_M=dx_cfg.group_m,
        LAYERS=len(layers), SPLIT=split, HAS_SCALE=row_scale is not None and bool(layers),
        HAS_BIAS=bool(layers) and layers[0].grad_b is not None,
        HAS_BIAS2=len(layers) == 2 and layers[1].grad_b is not None, HAS_DX=input_grad is not None,
        **precision_constexprs(dtype), INTERPRETING=interpret,
    )
    programs = sum(_weight_grad_tiles(layer, cfg) for layer in layers) * slices
    if input_grad is not None:
        programs += math.ceil(M / dx_cfg.block_m) * math.ceil(input_grad.grad_x.shape[1] / dx_cfg.block_n)
    launches = [Launch(linear_bwd_kernel, (programs,), args, constexprs, cfg.num_warps, cfg.num_stages)]
    if split:
        reduce_args = dict(Partial=partial, DW=first_ops["DW"], DB=first_ops["DB"], DW2=second_ops["DW2"],
                           DB2=second_ops["DB2"], part_db=part_db, part_dw2=part_dw2,
                           part_db2=part_db2, part_size=part_size)
        launches.append(Launch(weight_grad_reduce_kernel, (math.ceil(part_size / _REDUCE_BLOCK),), reduce_args,
                               dict(SLICES=slices, BLOCK=_REDUCE_BLOCK, INTERPRETING=interpret), num_warps=4,
                               num_stages=1))
    return launches


def row_scale_launch(scale: Tensor, rows_per_sample: int, row_scale: Tensor) -> Launch:
    """The launch expanding a per-sample ``scale`` (M // rows_per_sample,) to ``row_scale`` (M,) in
    the accumulation dtype, for an MLP backward that runs no ``gelu_bwd_kernel`` to store it."""
    M = row_scale.shape[0]
    block = 1024
    return Launch(row_scale_kernel, (math.ceil(M / block),),
                  dict(Scale=scale, RowScale=row_scale, M=M, rows_per_sample=rows_per_sample),
                  dict(BLOCK_M=block, ACC_DTYPE=precision_constexprs(row_scale.dtype)["ACC_DTYPE"]), num_warps=4,
                  num_stages=1)


# ----------------------------------------------------------------------------- backward helpers


def linear_grads_launches(layers: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]],
                          input_grad: tuple[Tensor, Tensor, Tensor] | None, interpret: bool,
                          row_scale: Tensor | None = None) -> list[Launch]:
    """The backward products of linear layers over the same M rows, as ``linear_bwd_launch``'s
    launches (none when nothing is wanted or every output is empty): for each layer given as
    (grad_y2d (M, N), x2d (M, K), grad_w (N, K) or None, grad_b (N,) or None), the wanted outputs
    written (``row_scale`` (M,) scaling the first layer's grad_y2d per row); and, given
    ``input_grad`` = (grad_y2d (M, N), weight (N, K), grad_x (M, K)), grad_y2d @ weight. A layer
    whose bias gradient alone is wanted still has its weight gradient computed, into a buffer
    allocated here, then dropped (frozen weights with trainable biases: not worth a kernel variant)."""
    operands = []
    for index, (grad_y2d, x2d, grad_w, grad_b) in enumerate(layers):
        if grad_w is None and grad_b is None:
            continue
        if grad_w is None:
            grad_w = torch.empty((grad_y2d.shape[1], x2d.shape[1]), dtype=grad_b.dtype, device=x2d.device)
        operands.append((index, WeightGradOperands(grad_y2d, x2d, grad_w, grad_b)))
    if not operands and input_grad is None:
        return []
    scaled = bool(operands) and operands[0][0] == 0  # the scale belongs to layers[0]'s gradient only
    launches = linear_bwd_launch([op for _, op in operands],
                                 InputGradOperands(*input_grad) if input_grad is not None else None,
                                 interpret=interpret, row_scale=row_scale if scaled else None)
    return launches if launches[0].grid[0] else []  # no tiles: every output is empty (not a valid launch)
