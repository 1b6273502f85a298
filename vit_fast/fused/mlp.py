"""The fused transformer MLP as torch ops: fc2(GELU(fc1(x))) (+ residual), forward and backward.

Public API (shapes as in ``vit_fast.reference``; weights in nn.Linear layout (out, in)):

    mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate="none", residual=None)
    MatmulConfig, choose_config(kernel, M, N, K, dtype, interpret=None)
    linear_launch(...), gelu_bwd_launch(...)    the Launch of one kernel call
    aot_launches(M, d_in, hidden, d_out, dtype, approximate="none", residual=True)
        the GPU's kernel launches (fc1, fc2, gelu_bwd), for vit_fast.aot's compile tests

Registered ops (namespace ``vit_fast``), each with a fake (meta) implementation:

    vit_fast::mlp           (x, w1, b1, w2, b2, approximate, residual?) -> (y, hidden)     + autograd
    vit_fast::mlp_backward  (grad_y, x, w1, b1, w2, hidden, approximate, needs)
                            -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)

Forward: two launches of ``linear_fwd_kernel``, fc1 with bias + GELU in the epilogue (the
hidden activation is written once, the pre-activation never), fc2 with bias + residual.
Backward, all inside ``vit_fast::mlp_backward`` (one custom-op call per MLP backward):
``gelu_bwd_kernel`` computes grad_pre = (dY W2) * GELU'(pre), recomputing pre in the same program
(why: ``kernels/mlp.py``); the other products and the bias sums go to cuBLAS and torch (why:
``_mlp_backward_impl``). The residual's gradient is dY itself, passed on by the autograd formula.

There is no registered plain linear: a GEMM with a bias is cuBLAS's job (``F.linear``), and fc2's
bias + residual epilogue already lives inside ``vit_fast::mlp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vit_fast.fused.launch import (
    Launch,
    accumulation_dtype,
    check_launchable,
    check_same_dtype_device,
    interpreting,
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


def _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual) -> None:
    """Metadata only (shapes, dtypes, devices), so the fake implementation raises them too."""
    _check_approximate(approximate)
    check_same_dtype_device({"x": x, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight,
                             "fc2_bias": fc2_bias, "residual": residual})
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    _check_linear_shapes("fc1_", x.shape, fc1_weight, fc1_bias)
    _check_linear_shapes("fc2_", (*x.shape[:-1], fc1_weight.shape[0]), fc2_weight, fc2_bias)
    out_shape = (*x.shape[:-1], fc2_weight.shape[0])
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")


# ----------------------------------------------------------------------------- launch builders

def _grid(M: int, N: int, cfg: MatmulConfig) -> tuple[int]:
    return (math.ceil(M / cfg.block_m) * math.ceil(N / cfg.block_n),)


def linear_launch(x2d: Tensor, weight: Tensor, bias: Tensor | None, residual2d: Tensor | None, out: Tensor,
                  activation: str, interpret: bool | None = None) -> Launch:
    """The launch computing out = act(x2d W^T + bias) + residual2d; x2d (M, K), weight (N, K), out (M, N)."""
    M, K = x2d.shape
    N = weight.shape[0]
    cfg = choose_config("linear", M, N, K, x2d.dtype, interpret)
    # Unused pointer arguments get `out`: a valid pointer the kernel never reads (its flag is off).
    bias_arg = bias if bias is not None else out
    res_arg = residual2d if residual2d is not None else out
    args = dict(
        X=x2d, W=weight, Bias=bias_arg, Residual=res_arg, Out=out, M=M, N=N, K=K,
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_rm=res_arg.stride(0), stride_rn=res_arg.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
    )
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual2d is not None, ACTIVATION=activation,
        **precision_constexprs(x2d.dtype),
    )
    return Launch(linear_fwd_kernel, _grid(M, N, cfg), args, constexprs, cfg.num_warps, cfg.num_stages)


def gelu_bwd_launch(grad_y2d: Tensor, x2d: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, grad_pre: Tensor,
                    activation: str, interpret: bool | None = None) -> Launch:
    """The launch computing grad_pre = (grad_y2d W2) * GELU'(x2d W1^T + b1), (M, hidden)."""
    M, k_in = x2d.shape
    hidden, k_out = w1.shape[0], w2.shape[0]
    cfg = choose_config("gelu_bwd", M, hidden, max(k_in, k_out), x2d.dtype, interpret)
    args = dict(
        DY=grad_y2d, W2=w2, X=x2d, W1=w1, B1=b1, DPre=grad_pre, M=M, N=hidden, K_OUT=k_out, K_IN=k_in,
        stride_dym=grad_y2d.stride(0), stride_dyk=grad_y2d.stride(1),
        stride_w2k=w2.stride(0), stride_w2n=w2.stride(1),  # W2 (out, hidden) is the (K_OUT, N) operand as is
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_w1n=w1.stride(0), stride_w1k=w1.stride(1),
        stride_dpm=grad_pre.stride(0), stride_dpn=grad_pre.stride(1),
    )
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        ACTIVATION=activation, **precision_constexprs(x2d.dtype),
    )
    return Launch(gelu_bwd_kernel, _grid(M, hidden, cfg), args, constexprs, cfg.num_warps, cfg.num_stages)


