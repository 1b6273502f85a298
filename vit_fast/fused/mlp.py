"""The fused transformer MLP as torch ops: fc2(GELU(fc1(x))) (+ residual), forward and backward.

Public API (shapes as in ``vit_fast.reference``; weights in nn.Linear layout (out, in)):

    mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate="none", residual=None, scale=None)
    MLPConfig, choose_config(rows, d_in, hidden, d_out, dtype, *, interpret=None)
                                                the tiles of its launches (``MatmulConfig`` each)
    gelu_bwd_launch(...)                        the Launch of ``gelu_bwd_kernel``; the other two
                                                kernels' builders, shared with the autocast linear
                                                (``vit_fast.fused.linear``), are ``vit_fast.fused.matmul``'s
    aot_launches(M, d_in, hidden, d_out, dtype, approximate="none", residual=True, ...)
        the GPU's kernel launches, for vit_fast.aot's compile tests;
    launch_plan(op, args, outputs, target)   the launches of one call of a registered op (run by the
        op, counted by vit_fast.cost);
        aot_every_config() vit-cifar's (``python -m vit_fast.aot --op mlp``)

Registered ops (namespace ``vit_fast``), each with a fake (meta) implementation:

    vit_fast::mlp           (x, w1, b1?, w2, b2?, approximate, residual?, scale?) -> (y, hidden)  + autograd
    vit_fast::mlp_backward  (grad_y, x, w1, b1?, w2, hidden, approximate, needs, scale?)
                            -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)

Forward: two launches of ``linear_fwd_kernel``, fc1 with bias + GELU in the epilogue (the
hidden activation is written once, the pre-activation never), fc2 with bias, stochastic depth's
per-sample scale and the residual: y = residual + scale[sample] * (h W2^T + b2).
Backward, all inside ``vit_fast::mlp_backward`` (one custom-op call per MLP backward), three
launches: ``gelu_bwd_kernel`` computes grad_pre = ((scale dY) W2) * GELU'(pre), recomputing pre in
the same program (why: ``kernels/mlp.py``), and stores stochastic depth's scale expanded to rows;
then one ``linear_bwd_kernel`` launch computes dW2 = (scale dY)^T H with db2, dW1 = grad_pre^T X
with db1 and dX = grad_pre W1, each tile (of dW: and slice of rows) by its own programs of one
grid, reading dY as it came (fp32 under autocast) and scaling and rounding it in registers, W1
converted in registers; ``weight_grad_reduce_kernel`` sums the slices' fp32 partials in slice
order (``matmul.weight_grad_config``). This replaced five launches (dX in Triton or cuBLAS, two
cuBLAS weight GEMMs with fp32 output, two bias reductions) and the 16-bit copy of scale * dY that
gelu_bwd stored for them. cuBLAS may still be faster per weight GEMM on a GPU:
``benchmarks/bench_mlp.py`` on a GPU is to settle it; no timing was taken.
The residual's gradient is dY itself, passed on by the autograd formula.

Mixed precision (what ``vit_fast.ops`` passes under autocast): x is in the compute dtype (bf16),
the parameters stay fp32 and are converted in the kernels' registers, the residual and y are the
fp32 residual stream. Without a residual y has x's dtype. hidden and the backward's intermediates
are in x's dtype; every parameter gradient comes back in its parameter's dtype, accumulated in
fp32 and stored by the kernel that reduced it, never rounded through 16 bits. No standalone cast
kernel runs. Every kernel is Triton, so on the CPU the interpreter runs the same kernels as a
GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vit_fast.fused.launch import (
    VIT_CIFAR_TOKENS, Launch, Target, accumulation_dtype, check_launchable, check_same_device, interpreting,
    meta_tensor, planned_samples, precision_constexprs, rows_per_sample_of,
)
from vit_fast.fused.matmul import (
    InputGradOperands, MatmulConfig, WeightGradOperands, check_dtypes, check_linear_shapes, input_grad_config,
    linear_bwd_launch, linear_grads_launches, linear_launch, product_config, row_scale_launch, tile_grid,
    weight_grad_config,
)
from vit_fast.kernels.mlp import gelu_bwd_kernel

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

__all__ = ["MLPConfig", "aot_every_config", "aot_launches", "choose_config", "gelu_bwd_launch", "mlp",
           "launch_plan"]

_APPROXIMATE_TO_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


# ----------------------------------------------------------------------------- launch config


@dataclass(frozen=True)
class MLPConfig:
    """The tiles of one forward + backward: fc1's and fc2's ``linear_fwd_kernel`` launches,
    ``gelu_bwd_kernel``'s, and the weight-gradient (fc2's and fc1's) and input-gradient tiles of the
    backward's one ``linear_bwd_kernel`` launch."""

    fc1: MatmulConfig
    fc2: MatmulConfig
    gelu_bwd: MatmulConfig
    weight_grad: MatmulConfig
    input_grad: MatmulConfig


