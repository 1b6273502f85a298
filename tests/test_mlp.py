"""The fused MLP (vit_fast.fused.mlp) against the reference math, forward and every gradient.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (conftest); on a CUDA machine the
same tests run the compiled kernels, bf16 included. The AOT test compiles every configuration the
launcher can pick at the ViT shapes for sm_80 and sm_90 and reads spills and shared memory.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from vit_fast import reference
from vit_fast.fused import linear as fused_linear
from vit_fast.fused import matmul
from vit_fast.fused import mlp as fused
from vit_fast.testing import (
    GPU_SIZED_REL,
    assert_compiled_matches_eager,
    assert_parity,
    check_forward_backward_relative,
    gpu_sized_cases,
    gpu_sized_id,
)

# bf16 runs in the interpreter too: the launchers widen 16-bit tl.dot operands to fp32 there
# (triton issue 11584 made the interpreter's bf16 tl.dot return garbage) and round bf16 stores to
# nearest even in software, so the parity rule holds on the CPU as on a GPU.
BF16 = torch.bfloat16
NAMES = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual")

# (leading dims of x, D_in, hidden, D_out): prime M, the awkward width 200, a single token, ratio
# 2 and 4, and an MLP whose output width differs from its input (no residual possible there).
SHAPES = [
    ((67,), 40, 160, 40),
    ((3, 5), 200, 400, 200),
    ((1, 1), 24, 96, 24),
    ((2, 13), 48, 96, 20),
]


def make_inputs(lead, d_in, hidden, d_out, with_residual=True) -> dict:
    """fp64 CPU master copies; weights initialised like nn.Linear (uniform in +-1/sqrt(fan_in))."""

    def uniform(*shape, fan_in):
        return (torch.rand(*shape, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)

    inputs = {
        "x": torch.randn(*lead, d_in, dtype=torch.float64),
        "fc1_weight": uniform(hidden, d_in, fan_in=d_in),
        "fc1_bias": uniform(hidden, fan_in=d_in),
        "fc2_weight": uniform(d_out, hidden, fan_in=hidden),
        "fc2_bias": uniform(d_out, fan_in=hidden),
        "residual": torch.randn(*lead, d_out, dtype=torch.float64) if with_residual else None,
    }
    inputs["grad_y"] = torch.randn(*lead, d_out, dtype=torch.float64)
    return inputs


def run_mlp(fn, inputs: dict, dtype, device, approximate: str, grad_y=None) -> dict:
    """Forward and backward of ``fn`` on copies of ``inputs`` cast to dtype; returns output and grads."""
    leaves = {
        name: inputs[name].to(device=device, dtype=dtype).requires_grad_()
        for name in NAMES
        if inputs[name] is not None
    }
    y = fn(*(leaves.get(name) for name in NAMES[:5]), approximate=approximate, residual=leaves.get("residual"))
    y.backward(inputs["grad_y"].to(device=device, dtype=dtype) if grad_y is None else grad_y)
    return {"y": y.detach(), **{f"grad_{name}": t.grad for name, t in leaves.items()}}


# ----------------------------------------------------------------------------- parity


# Every shape without a residual, and with one where D_out == D_in allows it.
RESIDUAL_CASES = [(shape, False) for shape in SHAPES] + [(s, True) for s in SHAPES if s[1] == s[3]]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape, with_residual", RESIDUAL_CASES, ids=lambda v: str(v) if isinstance(v, tuple) else f"residual={v}")
def test_mlp_fp32_matches_reference(device, shape, approximate, with_residual):
    inputs = make_inputs(*shape, with_residual=with_residual)
    out = run_mlp(fused.mlp, inputs, torch.float32, device, approximate)
    ref = run_mlp(reference.mlp, inputs, torch.float32, device, approximate)
    assert out.keys() == ref.keys()
    for name in ref:
        # Default fp32 tolerances (rtol 1.3e-6, atol 1e-5): only summation order may differ.
        torch.testing.assert_close(out[name], ref[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mlp_low_precision_parity(device, shape, approximate, dtype):
    lead, d_in, hidden, d_out = shape
    inputs = make_inputs(*shape, with_residual=d_in == d_out)
    out = run_mlp(fused.mlp, inputs, dtype, device, approximate)
    out_pt = run_mlp(reference.mlp, inputs, dtype, device, approximate)
    out_ref = run_mlp(reference.mlp, inputs, torch.float64, device, approximate)
    for name in out_ref:
        assert out[name].dtype == dtype, f"{name} has dtype {out[name].dtype}, expected {dtype}"
        assert_parity(out[name], out_pt[name], out_ref[name], name=name)


def test_mlp_cifar_shape_fp16(device):
    """One ViT-Tiny-sized block at CIFAR shapes: 2 images x 65 tokens, D = 192, hidden = 768."""
    inputs = make_inputs((2, 65), 192, 768, 192)
    out = run_mlp(fused.mlp, inputs, torch.float16, device, "none")
    out_pt = run_mlp(reference.mlp, inputs, torch.float16, device, "none")
    out_ref = run_mlp(reference.mlp, inputs, torch.float64, device, "none")
    for name in out_ref:
        assert_parity(out[name], out_pt[name], out_ref[name], name=name)


def _keep_scale(batch, dtype, p=0.3):
    """DropPath's draw (model.DropPath.keep_scale): B values 0 or 1/keep; sample 0 dropped and the
    last kept (a batch of 1 is kept)."""
    keep = 1.0 - p
    scale = torch.empty(batch, dtype=dtype).bernoulli_(keep).div_(keep)
    scale[0], scale[-1] = 0.0, 1.0 / keep
    return scale


def run_mixed(fn, inputs: dict, dtype, device, approximate: str, scale, params_fp32: bool, residual_fp32: bool):
    """As run_mlp, with autocast's dtypes: x in ``dtype``, the parameters in fp32 (params_fp32) and
    the residual stream in fp32 (residual_fp32), stochastic depth's ``scale`` (B,) or None."""
    leaves = {}
    for name in NAMES:
        if inputs[name] is None:
            continue
        wide = (params_fp32 and name.startswith("fc")) or (residual_fp32 and name == "residual")
        leaves[name] = inputs[name].to(device=device, dtype=torch.float32 if wide else dtype).requires_grad_()
    scale = scale.to(device) if scale is not None else None
    y = fn(*(leaves.get(name) for name in NAMES[:5]), approximate=approximate, residual=leaves.get("residual"),
           scale=scale)
    y.backward(inputs["grad_y"].to(device=device, dtype=y.dtype))
    return {"y": y.detach(), **{f"grad_{name}": t.grad for name, t in leaves.items()}}


