"""The fused transformer MLP as torch ops: fc2(GELU(fc1(x))) (+ residual), forward and backward.

Public API (shapes as in ``vit_fast.reference``; weights in nn.Linear layout (out, in)):

    mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate="none", residual=None, scale=None)
    MatmulConfig, choose_config(kernel, M, N, K, dtype, interpret=None)
    linear_launch(...), gelu_bwd_launch(...)    the Launch of one kernel call
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
Backward, all inside ``vit_fast::mlp_backward`` (one custom-op call per MLP backward):
``gelu_bwd_kernel`` computes grad_pre = ((scale dY) W2) * GELU'(pre), recomputing pre in the same
program (why: ``kernels/mlp.py``) and, when dY needs scaling or converting, storing the 16-bit
scale * dY it multiplied; dX = grad_pre W1 runs in ``linear_fwd_kernel`` when W1 is fp32 (cuBLAS
otherwise); the weight gradients are cuBLAS GEMMs with fp32 output and the bias gradients fp32
column sums (``_mlp_backward_op`` says why). The residual's gradient is dY itself, passed on by
the autograd formula.

Mixed precision (what ``vit_fast.ops`` passes under autocast): x is in the compute dtype (bf16),
the parameters stay fp32 and are converted in the kernels' registers, the residual and y are the
fp32 residual stream. Without a residual y has x's dtype. hidden and the backward's intermediates
are in x's dtype; every parameter gradient comes back in its parameter's dtype, reduced in fp32
and never rounded through 16 bits. No standalone cast kernel runs (on the CPU the interpreter's
fallback for the fp32-output GEMMs widens its operands instead).

A plain linear with fp32 weights and 16-bit activations (the qkv and output projections and
the head under autocast) is registered too, because cuBLAS would need the weights cast to 16 bits
(and its weight gradients cast back), about four standalone cast kernels per linear and step:

    linear(x, weight, bias=None) -> y                  x 16-bit, weight/bias fp32, y in x's dtype
    vit_fast::linear           (x, weight, bias?) -> y                                  + autograd
    vit_fast::linear_backward  (grad_y, x, weight, needs) -> (grad_x, grad_weight, grad_bias)
    linear_aot_launches(M, K, N, dtype, weight_dtype)   its Triton launches

Forward: ``linear_fwd_kernel`` (no activation) converting the weight in registers; backward: dX in
the same kernel (W read transposed), dW by cuBLAS with fp32 output, db an fp32 column sum. With
weights in x's dtype (no autocast) a linear stays ``F.linear``: cuBLAS with nothing to convert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vit_fast.fused.launch import (
    SUPPORTED_DTYPES,
    Launch,
    accumulation_dtype,
    check_launchable,
    check_same_device,
    interpreting,
    planning_active,
    precision_constexprs,
)
from vit_fast.kernels.mlp import gelu_bwd_kernel, linear_fwd_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

_APPROXIMATE_TO_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


# ----------------------------------------------------------------------------- launch configs


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int  # rows of the output tile
    block_n: int  # columns of the output tile
    block_k: int  # reduction step per tl.dot (>= 16, the tensor-core minimum)
    group_m: int = 8  # row tiles per L2-friendly group (see _tile_coordinates in kernels/mlp.py)
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth of the K loop (shared-memory buffers)


# In Triton's interpreter one fixed, modest config: tiles of 64 keep the number of programs (the
# interpreter's cost) low while test shapes still span several tiles and K steps.
INTERPRETER_CONFIG = MatmulConfig(block_m=64, block_n=64, block_k=32, group_m=4, num_warps=4, num_stages=1)

# One wave of 128x128 tiles covers the SMs of an A100 (108) or H100 (132); below that, halve the
# tile so the grid still fills the GPU.
_ONE_WAVE_TILES = 128


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
    if interpret is None:
        interpret = interpreting()
    if interpret:
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return MatmulConfig(64, 64, 16, group_m=8, num_warps=4, num_stages=3)
    if dtype == torch.float64:
        return MatmulConfig(32, 32, 16, group_m=8, num_warps=4, num_stages=2)
    block_k = 64
    big = math.ceil(M / 128) * math.ceil(N / 128) >= _ONE_WAVE_TILES
    if kernel == "linear":
        if big:
            return MatmulConfig(128, 128, block_k, group_m=8, num_warps=8, num_stages=3)
        return MatmulConfig(64, 128, block_k, group_m=8, num_warps=4, num_stages=4)
    if big:
        return MatmulConfig(128, 64, block_k, group_m=8, num_warps=8, num_stages=3)
    return MatmulConfig(64, 64, block_k, group_m=8, num_warps=4, num_stages=3)


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


def _interpreter_constexprs(dtype: torch.dtype, interpret: bool) -> dict:
    """DOT_IN_FP32 and BF16_RNE_IN_SOFTWARE: set only under the interpreter (kernels/mlp.py says why)."""
    return {"DOT_IN_FP32": interpret and dtype in (torch.float16, torch.bfloat16), "BF16_RNE_IN_SOFTWARE": interpret}


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
        ACTIVATION=activation, **precision_constexprs(x2d.dtype), **_interpreter_constexprs(x2d.dtype, interpret),
    )
    return Launch(linear_fwd_kernel, _grid(M, N, cfg), args, constexprs, cfg.num_warps, cfg.num_stages)


def gelu_bwd_launch(grad_y2d: Tensor, x2d: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, grad_pre: Tensor,
                    activation: str, interpret: bool | None = None, scale: Tensor | None = None,
                    rows_per_sample: int = 1, dyc: Tensor | None = None) -> Launch:
    """The launch computing grad_pre = ((scale * grad_y2d) W2) * GELU'(x2d W1^T + b1), (M, hidden),
    and, given ``dyc`` (M, D_out) contiguous in x2d's dtype, storing scale * grad_y2d into it."""
    if interpret is None:
        interpret = interpreting()
    M, k_in = x2d.shape
    hidden, k_out = w1.shape[0], w2.shape[0]
    cfg = choose_config("gelu_bwd", M, hidden, max(k_in, k_out), x2d.dtype, interpret)
    args = dict(
        DY=grad_y2d, Scale=scale if scale is not None else grad_pre, W2=w2, X=x2d, W1=w1,
        B1=b1 if b1 is not None else grad_pre, DPre=grad_pre, DYC=dyc if dyc is not None else grad_pre,
        M=M, N=hidden, K_OUT=k_out, K_IN=k_in, rows_per_sample=rows_per_sample,
        stride_dym=grad_y2d.stride(0), stride_dyk=grad_y2d.stride(1),
        stride_w2k=w2.stride(0), stride_w2n=w2.stride(1),  # W2 (out, hidden) is the (K_OUT, N) operand as is
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_w1n=w1.stride(0), stride_w1k=w1.stride(1),
        stride_dpm=grad_pre.stride(0), stride_dpn=grad_pre.stride(1),
    )
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS1=b1 is not None, HAS_SCALE=scale is not None, STORE_DYC=dyc is not None,
        ACTIVATION=activation, **precision_constexprs(x2d.dtype), **_interpreter_constexprs(x2d.dtype, interpret),
    )
    return Launch(gelu_bwd_kernel, _grid(M, hidden, cfg), args, constexprs, cfg.num_warps, cfg.num_stages)


