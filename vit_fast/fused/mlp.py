"""The fused transformer MLP as torch ops: fc2(GELU(fc1(x))) (+ residual), forward and backward.

Public API (shapes as in ``vit_fast.reference``; weights in nn.Linear layout (out, in)):

    mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate="none", residual=None, scale=None)
    MatmulConfig, choose_config(kernel, M, N, K, dtype, interpret=None),
    choose_weight_grad_config(M, weights, dtype, interpret=None)
    linear_launch(...), gelu_bwd_launch(...), linear_bwd_launch(layers, input_grad=None, ...)
                                                the Launch of one kernel call
    WeightGradOperands(grad_y2d, x2d, grad_w, grad_b), InputGradOperands(grad_y2d, weight, grad_x)
                                                what one linear_bwd_launch computes
    aot_launches(M, d_in, hidden, d_out, dtype, approximate="none", residual=True, ...)
        the GPU's kernel launches, for vit_fast.aot's compile tests; planned_launches(...) the same
        as Launch objects (kernel, grid, tensors) for accounts of launches and bytes

Registered ops (namespace ``vit_fast``), each with a fake (meta) implementation:

    vit_fast::mlp           (x, w1, b1?, w2, b2?, approximate, residual?, scale?) -> (y, hidden)  + autograd
    vit_fast::mlp_backward  (grad_y, x, w1, b1?, w2, hidden, approximate, needs, scale?)
                            -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)

Forward: two launches of ``linear_fwd_kernel``, fc1 with bias + GELU in the epilogue (the
hidden activation is written once, the pre-activation never), fc2 with bias, stochastic depth's
per-sample scale and the residual: y = residual + scale[sample] * (h W2^T + b2).
Backward, all inside ``vit_fast::mlp_backward`` (one custom-op call per MLP backward), two
launches: ``gelu_bwd_kernel`` computes grad_pre = ((scale dY) W2) * GELU'(pre), recomputing pre in
the same program (why: ``kernels/mlp.py``); then one ``linear_bwd_kernel`` launch computes dW2 =
(scale dY)^T H with db2, dW1 = grad_pre^T X with db1 and dX = grad_pre W1, each tile by its own
programs of one grid, reading dY as it came (fp32 under autocast) and scaling and rounding it in
registers, W1 converted in registers. This replaced five launches (dX in Triton or cuBLAS, two
cuBLAS weight GEMMs with fp32 output, two bias reductions) and the 16-bit copy of scale * dY that
gelu_bwd stored for them. cuBLAS may still be faster per weight GEMM on a GPU, where each
program of the Triton kernel streams all M rows of its panels (``choose_weight_grad_config`` says
what the grid costs): ``benchmarks/bench_mlp.py`` on a GPU is to settle it; no timing was taken.
The residual's gradient is dY itself, passed on by the autograd formula.

Mixed precision (what ``vit_fast.ops`` passes under autocast): x is in the compute dtype (bf16),
the parameters stay fp32 and are converted in the kernels' registers, the residual and y are the
fp32 residual stream. Without a residual y has x's dtype. hidden and the backward's intermediates
are in x's dtype; every parameter gradient comes back in its parameter's dtype, accumulated in
fp32 and stored by the kernel that reduced it, never rounded through 16 bits. No standalone cast
kernel runs. Every kernel is Triton, so on the CPU the interpreter runs the same kernels as a
GPU.

A plain linear with fp32 weights and 16-bit activations (the qkv and output projections and
the head under autocast) is registered too, because cuBLAS would need the weights cast to 16 bits
(and its weight gradients cast back), about four standalone cast kernels per linear and step:

    linear(x, weight, bias=None) -> y                  x 16-bit, weight/bias fp32, y in x's dtype
    vit_fast::linear           (x, weight, bias?) -> y                                  + autograd
    vit_fast::linear_backward  (grad_y, x, weight, needs) -> (grad_x, grad_weight, grad_bias)
    linear_aot_launches(M, K, N, dtype, weight_dtype)   its Triton launches

Forward: ``linear_fwd_kernel`` (no activation) converting the weight in registers; backward, one
``linear_bwd_kernel`` launch: dW and db (fp32 output) and dX. With weights in x's dtype (no
autocast) a linear stays ``F.linear``: cuBLAS with nothing to convert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vit_fast.fused.launch import (
    SUPPORTED_DTYPES,
    VIT_CIFAR_TOKENS,
    Launch,
    check_launchable,
    check_same_device,
    interpreting,
    meta_tensor,
    planned_samples,
    precision_constexprs,
)
from vit_fast.kernels.mlp import gelu_bwd_kernel, linear_bwd_kernel, linear_fwd_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

_APPROXIMATE_TO_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


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


def choose_config(kernel: str, M: int, N: int, K: int, dtype: torch.dtype,
                  interpret: bool | None = None) -> MatmulConfig:
    """The launch configuration of ``kernel`` ("linear" or "gelu_bwd") for an (M, K) x (K, N) product.

    - 16-bit inputs (the performance path): BLOCK_K = 64, a 128-byte row per pipeline stage.
    - "linear": 128x128 tiles with 8 warps when the grid has at least a wave of them, else 64x128
      with 4 warps and one more stage. Accumulator: 64 fp32 registers per thread either way.
    - "gelu_bwd" holds two accumulators (dY W2 and the recomputed pre-activation): 128x64 tiles
      with 8 warps (or 64x64 with 4) keep them at 64 fp32 registers per thread in total.
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
    big = math.ceil(M / 128) * math.ceil(N / 128) >= _ONE_WAVE_TILES
    if kernel == "linear":
        if big:
            return MatmulConfig(128, 128, block_k, group_m=8, num_warps=8, num_stages=3)
        return MatmulConfig(64, 128, block_k, group_m=8, num_warps=4, num_stages=4)
    if big:
        return MatmulConfig(128, 64, block_k, group_m=8, num_warps=8, num_stages=3)
    return MatmulConfig(64, 64, block_k, group_m=8, num_warps=4, num_stages=3)


