"""Fused LayerNorm (+ residual add): parity with vit_fast.reference, forward and backward.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py); the AOT test
compiles every launch configuration for sm_80 and sm_90 to cover what the interpreter cannot.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vit_fast import reference
from vit_fast.fused import layernorm as fused
from vit_fast.testing import (
    GPU_SIZED_REL,
    assert_compiled_matches_eager,
    assert_parity,
    check_forward_backward_relative,
    gpu_sized_cases,
    gpu_sized_id,
)

EPS = 1e-6

# (shape of x, residual variant): ViT widths, an awkward width (1000), odd small ones, one row,
# a prime row count, CIFAR-like 65-token sequences, and the widest row the launcher accepts.
CASES = [
    ((1, 192), False),
    ((7, 384), True),
    ((3, 65, 192), True),
    ((3, 65, 768), False),
    ((2, 7, 1000), True),
    ((7, 1), False),
    ((5, 33), True),
    ((2, 3, 5), False),
    ((2, fused.MAX_WIDTH), True),
]


def _make(shape, dtype, device, weight_dtype=None, residual=True):
    """Inputs (x, residual, weight, bias) as leaves; weight/bias not all-ones so they matter."""
    width = shape[-1]
    weight_dtype = weight_dtype or dtype
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    res = torch.randn(shape, device=device).to(dtype).requires_grad_() if residual else None
    w = (1 + 0.5 * torch.randn(width, device=device)).to(weight_dtype).requires_grad_()
    b = (0.5 * torch.randn(width, device=device)).to(weight_dtype).requires_grad_()
    return x, res, w, b


def _run(impl, x, res, w, b, grads):
    """Forward of ``impl`` (fused or reference module) and gradients of every input.

    ``grads`` = (dy, ds): incoming gradients of y and, in the residual variant, of s. Returns
    (outputs, input gradients) as lists of tensors.
    """
    if res is None:
        outs = [impl.layer_norm(x, w, b, EPS)]
        inputs = [x, w, b]
    else:
        outs = list(impl.add_layer_norm(x, res, w, b, EPS))
        inputs = [x, res, w, b]
    return outs, list(torch.autograd.grad(outs, inputs, grad_outputs=list(grads[: len(outs)])))


def _detached_copy(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("shape,residual", CASES, ids=lambda v: str(v))
def test_parity_fp32(shape, residual, device):
    x, res, w, b = _make(shape, torch.float32, device, residual=residual)
    grads = (torch.randn(shape, device=device), torch.randn(shape, device=device))
    outs, dins = _run(fused, x, res, w, b, grads)
    outs_ref, dins_ref = _run(reference, *_detached_copy([x, res, w, b]), grads)
    for out, ref in zip(outs + dins, outs_ref + dins_ref):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        # dweight/dbias sum over up to 195 rows: their error grows with the row count.
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,residual,weight_dtype",
    [((3, 65, 192), True, None), ((7, 1000), False, None), ((5, 384), True, torch.float32), ((1, 33), False, None)],
    ids=str,
)
def test_parity_low_precision(dtype, shape, residual, weight_dtype, device):
    """fp16/bf16 by the parity rule; weight_dtype=fp32 is the mixed-precision case (fp32 params)."""
    x, res, w, b = _make(shape, dtype, device, weight_dtype, residual)
    grads = (torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype))
    outs, dins = _run(fused, x, res, w, b, grads)
    outs_pt, dins_pt = _run(reference, *_detached_copy([x, res, w, b]), grads)
    outs_ref, dins_ref = _run(
        reference, *_detached_copy([x, res, w, b], torch.float32), [g.float() for g in grads]
    )
    names = ["y", "s"][: len(outs)] + ["dx", "dresidual"][: len(dins) - 2] + ["dweight", "dbias"]
    for name, out, pt, ref in zip(names, outs + dins, outs_pt + dins_pt, outs_ref + dins_ref):
        assert out.dtype == pt.dtype, f"{name}: dtype {out.dtype}, expected {pt.dtype}"
        assert_parity(out, pt, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), name=name)


def _reference_mixed(x, res, w, b, scale, out_dtype):
    """The torch backend's math under autocast: s = residual + scale * x (x 16-bit, residual fp32),
    y = LayerNorm(s) in fp32, rounded once to out_dtype."""
    branch = x * scale.view(-1, *([1] * (x.dim() - 1))) if scale is not None else x
    s = branch + res
    return reference.layer_norm(s, w, b, EPS).to(out_dtype), s


def _keep_scale(batch, dtype, device, p=0.3):
    """DropPath's draw (model.DropPath.keep_scale): B values 0 or 1/keep, in the branch's dtype."""
    keep = 1.0 - p
    scale = torch.empty(batch, dtype=dtype, device=device).bernoulli_(keep).div_(keep)
    scale[0] = 0.0  # at least one dropped and one kept sample, whatever the draw
    scale[-1] = 1.0 / keep
    return scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,drop", [((3, 65, 192), True), ((1, 65, 1000), False), ((5, 7, 192), True)], ids=str)
def test_parity_mixed_precision_residual_stream(dtype, shape, drop, device):
    """Autocast's contract: 16-bit branch x, fp32 residual and fp32 parameters, optional stochastic
    depth scale; s comes back fp32, y in the 16-bit dtype, parameter gradients fp32, the branch's
    gradient 16-bit and scaled, the residual's fp32. By the parity rule against the same math in
    the 16-bit dtype (out_pt) and in fp32 (out_ref)."""
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    res = torch.randn(shape, device=device).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).requires_grad_()
    b = (0.5 * torch.randn(shape[-1], device=device)).requires_grad_()
    scale = _keep_scale(shape[0], dtype, device) if drop else None
    dy, ds = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device)
    inputs = [x, res, w, b]

    def grads(y, s, leaves):
        return [y, s, *torch.autograd.grad([y, s], leaves, [dy.to(y.dtype), ds.to(s.dtype)])]

    y, s = fused.add_layer_norm(x, res, w, b, EPS, out_dtype=dtype, scale=scale)
    assert (y.dtype, s.dtype) == (dtype, torch.float32)
    got = grads(y, s, inputs)
    assert [g.dtype for g in got[2:]] == [dtype, torch.float32, torch.float32, torch.float32]
    ref_leaves = _detached_copy(inputs, torch.float32)
    ref = grads(*_reference_mixed(*ref_leaves, scale.float() if drop else None, torch.float32), ref_leaves)
    pt_leaves = _detached_copy(inputs, dtype)  # everything 16-bit: the low-precision reference
    pt = grads(*_reference_mixed(*pt_leaves, scale, dtype), pt_leaves)
    for name, out, p, r in zip(["y", "s", "dx", "dresidual", "dweight", "dbias"], got, pt, ref):
        assert_parity(out.float(), p.float(), r, atol=1e-5 * max(1.0, r.abs().max().item()), name=name)
    if drop:  # a dropped sample's branch has no effect and no gradient
        torch.testing.assert_close(s[0], res[0], rtol=0, atol=0)
        assert not got[2][0].any()


def test_drop_path_scale_fp32_matches_reference(device):
    """fp32 throughout, with a scale: tight against the reference DropPath's math on the same mask."""
    shape = (4, 9, 48)
    x, res, w, b = _make(shape, torch.float32, device)
    scale = _keep_scale(shape[0], torch.float32, device)
    dy, ds = torch.randn(shape, device=device), torch.randn(shape, device=device)
    y, s = fused.add_layer_norm(x, res, w, b, EPS, scale=scale)
    got = [y, s, *torch.autograd.grad([y, s], [x, res, w, b], [dy, ds])]
    leaves = _detached_copy([x, res, w, b])
    y_ref, s_ref = _reference_mixed(*leaves, scale, torch.float32)
    ref = [y_ref, s_ref, *torch.autograd.grad([y_ref, s_ref], leaves, [dy, ds])]
    for out, r in zip(got, ref):
        torch.testing.assert_close(out, r, rtol=1e-5, atol=2e-5 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_fp32_input_16bit_output(out_dtype, device):
    """norm1 and the final norm under autocast: the fp32 stream in, the GEMM's 16-bit operand out;
    dx comes back fp32 (the stream's), parameter gradients fp32."""
    shape = (2, 65, 192)
    x, _, w, b = _make(shape, torch.float32, device, residual=False)
    dy = torch.randn(shape, device=device).to(out_dtype)
    y = fused.layer_norm(x, w, b, EPS, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    got = [y, *torch.autograd.grad(y, [x, w, b], dy)]
    assert [g.dtype for g in got[1:]] == [torch.float32] * 3
    leaves = _detached_copy([x, w, b])
    y_ref = reference.layer_norm(*leaves, EPS)
    ref = [y_ref, *torch.autograd.grad(y_ref, leaves, dy.float())]
    # One rounding of the fp32 result: equal but where fp32 summation order flips a rounding (1 ulp).
    torch.testing.assert_close(got[0], y_ref.to(out_dtype))
    for out, r in zip(got[1:], ref[1:]):
        # dy is 16-bit for both; what remains is fp32 summation order.
        torch.testing.assert_close(out, r, rtol=1e-5, atol=2e-5 * max(1.0, r.abs().max().item()))


def test_bias_none(device):
    """nn.LayerNorm(bias=False) hands a LayerNorm no bias: y = xhat * weight, in both ops."""
    x, res, w, _ = _make((3, 5, 33), torch.float32, device)
    dy = torch.randn(3, 5, 33, device=device)
    for residual in (None, res):
        y = fused.layer_norm(x, w, None, EPS) if residual is None else fused.add_layer_norm(x, res, w, None, EPS)[0]
        got = [y, *torch.autograd.grad(y, [x, w], dy)]
        xr, rr, wr = _detached_copy([x, res, w])
        s = xr if residual is None else xr + rr
        y_ref = reference.layer_norm(s, wr, torch.zeros_like(wr), EPS)
        ref = [y_ref, *torch.autograd.grad(y_ref, [xr, wr], dy)]
        for out, r in zip(got, ref):
            torch.testing.assert_close(out, r, rtol=1e-5, atol=2e-5 * max(1.0, r.abs().max().item()))


def test_gradcheck_fp64(device):
    """fp64 inputs are computed in fp64 by the same kernels, so gradcheck tests the backward math."""
    x, res, w, b = _make((3, 6), torch.float64, device)
    assert torch.autograd.gradcheck(lambda *t: fused.layer_norm(*t, EPS), (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: fused.add_layer_norm(*t, EPS), (x, res, w, b))


# ---------------------------------------------------------------------------------------------
# Strides: non-contiguous inputs and incoming gradients


def _incoming_grads(kind, shape, device):
    """Incoming gradients with unusual strides, as autograd hands them to the backward."""
    if kind == "expanded":  # what y.sum().backward() passes: one value, every stride 0
        g = torch.tensor(0.7, device=device).expand(shape)
        assert g.stride() == (0,) * len(shape)
    elif kind == "transposed":  # last dimension strided: column stride = rows
        g = torch.randn(shape[::-1], device=device).transpose(0, -1)
        assert g.stride(-1) != 1
    else:  # "permuted": leading dims cannot be flattened into one row stride, so the op copies
        g = torch.randn(shape[1], shape[0], shape[2], device=device).transpose(0, 1)
    return g


@pytest.mark.parametrize("kind", ["expanded", "transposed", "permuted"])
@pytest.mark.parametrize("residual", [False, True])
def test_noncontiguous_incoming_grads(kind, residual, device):
    shape = (5, 13, 192)
    x, res, w, b = _make(shape, torch.float32, device, residual=residual)
    grads = (_incoming_grads(kind, shape, device), _incoming_grads(kind, shape, device).flip(-1))
    outs, dins = _run(fused, x, res, w, b, grads)
    _, dins_ref = _run(reference, *_detached_copy([x, res, w, b]), [g.contiguous() for g in grads])
    for out, ref in zip(dins, dins_ref):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5 * max(1.0, ref.abs().max().item()))


def test_sum_backward_reaches_every_input(device):
    """The block's usage: both y and s feed the loss, gradients accumulate into leaves twice."""
    x, res, w, b = _make((3, 65, 192), torch.float32, device)
    xr, rr, wr, br = _detached_copy([x, res, w, b])
    for _ in range(2):  # the second pass accumulates into .grad: x.grad and res.grad must not alias
        y, s = fused.add_layer_norm(x, res, w, b, EPS)
        (y.sum() + (s * s).sum()).backward()
        y, s = reference.add_layer_norm(xr, rr, wr, br, EPS)
        (y.sum() + (s * s).sum()).backward()
    assert x.grad.data_ptr() != res.grad.data_ptr()
    for t, r in zip([x, res, w, b], [xr, rr, wr, br]):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-5, atol=1e-4 * max(1.0, r.grad.abs().max().item()))


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_noncontiguous_inputs(layout, device):
    """Row strides other than the width (a slice of a wider tensor) and a strided last dimension."""
    rows, width = 21, 100
    if layout == "sliced":
        x = torch.randn(3, 7, width + 28, device=device)[..., :width]
        res = torch.randn(3, 7, width + 4, device=device)[..., 4:]
    else:
        x = torch.randn(width, rows, device=device).t()
        res = torch.randn(width, rows, device=device).t()
    assert not x.is_contiguous() and not res.is_contiguous()
    x.requires_grad_()
    res.requires_grad_()
    w = torch.randn(width, device=device, requires_grad=True)
    b = torch.randn(width, device=device, requires_grad=True)
    grads = (torch.randn(x.shape, device=device), torch.randn(x.shape, device=device))
    outs, dins = _run(fused, x, res, w, b, grads)
    outs_ref, dins_ref = _run(reference, *_detached_copy([x, res, w, b]), grads)
    for out, ref in zip(outs + dins, outs_ref + dins_ref):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5 * max(1.0, ref.abs().max().item()))


