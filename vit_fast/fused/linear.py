"""A plain linear with fp32 weights and 16-bit activations, as torch ops (namespace vit_fast).

The qkv and output projections and the head run it under autocast, because cuBLAS would need the
weights cast to 16 bits (and its weight gradients cast back), about four standalone cast kernels
per linear and step. It runs the MLP's Triton kernels (``kernels/mlp.py``) through the launch
builders that it shares with ``vit_fast.fused.mlp`` (``vit_fast.fused.matmul``).

Public API:

    linear(x, weight, bias=None) -> y           x 16-bit, weight/bias fp32, y in x's dtype
    LinearConfig, choose_config(rows, in_features, out_features, dtype, *, interpret=None)
                                                the tiles of its forward and backward launches
    aot_launches(M, K, N, dtype, weight_dtype=torch.float32, bias=True)   its Triton launches on a
        GPU, for vit_fast.aot's compile tests;
    launch_plan(op, args, outputs, target)   the launches of one call of a registered op (run by the
        op, counted by vit_fast.cost);
        aot_every_config() vit-cifar's projections and head (``python -m vit_fast.aot --op linear``)

Registered ops (namespace ``vit_fast``), each with a fake (meta) implementation:

    vit_fast::linear           (x, weight, bias?) -> y                                  + autograd
    vit_fast::linear_backward  (grad_y, x, weight, needs) -> (grad_x, grad_weight, grad_bias)

Forward: ``linear_fwd_kernel`` (no activation) converting the weight in registers; backward, one
``linear_bwd_kernel`` launch: dW and db (fp32 output) and dX, and, when the rows are split into
slices (``matmul.weight_grad_split_rows``), one ``weight_grad_reduce_kernel`` launch summing them. With weights in x's dtype (no
autocast) a linear stays ``F.linear``: cuBLAS with nothing to convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vit_fast.fused.launch import (
    VIT_CIFAR_TOKENS, Launch, Target, check_launchable, check_same_device, meta_tensor,
)
from vit_fast.fused.matmul import (
    InputGradOperands, MatmulConfig, WeightGradOperands, check_dtypes, check_linear_shapes, input_grad_config,
    linear_bwd_launch, linear_grads_launches, linear_launch, product_config, weight_grad_config,
)

if TYPE_CHECKING:
    from vit_fast.aot import KernelLaunch

__all__ = ["LinearConfig", "aot_every_config", "aot_launches", "choose_config", "launch_plan", "linear"]


# ----------------------------------------------------------------------------- launch config


@dataclass(frozen=True)
class LinearConfig:
    """The tiles of one forward + backward: ``linear_fwd_kernel``'s, and the weight-gradient and
    input-gradient tiles of the backward's one ``linear_bwd_kernel`` launch."""

    forward: MatmulConfig
    weight_grad: MatmulConfig
    input_grad: MatmulConfig


def choose_config(rows: int, in_features: int, out_features: int, dtype: torch.dtype, *,
                  interpret: bool | None = None) -> LinearConfig:
    """The tiles for x (rows, in_features) in ``dtype`` times a weight (out_features, in_features):
    ``vit_fast.fused.matmul``'s rules (``product_config``, ``weight_grad_config``,
    ``input_grad_config``), which the launch builders apply. ``interpret`` defaults to
    ``launch.interpreting()`` (then the fixed INTERPRETER_CONFIG)."""
    forward = product_config("linear", rows=rows, columns=out_features, dtype=dtype, interpret=interpret)
    weight_grad = weight_grad_config(rows=rows, weights=[(out_features, in_features)], dtype=dtype, interpret=interpret)
    return LinearConfig(forward, weight_grad,
                        input_grad_config(weight_grad=weight_grad, dtype=dtype, interpret=interpret))


# ----------------------------------------------------------------------------- input checks


def _check_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_same_device({"x": x, "weight": weight, "bias": bias})
    check_dtypes(x, {"weight": weight, "bias": bias}, {})
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    check_linear_shapes("", x.shape, weight, bias)


def _check_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor) -> None:
    _check_linear(x, weight, None)
    if tuple(grad_y.shape) != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"grad_y must have the output's shape {(*x.shape[:-1], weight.shape[0])}, "
                         f"got {tuple(grad_y.shape)}")


# ----------------------------------------------------------------------------- ahead-of-time compilation


def _aot_plans(M: int, K: int, N: int, dtype: torch.dtype,
               weight_dtype: torch.dtype = torch.float32, bias: bool = True) -> list[Launch]:
    """``linear``'s Triton ``Launch`` objects (forward; backward: dX, dW and db, and the reduction of
    the weight gradients' slices when the rows are split) on meta tensors."""
    t = partial(meta_tensor, dtype=dtype)
    x, w, grad_y = t(M, K), t(N, K, dtype=weight_dtype), t(M, N)
    grad_w_and_b = WeightGradOperands(grad_y, x, t(N, K, dtype=weight_dtype),
                                      t(N, dtype=weight_dtype) if bias else None)
    return [linear_launch(x, w, t(N, dtype=weight_dtype) if bias else None, None, t(M, N), "none", interpret=False),
            *linear_bwd_launch([grad_w_and_b], InputGradOperands(grad_y, w, t(M, K)), interpret=False)]