def choose_config(rows: int, d_in: int, hidden: int, d_out: int, dtype: torch.dtype, *,
                  interpret: bool | None = None) -> MLPConfig:
    """The tiles for x (rows, d_in) in ``dtype`` through ``hidden`` units to (rows, d_out):
    ``vit_fast.fused.matmul``'s rules, which the launch builders apply (a backward that needs
    fewer weight gradients takes the weight-gradient tiles of those it computes). ``interpret``
    defaults to ``launch.interpreting()`` (then the fixed INTERPRETER_CONFIG everywhere)."""
    weight_grad = weight_grad_config(rows=rows, weights=[(d_out, hidden), (hidden, d_in)], dtype=dtype,
                                     interpret=interpret)
    return MLPConfig(
        fc1=product_config("linear", rows=rows, columns=hidden, dtype=dtype, interpret=interpret),
        fc2=product_config("linear", rows=rows, columns=d_out, dtype=dtype, interpret=interpret),
        gelu_bwd=product_config("gelu_bwd", rows=rows, columns=hidden, dtype=dtype, interpret=interpret),
        weight_grad=weight_grad,
        input_grad=input_grad_config(weight_grad=weight_grad, dtype=dtype, interpret=interpret),
    )


# ----------------------------------------------------------------------------- input checks