# ---------------------------------------------------------------------------------------------
# Numerical robustness and determinism


def _fp64_truth(x, w, b, dy):
    """F.layer_norm in fp64 on the same fp32 values: an independent ground truth."""
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = F.layer_norm(xd, (xd.shape[-1],), wd, bd, EPS)
    return [y] + list(torch.autograd.grad(y, (xd, wd, bd), dy.double()))


def test_large_mean_tiny_spread(device):
    """Rows of mean 1e4 and std 1e-3 in fp32: E[x^2] - E[x]^2 would cancel to noise (or a negative
    variance); the centred two-pass statistics must match fp64."""
    x = (1e4 + 1e-3 * torch.randn(7, 768, device=device)).requires_grad_()
    w = (1 + 0.5 * torch.randn(768, device=device)).requires_grad_()
    b = torch.randn(768, device=device).requires_grad_()
    dy = torch.randn(7, 768, device=device)
    y = fused.layer_norm(x, w, b, EPS)
    got = [y] + list(torch.autograd.grad(y, (x, w, b), dy))
    truth = _fp64_truth(x, w, b, dy)
    for name, g, t in zip(["y", "dx", "dweight", "dbias"], got, truth):
        assert torch.isfinite(g).all(), name
        # Relative to the result's scale (dx ~ rstd ~ 1e3): fp32 rounding, not cancellation.
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-4 * t.abs().max().item(), msg=name)