def choose_weight_grad_config(M: int, weights: list[tuple[int, int]], dtype: torch.dtype,
                              interpret: bool | None = None) -> MatmulConfig:
    """The weight-gradient tiles' configuration in ``linear_bwd_kernel`` for dW = dY^T X over M rows,
    for the weights of shapes ``weights`` [(N, K), ...] in one grid (the MLP's fc2 and fc1: two), dY
    and X in ``dtype``; the launch's warps and stages are this config's.

    Each program owns one tile of one dW and reduces over all M rows itself (deterministic, no
    atomics, no partial-sum pass), so the grid is the number of tiles, which the rows do not
    change: vit-cifar's MLP weights (192 x 768 and 768 x 192) make 72 tiles of 64 x 64 and its
    projections (576 x 192, 192 x 192, 100 x 192) 27, 9 and 6. Too few to fill an H100's 132 SMs,
    so below one wave (_ONE_WAVE_TILES tiles of 64 x 64) the tile shrinks to 32 x 32: four times
    the programs (288 for the MLP, 108, 36 and 24 for the projections) at twice the L2 traffic per
    FLOP. The small-weight launches stay latency-bound (one program streams all M rows of its
    panels); cuBLAS splits the reduction over more blocks and may be faster per GEMM on a GPU,
    which only ``benchmarks/bench_mlp.py`` on a GPU can tell (no timing was taken). The dX tiles of
    the same launch, many and short, come after these and fill the SMs they leave idle. What the
    kernel buys for certain: the bias gradients in the same launch (no separate reduction reading
    dY again), dY read in its own dtype with stochastic depth's scale applied in registers (no
    scaled 16-bit copy), one launch for the whole backward of a linear (two for the MLP), and fp32
    output without any 16-bit rounding.

    - 16-bit: 4 warps, 3 stages; 64 rows per step for 32 x 32 tiles, 32 for 64 x 64 ones. Under
      autocast the dY tile is fp32 and is scaled, summed and converted in registers next to the dot's
      accumulator and the bias sums' (BLOCK_N x BLOCK_M fp32 each): at 64 x 64 x 64 that took 198 to
      255 registers (sm_90, sm_80; a STACK frame on sm_80), at 64 x 64 x 32 about 100.
    - fp32 and fp64 (accuracy paths): one small config each, as ``choose_config``.
    ``interpret`` defaults to ``launch.interpreting()`` (then the fixed INTERPRETER_CONFIG).
    """
    fixed = _fixed_config(dtype, interpret, fp32=MatmulConfig(16, 64, 64, group_m=1, num_warps=4, num_stages=3),
                          fp64=MatmulConfig(16, 32, 32, group_m=1, num_warps=4, num_stages=2))
    if fixed is not None:
        return fixed
    tiles = sum(math.ceil(n / 64) * max(math.ceil(k / 64), 1) for n, k in weights)
    if tiles >= _ONE_WAVE_TILES:
        return MatmulConfig(32, 64, 64, group_m=1, num_warps=4, num_stages=3)
    return MatmulConfig(64, 32, 32, group_m=1, num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------- input checks


def _check_linear_shapes(prefix: str, x_shape, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x_shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}weight of shape {tuple(weight.shape)} expects inputs of width {weight.shape[1]}, "
            f"got width {x_shape[-1]} (input shape {tuple(x_shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_approximate(approximate: str) -> None:
    if approximate not in _APPROXIMATE_TO_ACTIVATION:
        raise ValueError(f"approximate must be 'none' (erf GELU) or 'tanh', got {approximate!r}")


def _check_dtypes(x: Tensor, params: dict[str, Tensor | None], stream: dict[str, Tensor | None]) -> None:
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


def _check_scale(scale: Tensor | None, lead: tuple) -> None:
    if scale is None:
        return
    if len(lead) < 1 or tuple(scale.shape) != (lead[0],):
        raise ValueError(f"scale must have shape (B,) = ({lead[0] if lead else '?'},) for x of shape (B, ..., D), "
                         f"got {tuple(scale.shape)} with x's leading dimensions {tuple(lead)}")
    if not scale.is_floating_point():
        raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")


def _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale=None) -> None:
    """Metadata only (shapes, dtypes, devices), so the fake implementation raises them too."""
    _check_approximate(approximate)
    tensors = {"x": x, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight,
               "fc2_bias": fc2_bias, "residual": residual, "scale": scale}
    check_same_device(tensors)
    _check_dtypes(x, {"fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias},
                  {"residual": residual})
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    _check_linear_shapes("fc1_", x.shape, fc1_weight, fc1_bias)
    _check_linear_shapes("fc2_", (*x.shape[:-1], fc1_weight.shape[0]), fc2_weight, fc2_bias)
    out_shape = (*x.shape[:-1], fc2_weight.shape[0])
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
    _check_scale(scale, tuple(x.shape[:-1]))


def _check_mlp_backward(grad_y, x, fc1_weight, fc1_bias, fc2_weight, hidden, approximate, needs, scale) -> None:
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, None, approximate, None, scale)
    out_shape = (*x.shape[:-1], fc2_weight.shape[0])
    if tuple(grad_y.shape) != out_shape:
        raise ValueError(f"grad_y must have the output's shape {out_shape}, got {tuple(grad_y.shape)}")
    hidden_shape = (math.prod(x.shape[:-1]), fc1_weight.shape[0])
    if tuple(hidden.shape) != hidden_shape or hidden.dtype != x.dtype:
        raise ValueError(f"hidden must have shape {hidden_shape} and x's dtype {x.dtype}, "
                         f"got {tuple(hidden.shape)} {hidden.dtype}")
    _check_dtypes(x, {"fc1_weight": fc1_weight}, {"grad_y": grad_y})
    if len(needs) != 5:
        raise ValueError(f"needs must list 5 booleans (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias), got {needs}")
    check_same_device({"grad_y": grad_y, "x": x, "hidden": hidden})