def _linear_fwd(x2d: Tensor, weight: Tensor, bias: Tensor | None, residual2d: Tensor | None,
                activation: str) -> Tensor:
    out = torch.empty((x2d.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
    if out.numel():  # an empty grid is not a valid launch
        linear_launch(x2d, weight, bias, residual2d, out, activation).run()
    return out


def _gelu_bwd(grad_y2d: Tensor, x2d: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, activation: str) -> Tensor:
    grad_pre = torch.empty((x2d.shape[0], w1.shape[0]), device=x2d.device, dtype=x2d.dtype)
    if grad_pre.numel():
        gelu_bwd_launch(grad_y2d, x2d, w1, b1, w2, grad_pre, activation).run()
    return grad_pre


def aot_launches(M: int, d_in: int, hidden: int, d_out: int, dtype: torch.dtype, approximate: str = "none",
                 residual: bool = True) -> list[KernelLaunch]:
    """The kernels ``mlp`` runs on a GPU for x (M, d_in) -> (M, d_out) through ``hidden`` units,
    forward and backward: fc1 (bias + GELU epilogue), fc2 (bias, + residual if ``residual``) and
    gelu_bwd. Built by the launchers themselves on meta tensors, with the GPU's config choice."""
    _check_approximate(approximate)
    activation = _APPROXIMATE_TO_ACTIVATION[approximate]

    def t(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    x, w1, b1, w2, b2 = t(M, d_in), t(hidden, d_in), t(hidden), t(d_out, hidden), t(d_out)
    h, y = t(M, hidden), t(M, d_out)
    launches = [
        linear_launch(x, w1, b1, None, h, activation, interpret=False),  # fc1
        linear_launch(h, w2, b2, t(M, d_out) if residual else None, y, "none", interpret=False),  # fc2
        gelu_bwd_launch(y, x, w1, b1, w2, t(M, hidden), activation, interpret=False),
    ]
    from vit_fast.aot import kernel_launches  # the compile tests' path only: running needs none of it

    return kernel_launches(launches)


# ----------------------------------------------------------------------------- vit_fast::mlp


@torch.library.custom_op("vit_fast::mlp", mutates_args=())
def _mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
            approximate: str, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual)
    check_launchable("x", x)
    lead, d_out = x.shape[:-1], fc2_weight.shape[0]
    x2d = x.reshape(-1, x.shape[-1])  # (M, D_in), a view whenever the strides allow
    hidden = _linear_fwd(x2d, fc1_weight, fc1_bias, None, _APPROXIMATE_TO_ACTIVATION[approximate])  # (M, Hd)
    res2d = residual.reshape(-1, d_out) if residual is not None else None
    y = _linear_fwd(hidden, fc2_weight, fc2_bias, res2d, "none")  # (M, D_out)
    return y.reshape(*lead, d_out), hidden


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual):
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual)
    M = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], fc2_weight.shape[0]))
    return y, x.new_empty((M, fc1_weight.shape[0]))


# ----------------------------------------------------------------------------- vit_fast::mlp_backward


def _sum_rows(t: Tensor) -> Tensor:
    """Column sums (the bias gradient) accumulated in fp32 (fp64 for fp64), rounded once."""
    return t.sum(0, dtype=accumulation_dtype(t.dtype)).to(t.dtype)