def test_constant_rows(device):
    """Zero-variance rows (zeros, ones, 1e4): rstd = 1/sqrt(eps) stays finite and y equals the bias."""
    x = torch.tensor([0.0, 1.0, 1e4, -3.0], device=device)[:, None].repeat(1, 384).requires_grad_()
    w = torch.randn(384, device=device, requires_grad=True)
    b = torch.randn(384, device=device, requires_grad=True)
    dy = torch.randn(4, 384, device=device)
    y = fused.layer_norm(x, w, b, EPS)
    torch.testing.assert_close(y, b.detach().expand(4, -1), rtol=0, atol=0)
    got = [y] + list(torch.autograd.grad(y, (x, w, b), dy))
    truth = _fp64_truth(x, w, b, dy)
    for name, g, t in zip(["y", "dx", "dweight", "dbias"], got, truth):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), t, rtol=1e-5, atol=1e-5 * max(1.0, t.abs().max().item()), msg=name)


def test_backward_is_deterministic(device):
    """dweight/dbias come from per-program partial sums reduced in a fixed order: bitwise equal."""
    x, res, w, b = _make((3, 65, 384), torch.float32, device)
    grads = (torch.randn(x.shape, device=device), torch.randn(x.shape, device=device))
    _, first = _run(fused, x, res, w, b, grads)
    _, second = _run(fused, x, res, w, b, grads)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_empty_rows(device):
    x, res, w, b = _make((0, 192), torch.float32, device)
    y, s = fused.add_layer_norm(x, res, w, b, EPS)
    assert y.shape == s.shape == (0, 192)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile


def test_opcheck(device):
    x, res, w, b = _make((3, 5, 33), torch.float32, device)
    ops = torch.ops.vit_fast
    torch.library.opcheck(ops.layer_norm.default, (x, w, b, EPS))
    torch.library.opcheck(ops.add_layer_norm.default, (x, res, w, b, EPS))
    y, mean, rstd = ops.layer_norm(x.detach(), w.detach(), b.detach(), EPS)
    dy, ds = torch.randn_like(y), torch.randn_like(y)
    torch.library.opcheck(ops.layer_norm_backward.default, (dy, None, x.detach(), w.detach(), mean, rstd))
    torch.library.opcheck(ops.layer_norm_backward.default, (dy, ds, x.detach(), w.detach(), mean, rstd))
    # The mixed-precision variants: bf16 branch, fp32 residual, bf16 output, a scale, no bias.
    xb, scale = x.detach().bfloat16().requires_grad_(), _keep_scale(3, torch.bfloat16, device)
    torch.library.opcheck(ops.add_layer_norm.default, (xb, res, w, None, EPS, torch.bfloat16, scale))
    torch.library.opcheck(ops.layer_norm.default, (res, w, b, EPS, torch.bfloat16))
    _, s, mean, rstd = ops.add_layer_norm(xb.detach(), res.detach(), w.detach(), None, EPS, torch.bfloat16, scale)
    torch.library.opcheck(ops.layer_norm_backward.default,
                          (dy.bfloat16(), ds, s, w.detach(), mean, rstd, scale, torch.bfloat16))