# ----------------------------------------------------------------------------- launch builders

def _grid(M: int, N: int, cfg: MatmulConfig) -> tuple[int]:
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
    cfg = choose_config("linear", M, N, K, x2d.dtype, interpret)
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
    )
    return Launch(linear_fwd_kernel, _grid(M, N, cfg), args, constexprs, cfg.num_warps, cfg.num_stages)


def gelu_bwd_launch(grad_y2d: Tensor, x2d: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, grad_pre: Tensor,
                    activation: str, interpret: bool | None = None, scale: Tensor | None = None,
                    rows_per_sample: int = 1) -> Launch:
    """The launch computing grad_pre = ((scale * grad_y2d) W2) * GELU'(x2d W1^T + b1), (M, hidden)."""
    if interpret is None:
        interpret = interpreting()
    M, k_in = x2d.shape
    hidden, k_out = w1.shape[0], w2.shape[0]
    cfg = choose_config("gelu_bwd", M, hidden, max(k_in, k_out), x2d.dtype, interpret)
    args = dict(
        DY=grad_y2d, Scale=scale if scale is not None else grad_pre, W2=w2, X=x2d, W1=w1,
        B1=b1 if b1 is not None else grad_pre, DPre=grad_pre,
        M=M, N=hidden, K_OUT=k_out, K_IN=k_in, rows_per_sample=rows_per_sample,
        stride_dym=grad_y2d.stride(0), stride_dyk=grad_y2d.stride(1),
        stride_w2k=w2.stride(0), stride_w2n=w2.stride(1),  # W2 (out, hidden) is the (K_OUT, N) operand as is
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_w1n=w1.stride(0), stride_w1k=w1.stride(1),
        stride_dpm=grad_pre.stride(0), stride_dpn=grad_pre.stride(1),
    )
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS1=b1 is not None, HAS_SCALE=scale is not None,
        ACTIVATION=activation, **precision_constexprs(x2d.dtype), INTERPRETING=interpret,
    )
    return Launch(gelu_bwd_kernel, _grid(M, hidden, cfg), args, constexprs, cfg.num_warps, cfg.num_stages)


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