def _needs_dyc(grad_y: Tensor, x: Tensor, scale: Tensor | None) -> bool:
    """Whether the backward's dW2 / db2 operand (scale * dY in x's dtype) differs from dY itself."""
    return scale is not None or grad_y.dtype != x.dtype


def _plans(M: int, d_in: int, hidden: int, d_out: int, dtype: torch.dtype, approximate: str, residual: bool,
           weight_dtype: torch.dtype | None, residual_dtype: torch.dtype | None, scale: bool, bias: bool,
           interpret: bool = False) -> list[Launch]:
    """Every Triton launch of one MLP forward + backward, built on meta tensors by the launchers."""
    _check_approximate(approximate)
    activation = _APPROXIMATE_TO_ACTIVATION[approximate]
    weight_dtype = weight_dtype or dtype
    out_dtype = (residual_dtype or dtype) if residual else dtype

    def t(*shape, dtype=dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    x, w1, w2 = t(M, d_in), t(hidden, d_in, dtype=weight_dtype), t(d_out, hidden, dtype=weight_dtype)
    b1, b2 = (t(hidden, dtype=weight_dtype), t(d_out, dtype=weight_dtype)) if bias else (None, None)
    samples = max(1, M // 65)
    scale_t = t(samples) if scale else None
    rows_per_sample = M // samples if scale else 1
    h, y, grad_y = t(M, hidden), t(M, d_out, dtype=out_dtype), t(M, d_out, dtype=out_dtype)
    dyc = t(M, d_out) if _needs_dyc(grad_y, x, scale_t) else None
    launches = [
        linear_launch(x, w1, b1, None, h, activation, interpret=interpret),  # fc1
        linear_launch(h, w2, b2, t(M, d_out, dtype=out_dtype) if residual else None, y, "none", interpret=interpret,
                      scale=scale_t, rows_per_sample=rows_per_sample),  # fc2
        gelu_bwd_launch(grad_y, x, w1, b1, w2, t(M, hidden), activation, interpret=interpret, scale=scale_t,
                        rows_per_sample=rows_per_sample, dyc=dyc),
    ]
    if weight_dtype != dtype:  # dX = grad_pre W1 with W1 converted in registers (cuBLAS otherwise)
        launches.append(linear_launch(h, w1.t(), None, None, x, "none", interpret=interpret))
    return launches


def aot_launches(M: int, d_in: int, hidden: int, d_out: int, dtype: torch.dtype, approximate: str = "none",
                 residual: bool = True, weight_dtype: torch.dtype | None = None,
                 residual_dtype: torch.dtype | None = None, scale: bool = False,
                 bias: bool = True) -> list[KernelLaunch]:
    """The Triton kernels ``mlp`` runs on a GPU for x (M, d_in) in ``dtype`` -> (M, d_out) through
    ``hidden`` units, forward and backward: fc1 (bias + GELU epilogue), fc2 (bias, + residual if
    ``residual``, in ``residual_dtype``; stochastic depth's scale if ``scale``), gelu_bwd, and the
    dX product when the parameters are in ``weight_dtype`` (fp32 under autocast). Built by the
    launchers themselves on meta tensors, with the GPU's config choice."""
    launches = _plans(M, d_in, hidden, d_out, dtype, approximate, residual, weight_dtype, residual_dtype, scale, bias)
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches(launches)


def planned_launches(M: int, d_in: int, hidden: int, d_out: int, dtype: torch.dtype, approximate: str = "none",
                     residual: bool = True, **variant) -> list[Launch]:
    """The Triton ``Launch`` objects (kernel, grid, meta tensors) of one forward + backward, for
    accounts of launches and bytes (``variant`` as ``aot_launches``). The backward's cuBLAS GEMMs
    (dW1, dW2, and dX when the weights are in the compute dtype) and the two bias column sums are
    not Triton launches and are not listed."""
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


def _sum_rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Column sums (a bias gradient) accumulated in fp32 (fp64 for fp64) by one reduction kernel,
    in ``dtype``, the bias's: fp32 biases get the fp32 sum itself, never a 16-bit rounding of it."""
    total = t.sum(0, dtype=accumulation_dtype(t.dtype))
    return total if total.dtype == dtype else total.to(dtype)


def _product(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b in ``dtype`` (a weight gradient in its weight's dtype). 16-bit operands with an fp32
    result: cuBLAS writes fp32 from its fp32 accumulator (``out_dtype``, CUDA only); on the CPU (the
    interpreter's test runs) the operands are widened, which computes the same exact products."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda or planning_active():  # planning: the account plans the GPU's path
        return torch.mm(a, b, out_dtype=dtype)
    return a.to(dtype) @ b.to(dtype)


def _not_needed(like: Tensor) -> Tensor:
    # A custom op returns tensors, never None: an unrequested gradient is an empty placeholder
    # (no compute, no memory) that the autograd formula turns back into None.
    return like.new_empty((0,))


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
    param_dtype = w1.dtype
    # The products below take their dtypes from the operands; an autocast region around the
    # backward must not re-cast them.
    with torch.autocast(x.device.type, enabled=False):
        gy2d = grad_y.reshape(-1, w2.shape[0])  # (M, D_out); may be a stride-0 view: the kernel and cuBLAS take strides
        x2d = x.reshape(-1, x.shape[-1])  # (M, D_in)
        M = x2d.shape[0]
        # The only product with an elementwise tail (GELU') is fused; it needs no pre-activation.
        grad_pre = x.new_empty((M, w1.shape[0]))  # (M, Hd)
        dyc = x.new_empty((M, w2.shape[0])) if _needs_dyc(grad_y, x, scale) else None
        if grad_pre.numel():
            gelu_bwd_launch(gy2d, x2d, w1, fc1_bias, w2, grad_pre, _APPROXIMATE_TO_ACTIVATION[approximate],
                            scale=scale, rows_per_sample=_rows_per_sample(x, scale), dyc=dyc).run()
        elif dyc is not None:  # no hidden units (degenerate): no kernel ran to fill it
            keep = scale.repeat_interleave(_rows_per_sample(x, scale))[:, None] if scale is not None else 1.0
            dyc = (gy2d * keep).to(x.dtype)
        dy = dyc if dyc is not None else gy2d  # (M, D_out): the branch's gradient, in x's dtype
        # The other gradients are plain GEMMs (and column sums) with nothing to fuse into them:
        # cuBLAS runs them near the roofline already, where a Triton copy would have to match it on
        # every shape, and both cuBLAS GEMMs and torch's sum reductions are deterministic run to run
        # (no atomics, no split-K reductions in arbitrary order). With fp32 weights, dX is the one
        # product that would need a 16-bit copy of W1 for cuBLAS: linear_fwd_kernel converts W1 in
        # registers instead. To be confirmed against Triton alternatives by benchmarks/bench_mlp.py.
        grad_x = _linear_input_grad(grad_pre, w1, x.dtype).reshape(x.shape) if needs[0] else _not_needed(x)
        grad_w1 = _product(grad_pre.t(), x2d, param_dtype) if needs[1] else _not_needed(x)
        grad_b1 = _sum_rows(grad_pre, param_dtype) if needs[2] else _not_needed(x)
        grad_w2 = _product(dy.t(), hidden, param_dtype) if needs[3] else _not_needed(x)
        grad_b2 = _sum_rows(dy, param_dtype) if needs[4] else _not_needed(x)
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


def _linear_input_grad(grad_y2d: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """grad_y2d @ weight (M, K) in ``dtype``: cuBLAS when the weight has that dtype, else the Triton
    matmul converting the (fp32) weight in registers, read transposed through its strides."""
    if weight.dtype == dtype:
        return grad_y2d @ weight
    if not grad_y2d.shape[1]:  # no output features: the gradient is zero
        return torch.zeros((grad_y2d.shape[0], weight.shape[1]), dtype=dtype, device=grad_y2d.device)
    out = torch.empty((grad_y2d.shape[0], weight.shape[1]), dtype=dtype, device=grad_y2d.device)
    if out.numel():  # the kernel writes every element: no zero-fill launch
        linear_launch(grad_y2d, weight.t(), None, None, out, "none").run()
    return out


def linear_aot_launches(M: int, K: int, N: int, dtype: torch.dtype,
                        weight_dtype: torch.dtype = torch.float32, bias: bool = True) -> list[KernelLaunch]:
    """The Triton kernels ``linear`` runs on a GPU for x (M, K) in ``dtype`` and a weight (N, K) in
    ``weight_dtype``: the forward and the backward's dX (its dW and db are cuBLAS and torch)."""
    from vit_fast.aot import kernel_launches  # the compile tests' path only

    return kernel_launches(linear_planned_launches(M, K, N, dtype, weight_dtype, bias))


def linear_planned_launches(M: int, K: int, N: int, dtype: torch.dtype,
                            weight_dtype: torch.dtype = torch.float32, bias: bool = True) -> list[Launch]:
    """``linear``'s Triton ``Launch`` objects (forward, dX) on meta tensors, for accounts."""

    def t(*shape, dtype=dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    w = t(N, K, dtype=weight_dtype)
    return [linear_launch(t(M, K), w, t(N, dtype=weight_dtype) if bias else None, None, t(M, N), "none",
                          interpret=False),
            linear_launch(t(M, N), w.t(), None, None, t(M, K), "none", interpret=False)]


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
        grad_x = _linear_input_grad(gy2d, weight, x.dtype).reshape(x.shape) if needs[0] else _not_needed(x)
        grad_w = _product(gy2d.t(), x2d, weight.dtype) if needs[1] else _not_needed(x)
        grad_b = _sum_rows(gy2d, weight.dtype) if needs[2] else _not_needed(x)
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