class _PreNormResidual(torch.nn.Module):
    """A pre-LN block's two norms: norm1 of the stream, then add + norm2 of the updated stream."""

    def __init__(self, width):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width, eps=EPS)
        self.norm2 = torch.nn.LayerNorm(width, eps=EPS)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):
        h = fused.layer_norm(x, self.norm1.weight, self.norm1.bias, EPS)
        y, s = fused.add_layer_norm(self.proj(h), x, self.norm2.weight, self.norm2.bias, EPS)
        return y + s


def test_torch_compile_fullgraph(device):
    module = _PreNormResidual(48).to(device)
    assert_compiled_matches_eager(module, torch.randn(2, 5, 48, device=device), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs(device):
    x, res, w, b = (t.detach() for t in _make((4, 16), torch.float32, device))
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\).*got \(15,\)"):
        fused.layer_norm(x, w[:15], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        fused.layer_norm(x, w, b[None])
    with pytest.raises(TypeError, match="weight and bias must share a dtype"):
        fused.layer_norm(x, w, b.double())
    with pytest.raises(TypeError, match=r"must be torch.float16 \(like x\) or torch.float32, got torch.bfloat16"):
        fused.layer_norm(x.half(), w.bfloat16(), b.bfloat16())
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64, got torch.int32"):
        fused.layer_norm(x.int(), w, b)
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(4, 16\), got \(2, 2, 16\)"):
        fused.add_layer_norm(x, res.reshape(2, 2, 16), w, b)
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        fused.add_layer_norm(x, res.half(), w, b)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        fused.layer_norm(x, w.to("meta"), b)
    with pytest.raises(ValueError, match=rf"must be in \[1, {fused.MAX_WIDTH}\], got {fused.MAX_WIDTH + 1}"):
        wide = torch.ones(fused.MAX_WIDTH + 1, device=device)
        fused.layer_norm(torch.randn(2, fused.MAX_WIDTH + 1, device=device), wide, wide)


def test_bad_eps_bias_and_scale(device):
    x, res, w, b = (t.detach() for t in _make((2, 4, 16), torch.float32, device))
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1e-05"):
        fused.layer_norm(x, w, b, -1e-5)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got nan"):
        fused.add_layer_norm(x, res, w, b, float("nan"))
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        fused.layer_norm(x, w, b[:3])
    with pytest.raises(ValueError, match=r"scale must have shape \(B,\) = \(2,\).*got \(3,\)"):
        fused.add_layer_norm(x, res, w, b, scale=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="residual must have the dtype of x .*or be torch.float32.*got torch.float16"):
        fused.add_layer_norm(x.bfloat16(), res.half(), w, b)
    with pytest.raises(TypeError, match="out_dtype must be .*got torch.int32"):
        fused.layer_norm(x, w, b, out_dtype=torch.int32)


def test_fake_implementations_check_like_the_real_ones():
    """The fake (meta) kernels raise the real ones' errors: torch.compile and the cost account run
    only them, so a bad shape, dtype or device must not pass there silently."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.vit_fast
    with FakeTensorMode():
        x, res, w = torch.empty(2, 4, 16), torch.empty(2, 4, 16), torch.empty(16)
        with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
            ops.layer_norm(x, torch.empty(15), w, EPS)
        with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1.0"):
            ops.layer_norm(x, w, w, -1.0)
        with pytest.raises(TypeError, match="residual must have the dtype of x"):
            ops.add_layer_norm(x, res.half(), w, w, EPS)
        with pytest.raises(ValueError, match=r"scale must have shape \(B,\)"):
            ops.add_layer_norm(x, res, w, w, EPS, None, torch.empty(5))
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            ops.add_layer_norm(x, res.to("meta"), w, w, EPS)
        stats = torch.empty(2, 4)
        with pytest.raises(ValueError, match=r"dy must have the shape of x \(2, 4, 16\)"):
            ops.layer_norm_backward(torch.empty(2, 16), None, x, w, stats, stats)
        with pytest.raises(ValueError, match=r"mean must have shape \(2, 4\)"):
            ops.layer_norm_backward(x, None, x, w, torch.empty(8), stats)
    with pytest.raises(ValueError, match="all tensors must be on one device"):  # meta vs CPU, no fake mode
        ops.layer_norm(torch.empty(2, 16, device="meta"), torch.empty(16), torch.empty(16), EPS)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="cannot run the Triton kernels"):
        fused.layer_norm(x, torch.ones(8), torch.zeros(8))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_90: what the interpreter cannot check (vit_fast.aot)

AOT_WIDTHS = (192, 384, 768, 1024, fused.MAX_WIDTH)
AOT_ROWS = 128 * 65  # a CIFAR ViT batch; the configs depend on the width and dtypes only


def _aot_launches():
    """Every kernel launch the launchers make at AOT_WIDTHS, for each input dtype, parameter
    dtype (x's or fp32) and with and without the residual, as the launchers build them
    (``fused.aot_launches``), plus autocast's variants (fp32 residual stream, 16-bit output, with
    and without stochastic depth's scale). Duplicates (768 and 1024 share a tile) compile once."""
    launches = [
        launch
        for width in AOT_WIDTHS
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
        for weight_dtype in {dtype, torch.float32}
        for residual in (False, True)
        for launch in fused.aot_launches(AOT_ROWS, width, dtype, residual, weight_dtype)
    ]
    for width in AOT_WIDTHS:
        for dtype in (torch.float16, torch.bfloat16):
            launches += fused.aot_launches(AOT_ROWS, width, torch.float32, False, torch.float32, out_dtype=dtype)
            for scale in (False, True):
                launches += fused.aot_launches(AOT_ROWS, width, dtype, True, torch.float32,
                                               residual_dtype=torch.float32, out_dtype=dtype, scale=scale)
    return launches


def test_column_sum_fills_the_gpu():
    """The dweight/dbias reduction at vit-cifar's shape (128 * 65 rows, width 192) runs 100+
    programs on an A100 and an H100 (it ran 2), and the same order every time (a pure function of
    the shape and the SM count)."""
    for sms in (108, 132):
        from vit_fast.fused.launch import Target, meta_tensor

        dy = meta_tensor(AOT_ROWS, 192, dtype=torch.bfloat16)
        s, ds, dx = (meta_tensor(AOT_ROWS, 192, dtype=torch.float32) for _ in range(3))
        w, stats = meta_tensor(192, dtype=torch.float32), meta_tensor(AOT_ROWS, dtype=torch.float32)
        plan = fused.launch_plan("layer_norm_backward", (dy, ds, s, w, stats, stats, None, None),
                                 (dx, meta_tensor(0, dtype=torch.float32), w, w), Target(False, "cuda", sms))
        column_sum = [launch for launch in plan if launch.kernel.fn.__name__ == "column_sum_kernel"]
        assert len(column_sum) == 1 and column_sum[0].grid[0] >= 100, column_sum[0].grid


def test_aot_compiles_without_spills():
    from vit_fast.aot import TARGETS, compile_launches

    results = compile_launches(_aot_launches())
    assert {r.name for _, r in results} == {"layer_norm_fwd_kernel", "layer_norm_bwd_kernel", "column_sum_kernel"}
    assert {r.capability for _, r in results} == set(TARGETS)
    for launch, r in results:
        where = f"{launch.describe()} {launch.signature['X' if 'X' in launch.signature else 'DW']} sm_{r.capability}"
        # r.spills counts STACK too: ptxas has reported this kernel's spills only there (width 8192).
        assert not r.spills, f"{where} spills: {r}"
        assert r.fits_shared_memory, f"{where} needs {r.shared_bytes} B of shared memory"


# ---------------------------------------------------------------------------------------------
# GPU-sized case (vit_fast.testing.gpu_sized_cases: full size on CUDA, shrunken on the CPU)


# (rows, width): 512 images of 65 tokens on CUDA; 17 rows on the CPU (one partial row tile), at each
# ViT width.
@pytest.mark.parametrize("device,dtype,shape", gpu_sized_cases([(512 * 65, w) for w in (192, 384, 768)],
                                                               [(17, w) for w in (192, 384, 768)]), ids=gpu_sized_id)
def test_add_layer_norm_large(device, dtype, shape):
    from vit_fast.fused import layernorm

    rows, width = shape
    x, res = (torch.randn(rows, width, device=device, dtype=dtype) for _ in range(2))
    w = 1 + 0.1 * torch.randn(width, device=device, dtype=dtype)
    b = 0.1 * torch.randn(width, device=device, dtype=dtype)
    check_forward_backward_relative(lambda *a: layernorm.add_layer_norm(*a)[0] * 2 + layernorm.add_layer_norm(*a)[1],
                                    lambda *a: reference.add_layer_norm(*a)[0] * 2 + reference.add_layer_norm(*a)[1],
                                    [x, res, w, b], GPU_SIZED_REL, f"add_layer_norm width {width}")