def _input_grad_config(dtype: torch.dtype, weight_grad: MatmulConfig, interpret: bool) -> MatmulConfig:
    """The DX tiles' configuration inside a ``linear_bwd_launch``. A kernel's registers are the most
    any of its branches needs, so the DX tiles are kept as small as the weight-gradient ones: at
    64 x 128 x 64 (``choose_config``'s "linear" for 4 warps) the kernel took 206 to 255 registers
    with an fp32 weight, at 64 x 64 x 32 96 to 128; fp32's 64 x 64 x 16 took up to 246 (32 x 64 here)
    and fp64's 32 x 32 x 16 a STACK frame on sm_90 (16 x 32 here). Warps and stages are the launch's."""
    if interpret:
        return INTERPRETER_CONFIG
    warps, stages = weight_grad.num_warps, weight_grad.num_stages
    if dtype == torch.float32:
        return MatmulConfig(32, 64, 16, group_m=8, num_warps=warps, num_stages=stages)
    if dtype == torch.float64:
        return MatmulConfig(16, 32, 16, group_m=8, num_warps=warps, num_stages=stages)
    return MatmulConfig(64, 64, 32, group_m=8, num_warps=warps, num_stages=stages)


def linear_bwd_launch(layers: list[WeightGradOperands], input_grad: InputGradOperands | None = None,
                      interpret: bool | None = None, scale: Tensor | None = None, rows_per_sample: int = 1,
                      config: MatmulConfig | None = None) -> Launch:
    """One launch computing the weight and bias gradients of ``layers`` (one or two, over the same
    rows; the first one's dY scaled per sample by ``scale``, stochastic depth's, (M // rows_per_sample,))
    and ``input_grad``'s product, each tile by its own programs of one grid. ``config`` overrides
    ``choose_weight_grad_config`` and the DX tiles' choice (tests use small tiles so that small
    shapes span several)."""
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
    cfg = config or choose_weight_grad_config(M, [tuple(layer.grad_w.shape) for layer in layers], dtype, interpret)
    dx_cfg = config or _input_grad_config(dtype, cfg, interpret)
    # Unused pointer, size and stride arguments repeat present ones (their flags are off).
    some = input_grad.grad_x if input_grad else first.grad_w
    first = first or WeightGradOperands(input_grad.grad_y2d, input_grad.grad_x, some, None)
    second = layers[1] if len(layers) == 2 else first
    dx = input_grad or InputGradOperands(first.grad_y2d, first.grad_w, some)

    def operands(layer: WeightGradOperands, suffix: str) -> dict:
        return {f"DY{suffix}": layer.grad_y2d, f"X{suffix}": layer.x2d, f"DW{suffix}": layer.grad_w,
                f"DB{suffix}": layer.grad_b if layer.grad_b is not None else some}

    def strides(layer: WeightGradOperands, suffix: str) -> dict:
        return {f"stride_dy{suffix}m": layer.grad_y2d.stride(0), f"stride_dy{suffix}n": layer.grad_y2d.stride(1),
                f"stride_x{suffix}m": layer.x2d.stride(0), f"stride_x{suffix}k": layer.x2d.stride(1)}

    args = dict(
        **operands(first, ""), Scale=scale if scale is not None else some, **operands(second, "2"),
        G=dx.grad_y2d, W=dx.weight, DX=dx.grad_x,
        M=M, N=first.grad_w.shape[0], K=first.grad_w.shape[1], N2=second.grad_w.shape[0], K2=second.grad_w.shape[1],
        NX=dx.weight.shape[0], KX=dx.weight.shape[1], rows_per_sample=rows_per_sample,
        **strides(first, ""), **strides(second, "2"),
        stride_gm=dx.grad_y2d.stride(0), stride_gn=dx.grad_y2d.stride(1),
        stride_wn=dx.weight.stride(0), stride_wk=dx.weight.stride(1),
    )
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DX_BLOCK_M=dx_cfg.block_m, DX_BLOCK_N=dx_cfg.block_n, DX_BLOCK_K=dx_cfg.block_k, DX_GROUP_M=dx_cfg.group_m,
        LAYERS=len(layers), HAS_SCALE=scale is not None and bool(layers),
        HAS_BIAS=bool(layers) and layers[0].grad_b is not None,
        HAS_BIAS2=len(layers) == 2 and layers[1].grad_b is not None, HAS_DX=input_grad is not None,
        **precision_constexprs(dtype), INTERPRETING=interpret,
    )
    tiles = sum(_weight_grad_tiles(layer, cfg) for layer in layers)
    if input_grad is not None:
        tiles += math.ceil(M / dx_cfg.block_m) * math.ceil(input_grad.grad_x.shape[1] / dx_cfg.block_n)
    return Launch(linear_bwd_kernel, (tiles,), args, constexprs, cfg.num_warps, cfg.num_stages)


