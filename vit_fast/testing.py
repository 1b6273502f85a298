"""Helpers shared by the parity tests and the benchmarks' correctness smoke runs."""

from __future__ import annotations

import torch
from torch import Tensor


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_parity(out: Tensor, out_pt: Tensor, out_ref: Tensor, atol: float = 1e-5, name: str = "output") -> None:
    """The parity rule of every fused op's 16-bit tests (the rule of FlashAttention's own tests).

    One fixed tolerance cannot serve fp16 and bf16 at every shape: loose enough for bf16, it
    would pass a broken fp16 kernel. So the fused error is judged against the error the same
    math makes when computed in the same low precision.

    ``out`` is the fused result, ``out_pt`` the reference computed in the same low precision,
    ``out_ref`` the reference in fp32 or fp64. The fused result may be at most twice as far from
    ``out_ref`` as the low-precision reference is, plus a small absolute slack.
    """
    _check_finite_and_shape(out, out_ref, name)
    err = max_abs_diff(out, out_ref)
    err_pt = max_abs_diff(out_pt, out_ref)
    assert err <= 2 * err_pt + atol, (
        f"{name}: fused max error {err:.3e} vs reference-in-same-dtype error {err_pt:.3e} "
        f"(allowed {2 * err_pt + atol:.3e})"
    )


def _check_finite_and_shape(out: Tensor, out_ref: Tensor, name: str) -> None:
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(out_ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the fused result"


def _scale(out_ref: Tensor, name: str) -> float:
    """max|reference|, which must be positive: against an all-zero reference a relative bound is
    zero wide and a parity bound is only the other reference's error, so the test has no teeth."""
    scale = out_ref.abs().max().item() if out_ref.numel() else 0.0
    assert scale > 0, f"{name}: the reference is all zero (max|ref| = {scale}); the comparison would have no teeth"
    return scale


def assert_close_relative(out: Tensor, out_ref: Tensor, rel: float, name: str = "output") -> None:
    """max|out - out_ref| <= rel * max|out_ref|: a tolerance that scales with each tensor.

    An absolute tolerance passes a tensor that is all wrong whenever the tensor is smaller than
    the tolerance (an all-zero gradient of a parameter whose gradient is below 1e-3 passes
    ``atol=1e-3``); with ``rel < 1`` a zeroed or sign-flipped result always fails.
    """
    if not 0 < rel < 1:
        raise ValueError(f"rel must be in (0, 1) for the bound to reject an all-zero result, got {rel}")
    _check_finite_and_shape(out, out_ref, name)
    scale = _scale(out_ref, name)
    err = max_abs_diff(out, out_ref)
    assert err <= rel * scale, (
        f"{name}: max error {err:.3e} exceeds {rel:g} x max|reference| = {rel * scale:.3e}"
    )


def assert_parity_relative(out: Tensor, out_pt: Tensor, out_ref: Tensor, rel: float, name: str = "output") -> None:
    """The parity rule with its slack relative to the tensor: the fused result ``out`` may be at
    most twice as far from ``out_ref`` (fp32/fp64) as ``out_pt`` (the reference in the same low
    precision as ``out``) is, plus ``rel * max|out_ref|``.

    The bound must stay below max|out_ref| itself, or an all-zero ``out`` would pass: when the
    same-precision reference is that far off, the comparison says nothing and this fails rather
    than pass vacuously.
    """
    if not 0 < rel < 1:
        raise ValueError(f"rel must be in (0, 1) for the bound to reject an all-zero result, got {rel}")
    _check_finite_and_shape(out, out_ref, name)
    scale = _scale(out_ref, name)
    err = max_abs_diff(out, out_ref)
    err_pt = max_abs_diff(out_pt, out_ref)
    allowed = 2 * err_pt + rel * scale
    assert allowed < scale, (
        f"{name}: the same-precision reference is off by {err_pt:.3e} of max|reference| {scale:.3e}, so the "
        f"parity bound {allowed:.3e} would accept an all-zero result; compare against a more precise baseline"
    )
    assert err <= allowed, (
        f"{name}: fused max error {err:.3e} vs reference-in-same-dtype error {err_pt:.3e} "
        f"(allowed 2 x that + {rel:g} x max|reference| {scale:.3e} = {allowed:.3e})"
    )


def default_device() -> torch.device:
    """CUDA when present, else the CPU (where Triton kernels run in Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def devices() -> list[torch.device]:
    """Devices for a test's ``device`` parametrization: the CPU always (Triton kernels in the
    interpreter, the patch embedding in the extension's C++ twin), then CUDA when present. A GPU
    test body that also runs on the CPU has its setup, shapes and tolerances proven on machines
    without a GPU, before a GPU ever runs it."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def assert_compiled_matches_eager(module: torch.nn.Module, x: Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """``torch.compile(module, fullgraph=True)`` gives the eager output, and the eager gradients of
    the input and of every parameter (through ``out.square().sum()``): our custom ops must be
    opaque, traceable nodes for Dynamo, forward and backward."""
    torch._dynamo.reset()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def run(fn):
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi)
        grads = torch.autograd.grad(out.float().square().sum(), [xi, *(p for _, p in named)])
        return out.detach(), grads

    out_eager, grads_eager = run(module)
    out_compiled, grads_compiled = run(torch.compile(module, fullgraph=True))
    torch.testing.assert_close(out_compiled, out_eager, rtol=rtol, atol=atol)
    for name, c, e in zip(["input", *(n for n, _ in named)], grads_compiled, grads_eager):
        torch.testing.assert_close(c, e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"gradient of {name}: {m}")