def reference_scaled_mlp(x, w1, b1, w2, b2, approximate="none", residual=None, scale=None):
    """The reference MLP with DropPath's scale on the branch, as the torch backend computes it."""
    y = reference.mlp(x, w1, b1, w2, b2, approximate)
    if scale is not None:
        y = y * scale.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
    return y + residual if residual is not None else y


# (leading dims, D_in, hidden, D_out): 65 tokens and batch 1 or 3, the awkward 200, a prime batch,
# vit-cifar's width 192.
MIXED_SHAPES = [((3, 65), 48, 96, 48), ((1, 65), 200, 400, 200), ((5, 7), 40, 160, 40), ((2, 65), 192, 384, 192)]


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("shape", MIXED_SHAPES, ids=str)
@pytest.mark.parametrize("drop", [False, True], ids=["no_drop", "drop_path"])
def test_mlp_mixed_precision_parity(device, shape, dtype, drop):
    """Autocast's contract: 16-bit x, fp32 parameters, the fp32 residual stream, optionally
    stochastic depth's scale. y is fp32 (the stream), x's gradient 16-bit, every parameter's and
    the residual's fp32; by the parity rule against the same math all in ``dtype`` and in fp64."""
    inputs = make_inputs(*shape)
    scale = _keep_scale(shape[0][0], dtype) if drop else None
    out = run_mixed(fused.mlp, inputs, dtype, device, "none", scale, params_fp32=True, residual_fp32=True)
    assert out["y"].dtype == torch.float32 and out["grad_x"].dtype == dtype
    assert all(out[f"grad_{n}"].dtype == torch.float32 for n in NAMES[1:])
    out_pt = run_mixed(reference_scaled_mlp, inputs, dtype, device, "none", scale, False, False)
    out_ref = run_mixed(reference_scaled_mlp, inputs, torch.float64, device, "none", scale, False, False)
    for name in out_ref:
        assert_parity(out[name].double(), out_pt[name], out_ref[name], name=name)
    if drop and shape[0][0] > 1:  # the dropped sample 0: y is its residual exactly, x gets no gradient
        torch.testing.assert_close(out["y"][0], inputs["residual"][0].float().to(device), rtol=0, atol=0)
        assert not out["grad_x"][0].any()


def test_mlp_scale_fp32_matches_reference(device):
    """fp32 throughout with stochastic depth: default fp32 tolerances against the reference."""
    inputs = make_inputs((4, 9), 40, 80, 40)
    scale = _keep_scale(4, torch.float32)
    out = run_mixed(fused.mlp, inputs, torch.float32, device, "tanh", scale, False, False)
    ref = run_mixed(reference_scaled_mlp, inputs, torch.float32, device, "tanh", scale, False, False)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("missing", ["fc1_bias", "fc2_bias", "both"])
def test_mlp_without_biases(device, missing):
    """nn.Linear(bias=False) layers: the op runs, forward and backward, with either bias None."""
    inputs = make_inputs((3, 5), 24, 48, 24)
    for name in ("fc1_bias", "fc2_bias"):
        if missing in (name, "both"):
            inputs[name] = None
    out = run_mlp(fused.mlp, inputs, torch.float32, device, "none")
    ref = run_mlp(reference.mlp, inputs, torch.float32, device, "none")
    assert out.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