def _plans(M: int, d_in: int, hidden: int, d_out: int, dtype: torch.dtype, approximate: str, residual: bool,
           weight_dtype: torch.dtype | None, residual_dtype: torch.dtype | None, scale: bool, bias: bool,
           interpret: bool = False) -> list[Launch]:
    """Every Triton launch of one MLP forward + backward, built on meta tensors by the launchers."""
    _check_approximate(approximate)
    activation = _APPROXIMATE_TO_ACTIVATION[approximate]
    weight_dtype = weight_dtype or dtype
    out_dtype = (residual_dtype or dtype) if residual else dtype

    t = partial(meta_tensor, dtype=dtype)
    x, w1, w2 = t(M, d_in), t(hidden, d_in, dtype=weight_dtype), t(d_out, hidden, dtype=weight_dtype)
    b1, b2 = (t(hidden, dtype=weight_dtype), t(d_out, dtype=weight_dtype)) if bias else (None, None)
    samples, rows_per_sample = planned_samples(M)
    scale_t = t(samples) if scale else None
    rows_per_sample = rows_per_sample if scale else 1
    h, y, grad_y = t(M, hidden), t(M, d_out, dtype=out_dtype), t(M, d_out, dtype=out_dtype)
    grad_pre = t(M, hidden)
    return [
        linear_launch(x, w1, b1, None, h, activation, interpret=interpret),  # fc1
        linear_launch(h, w2, b2, t(M, d_out, dtype=out_dtype) if residual else None, y, "none", interpret=interpret,
                      scale=scale_t, rows_per_sample=rows_per_sample),  # fc2
        gelu_bwd_launch(grad_y, x, w1, b1, w2, grad_pre, activation, interpret=interpret, scale=scale_t,
                        rows_per_sample=rows_per_sample),
        linear_bwd_launch(  # dW2, db2, dW1, db1, dX
            [WeightGradOperands(grad_y, h, torch.empty_like(w2), torch.empty_like(b2) if bias else None),
             WeightGradOperands(grad_pre, x, torch.empty_like(w1), torch.empty_like(b1) if bias else None)],
            InputGradOperands(grad_pre, w1, t(M, d_in)), interpret=interpret, scale=scale_t,
            rows_per_sample=rows_per_sample),
    ]


def aot_launches(M: int, d_in: int, hidden: int, d_out: int, dtype: torch.dtype, approximate: str = "none",
                 residual: bool = True, weight_dtype: torch.dtype | None = None,
                 residual_dtype: torch.dtype | None = None, scale: bool = False,
                 bias: bool = True) -> list[KernelLaunch]:
    """The Triton kernels ``mlp`` runs on a GPU for x (M, d_in) in ``dtype`` -> (M, d_out) through
    ``hidden`` units, forward and backward: fc1 (bias + GELU epilogue), fc2 (bias, + residual if
    ``residual``, in ``residual_dtype``; stochastic depth's scale if ``scale``), gelu_bwd, and the
    one launch of both layers' weight and bias gradients and dX, the parameters in ``weight_dtype``
    (fp32 under autocast). Built by the launchers themselves on meta tensors, with the GPU's config
    choice."""
    launches = _plans(M, d_in, hidden, d_out, dtype, approximate, residual, weight_dtype, residual_dtype, scale, bias)
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches(launches)


def planned_launches(M: int, d_in: int, hidden: int, d_out: int, dtype: torch.dtype, approximate: str = "none",
                     residual: bool = True, **variant) -> list[Launch]:
    """The Triton ``Launch`` objects (kernel, grid, meta tensors) of one forward + backward, for
    accounts of launches and bytes (``variant`` as ``aot_launches``): every kernel the op runs."""
    defaults = dict(weight_dtype=None, residual_dtype=None, scale=False, bias=True)
    return _plans(M, d_in, hidden, d_out, dtype, approximate, residual, **{**defaults, **variant})


# ----------------------------------------------------------------------------- vit_fast::mlp


def _rows_per_sample(x: Tensor, scale: Tensor | None) -> int:
    rows = math.prod(x.shape[:-1])
    return rows // scale.shape[0] if scale is not None and scale.shape[0] else 1