def _check_approximate(approximate: str) -> None:
    if approximate not in _APPROXIMATE_TO_ACTIVATION:
        raise ValueError(f"approximate must be 'none' (erf GELU) or 'tanh', got {approximate!r}")


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
    check_dtypes(x, {"fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias},
                  {"residual": residual})
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    check_linear_shapes("fc1_", x.shape, fc1_weight, fc1_bias)
    check_linear_shapes("fc2_", (*x.shape[:-1], fc1_weight.shape[0]), fc2_weight, fc2_bias)
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
    check_dtypes(x, {"fc1_weight": fc1_weight}, {"grad_y": grad_y})
    if len(needs) != 5:
        raise ValueError(f"needs must list 5 booleans (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias), got {needs}")
    check_same_device({"grad_y": grad_y, "x": x, "hidden": hidden})


# ----------------------------------------------------------------------------- launch builders


def gelu_bwd_launch(grad_y2d: Tensor, x2d: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, grad_pre: Tensor,
                    activation: str, interpret: bool | None = None, scale: Tensor | None = None,
                    rows_per_sample: int = 1, row_scale: Tensor | None = None) -> Launch:
    """The launch computing grad_pre = ((scale * grad_y2d) W2) * GELU'(x2d W1^T + b1), (M, hidden),
    and, given ``row_scale`` (M,) (with ``scale``), the per-sample scale expanded to rows into it:
    what ``linear_bwd_kernel``'s weight-gradient loop reads instead of dividing row indices."""
    if interpret is None:
        interpret = interpreting()
    M, k_in = x2d.shape
    hidden, k_out = w1.shape[0], w2.shape[0]
    cfg = product_config("gelu_bwd", rows=M, columns=hidden, dtype=x2d.dtype, interpret=interpret)
    args = dict(
        DY=grad_y2d, Scale=scale if scale is not None else grad_pre,
        RowScale=row_scale if row_scale is not None else grad_pre, W2=w2, X=x2d, W1=w1,
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
        STORE_ROW_SCALE=scale is not None and row_scale is not None, ACTIVATION=activation, **precision_constexprs(x2d.dtype), INTERPRETING=interpret,
        EVEN_K_OUT=k_out % cfg.block_k == 0, EVEN_K_IN=k_in % cfg.block_k == 0,
    )
    return Launch(gelu_bwd_kernel, tile_grid(M, hidden, cfg), args, constexprs, cfg.num_warps, cfg.num_stages)


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
    row_scale = t(M, dtype=accumulation_dtype(dtype)) if scale else None
    return [
        linear_launch(x, w1, b1, None, h, activation, interpret=interpret),  # fc1
        linear_launch(h, w2, b2, t(M, d_out, dtype=out_dtype) if residual else None, y, "none", interpret=interpret,
                      scale=scale_t, rows_per_sample=rows_per_sample),  # fc2
        gelu_bwd_launch(grad_y, x, w1, b1, w2, grad_pre, activation, interpret=interpret, scale=scale_t,
                        rows_per_sample=rows_per_sample, row_scale=row_scale),
        *linear_bwd_launch(  # dW2, db2, dW1, db1, dX (and the sum of the weight gradients' slices)
            [WeightGradOperands(grad_y, h, torch.empty_like(w2), torch.empty_like(b2) if bias else None),
             WeightGradOperands(grad_pre, x, torch.empty_like(w1), torch.empty_like(b1) if bias else None)],
            InputGradOperands(grad_pre, w1, t(M, d_in)), interpret=interpret, row_scale=row_scale),
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


def aot_every_config(batch: int = 128, tokens: int = VIT_CIFAR_TOKENS, dim: int = 192,
                     hidden: int = 384) -> list[KernelLaunch]:
    """The distinct launches of the fused model's MLPs in training, for ``python -m vit_fast.aot
    --op mlp``: vit-cifar's shapes by default (``batch`` images of ``tokens`` tokens, width
    ``dim``, MLP ``hidden``), under bf16 autocast (bf16 activations, fp32 parameters, the fp32
    residual stream, stochastic depth's scale) and in fp32. The model's other linears are
    ``vit_fast.fused.linear``'s (``--op linear``)."""
    M = batch * tokens
    launches = aot_launches(M, dim, hidden, dim, torch.bfloat16, weight_dtype=torch.float32,
                            residual_dtype=torch.float32, scale=True)
    launches += aot_launches(M, dim, hidden, dim, torch.float32, scale=True)
    return list({launch.key: launch for launch in launches}.values())


def launch_plan(op: str, args: tuple, outputs: tuple, target: Target) -> list[Launch]:
    """The launches of one call of ``vit_fast::<op>`` (mlp, mlp_backward) with ``args`` (the op's
    arguments, in its schema's order) writing ``outputs`` (what the op returns), on ``target``.
    The real implementations run them; ``vit_fast.cost`` counts them."""
    interpret = target.interpret
    if op == "mlp":
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale = args
        y, hidden = outputs
        d_out = fc2_weight.shape[0]
        x2d = x.reshape(-1, x.shape[-1])  # (M, D_in), a view whenever the strides allow
        launches = []
        if hidden.numel():  # an empty grid is not a valid launch
            launches.append(linear_launch(x2d, fc1_weight, fc1_bias, None, hidden,
                                          _APPROXIMATE_TO_ACTIVATION[approximate], interpret=interpret))
        if y.numel():
            res2d = residual.reshape(-1, d_out) if residual is not None else None
            launches.append(linear_launch(hidden, fc2_weight, fc2_bias, res2d, y.reshape(-1, d_out), "none",
                                          interpret=interpret, scale=scale,
                                          rows_per_sample=rows_per_sample_of(x, scale)))
        return launches
    if op == "mlp_backward":
        grad_y, x, w1, fc1_bias, w2, hidden, approximate, needs, scale = args
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = outputs
        # Only Triton kernels run here, but an autocast region around the backward must not re-cast
        # any torch operator a future change adds.
        with torch.autocast(x.device.type, enabled=False):
            gy2d = grad_y.reshape(-1, w2.shape[0])  # (M, D_out); may be a stride-0 view: the kernels take strides
            x2d = x.reshape(-1, x.shape[-1])  # (M, D_in)
            M = x2d.shape[0]
            per_sample = rows_per_sample_of(x, scale)
            # The only product with an elementwise tail (GELU') is fused; it needs no pre-activation.
            grad_pre = x.new_empty((M, w1.shape[0]))  # (M, Hd)
            # Stochastic depth's scale expanded to rows for fc2's weight gradients: stored by gelu_bwd's
            # first column of tiles, or by a launch of its own when gelu_bwd does not run.
            row_scale = (torch.empty(M, dtype=accumulation_dtype(x.dtype), device=x.device)
                         if scale is not None and M and (needs[3] or needs[4]) else None)
            launches = []
            if grad_pre.numel() and any(needs[:3]):
                launches.append(gelu_bwd_launch(gy2d, x2d, w1, fc1_bias, w2, grad_pre,
                                                _APPROXIMATE_TO_ACTIVATION[approximate], interpret=interpret,
                                                scale=scale, rows_per_sample=per_sample, row_scale=row_scale))
            elif row_scale is not None:
                launches.append(row_scale_launch(scale, per_sample, row_scale))
            # Everything else in one launch (and the sum of its weight gradients' slices): fc2's weight and
            # bias gradients (from grad_y as it came, the fp32 residual stream's under autocast, scaled
            # and rounded to x's dtype in registers), fc1's, and dX = grad_pre W1.
            launches += linear_grads_launches(
                [(gy2d, hidden, grad_w2 if needs[3] else None, grad_b2 if needs[4] else None),
                 (grad_pre, x2d, grad_w1 if needs[1] else None, grad_b1 if needs[2] else None)],
                (grad_pre, w1, grad_x.reshape(x2d.shape)) if needs[0] else None, interpret, row_scale)
        return launches
    raise ValueError(f"vit_fast::{op} is not an MLP op")


# ----------------------------------------------------------------------------- vit_fast::mlp


@torch.library.custom_op("vit_fast::mlp", mutates_args=())
def _mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
            approximate: str, residual: Tensor | None, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale)
    check_launchable("x", x)
    M = math.prod(x.shape[:-1])
    y = torch.empty((*x.shape[:-1], fc2_weight.shape[0]), dtype=residual.dtype if residual is not None else x.dtype,
                    device=x.device)
    hidden = x.new_empty((M, fc1_weight.shape[0]))  # (M, Hd)
    for launch in launch_plan("mlp", (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale),
                              (y, hidden), Target.of(x)):
        launch.run()
    return y, hidden


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale=None):
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, scale)
    M = math.prod(x.shape[:-1])
    y = torch.empty((*x.shape[:-1], fc2_weight.shape[0]), dtype=residual.dtype if residual is not None else x.dtype,
                    device=x.device)
    return y, x.new_empty((M, fc1_weight.shape[0]))