# ((5,), 192, 200): vit-64's head on the class tokens (192 wide, Tiny-ImageNet's 200 classes).
@pytest.mark.parametrize("shape", [((3, 65), 48, 144), ((1, 1), 200, 100), ((7,), 40, 13), ((5,), 192, 200)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_mixed_precision_parity(device, shape, dtype, bias):
    """The projections under autocast: 16-bit x, fp32 weight and bias converted in the kernel; y and
    x's gradient 16-bit, the weight's and bias's fp32. Parity rule against the reference linear in
    ``dtype`` (out_pt) and in fp64 (out_ref)."""
    lead, d_in, d_out = shape
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    w = (torch.rand(d_out, d_in, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)
    b = torch.randn(d_out, dtype=torch.float64) if bias else None
    grad_y = torch.randn(*lead, d_out, dtype=torch.float64)

    def run(fn, x_dtype, w_dtype):
        leaves = [t.to(device=device, dtype=dt).requires_grad_() if t is not None else None
                  for t, dt in ((x, x_dtype), (w, w_dtype), (b, w_dtype))]
        y = fn(*leaves)
        y.backward(grad_y.to(device=device, dtype=y.dtype))
        return [y.detach()] + [t.grad for t in leaves if t is not None]

    out = run(fused_linear.linear, dtype, torch.float32)
    assert [t.dtype for t in out] == [dtype, dtype] + [torch.float32] * (1 + bias)
    out_pt = run(reference.linear, dtype, dtype)
    out_ref = run(reference.linear, torch.float64, torch.float64)
    for name, o, p, r in zip(["y", "grad_x", "grad_weight", "grad_bias"], out, out_pt, out_ref):
        assert_parity(o.double(), p, r, name=name)


def test_linear_opcheck_and_fake_checks(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 5, 16, device=device).bfloat16().requires_grad_()
    w = torch.randn(8, 16, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vit_fast.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.vit_fast.linear.default, (x, w, None))
    gy = torch.randn(3, 5, 8, device=device).bfloat16()
    torch.library.opcheck(torch.ops.vit_fast.linear_backward.default, (gy, x.detach(), w.detach(), [True, True, False]))
    with FakeTensorMode():
        with pytest.raises(ValueError, match="expects inputs of width 16, got width 15"):
            torch.ops.vit_fast.linear(torch.empty(2, 15, dtype=torch.bfloat16), torch.empty(8, 16), None)
        with pytest.raises(TypeError, match="bias has dtype torch.float16 but x has torch.bfloat16"):
            torch.ops.vit_fast.linear(torch.empty(2, 16, dtype=torch.bfloat16), torch.empty(8, 16),
                                      torch.empty(8, dtype=torch.float16))
        with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(2, 8\)"):
            torch.ops.vit_fast.linear_backward(torch.empty(2, 7, dtype=torch.bfloat16),
                                               torch.empty(2, 16, dtype=torch.bfloat16), torch.empty(8, 16), [True] * 3)


@pytest.mark.parametrize("layout", ["sum_stride0", "transposed", "strided_slice"])
def test_mlp_noncontiguous_incoming_grad(device, layout):
    shape = ((2, 7), 40, 80, 40)
    inputs = make_inputs(*shape)
    lead, d_out = shape[0], shape[3]
    if layout == "transposed":
        grad_y = torch.randn(d_out, *lead, device=device).movedim(0, -1)
    elif layout == "strided_slice":
        grad_y = torch.randn(*lead, 2 * d_out, device=device)[..., ::2]
    else:  # what y.sum().backward() hands in: one value expanded with stride 0
        grad_y = torch.ones((), device=device).expand(*lead, d_out)
    assert not grad_y.is_contiguous()
    out = run_mlp(fused.mlp, inputs, torch.float32, device, "none", grad_y=grad_y)
    ref = run_mlp(reference.mlp, inputs, torch.float32, device, "none", grad_y=grad_y)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_gradcheck_fp64(device, approximate):
    inputs = make_inputs((2, 3), 4, 8, 4)  # 124 scalar inputs, each perturbed twice
    args = [inputs[name].to(device).requires_grad_() for name in NAMES]

    def fn(x, w1, b1, w2, b2, r):
        return fused.mlp(x, w1, b1, w2, b2, approximate=approximate, residual=r)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_mlp_is_deterministic(device):
    inputs = make_inputs((67,), 40, 160, 40)
    first = run_mlp(fused.mlp, inputs, torch.float16, device, "none")
    second = run_mlp(fused.mlp, inputs, torch.float16, device, "none")
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


# ----------------------------------------------------------------------------- linear_bwd_kernel

# Tiles of 16 (the dot's minimum) so that the awkward shapes below span several of each: M = 37 is
# two full row steps and a partial one, N = 24 and K = 20 a full and a partial tile. SPLIT_TILES
# also splits the rows into slices of one step: 16, 16 and a partial 5 (each program a slice,
# their partials summed by weight_grad_reduce_kernel).
SMALL_TILES = matmul.MatmulConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)
SPLIT_TILES = dataclasses.replace(SMALL_TILES, split_rows=16)
# (M, N, K) of the first layer and (N2, K2) of the second one of a grouped launch.
WGRAD_SHAPE, WGRAD_SECOND = (37, 24, 20), (30, 11)
# (operand dtype of X, incoming gradient's dtype, parameter dtype): fp32 throughout; bf16 with
# bf16 parameters; autocast's bf16 activations with an fp32 gradient and fp32 parameters.
WGRAD_DTYPES = [(torch.float32, torch.float32, torch.float32), (BF16, BF16, BF16),
                (BF16, torch.float32, torch.float32)]


def _weight_grad_inputs(device, M, layers, x_dtype, dy_dtype, param_dtype, bias, scale_samples=0):
    """Inputs and NaN-filled outputs (every element must be written) of a linear_bwd launch: one
    WeightGradOperands per (N, K) in ``layers``, and a per-row scale (M,) of ``scale_samples``
    samples' draws (0: none), each repeated over M // scale_samples rows."""
    operands = []
    for n, k in layers:
        operands.append(matmul.WeightGradOperands(
            torch.randn(M, n, device=device, dtype=dy_dtype), torch.randn(M, k, device=device, dtype=x_dtype),
            torch.full((n, k), float("nan"), device=device, dtype=param_dtype),
            torch.full((n,), float("nan"), device=device, dtype=param_dtype) if bias else None))
    scale = (_keep_scale(scale_samples, torch.float32).repeat_interleave(M // scale_samples).to(device)
             if scale_samples else None)
    return operands, scale


def _input_grad_operands(device, M, N, K, x_dtype, param_dtype):
    return matmul.InputGradOperands(torch.randn(M, N, device=device, dtype=x_dtype),
                                   torch.randn(N, K, device=device, dtype=param_dtype),
                                   torch.full((M, K), float("nan"), device=device, dtype=x_dtype))


def _check(out, ref, low, label):
    """fp32 outputs against the fp64 reference of the kernel's own (rounded) operands at fp32's
    tight default tolerance (only the summation order differs); 16-bit outputs by the parity rule,
    against the same product computed by torch in that dtype (``low``)."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1.3e-6, atol=1e-5, msg=lambda m: f"{label}: {m}")
    else:
        assert_parity(out.double(), low().to(out.dtype), ref, name=label)


def _check_weight_grads(op, row_scale, name):
    """dW and db of one layer: the dot multiplies scale * dY (formed in fp32, as the kernel does;
    ``row_scale`` (M,) per row) rounded to X's dtype, what the tensor cores take; the bias sums
    scale * dY before that rounding."""
    dy = op.grad_y2d.float()
    if row_scale is not None:
        dy = dy * row_scale.float()[:, None]
    dy_low = dy.to(op.x2d.dtype)
    _check(op.grad_w, dy_low.double().t() @ op.x2d.double(), lambda: dy_low.t() @ op.x2d, f"{name} grad_w")
    if op.grad_b is not None:
        _check(op.grad_b, dy.double().sum(0), lambda: dy_low.sum(0), f"{name} grad_b")


def _check_input_grad(op, name):
    """dX = dY W with the weight rounded to dX's dtype in registers."""
    w_low = op.weight.to(op.grad_x.dtype)
    _check(op.grad_x, op.grad_y2d.double() @ w_low.double(), lambda: op.grad_y2d @ w_low, f"{name} grad_x")


# What one launch computes: "weights" one layer's dW (and db); "linear" the same and its dX, as
# linear_backward launches it; "mlp" two layers' (the first one's dY scaled per sample) and the
# second one's dX, as mlp_backward launches it; "input_grad" dX alone.
LAUNCH_LAYOUTS = ["weights", "linear", "mlp", "input_grad"]


def _run(launches) -> None:
    for launch in launches:
        launch.run()


@pytest.mark.parametrize("dtypes", WGRAD_DTYPES, ids=["fp32", "bf16", "bf16_x_fp32_params"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", LAUNCH_LAYOUTS)
@pytest.mark.parametrize("config", [SMALL_TILES, SPLIT_TILES], ids=["one_slice", "three_slices"])
def test_linear_bwd_kernel_on_awkward_shapes(device, dtypes, bias, layout, config):
    """dW = dY^T X, db = column sums of dY and dX = dY W, for shapes that are no multiple of the
    tiles, with and without biases, each product by its own programs of one grid; the weight
    gradients over all rows at once, or over three slices of rows (the last one partial) whose
    partials a second launch sums."""
    x_dtype, dy_dtype, param_dtype = dtypes
    M, N, K = WGRAD_SHAPE
    layers = {"weights": [(N, K)], "linear": [(N, K)], "mlp": [(N, K), WGRAD_SECOND], "input_grad": []}[layout]
    operands, scale = _weight_grad_inputs(device, M, layers, x_dtype, dy_dtype, param_dtype, bias,
                                          scale_samples=M if layout == "mlp" else 0)
    dx_shape = (N, K) if layout != "mlp" else WGRAD_SECOND
    input_grad = _input_grad_operands(device, M, *dx_shape, x_dtype, param_dtype) if layout != "weights" else None
    launches = matmul.linear_bwd_launch(operands, input_grad, row_scale=scale, config=config)
    slices = 3 if config.split_rows and layers else 1
    dx_tiles = math.ceil(M / 16) * math.ceil(dx_shape[1] / 16) if input_grad is not None else 0
    assert launches[0].grid == (sum(math.ceil(n / 16) * math.ceil(k / 16) for n, k in layers) * slices + dx_tiles,)
    assert [launch.kernel.__name__ for launch in launches][1:] == ["weight_grad_reduce_kernel"] * (slices > 1)
    _run(launches)
    for i, op in enumerate(operands):
        _check_weight_grads(op, scale if i == 0 else None, name=f"layer {i}")
    if input_grad is not None:
        _check_input_grad(input_grad, name=layout)


def test_linear_bwd_kernel_with_the_launchers_config(device):
    """The launcher's own configuration (the interpreter's fixed one on a CPU) over several row
    steps and a partial one, with stochastic depth's scale over samples of 65 rows and a stride-0
    incoming gradient (what y.sum().backward() hands in)."""
    M, N, K = 3 * 65, 40, 72
    operands, _ = _weight_grad_inputs(device, M, [(N, K)], BF16, torch.float32, torch.float32, bias=True)
    op = dataclasses.replace(operands[0], grad_y2d=torch.full((), 0.75, device=device).expand(M, N))
    scale = _keep_scale(3, torch.float32).repeat_interleave(65).to(device)
    input_grad = _input_grad_operands(device, M, N, K, BF16, torch.float32)
    _run(matmul.linear_bwd_launch([op], input_grad, row_scale=scale))
    _check_weight_grads(op, scale, name="stride-0 dY")
    _check_input_grad(input_grad, name="launcher's config")


def test_linear_bwd_kernel_without_inputs_still_sums_the_bias(device):
    """K = 0 (a layer without inputs): no dW tiles, but one column of programs stores db."""
    operands, _ = _weight_grad_inputs(device, 37, [(24, 0)], torch.float32, torch.float32, torch.float32, bias=True)
    _run(matmul.linear_bwd_launch(operands, config=SPLIT_TILES))
    _check_weight_grads(operands[0], None, name="K = 0")


def test_weight_grad_check_catches_a_dropped_bias_tile(device, tmp_path, monkeypatch):
    """Mutation test: a copy of the kernel whose bias sum skips the last row step of each slice (the
    last slice's is the partial one, where masking bugs live) must fail the check that the real
    kernel passes, while its dW, still complete, passes."""
    import importlib
    import inspect

    from vit_fast.kernels import mlp as kernels

    source = inspect.getsource(kernels)
    accumulate = "            bias_acc += dy.to(ACC_DTYPE)"
    assert source.count(accumulate) == 1, "the mutation's anchor moved: update this test with the kernel"
    mutated = source.replace(accumulate, "            if m_start + BLOCK_M < m_end:\n    " + accumulate)
    (tmp_path / "mutated_mlp_kernels.py").write_text(mutated)
    monkeypatch.syspath_prepend(str(tmp_path))
    mutant = importlib.import_module("mutated_mlp_kernels").linear_bwd_kernel

    M, N, K = WGRAD_SHAPE
    operands, _ = _weight_grad_inputs(device, M, [(N, K)], torch.float32, torch.float32, torch.float32, bias=True)
    launches = matmul.linear_bwd_launch(operands, config=SPLIT_TILES)
    _run(launches)
    _check_weight_grads(operands[0], None, name="real kernel")
    launches[0].kernel = mutant
    _run(launches)
    _check_weight_grads(dataclasses.replace(operands[0], grad_b=None), None, name="mutant's dW")
    with pytest.raises(AssertionError, match="grad_b"):
        _check_weight_grads(operands[0], None, name="mutant")


def test_split_weight_grads_match_fp64_tightly(device):
    """fp64 throughout, three slices of rows (the last one partial) summed in slice order: dW and
    db equal the fp64 product to fp64's default tolerance (only the summation order differs)."""
    M, N, K = WGRAD_SHAPE
    operands, scale = _weight_grad_inputs(device, M, [(N, K), WGRAD_SECOND], torch.float64, torch.float64,
                                          torch.float64, bias=True, scale_samples=M)
    launches = matmul.linear_bwd_launch(operands, row_scale=scale.double(), config=SPLIT_TILES)
    assert launches[0].args["slices"] == 3 and M % launches[0].args["rows_per_slice"]  # a partial last slice
    _run(launches)
    for i, op in enumerate(operands):
        dy = op.grad_y2d * (scale.double()[:, None] if i == 0 else 1.0)
        torch.testing.assert_close(op.grad_w, dy.t() @ op.x2d, msg=lambda m: f"layer {i} grad_w: {m}")
        torch.testing.assert_close(op.grad_b, dy.sum(0), msg=lambda m: f"layer {i} grad_b: {m}")


def test_split_weight_grads_are_deterministic(device):
    """Two runs of a split launch (the launcher's own config, several slices) are bit-identical:
    fixed slices, a fixed order of their sum, no atomics."""
    M, N, K = 3 * 65, 40, 72
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        operands, scale = _weight_grad_inputs(device, M, [(N, K), (24, 40)], BF16, torch.float32, torch.float32,
                                              bias=True, scale_samples=3)
        launches = matmul.linear_bwd_launch(operands, row_scale=scale)
        assert launches[0].args["slices"] >= 2
        _run(launches)
        results.append([t for op in operands for t in (op.grad_w, op.grad_b)])
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_mlp_backward_of_fc2_alone_expands_the_scale_itself(device):
    """Drop-path's scale with only fc2's gradients wanted: no gelu_bwd launch stores the per-row
    scale, so row_scale_kernel does; dW2 and db2 match the fp64 reference of the kernel's math."""
    from vit_fast.fused.launch import Target

    inputs = {k: v.to(device=device, dtype=torch.float32) if v is not None else None
              for k, v in make_inputs((3, 65), 24, 48, 24).items()}
    x, w1, b1, w2, b2, r = (inputs[name] for name in NAMES)
    scale = _keep_scale(3, torch.float32).to(device)
    _, hidden = torch.ops.vit_fast.mlp(x, w1, b1, w2, b2, "none", r, scale)
    needs = [False, False, False, True, True]
    args = (inputs["grad_y"], x, w1, b1, w2, hidden, "none", needs, scale)
    grads = torch.ops.vit_fast.mlp_backward(*args)
    plan = fused.launch_plan("mlp_backward", args, grads, Target.of(x))
    assert [launch.kernel.__name__ for launch in plan][:2] == ["row_scale_kernel", "linear_bwd_kernel"]
    dy = inputs["grad_y"].reshape(-1, 24).double() * scale.double().repeat_interleave(65)[:, None]
    _check(grads[3], dy.t() @ hidden.double(), None, "grad_fc2_weight")
    _check(grads[4], dy.sum(0), None, "grad_fc2_bias")


def test_vit_cifar_weight_grads_fill_an_h100():
    """The planned backward launches of vit-cifar's step (batch 128: 8,320 rows, bf16 autocast,
    drop-path): the MLP's, qkv's and the output projection's weight gradients run at least one
    wave of an H100's 132 SMs of programs, each at most 32 row steps long, their rows split into
    several slices whose fp32 partials stay within half the bytes of the dY and X they reduce."""
    M, d = 128 * 65, 192
    plans = {"mlp": fused._plans(M, d, 4 * d, d, BF16, "none", True, torch.float32, torch.float32, True, True),
             "qkv": fused_linear._aot_plans(M, d, 3 * d, BF16), "proj": fused_linear._aot_plans(M, d, d, BF16)}
    for name, launches in plans.items():
        (launch,) = [launch for launch in launches if launch.kernel.__name__ == "linear_bwd_kernel"]
        a, c = launch.args, launch.constexprs
        tiles = sum(math.ceil(a[n] / c["BLOCK_N"]) * math.ceil(a[k] / c["BLOCK_K"])
                    for n, k in (("N", "K"), ("N2", "K2"))[:c["LAYERS"]])
        dx_tiles = math.ceil(M / c["DX_BLOCK_M"]) * math.ceil(a["KX"] / c["DX_BLOCK_N"])
        assert launch.grid[0] - dx_tiles == tiles * a["slices"] >= 132, name
        assert a["slices"] >= 2 and math.ceil(a["rows_per_slice"] / c["BLOCK_M"]) <= 32, name
        layers = [(a["DY"], a["X"]), (a["DY2"], a["X2"])][:c["LAYERS"]]
        operand_bytes = sum(t.numel() * t.element_size() for pair in layers for t in pair)
        assert a["Partial"].numel() * a["Partial"].element_size() <= operand_bytes / 2, name
        assert [launch.kernel.__name__ for launch in launches].count("weight_grad_reduce_kernel") == 1, name


def test_backward_launch_counts_under_autocast():
    """What the cost account sees of one backward at vit-cifar's shapes under autocast (bf16
    activations, fp32 parameters, the fp32 residual stream's gradient, drop-path's scale):
    mlp_backward = gelu_bwd + one launch of both layers' dW/db and dX, linear_backward = one launch
    of dX, dW and db, and no standalone cast: at 520 rows the weight gradients' partials would
    outweigh half their operands' bytes, so the rows are not split and no reduction launch follows."""
    from vit_fast import cost

    B, N, d, hidden = 8, 65, 192, 768
    t = torch.empty
    x, hid = t(B, N, d, dtype=BF16), t(B * N, hidden, dtype=BF16)
    w1, b1, w2 = t(hidden, d), t(hidden), t(d, hidden)
    mlp_bwd = cost.custom_op_kernels(torch.ops.vit_fast.mlp_backward.default,
                                     (t(B, N, d), x, w1, b1, w2, hid, "none", [True] * 5, t(B)), {})
    lin_bwd = cost.custom_op_kernels(torch.ops.vit_fast.linear_backward.default,
                                     (t(B, N, 3 * d, dtype=BF16), x, t(3 * d, d), [True] * 3), {})
    assert (len(mlp_bwd), len(lin_bwd)) == (2, 1)
    assert not any(k.cast for k in mlp_bwd + lin_bwd)


# ----------------------------------------------------------------------------- registration, compile


def test_opcheck_every_op(device):
    inputs = {k: v.to(device=device, dtype=torch.float32) if v is not None else None
              for k, v in make_inputs((3, 7), 40, 80, 40).items()}
    x, w1, b1, w2, b2, r = (inputs[name] for name in NAMES)
    grad_args = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, r)]
    xg, w1g, b1g, w2g, b2g, rg = grad_args
    cases = [
        (torch.ops.vit_fast.mlp.default, (xg, w1g, b1g, w2g, b2g, "none", rg)),
        (torch.ops.vit_fast.mlp.default, (x, w1, b1, w2, b2, "tanh", None)),
        (torch.ops.vit_fast.mlp_backward.default,
         (inputs["grad_y"], x, w1, b1, w2, torch.randn(21, 80, device=device), "none", [True] * 5)),
        (torch.ops.vit_fast.mlp_backward.default,
         (inputs["grad_y"], x, w1, b1, w2, torch.randn(21, 80, device=device), "tanh", [False, True, True, False, True])),
    ]
    # Autocast's variant: bf16 x, fp32 parameters and residual, a scale; fp32 grad_y.
    scale = _keep_scale(3, torch.bfloat16).to(device)
    xb = x.bfloat16()
    hidden = torch.ops.vit_fast.mlp(xb, w1, b1, w2, b2, "none", r, scale)[1]
    cases += [
        (torch.ops.vit_fast.mlp.default, (xb.clone().requires_grad_(), w1g, None, w2g, b2g, "none", rg, scale)),
        (torch.ops.vit_fast.mlp_backward.default,
         (inputs["grad_y"], xb, w1, b1, w2, hidden, "none", [True] * 5, scale)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


class FusedMlpBlock(nn.Module):
    """x + MLP(x) with the fused op: a stand-in for the ViT block's second half."""

    def __init__(self, dim: int, hidden: int, approximate: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x):
        return fused.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                         approximate=self.approximate, residual=x)


def test_torch_compile_fullgraph_matches_eager(device):
    block = FusedMlpBlock(40, 80, "tanh").to(device)
    assert_compiled_matches_eager(block, torch.randn(3, 11, 40, device=device), rtol=1.3e-6, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def _mlp_args(device, **override):
    inputs = {k: v.to(device=device, dtype=torch.float32) if v is not None else None
              for k, v in make_inputs((4,), 16, 32, 16).items()}
    args = {name: inputs[name] for name in NAMES}
    args["approximate"] = "none"
    args.update(override)
    return args


# (override of one argument, as a function of the device; exception; message pattern)
BAD_INPUTS = {
    "approximate": (lambda d: {"approximate": "erf"}, ValueError, "approximate must be 'none'.*got 'erf'"),
    "x_width": (lambda d: {"x": torch.randn(4, 17, device=d)}, ValueError, "expects inputs of width 16, got width 17"),
    "fc1_bias": (lambda d: {"fc1_bias": torch.randn(31, device=d)}, ValueError,
                 r"fc1_bias must have shape \(32,\), got \(31,\)"),
    "fc2_weight": (lambda d: {"fc2_weight": torch.randn(16, 33, device=d)}, ValueError,
                   "fc2_weight.*expects inputs of width 33, got width 32"),
    "weight_dims": (lambda d: {"fc1_weight": torch.randn(32, 16, 1, device=d)}, ValueError, "fc1_weight must be 2-D"),
    "residual": (lambda d: {"residual": torch.randn(4, 15, device=d)}, ValueError,
                 r"residual must have the output's shape \(4, 16\)"),
    "dtype": (lambda d: {"fc2_bias": torch.randn(16, device=d, dtype=torch.float64)}, TypeError,
              "fc2_bias has dtype torch.float64 but x has torch.float32"),
    "int_dtype": (lambda d: {"x": torch.randint(0, 3, (4, 16), device=d)}, TypeError, "x has dtype torch.int64; supported"),
    "device": (lambda d: {"fc1_weight": torch.randn(32, 16, device="meta")}, ValueError, "fc1_weight is on meta"),
    "param_dtypes": (lambda d: {"x": torch.randn(4, 16, device=d, dtype=torch.bfloat16),
                                "fc2_weight": torch.randn(16, 32, device=d, dtype=torch.bfloat16)}, TypeError,
                     "fc2_weight has dtype torch.bfloat16 but fc1_weight has torch.float32; the parameters must "
                     "share one dtype"),
    "residual_dtype": (lambda d: {"x": torch.randn(4, 16, device=d, dtype=torch.bfloat16),
                                  "residual": torch.randn(4, 16, device=d, dtype=torch.float16)}, TypeError,
                       "residual has dtype torch.float16 but x has torch.bfloat16; expected torch.bfloat16 or "
                       "torch.float32"),
    "scale_shape": (lambda d: {"scale": torch.ones(3, device=d)}, ValueError, r"scale must have shape \(B,\) = \(4,\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_mlp_rejects_bad_inputs(device, case):
    override, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        fused.mlp(**_mlp_args(device, **override(device)))


def test_fake_implementations_check_like_the_real_ones():
    """The fake (meta) kernels raise the real ones' errors (torch.compile and the cost account run
    only them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.vit_fast
    with FakeTensorMode():
        x, w1, b1, w2, b2 = torch.empty(4, 16), torch.empty(32, 16), torch.empty(32), torch.empty(16, 32), torch.empty(16)
        with pytest.raises(ValueError, match="expects inputs of width 16, got width 17"):
            ops.mlp(torch.empty(4, 17), w1, b1, w2, b2, "none", None)
        with pytest.raises(TypeError, match="fc2_bias has dtype torch.float64"):
            ops.mlp(x, w1, b1, w2, b2.double(), "none", None)
        with pytest.raises(ValueError, match="approximate must be 'none'"):
            ops.mlp(x, w1, b1, w2, b2, "erf", None)
        with pytest.raises(ValueError, match=r"scale must have shape \(B,\)"):
            ops.mlp(x, w1, b1, w2, b2, "none", None, torch.empty(7))
        with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(4, 16\)"):
            ops.mlp_backward(torch.empty(4, 15), x, w1, b1, w2, torch.empty(4, 32), "none", [True] * 5)
        with pytest.raises(ValueError, match=r"hidden must have shape \(4, 32\)"):
            ops.mlp_backward(torch.empty(4, 16), x, w1, b1, w2, torch.empty(4, 31), "none", [True] * 5)
    with pytest.raises(ValueError, match="fc1_weight is on meta"):  # meta vs CPU, no fake mode
        ops.mlp(torch.empty(4, 16), torch.empty(32, 16, device="meta"), None, torch.empty(16, 32), None, "none", None)


# ----------------------------------------------------------------------------- ahead-of-time compile

AOT_WIDTHS = (192, 384, 768)
AOT_RATIOS = (2, 4)
# CIFAR training batches of 128 and 512 images x 65 tokens, plus a small batch of 8 (520 rows,
# not a multiple of 16) that reaches the launcher's small-grid configurations.
AOT_ROWS = (128 * 65, 512 * 65, 8 * 65)


def vit_launches(dtype, widths=AOT_WIDTHS, ratios=AOT_RATIOS, rows=AOT_ROWS) -> list:
    """Every kernel launch the MLP makes at the ViT shapes, built by the launcher
    itself on meta tensors (``fused.aot_launches``), so the test compiles exactly what would run."""
    launches = []
    for d in widths:
        for hidden in (d * r for r in ratios):
            for m in rows:
                for approximate in ("none", "tanh"):
                    for residual in (False, True):
                        launches += fused.aot_launches(m, d, hidden, d, dtype, approximate, residual)
                    if dtype != torch.float32:  # autocast: fp32 parameters and residual stream, drop-path
                        for scale in (False, True):
                            launches += fused.aot_launches(m, d, hidden, d, dtype, approximate, True,
                                                           weight_dtype=torch.float32,
                                                           residual_dtype=torch.float32, scale=scale)
    return launches


def _config(launch) -> tuple:
    c = launch.constexprs
    return (launch.kernel, c.get("BLOCK_M"), c.get("BLOCK_N"), c.get("BLOCK_K"), c.get("GROUP_M"), launch.num_warps,
            launch.num_stages)


def _without_linear_bwd(launches) -> list:
    """The forward and gelu_bwd launches only: linear_bwd_kernel's configurations are compiled by
    test_linear_bwd_configs_compile_without_spills at the shapes that pick each one (its variants
    at every shape here, 38 of them, would add minutes for no new configuration)."""
    return [launch for launch in launches if launch.kernel != "linear_bwd_kernel"]


def test_vit_shapes_reach_every_16bit_config():
    """The AOT shapes reach both branches of choose_config for both kernels: nothing it returns
    for 16-bit inputs is left uncompiled."""
    for dtype in (torch.float16, torch.bfloat16):
        configs = {_config(launch) for launch in vit_launches(dtype)}
        assert len({c for c in configs if c[0] == "linear_fwd_kernel"}) == 2, configs
        assert len({c for c in configs if c[0] == "gelu_bwd_kernel"}) == 2, configs
        assert len({c for c in configs if c[0] == "linear_bwd_kernel"}) == 1, configs  # one 16-bit config


def _tiles(config) -> list:
    """The MatmulConfig of each kernel (part) of an op's config (MLPConfig, LinearConfig)."""
    return [getattr(config, field.name) for field in dataclasses.fields(config)]


def _tiles_only(config: matmul.MatmulConfig) -> matmul.MatmulConfig:
    """The config without its row-dependent slice of rows (``weight_grad_split_rows``)."""
    return dataclasses.replace(config, split_rows=0)


def test_interpreter_config_is_fixed():
    sizes = [(m, n, kk, dt) for m in (1, 8320) for n in (24, 3072) for kk in (8, 768)
             for dt in (torch.float16, torch.float32)]
    assert {tile for m, n, kk, dt in sizes
            for config in (fused.choose_config(rows=m, d_in=kk, hidden=n, d_out=kk, dtype=dt, interpret=True),
                           fused_linear.choose_config(rows=m, in_features=kk, out_features=n, dtype=dt,
                                                      interpret=True))
            for tile in map(_tiles_only, _tiles(config))} == {matmul.INTERPRETER_CONFIG}
    assert {matmul.product_config(k, rows=m, columns=n, dtype=dt, interpret=True)
            for k in ("linear", "gelu_bwd") for m, n, _, dt in sizes} == {matmul.INTERPRETER_CONFIG}
    assert {_tiles_only(matmul.weight_grad_config(rows=m, weights=[(n, kk)] * layers, dtype=dt, interpret=True))
            for m, n, kk, dt in sizes for layers in (1, 2)} == {matmul.INTERPRETER_CONFIG}


def test_linear_launches_compile_without_spills():
    """The autocast projections' launches (qkv, output projection, head; forward and dX) at the
    presets' shapes (the head at 100 classes and vit-64's 200), fp32 weights converted in registers."""
    from vit_fast.aot import compile_launches

    launches = [launch for dtype in (torch.float16, torch.bfloat16) for m in (128 * 65, 8 * 65, 128)
                for d in AOT_WIDTHS for n in (3 * d, d, 100, 200)
                for launch in _without_linear_bwd(fused_linear.aot_launches(m, d, n, dtype, torch.float32))]
    for launch, r in compile_launches(launches):
        assert not r.spills, f"{launch.describe()} sm_{r.capability} spills: {r}"
        assert r.fits_shared_memory, f"{launch.describe()} needs {r.shared_bytes} B of shared memory"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_every_launch_config_compiles_without_spills(dtype):
    from vit_fast.aot import compile_launches

    # fp32 is the accuracy path of GPU test runs (one config for every shape): one shape suffices.
    launches = vit_launches(dtype) if dtype != torch.float32 else vit_launches(dtype, (192,), (4,), (128 * 65,))
    results = compile_launches(_without_linear_bwd(launches))
    assert results, "nothing was compiled"
    for launch, r in results:
        where = f"{launch.describe()} sm_{r.capability}"
        # r.spills counts STACK too: ptxas sometimes reports spills only there.
        assert not r.spills, f"{where} spills: {r}"
        assert r.fits_shared_memory, f"{where} needs {r.shared_bytes} B of shared memory"


def test_linear_bwd_configs_compile_without_spills():
    """linear_bwd_kernel's 16-bit configuration (64 x 64 tiles, rows split into slices) and the
    reduction of its slices, as autocast trains (bf16 activations, the fp32 residual stream's
    gradient, drop-path's per-row scale, fp32 parameters): vit-cifar's MLP (D = 192, hidden 768,
    batch 128) and a D = 384 MLP, both layers and dX in one launch."""
    from vit_fast.aot import compile_launches

    launches = [launch for d in (192, 384)
                for launch in fused.aot_launches(128 * 65, d, 4 * d, d, BF16, weight_dtype=torch.float32,
                                                 residual_dtype=torch.float32, scale=True)
                if launch.kernel in ("linear_bwd_kernel", "weight_grad_reduce_kernel")]
    assert {(launch.constexprs["BLOCK_N"], launch.constexprs["BLOCK_K"]) for launch in launches
            if launch.kernel == "linear_bwd_kernel"} == {(64, 64)}
    assert {launch.kernel for launch in launches} == {"linear_bwd_kernel", "weight_grad_reduce_kernel"}
    for launch, r in compile_launches(launches):
        assert not r.spills, f"{launch.describe()} sm_{r.capability} spills (LOCAL or STACK): {r}"
        assert r.fits_shared_memory, f"{launch.describe()} needs {r.shared_bytes} B of shared memory"


def test_launch_from_args_specialises_like_a_launch():
    """vit_fast.aot.launch_from_args, which every AOT test relies on, applies Triton's launch
    specialisation: ints equal to 1 become constants, ints and 16-byte-aligned tensors divisible
    by 16 get hints (a view 8 bytes into its storage does not), dtypes cross as strings."""
    from vit_fast.aot import kernel_launch

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    x = t(48, 2 * 32)[:, 4:]  # 4 bf16 = 8 bytes into the storage: not 16-byte aligned
    launch = matmul.linear_launch(x, t(40, 60), t(40), None, t(48, 40), "gelu", interpret=False)
    launch.args["M"] = 1  # as a one-row launch would pass it
    k = kernel_launch(launch)
    assert k.kernel == "linear_fwd_kernel" and k.module == "vit_fast.kernels.mlp"
    assert k.signature["X"] == "*bf16" and "X" not in k.divisible_by_16 and "W" in k.divisible_by_16
    assert "M" not in k.signature and k.constexprs["M"] == 1
    assert k.constexprs["stride_xk"] == 1 and k.constexprs["ACC_DTYPE"] == "tl.float32"
    assert k.signature["stride_xm"] == "i32" and "stride_xm" in k.divisible_by_16  # 64
    assert k.signature["N"] == "i32" and "N" not in k.divisible_by_16  # 40
    assert list(k.signature) == [n for n in matmul.linear_fwd_kernel.arg_names if n in k.signature]


# ---------------------------------------------------------------------------------------------
# GPU-sized case (vit_fast.testing.gpu_sized_cases: full size on CUDA, shrunken on the CPU)


# (rows, dim, mlp ratio): 128 images of 65 tokens on CUDA; on the CPU 17 rows (one partial row tile)
# at vit-cifar's and vit-small's MLP shapes.
@pytest.mark.parametrize("device,dtype,shape", gpu_sized_cases([(128 * 65, d, r) for d, r in ((192, 2), (192, 4), (384, 4))],
                                                               [(17, 192, 2), (17, 384, 4)]), ids=gpu_sized_id)
def test_mlp_large(device, dtype, shape):
    from vit_fast.fused import mlp

    M, dim, ratio = shape
    hidden = dim * ratio
    x, res = (torch.randn(M, dim, device=device, dtype=dtype) for _ in range(2))
    w1 = torch.randn(hidden, dim, device=device, dtype=dtype) / dim**0.5
    b1 = 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    w2 = torch.randn(dim, hidden, device=device, dtype=dtype) / hidden**0.5
    b2 = 0.1 * torch.randn(dim, device=device, dtype=dtype)
    check_forward_backward_relative(lambda *a: mlp.mlp(*a[:5], "none", a[5]),
                                    lambda *a: reference.mlp(*a[:5], "none", a[5]),
                                    [x, w1, b1, w2, b2, res], GPU_SIZED_REL, f"mlp {dim}x{ratio}")