@torch.library.custom_op("vit_fast::mlp", mutates_args=())
def _mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
            approximate: str, residual: Tensor | None, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale)
    check_launchable("x", x)
    lead, d_out = x.shape[:-1], fc2_weight.shape[0]
    x2d = x.reshape(-1, x.shape[-1])  # (M, D_in), a view whenever the strides allow
    M = x2d.shape[0]
    hidden = x.new_empty((M, fc1_weight.shape[0]))  # (M, Hd)
    y = torch.empty((M, d_out), dtype=residual.dtype if residual is not None else x.dtype, device=x.device)
    if hidden.numel():  # an empty grid is not a valid launch
        linear_launch(x2d, fc1_weight, fc1_bias, None, hidden, _APPROXIMATE_TO_ACTIVATION[approximate]).run()
    if y.numel():
        res2d = residual.reshape(-1, d_out) if residual is not None else None
        linear_launch(hidden, fc2_weight, fc2_bias, res2d, y, "none", scale=scale,
                      rows_per_sample=_rows_per_sample(x, scale)).run()
    return y.reshape(*lead, d_out), hidden


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale=None):
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale)
    M = math.prod(x.shape[:-1])
    y = torch.empty((*x.shape[:-1], fc2_weight.shape[0]), dtype=residual.dtype if residual is not None else x.dtype,
                    device=x.device)
    return y, x.new_empty((M, fc1_weight.shape[0]))


# ----------------------------------------------------------------------------- vit_fast::mlp_backward


def _not_needed(like: Tensor) -> Tensor:
    # A custom op returns tensors, never None: an unrequested gradient is an empty placeholder
    # (no compute, no memory) that the autograd formula turns back into None.
    return like.new_empty((0,))


def _linear_grads(layers: list[tuple[Tensor, Tensor, bool, bool]], input_grad: tuple[Tensor, Tensor] | None,
                  dtype: torch.dtype, scale: Tensor | None = None, rows_per_sample: int = 1
                  ) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
    """The backward products of linear layers over the same M rows, in one ``linear_bwd_kernel``
    launch: (grad_w (N, K), grad_b (N,)) in ``dtype`` for each layer given as (grad_y2d (M, N), x2d
    (M, K), needs_weight, needs_bias), ``scale`` scaling the first layer's grad_y2d per sample; and,
    given ``input_grad`` = (grad_y2d (M, N), weight (N, K)), grad_y2d @ weight (M, K) in grad_y2d's
    dtype (else None). Unneeded parameter gradients come back as empty placeholders; a layer whose
    bias gradient alone is needed still has its weight gradient computed, then dropped (frozen
    weights with trainable biases: not worth a kernel variant)."""
    grads, operands = [], []
    for index, (grad_y2d, x2d, needs_weight, needs_bias) in enumerate(layers):
        if not (needs_weight or needs_bias):
            grads.append((_not_needed(x2d), _not_needed(x2d)))
            continue
        grad_w = torch.empty((grad_y2d.shape[1], x2d.shape[1]), dtype=dtype, device=x2d.device)
        grad_b = torch.empty((grad_y2d.shape[1],), dtype=dtype, device=x2d.device) if needs_bias else None
        operands.append((index, WeightGradOperands(grad_y2d, x2d, grad_w, grad_b)))
        grads.append((grad_w if needs_weight else _not_needed(x2d), grad_b if needs_bias else _not_needed(x2d)))
    grad_x = None
    if input_grad is not None:
        grad_y2d, weight = input_grad
        grad_x = grad_y2d.new_empty((grad_y2d.shape[0], weight.shape[1]))
    if operands or grad_x is not None:
        scaled = bool(operands) and operands[0][0] == 0  # the scale belongs to layers[0]'s gradient only
        launch = linear_bwd_launch([op for _, op in operands],
                                   InputGradOperands(*input_grad, grad_x) if grad_x is not None else None,
                                   scale=scale if scaled else None, rows_per_sample=rows_per_sample if scaled else 1)
        if launch.grid[0]:  # no tiles: every output is empty (an empty grid is not a valid launch)
            launch.run()
    return grads, grad_x