def aot_launches(M: int, K: int, N: int, dtype: torch.dtype,
                 weight_dtype: torch.dtype = torch.float32, bias: bool = True) -> list[KernelLaunch]:
    """The Triton kernels ``linear`` runs on a GPU for x (M, K) in ``dtype`` and a weight (N, K) in
    ``weight_dtype``: the forward and the backward's one launch (dX, dW and db)."""
    from vit_fast.aot import kernel_launches  # the compile tests' path only

    return kernel_launches(_aot_plans(M, K, N, dtype, weight_dtype, bias))


def aot_every_config(batch: int = 128, tokens: int = VIT_CIFAR_TOKENS, dim: int = 192,
                     classes: int = 100) -> list[KernelLaunch]:
    """The distinct launches of the fused model's autocast linears in training, for ``python -m
    vit_fast.aot --op linear``: vit-cifar's shapes by default (``batch`` images of ``tokens``
    tokens, width ``dim``, ``classes`` head outputs), under bf16 autocast (bf16 activations, fp32
    parameters): the qkv and output projections and the head (on the class tokens), the head also
    at vit-64's 200 classes (Tiny-ImageNet) and 1000 (ImageNet 64x64); vit-64's other shapes are
    vit-cifar's (65 tokens, width 192)."""
    M = batch * tokens
    launches = []
    heads = [(batch, c) for c in dict.fromkeys((classes, 200, 1000))]
    for rows, n in ((M, 3 * dim), (M, dim), *heads):  # qkv, proj, heads (class tokens)
        launches += aot_launches(rows, dim, n, torch.bfloat16)
    return list({launch.key: launch for launch in launches}.values())


def launch_plan(op: str, args: tuple, outputs: tuple, target: Target) -> list[Launch]:
    """The launches of one call of ``vit_fast::<op>`` (linear, linear_backward) with ``args`` (the
    op's arguments, in its schema's order) writing ``outputs`` (what the op returns), on
    ``target``. The real implementations run them; ``vit_fast.cost`` counts them."""
    if op == "linear":
        x, weight, bias = args
        (out,) = outputs
        x2d = x.reshape(-1, x.shape[-1])
        if not out.numel():  # an empty grid is not a valid launch
            return []
        return [linear_launch(x2d, weight, bias, None, out.reshape(x2d.shape[0], weight.shape[0]), "none",
                              interpret=target.interpret)]
    if op == "linear_backward":
        grad_y, x, weight, needs = args
        grad_x, grad_w, grad_b = outputs
        with torch.autocast(x.device.type, enabled=False):
            gy2d = grad_y.reshape(-1, weight.shape[0]).to(x.dtype)  # a no-op: y, hence grad_y, has x's dtype
            x2d = x.reshape(-1, x.shape[-1])
            return linear_grads_launches(
                [(gy2d, x2d, grad_w if needs[1] else None, grad_b if needs[2] else None)],
                (gy2d, weight, grad_x.reshape(x2d.shape)) if needs[0] else None, target.interpret)
    raise ValueError(f"vit_fast::{op} is not a linear op")


# ----------------------------------------------------------------------------- vit_fast::linear


@torch.library.custom_op("vit_fast::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + b in x's dtype, W and b converted in registers (fp32 master weights under autocast)."""
    _check_linear(x, weight, bias)
    check_launchable("x", x)
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for launch in launch_plan("linear", (x, weight, bias), (out,), Target.of(x)):
        launch.run()
    return out


@_linear_op.register_fake
def _(x, weight, bias):
    _check_linear(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("vit_fast::linear_backward", mutates_args=())
def _linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, needs: list[bool]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (x, weight, bias) of y = x W^T + b; ``needs`` (three bools) says which are wanted.
    grad_x in x's dtype, the weight's and bias's in the weight's dtype (fp32: reduced in fp32)."""
    _check_linear_backward(grad_y, x, weight)
    check_launchable("x", x)
    outputs = _backward_outputs(grad_y, x, weight, needs)
    for launch in launch_plan("linear_backward", (grad_y, x, weight, needs), outputs, Target.of(x)):
        launch.run()
    return outputs


def _backward_outputs(grad_y, x, weight, needs) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias), an empty placeholder for each one not needed."""
    specs = ((x.shape, x.dtype), (weight.shape, weight.dtype), ((weight.shape[0],), weight.dtype))
    return tuple(torch.empty(shape if need else (0,), dtype=dtype if need else x.dtype, device=x.device)
                 for (shape, dtype), need in zip(specs, needs))


@_linear_backward_op.register_fake
def _(grad_y, x, weight, needs):
    _check_linear_backward(grad_y, x, weight)
    return _backward_outputs(grad_y, x, weight, needs)


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


# ----------------------------------------------------------------------------- public API


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b (nn.Linear layout) with x 16-bit and W, b in x's dtype or fp32, converted in the
    kernel; y in x's dtype. Gradients: x's in its dtype, W's and b's in theirs, reduced in fp32."""
    _check_linear(x, weight, bias)
    return _linear_op(x, weight, bias)