# ----------------------------------------------------------------------------- vit_fast::mlp_backward


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
    outputs = _backward_outputs(x, fc1_weight, fc2_weight, needs)
    for launch in launch_plan("mlp_backward", (grad_y, x, fc1_weight, fc1_bias, fc2_weight, hidden, approximate,
                                               needs, scale), outputs, Target.of(x)):
        launch.run()
    return outputs


def _backward_outputs(x, fc1_weight, fc2_weight, needs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias), an empty
    placeholder for each one not needed."""
    param = fc1_weight.dtype
    specs = ((x.shape, x.dtype), (fc1_weight.shape, param), ((fc1_weight.shape[0],), param),
             (fc2_weight.shape, param), ((fc2_weight.shape[0],), param))
    return tuple(torch.empty(shape if need else (0,), dtype=dtype if need else x.dtype, device=x.device)
                 for (shape, dtype), need in zip(specs, needs))


@_mlp_backward_op.register_fake
def _(grad_y, x, fc1_weight, fc1_bias, fc2_weight, hidden, approximate, needs, scale=None):
    _check_mlp_backward(grad_y, x, fc1_weight, fc1_bias, fc2_weight, hidden, approximate, needs, scale)
    return _backward_outputs(x, fc1_weight, fc2_weight, needs)


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