@torch.library.custom_op("vit_fast::mlp_backward", mutates_args=())
def _mlp_backward_op(grad_y: Tensor, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                     hidden: Tensor, approximate: str, needs: list[bool], scale: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) of y = residual + scale * fc2(GELU(fc1(x)))
    given grad_y (..., D_out) and the forward's hidden activation (M, Hd); ``needs`` (five bools) says
    which are wanted, the others come back empty. Parameter gradients have the parameters' dtype
    (fc2_bias's is fc1_weight's: the parameters share one)."""
    _check_mlp_backward(grad_y, x, fc1_weight, fc1_bias, fc2_weight, hidden, approximate, needs, scale)
    check_launchable("x", x)
    w1, w2 = fc1_weight, fc2_weight
    # Only Triton kernels run here, but an autocast region around the backward must not re-cast
    # any torch operator a future change adds.
    with torch.autocast(x.device.type, enabled=False):
        gy2d = grad_y.reshape(-1, w2.shape[0])  # (M, D_out); may be a stride-0 view: the kernels take strides
        x2d = x.reshape(-1, x.shape[-1])  # (M, D_in)
        M = x2d.shape[0]
        rows_per_sample = _rows_per_sample(x, scale)
        # The only product with an elementwise tail (GELU') is fused; it needs no pre-activation.
        grad_pre = x.new_empty((M, w1.shape[0]))  # (M, Hd)
        if grad_pre.numel() and any(needs[:3]):
            gelu_bwd_launch(gy2d, x2d, w1, fc1_bias, w2, grad_pre, _APPROXIMATE_TO_ACTIVATION[approximate],
                            scale=scale, rows_per_sample=rows_per_sample).run()
        # Everything else in one launch: fc2's weight and bias gradients (from grad_y as it came, the
        # fp32 residual stream's under autocast, scaled and rounded to x's dtype in registers),
        # fc1's, and dX = grad_pre W1.
        [(grad_w2, grad_b2), (grad_w1, grad_b1)], grad_x2d = _linear_grads(
            [(gy2d, hidden, needs[3], needs[4]), (grad_pre, x2d, needs[1], needs[2])],
            (grad_pre, w1) if needs[0] else None, w1.dtype, scale, rows_per_sample)
        grad_x = grad_x2d.reshape(x.shape) if needs[0] else _not_needed(x)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


@_mlp_backward_op.register_fake
def _(grad_y, x, fc1_weight, fc1_bias, fc2_weight, hidden, approximate, needs, scale=None):
    _check_mlp_backward(grad_y, x, fc1_weight, fc1_bias, fc2_weight, hidden, approximate, needs, scale)
    param = fc1_weight.dtype
    specs = ((x.shape, x.dtype), (fc1_weight.shape, param), ((fc1_weight.shape[0],), param),
             (fc2_weight.shape, param), ((fc2_weight.shape[0],), param))
    return tuple(torch.empty(shape if need else (0,), dtype=dtype if need else x.dtype, device=x.device)
                 for (shape, dtype), need in zip(specs, needs))


# ----------------------------------------------------------------------------- vit_fast::linear


def _check_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_same_device({"x": x, "weight": weight, "bias": bias})
    _check_dtypes(x, {"weight": weight, "bias": bias}, {})
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    _check_linear_shapes("", x.shape, weight, bias)


def linear_aot_launches(M: int, K: int, N: int, dtype: torch.dtype,
                        weight_dtype: torch.dtype = torch.float32, bias: bool = True) -> list[KernelLaunch]:
    """The Triton kernels ``linear`` runs on a GPU for x (M, K) in ``dtype`` and a weight (N, K) in
    ``weight_dtype``: the forward and the backward's one launch (dX, dW and db)."""
    from vit_fast.aot import kernel_launches  # the compile tests' path only

    return kernel_launches(linear_planned_launches(M, K, N, dtype, weight_dtype, bias))


def aot_every_config(batch: int = 128, tokens: int = VIT_CIFAR_TOKENS, dim: int = 192, hidden: int = 384,
                     classes: int = 100) -> list[KernelLaunch]:
    """The distinct launches of the fused model's MLPs and autocast linears in training, for
    ``python -m vit_fast.aot --op mlp``: vit-cifar's shapes by default (``batch`` images of
    ``tokens`` tokens, width ``dim``, MLP ``hidden``, ``classes`` head outputs), under bf16
    autocast (bf16 activations, fp32 parameters, the fp32 residual stream, stochastic depth's
    scale; the qkv and output projections and the head as ``linear``) and the MLP in fp32."""
    M = batch * tokens
    launches = aot_launches(M, dim, hidden, dim, torch.bfloat16, weight_dtype=torch.float32,
                            residual_dtype=torch.float32, scale=True)
    launches += aot_launches(M, dim, hidden, dim, torch.float32, scale=True)
    for rows, n in ((M, 3 * dim), (M, dim), (batch, classes)):  # qkv, proj, head (class tokens)
        launches += linear_aot_launches(rows, dim, n, torch.bfloat16)
    return list({launch.key: launch for launch in launches}.values())


def linear_planned_launches(M: int, K: int, N: int, dtype: torch.dtype,
                            weight_dtype: torch.dtype = torch.float32, bias: bool = True) -> list[Launch]:
    """``linear``'s Triton ``Launch`` objects (forward; backward: dX, dW and db) on meta tensors, for accounts."""

    t = partial(meta_tensor, dtype=dtype)
    x, w, grad_y = t(M, K), t(N, K, dtype=weight_dtype), t(M, N)
    grad_w_and_b = WeightGradOperands(grad_y, x, t(N, K, dtype=weight_dtype),
                                      t(N, dtype=weight_dtype) if bias else None)
    return [linear_launch(x, w, t(N, dtype=weight_dtype) if bias else None, None, t(M, N), "none", interpret=False),
            linear_bwd_launch([grad_w_and_b], InputGradOperands(grad_y, w, t(M, K)), interpret=False)]