def _not_needed(like: Tensor) -> Tensor:
    # A custom op returns tensors, never None: an unrequested gradient is an empty placeholder
    # (no compute, no memory) that the autograd formula turns back into None.
    return like.new_empty((0,))


@torch.library.custom_op("vit_fast::mlp_backward", mutates_args=())
def _mlp_backward_op(grad_y: Tensor, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor,
                     hidden: Tensor, approximate: str, needs: list[bool]
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) of y = fc2(GELU(fc1(x))) given
    grad_y (..., D_out) and the forward's hidden activation (M, Hd); ``needs`` (five bools) says
    which are wanted, the others come back empty."""
    _check_approximate(approximate)
    check_same_dtype_device({"grad_y": grad_y, "x": x, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias,
                             "fc2_weight": fc2_weight, "hidden": hidden})
    check_launchable("x", x)
    w1, w2 = fc1_weight, fc2_weight
    gy2d = grad_y.reshape(-1, w2.shape[0])  # (M, D_out); may be a stride-0 view: the kernel and cuBLAS take strides
    x2d = x.reshape(-1, x.shape[-1])  # (M, D_in)
    # The only product with an elementwise tail (GELU') is fused; it needs no pre-activation.
    grad_pre = _gelu_bwd(gy2d, x2d, w1, fc1_bias, w2, _APPROXIMATE_TO_ACTIVATION[approximate])  # (M, Hd)
    # The other gradients are plain GEMMs (and column sums) with nothing to fuse into them:
    # cuBLAS runs them near the roofline already, where a Triton copy would have to match it on
    # every shape, and both cuBLAS GEMMs and torch's sum reductions are deterministic run to run
    # (no atomics, no split-K reductions in arbitrary order). To be confirmed against a Triton
    # alternative by benchmarks/bench_mlp.py on a GPU.
    grad_x = (grad_pre @ w1).reshape(x.shape) if needs[0] else _not_needed(x)
    grad_w1 = grad_pre.t() @ x2d if needs[1] else _not_needed(x)
    grad_b1 = _sum_rows(grad_pre) if needs[2] else _not_needed(x)
    grad_w2 = gy2d.t() @ hidden if needs[3] else _not_needed(x)
    grad_b2 = _sum_rows(gy2d) if needs[4] else _not_needed(x)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


@_mlp_backward_op.register_fake
def _(grad_y, x, fc1_weight, fc1_bias, fc2_weight, hidden, approximate, needs):
    shapes = (x.shape, fc1_weight.shape, fc1_bias.shape, fc2_weight.shape, (fc2_weight.shape[0],))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


# ----------------------------------------------------------------------------- autograd


def _mlp_setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, _fc2_bias, approximate, residual = inputs
    _y, hidden = output
    # Saved: the inputs and the hidden activation H (dW2 = dY^T H needs it). Not saved: the
    # pre-activation, recomputed in gelu_bwd_kernel (kernels/mlp.py says why).
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, hidden)
    ctx.approximate = approximate
    ctx.has_residual = residual is not None
    # `hidden` is returned only to be saved here; it carries no gradient (and no zero-fill).
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)


def _mlp_backward(ctx, grad_y: Tensor | None, _grad_hidden: Tensor | None):
    if grad_y is None:  # y's gradient is undefined (zero): so are the inputs'
        return (None,) * 7
    x, w1, b1, w2, hidden = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = _mlp_backward_op(grad_y, x, w1, b1, w2, hidden, ctx.approximate, needs)
    grad_residual = grad_y if ctx.has_residual and ctx.needs_input_grad[6] else None
    return (*(g if need else None for g, need in zip(grads, needs)), None, grad_residual)


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


# ----------------------------------------------------------------------------- public API


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    approximate: str = "none",
    residual: Tensor | None = None,
) -> Tensor:
    """fc2(GELU(fc1(x))) (+ residual), as ``vit_fast.reference.mlp``; differentiable in every tensor.

    x (..., D_in); fc1_weight (Hd, D_in); fc1_bias (Hd,); fc2_weight (D_out, Hd); fc2_bias (D_out,);
    residual, if given, (..., D_out). ``approximate``: "none" (erf GELU) or "tanh".
    """
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual)
    y, _hidden = _mlp_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual)
    return y
