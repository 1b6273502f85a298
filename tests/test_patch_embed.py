"""Fused patch embedding (vit_fast._C) against vit_fast.reference.patch_embed.

CPU: the C++ implementation, which calls the same index helpers (csrc/patch_embed_index.h) and
sums the parameter gradients in the same orders (csrc/patch_embed_sum.h) as the CUDA kernels:
forward and every gradient, fp32 tight and fp64 gradcheck, awkward and strided inputs, a B=256
batch against fp64 by bounds that hold on every CPU (the summation orders' rounding depth, with
serial sums as the mutation they reject), opcheck, errors, torch.compile. When the extension was
built with nvcc, the compiled kernels are read with cuobjdump (sm_80 and sm_90 code without local
memory or stack frames, compute_90 PTX).
On a GPU the same parity tests run on CUDA in fp32, fp16 and bf16.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from vit_fast import reference
from vit_fast.fused import patch_embed as fused
from vit_fast.testing import (
    assert_compiled_matches_eager,
    assert_parity,
    assert_summation_accuracy,
    assert_within_bound,
    gamma,
    separating_depth,
    serial_sum,
    summation_error_ratios,
    unit_roundoff,
)

requires_cuda = pytest.mark.gpu(reason="CUDA parity needs a CUDA GPU")


def test_extension_is_built():
    # Everything below needs the extension; say how to get it rather than fail 40 times obscurely.
    assert fused.extension_available(), f"{fused._LOAD_ERROR}; rebuild with: {fused.REBUILD_COMMAND}"


def make_inputs(batch, channels, height, width, patch, dim, dtype=torch.float32, device="cpu"):
    n = (height // patch) * (width // patch)
    kw = dict(dtype=dtype, device=device)
    return (
        torch.randn(batch, channels, height, width, **kw),
        torch.randn(dim, channels, patch, patch, **kw) * (channels * patch * patch) ** -0.5,
        torch.randn(dim, **kw),
        torch.randn(1, 1, dim, **kw),
        torch.randn(1, n + 1, dim, **kw),
    )


def forward_and_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. every input."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


NAMES = ["images", "weight", "bias", "cls_token", "pos_embed"]

# (batch, channels, height, width, patch, dim): the image and patch sizes, batch 1 and a
# prime batch, D not a multiple of the CUDA tile (64) nor of 16, plus a non-square image (row and
# column index mix-ups) and an odd channel count.
SHAPES = [
    (1, 3, 32, 32, 4, 40),
    (7, 3, 32, 32, 4, 40),
    (7, 3, 32, 32, 16, 40),
    (1, 3, 224, 224, 16, 72),
    (7, 3, 224, 224, 16, 24),
    (7, 3, 224, 224, 4, 24),
    (3, 5, 24, 40, 4, 17),
    (2, 3, 64, 64, 8, 40),  # vit-64: 64x64 images in 8x8 patches, 65 tokens
]


def assert_matches_reference(inputs, grad_out):
    """fp32 fused vs the fp64 reference, tight: the error of the fp32 reference itself plus 1e-5
    relative slack (fp32 accumulation, different summation order)."""
    out, grads = forward_and_grads(fused.patch_embed, inputs, grad_out)
    ref64, grads64 = forward_and_grads(reference.patch_embed, [t.double() for t in inputs], grad_out.double())
    ref32, grads32 = forward_and_grads(reference.patch_embed, inputs, grad_out)
    for name, a, a32, a64 in zip(["tokens", *NAMES], [out, *grads], [ref32, *grads32], [ref64, *grads64]):
        assert a.shape == a64.shape and a.dtype == a32.dtype, f"{name}: {a.shape}/{a.dtype} vs {a64.shape}"
        scale = a64.abs().max().item()
        err = (a.double() - a64).abs().max().item()
        err32 = (a32.double() - a64).abs().max().item()
        assert err <= 2 * err32 + 1e-5 * scale + 1e-6, (
            f"{name}: error {err:.3e} vs fp64, fp32 reference's error {err32:.3e}, scale {scale:.2e}"
        )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_{}x{}_p{}_D{}".format(*s))
def test_parity_fp32(shape):
    inputs = make_inputs(*shape)
    B, _, H, W, p, D = shape
    assert_matches_reference(inputs, torch.randn(B, (H // p) * (W // p) + 1, D))


def test_parity_non_contiguous_inputs():
    # channels_last images, a sliced batch of those, and parameters that are strided views.
    images, weight, bias, cls_token, pos_embed = make_inputs(9, 3, 32, 24, 4, 40)
    images = images.to(memory_format=torch.channels_last)[1::2]  # batch 4, strides of neither layout
    weight = weight.transpose(2, 3).contiguous().transpose(2, 3)  # same values, (C, p, p) strides swapped
    bias = torch.stack([bias, bias], dim=1)[:, 0]  # stride 2
    pos_big = torch.randn(1, pos_embed.shape[1], 2 * 40)
    pos_embed = pos_big[:, :, ::2]  # stride 2 along D
    cls_token = cls_token.expand(1, 1, 40)
    assert not images.is_contiguous() and not images.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous() and not bias.is_contiguous() and not pos_embed.is_contiguous()
    grad_out = torch.randn(40, pos_embed.shape[1], 4).permute(2, 1, 0)  # non-contiguous grad
    assert_matches_reference([images, weight, bias, cls_token, pos_embed], grad_out)


def test_stride_zero_grad_from_sum():
    # out.sum().backward() hands back an expanded (stride-0) gradient.
    inputs = make_inputs(3, 3, 16, 16, 4, 20)
    leaves = [t.clone().requires_grad_() for t in inputs]
    fused.patch_embed(*leaves).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    reference.patch_embed(*ref_leaves).sum().backward()
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_images_without_grad_skip_the_image_gradient():
    images, *params = make_inputs(2, 3, 8, 12, 4, 6)
    params = [p.requires_grad_() for p in params]
    out = fused.patch_embed(images, *params)
    out.backward(torch.randn_like(out))
    assert images.grad is None and all(p.grad is not None for p in params)


def test_gradcheck_fp64():
    inputs = [t.requires_grad_() for t in make_inputs(2, 2, 8, 12, 4, 5, dtype=torch.float64)]
    assert torch.autograd.gradcheck(fused.patch_embed, inputs)
    # Only some inputs differentiable: the image-gradient op is skipped, the others stay right.
    inputs[0].requires_grad_(False)
    inputs[3].requires_grad_(False)
    assert torch.autograd.gradcheck(fused.patch_embed, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_low_precision_parity(dtype):
    inputs = make_inputs(3, 3, 32, 32, 4, 40)
    grad_out = torch.randn(3, 65, 40)
    low = [t.to(dtype) for t in inputs]
    out, grads = forward_and_grads(fused.patch_embed, low, grad_out.to(dtype))
    out_pt, grads_pt = forward_and_grads(reference.patch_embed, low, grad_out.to(dtype))
    out_ref, grads_ref = forward_and_grads(reference.patch_embed, inputs, grad_out)
    for name, a, b, c in zip(["tokens", *NAMES], [out, *grads], [out_pt, *grads_pt], [out_ref, *grads_ref]):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_parity(a, b, c, atol=1e-2, name=name)


def test_deterministic():
    inputs = make_inputs(7, 3, 32, 32, 4, 40)
    grad_out = torch.randn(7, 65, 40)
    first = forward_and_grads(fused.patch_embed, inputs, grad_out)
    second = forward_and_grads(fused.patch_embed, inputs, grad_out)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


def test_opcheck():
    images, weight, bias, cls_token, pos_embed = make_inputs(3, 3, 8, 12, 4, 5)
    args = (images.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
            cls_token.requires_grad_(), pos_embed.requires_grad_())
    torch.library.opcheck(torch.ops.vit_fast.patch_embed.default, args)
    grad_out = torch.randn(3, 7, 5)
    backward = torch.ops.vit_fast.patch_embed_backward.default
    # Every gradient; the parameters' only (frozen images, the training step); the images' only;
    # a mix (the placeholders of the others must match the fake's).
    for needs in ([True] * 5, [False, True, True, True, True], [True, False, False, False, False],
                  [False, True, False, True, False]):
        torch.library.opcheck(backward, (grad_out, images.detach(), weight.detach(), needs))


def test_backward_is_one_op_with_a_needs_mask():
    # Each wanted gradient equals the one computed with every gradient wanted; each unwanted one is
    # an empty (0,) placeholder in the images' dtype, from the real op and the fake alike.
    images, weight, *_ = make_inputs(3, 3, 8, 12, 4, 5)
    grad_out = torch.randn(3, 7, 5)
    every = torch.ops.vit_fast.patch_embed_backward(grad_out, images, weight, [True] * 5)
    assert [tuple(g.shape) for g in every] == [(3, 3, 8, 12), (5, 3, 4, 4), (5,), (1, 1, 5), (1, 7, 5)]
    for needs in ([True, False, False, False, False], [False, True, True, True, True],
                  [False, False, True, False, True]):
        for device in ("cpu", "meta"):
            grads = torch.ops.vit_fast.patch_embed_backward(grad_out.to(device), images.to(device),
                                                            weight.to(device), needs)
            for name, g, full, need in zip(NAMES, grads, every, needs):
                assert g.dtype == images.dtype and g.device.type == device, (name, needs, device)
                assert g.shape == (full.shape if need else (0,)), (name, needs, device)
                if need and device == "cpu":
                    assert torch.equal(g, full), (name, needs)
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError, match=r"needs must list 5 booleans \(images, weight, bias, cls_token, "
                                             r"pos_embed\), got \[True, False\]"):
            torch.ops.vit_fast.patch_embed_backward(grad_out.to(device), images.to(device), weight.to(device),
                                                    [True, False])


@pytest.mark.parametrize("images_grad", [False, True])
def test_autograd_calls_the_backward_op_once(images_grad):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "vit_fast":
                self.calls.append((func.overloadpacket.__name__, args[3] if len(args) > 3 else None))
            return func(*args, **(kwargs or {}))

    images, *params = make_inputs(2, 3, 8, 12, 4, 6)
    images.requires_grad_(images_grad)
    params[2].requires_grad_()  # the class token alone among the parameters
    out = fused.patch_embed(images, *params)
    with Recorder() as recorder:
        out.backward(torch.randn_like(out))
    assert recorder.calls == [("patch_embed_backward", [images_grad, False, False, True, False])]
    assert (images.grad is not None) == images_grad and params[2].grad is not None


# (input to replace, how, the message expected): each names the offending shape and the expectation.
BAD_INPUTS = {
    "channels": ("images", lambda t: t[:, :2], r"weight \[5, 3, 4, 4\] expects 3 input channels but the images have 2"),
    "indivisible": ("images", lambda t: t[..., :10], r"image size \(8, 10\) must be a multiple of the patch size 4"),
    "rank": ("images", lambda t: t[0], r"images must have shape \(B, C, H, W\), got \[3, 8, 12\]"),
    "non_square": ("weight", lambda t: t[..., :3], r"square patches, got \[5, 3, 4, 3\]"),
    "bias": ("bias", lambda t: t[:4], r"bias must have shape \(5,\) to match weight \[5, 3, 4, 4\], got \[4\]"),
    "cls": ("cls_token", lambda t: t[0], r"cls_token must have shape \(1, 1, 5\), got \[1, 5\]"),
    "pos": ("pos_embed", lambda t: t[:, :6], r"pos_embed must have shape \(1, 7, 5\) for 6 patches"),
    "dtype": ("bias", lambda t: t.double(), r"bias has dtype Double but images have dtype Float"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_errors_name_the_shapes(case):
    name, change, message = BAD_INPUTS[case]
    inputs = dict(zip(NAMES, make_inputs(2, 3, 8, 12, 4, 5)))
    inputs[name] = change(inputs[name])
    with pytest.raises(RuntimeError, match=message):
        fused.patch_embed(**inputs)


def test_backward_error_names_the_grad_shape():
    images, weight, *_ = make_inputs(2, 3, 8, 12, 4, 5)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(2, 7, 5\), got \[2, 6, 5\]"):
        torch.ops.vit_fast.patch_embed_backward(torch.randn(2, 6, 5), images, weight, [True] * 5)


def test_torch_compile_fullgraph():
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 24, kernel_size=4, stride=4)
            self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 24))
            self.pos_embed = torch.nn.Parameter(torch.randn(1, 17, 24))

        def forward(self, x):
            return fused.patch_embed(x, self.proj.weight, self.proj.bias, self.cls_token, self.pos_embed).tanh()

    assert_compiled_matches_eager(Embed(), torch.randn(3, 3, 16, 16), rtol=1e-5, atol=1e-5)


def test_stale_extension_is_refused(tmp_path, monkeypatch):
    # A source newer than the library: the loader must refuse it and name the rebuild command.
    source = tmp_path / "patch_embed.cpp"
    source.write_text("// newer than the library")
    monkeypatch.setattr(fused, "_CSRC", tmp_path)
    os.utime(source, (4e9, 4e9))  # far in the future
    error = fused._load_extension()
    assert error is not None and "stale" in error and str(source) in error
    monkeypatch.setattr(fused, "_LOAD_ERROR", error)
    with pytest.raises(RuntimeError, match=re.escape(fused.REBUILD_COMMAND)):
        fused.patch_embed(*make_inputs(1, 3, 8, 8, 4, 5))


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------

CUDA_SHAPES = [(256, 3, 32, 32, 4, 192), (7, 3, 32, 32, 4, 40), (5, 3, 224, 224, 16, 200), (3, 5, 24, 40, 4, 17)]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def assert_dtype_parity(shape, dtype, device):
    """The fused op in `dtype` on `device` vs the fp64 reference: at most twice the error of the
    reference run in `dtype`, plus 1e-5 (fp32) or 1e-2 (16-bit) absolute slack."""
    inputs = make_inputs(*shape, device=device)
    B, _, H, W, p, D = shape
    grad_out = torch.randn(B, (H // p) * (W // p) + 1, D, device=device)
    low = [t.to(dtype) for t in inputs]
    out, grads = forward_and_grads(fused.patch_embed, low, grad_out.to(dtype))
    out_pt, grads_pt = forward_and_grads(reference.patch_embed, low, grad_out.to(dtype))
    out_ref, grads_ref = forward_and_grads(reference.patch_embed, [t.double() for t in inputs], grad_out.double())
    for name, a, b, c in zip(["tokens", *NAMES], [out, *grads], [out_pt, *grads_pt], [out_ref, *grads_ref]):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_parity(a, b, c, atol=1e-5 if dtype == torch.float32 else 1e-2, name=name)


@pytest.fixture(scope="module")
def large_batch():
    """CUDA_SHAPES[0] (B = 256 CIFAR images, 4x4 patches, D = 192) with a random grad_out; the
    fp64 reference (``exact``: each of its roundings is 2^-29 of an fp32 one); and for each
    parameter gradient ``terms[name] = (n, sum of squared terms per output)`` (fp64):
    grad_pos_embed[t] and grad_cls_token sum grad_out[b, t] over the batch (n = 256), grad_bias
    sums grad_out over the batch and the 64 patch tokens, grad_weight the products
    grad_patches[m, d] patches[m, k] over the B N patch rows m (n = 16384)."""
    torch.manual_seed(0)
    B, C, H, W, p, D = CUDA_SHAPES[0]
    inputs = make_inputs(B, C, H, W, p, D)
    grad_out = torch.randn(B, (H // p) * (W // p) + 1, D)
    out64, grads64 = forward_and_grads(reference.patch_embed, [t.double() for t in inputs], grad_out.double())
    patches = reference.patchify(inputs[0], p).reshape(-1, C * p * p)  # (B N, C p p)
    grad_patches = grad_out[:, 1:].reshape(-1, D)  # (B N, D)
    sq = grad_out.double().square()
    weight_sq = grad_patches.double().square().T @ patches.double().square()
    terms = {
        "weight": (patches.shape[0], weight_sq.reshape(D, C, p, p)),
        "bias": (patches.shape[0], sq[:, 1:].sum((0, 1))),
        "cls_token": (B, sq[:, :1].sum(0, keepdim=True)),
        "pos_embed": (B, sq.sum(0, keepdim=True)),
    }
    exact = dict(zip(["tokens", *NAMES], [out64, *grads64]))
    return SimpleNamespace(inputs=inputs, grad_out=grad_out, patches=patches, grad_patches=grad_patches,
                           exact=exact, terms=terms)


def test_large_batch_fp32_cpu(large_batch):
    # The CPU implementation sums the parameter gradients in the CUDA kernels' orders
    # (csrc/patch_embed_sum.h): grad_pos_embed and grad_cls_token over the batch in chunks of 16
    # images, then the 16 chunk partials; grad_bias the same per token, then over the 64 tokens the
    # same way; grad_weight over the 16384 patch rows in 64 slices of 256 rows, then the 64 slice
    # partials. So this is the accuracy check of those orders at the CUDA test's largest batch.
    #
    # Not by the CUDA test's parity rule (twice the error of PyTorch's fp32 result): on the CPU
    # that error is whatever order the CPU's BLAS and torch's reductions sum in. Here it made
    # grad_weight's allowance 4.2e-4 for a fused 2.6e-4; BLAS block sizes of other CPUs give it
    # 1.3e-4 to 3.4e-4 (2.6e-4 to 6.8e-4 allowed), a pairwise sum 6e-5, and a correct fused result
    # would fail there. And one serial fp32 sum over the batch, the order this test exists to
    # catch, made grad_pos_embed 3.57e-5 off against an allowance of 3.57e-5.
    #
    # Instead, vit_fast.testing.assert_summation_accuracy (its docstring has the analysis): with
    # z = |error| / (u |terms|_2) per output, a summation order of mean rounding depth d has
    # rms z = sqrt(0.18 d); the rms z of each gradient must be at most that of depth
    # separating_depth(n), halfway on a log scale between the best blocked order (sqrt n) and one
    # serial sum (n / 2): 45 for the batch sums (rms z 2.86), 1024 for the row sums (13.6); and
    # max z at most 8 times that. Only the inputs and the fp64 sums enter it, so the bound is the
    # same on every CPU. So is the fused result: no BLAS (explicit loops in csrc/patch_embed.cpp,
    # whose threads split the outputs, not the sums), and only a compiler's contraction of a
    # product and an add into an FMA can change it: not by default (-O3, baseline x86-64); a
    # -march=haswell build changed grad_weight and grad_images in the last bits (grad_weight's
    # ratios below by under 0.01), the sums without products not at all. Measured, rms z / allowed
    # and max z / allowed:
    #   grad_weight 0.40, 0.31 (fused rms z 5.47: depth 161); one serial sum 2.86, 2.86
    #   grad_pos_embed 0.64, 0.57 (rms z 1.83: depth 16); one serial sum over the batch 1.70, 1.57
    #   grad_cls_token 0.72, 0.57; serial 1.99, 1.57
    #   grad_bias 0.18, 0.07; one serial sum over the 16384 rows 2.96, 2.01
    # (test_large_batch_bound_kills_serial_sums keeps the serial sums failing.)
    #
    # The tokens and the image gradient are dot products of 48 and 192 terms, in no order the
    # kernels promise: each element must be within the any-order bound gamma_n |x|.|y| (Higham
    # 3.5; n = 48 + 2 with the bias and positional additions, 192 for the images), which FMAs
    # only tighten. Measured: at most 0.11 (tokens) and 0.033 (grad_images) of it.
    lb = large_batch
    out, grads = forward_and_grads(fused.patch_embed, lb.inputs, lb.grad_out)
    result = dict(zip(["tokens", *NAMES], [out, *grads]))
    abs_out, abs_grads = forward_and_grads(
        reference.patch_embed, [t.double().abs() for t in lb.inputs], lb.grad_out.double().abs())
    D, C, p, _ = lb.inputs[1].shape
    u = unit_roundoff(torch.float32)
    assert_within_bound(result["tokens"], lb.exact["tokens"], gamma(C * p * p + 2, u) * abs_out, "tokens")
    assert_within_bound(result["images"], lb.exact["images"], gamma(D, u) * abs_grads[0], "grad_images")
    for name, (n, sq) in lb.terms.items():
        assert_summation_accuracy(result[name], lb.exact[name], sq, separating_depth(n), f"grad_{name}")


def test_large_batch_bound_kills_serial_sums(large_batch):
    # The regressions test_large_batch_fp32_cpu exists to catch: one serial fp32 sum over the
    # batch (grad_pos_embed, grad_cls_token), over all 16384 rows (grad_bias), over all 16384
    # patch rows (grad_weight). Computed here left to right with elementwise adds
    # (vit_fast.testing.serial_sum: the same on every CPU), each must fail its bound by 1.4x in rms
    # (measured: 1.70 grad_pos_embed, 1.99 grad_cls_token, 2.96 grad_bias, 2.86 grad_weight).
    lb = large_batch
    rows = zip(lb.grad_patches, lb.patches)
    serial = {
        "pos_embed": serial_sum(lb.grad_out.unbind(0)).unsqueeze(0),
        "bias": serial_sum(lb.grad_patches.unbind(0)),
        "weight": serial_sum(g[:, None] * x[None, :] for g, x in rows).reshape(lb.exact["weight"].shape),
    }
    serial["cls_token"] = serial["pos_embed"][:, :1]
    for name, value in serial.items():
        n, sq = lb.terms[name]
        rms_ratio, _ = summation_error_ratios(value, lb.exact[name], sq, separating_depth(n))
        assert rms_ratio >= 1.4, f"grad_{name}: a serial sum is only {rms_ratio:.2f}x the allowed rms error"
        with pytest.raises(AssertionError, match="rms error"):
            assert_summation_accuracy(value, lb.exact[name], sq, separating_depth(n), f"grad_{name}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "B{}_C{}_{}x{}_p{}_D{}".format(*s))
def test_cuda_parity(shape, dtype):
    assert_dtype_parity(shape, dtype, "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_deterministic(device):
    # Sliced channels_last images (batch 9 -> 4, strides of neither layout), a permuted gradient,
    # then a second run that must give bitwise the same tokens and gradients.
    images, weight, bias, cls_token, pos_embed = make_inputs(9, 3, 32, 32, 4, 40, device=device)
    images = images.to(memory_format=torch.channels_last)[1::2]
    assert images.shape[0] == 4 and not images.is_contiguous()
    grad_out = torch.randn(40, 65, 4, device=device).permute(2, 1, 0)  # (4, 65, 40), non-contiguous
    inputs = [images, weight, bias, cls_token, pos_embed]
    out, grads = forward_and_grads(fused.patch_embed, inputs, grad_out)
    ref, ref_grads = forward_and_grads(reference.patch_embed, [t.double() for t in inputs], grad_out.double())
    for name, a, b in zip(["tokens", *NAMES], [out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)
    again, grads_again = forward_and_grads(fused.patch_embed, inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip([out, *grads], [again, *grads_again]))


# ---------------------------------------------------------------------------------------------
# The patch embedding's fake (meta) implementations check what the C++ op checks.



def _patch_embed_inputs(device="cpu", image=8, patch=4, dim=6):
    n = (image // patch) ** 2
    images = torch.randn(2, 3, image, image, device=device)
    weight = torch.randn(dim, 3, patch, patch, device=device)
    return images, weight, torch.randn(dim, device=device), torch.randn(1, 1, dim, device=device), \
        torch.randn(1, n + 1, dim, device=device)


def test_patch_embed_fake_refuses_mixed_devices():
    images, weight, bias, cls_token, pos_embed = _patch_embed_inputs()
    with pytest.raises(RuntimeError, match="weight is on meta but images are on cpu"):
        torch.ops.vit_fast.patch_embed(images, weight.to("meta"), bias, cls_token, pos_embed)


def test_patch_embed_fake_refuses_images_not_a_multiple_of_the_patch():
    from torch._subclasses.fake_tensor import FakeTensorMode

    images, weight, bias, cls_token, pos_embed = _patch_embed_inputs()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (torch.randn(2, 3, 9, 9), weight, bias, cls_token, pos_embed)]
        with pytest.raises(RuntimeError, match=r"image size \(9, 9\) must be a multiple of the patch size 4"):
            torch.ops.vit_fast.patch_embed(*fake)
    # The real op refuses the same input with the same words.
    with pytest.raises(RuntimeError, match=r"image size \(9, 9\) must be a multiple of the patch size 4"):
        torch.ops.vit_fast.patch_embed(torch.randn(2, 3, 9, 9), weight, bias, cls_token, pos_embed)


@pytest.mark.parametrize("bad", ["bias", "cls_token", "pos_embed", "dtype"])
def test_patch_embed_fake_checks_shapes_and_dtypes_like_the_real_op(bad):
    images, weight, bias, cls_token, pos_embed = _patch_embed_inputs()
    args = dict(images=images, weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed)
    if bad == "dtype":
        args["bias"] = bias.double()
    else:
        args[bad] = torch.randn(*[s + 1 if i == len(args[bad].shape) - 1 else s
                                  for i, s in enumerate(args[bad].shape)])
    with pytest.raises(RuntimeError) as real:
        torch.ops.vit_fast.patch_embed(*args.values())
    meta = {k: v.to("meta") for k, v in args.items()}
    with pytest.raises(RuntimeError) as fake:
        torch.ops.vit_fast.patch_embed(*meta.values())
    # The same words name the same mistake (C++ prints sizes and dtypes in its own notation).
    assert str(fake.value).split()[:4] == str(real.value).split()[:4]
    assert str(fake.value).split()[1] == ("bias" if bad == "dtype" else bad)


def test_patch_embed_backward_fakes_check_grad_out():
    images, weight, *_ = _patch_embed_inputs()
    bad_grad = torch.randn(2, 4, 6, device="meta")  # 5 tokens expected (4 patches + class token)
    # Whichever gradients are asked for: the parameters' only, the images' only, all of them.
    for needs in ([False, True, True, True, True], [True, False, False, False, False], [True] * 5):
        with pytest.raises(RuntimeError, match=r"grad_out must have shape \(2, 5, 6\), got \(2, 4, 6\)"):
            torch.ops.vit_fast.patch_embed_backward(bad_grad, images.to("meta"), weight.to("meta"), needs)


# ----------------------------------------------------------------------------------------------
# Compiled kernels: sm_80 and sm_90 code without local memory or stack frames, compute_90 PTX
# (needs an nvcc build, not a GPU)
# ----------------------------------------------------------------------------------------------

KERNELS = [
    "patch_embed_forward_kernel",
    "patch_embed_backward_images_kernel",
    "patch_embed_weight_grad_partial_kernel",
    "patch_embed_weight_grad_reduce_kernel",
    "patch_embed_column_sum_partial_kernel",
    "patch_embed_column_sum_finish_kernel",
]
KERNEL_DTYPES = ["f", "6__half", "13__nv_bfloat16"]  # Itanium mangling of the template argument


def built_with_cuda() -> bool:
    """Whether vit_fast._C registered CUDA kernels, i.e. was compiled WITH_CUDA by nvcc."""
    return fused.extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "vit_fast::patch_embed", "CUDA"
    )


requires_cuda_build = pytest.mark.skipif(
    not built_with_cuda(), reason="vit_fast._C was built for the CPU only (no nvcc found, or VIT_FAST_CPU_ONLY=1)"
)


def find_cuobjdump() -> str | None:
    import triton

    candidates = [
        shutil.which("cuobjdump"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
        "/usr/local/cuda/bin/cuobjdump",
        # The triton wheel ships one; it reads the fatbinary without a GPU or a toolkit.
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"),
    ]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def cuobjdump(*args: str) -> str:
    """stdout of cuobjdump *args on the built vit_fast._C."""
    tool = find_cuobjdump()
    assert tool, "cuobjdump not found on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin or the triton wheel"
    import vit_fast._C

    return subprocess.run([tool, *args, vit_fast._C.__file__], capture_output=True, text=True, check=True).stdout


def parse_resource_usage(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """cuobjdump -res-usage output -> {arch: {mangled function: {REG: .., STACK: .., LOCAL: .., ...}}}."""
    usage: dict[str, dict[str, dict[str, int]]] = {}
    arch = function = None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"arch = (sm_\d+)", line):
            arch = m.group(1)
            usage.setdefault(arch, {})
        elif m := re.match(r"Function (\S+):", line):
            function = m.group(1)
        elif function and arch and line.startswith("REG:"):
            usage[arch][function] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d\])?):(\d+)", line)}
            function = None
    return usage


@requires_cuda_build
def test_compiled_kernels_no_local_memory_or_stack():
    # LOCAL counts spills and local arrays, STACK the frame of calls (a 64-bit division is a call):
    # both are per-thread memory traffic that the kernels are written to avoid. Every SASS image
    # is checked: sm_80 and sm_90 always, sm_100 / sm_120 when the build's nvcc supported them.
    usage = parse_resource_usage(cuobjdump("-res-usage"))
    for arch in ("sm_80", "sm_90"):
        assert arch in usage, f"no {arch} code in vit_fast._C (found {sorted(usage)})"
    for arch, functions in usage.items():
        for kernel in KERNELS:
            for dtype in KERNEL_DTYPES:
                matches = [f for f in functions if f"{len(kernel)}{kernel}I{dtype}E" in f]
                assert len(matches) == 1, f"{arch}: expected one {kernel}<{dtype}>, found {matches}"
                stats = functions[matches[0]]
                assert stats["LOCAL"] == 0 and stats["STACK"] == 0, (
                    f"{arch} {kernel}<{dtype}> uses local memory or a stack frame: {stats}"
                )
        expected = len(KERNELS) * len(KERNEL_DTYPES)
        assert len(functions) == expected, f"{arch}: unexpected kernels {sorted(functions)}"


@requires_cuda_build
def test_compiled_extension_embeds_ptx():
    # compute_90 PTX next to the SASS: a GPU newer than every SASS image JIT-compiles it instead of
    # failing with "no kernel image is available for execution on the device".
    listing = cuobjdump("--list-ptx")
    assert re.search(r"PTX file\s+\d+: \S+\.sm_90\.ptx", listing), f"no compute_90 PTX in vit_fast._C:\n{listing}"