@torch.library.custom_op("vit_fast::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + b in x's dtype, W and b converted in registers (fp32 master weights under autocast)."""
    _check_linear(x, weight, bias)
    check_launchable("x", x)
    x2d = x.reshape(-1, x.shape[-1])
    out = x.new_empty((x2d.shape[0], weight.shape[0]))
    if out.numel():
        linear_launch(x2d, weight, bias, None, out, "none").run()
    return out.reshape(*x.shape[:-1], weight.shape[0])


@_linear_op.register_fake
def _(x, weight, bias):
    _check_linear(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("vit_fast::linear_backward", mutates_args=())
def _linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, needs: list[bool]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (x, weight, bias) of y = x W^T + b; ``needs`` (three bools) says which are wanted.
    grad_x in x's dtype, the weight's and bias's in the weight's dtype (fp32: reduced in fp32)."""
    _check_linear(x, weight, None)
    if tuple(grad_y.shape) != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"grad_y must have the output's shape {(*x.shape[:-1], weight.shape[0])}, "
                         f"got {tuple(grad_y.shape)}")
    check_launchable("x", x)
    with torch.autocast(x.device.type, enabled=False):
        gy2d = grad_y.reshape(-1, weight.shape[0]).to(x.dtype)  # a no-op: y, hence grad_y, has x's dtype
        x2d = x.reshape(-1, x.shape[-1])
        [(grad_w, grad_b)], grad_x2d = _linear_grads([(gy2d, x2d, needs[1], needs[2])],
                                                     (gy2d, weight) if needs[0] else None, weight.dtype)
        grad_x = grad_x2d.reshape(x.shape) if needs[0] else _not_needed(x)
    return grad_x, grad_w, grad_b


@_linear_backward_op.register_fake
def _(grad_y, x, weight, needs):
    _check_linear(x, weight, None)
    if tuple(grad_y.shape) != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"grad_y must have the output's shape {(*x.shape[:-1], weight.shape[0])}, "
                         f"got {tuple(grad_y.shape)}")
    specs = ((x.shape, x.dtype), (weight.shape, weight.dtype), ((weight.shape[0],), weight.dtype))
    return tuple(torch.empty(shape if need else (0,), dtype=dtype if need else x.dtype, device=x.device)
                 for (shape, dtype), need in zip(specs, needs))


def _linear_setup_context(ctx, inputs, output):
    x, weight, _bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_y: Tensor | None):
    if grad_y is None:
        return None, None, None
    x, weight = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = _linear_backward_op(grad_y, x, weight, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b (nn.Linear layout) with x 16-bit and W, b in x's dtype or fp32, converted in the
    kernel; y in x's dtype. Gradients: x's in its dtype, W's and b's in theirs, reduced in fp32."""
    _check_linear(x, weight, bias)
    return _linear_op(x, weight, bias)


# ----------------------------------------------------------------------------- autograd


def _mlp_setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, _fc2_bias, approximate, residual, scale = inputs
    _y, hidden = output
    # Saved: the inputs and the hidden activation H (dW2 = dY^T H needs it). Not saved: the
    # pre-activation, recomputed in gelu_bwd_kernel (kernels/mlp.py says why).
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, hidden, scale)
    ctx.approximate = approximate
    ctx.has_residual = residual is not None
    # `hidden` is returned only to be saved here; it carries no gradient (and no zero-fill).
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)


def _mlp_backward(ctx, grad_y: Tensor | None, _grad_hidden: Tensor | None):
    if grad_y is None:  # y's gradient is undefined (zero): so are the inputs'
        return (None,) * 8
    x, w1, b1, w2, hidden, scale = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = _mlp_backward_op(grad_y, x, w1, b1, w2, hidden, ctx.approximate, needs, scale)
    grad_residual = grad_y if ctx.has_residual and ctx.needs_input_grad[6] else None
    return (*(g if need else None for g, need in zip(grads, needs)), None, grad_residual, None)


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


# ----------------------------------------------------------------------------- public API


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    approximate: str = "none",
    residual: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """residual + scale[sample] * fc2(GELU(fc1(x))), as ``vit_fast.reference.mlp`` (with stochastic
    depth's scale applied as ``vit_fast.model.DropPath`` does); differentiable in every tensor but
    scale.

    x (..., D_in); fc1_weight (Hd, D_in); fc1_bias (Hd,) or None; fc2_weight (D_out, Hd); fc2_bias
    (D_out,) or None; residual, if given, (..., D_out); scale, if given, (B,) for x (B, ..., D_in).
    ``approximate``: "none" (erf GELU) or "tanh". Mixed precision: parameters in x's dtype or fp32,
    the residual in x's dtype or fp32; y has the residual's dtype (x's without one).
    """
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale)
    y, _hidden = _mlp_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale)
    return y
