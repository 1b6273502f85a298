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
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(out_ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the fused result"
    err = max_abs_diff(out, out_ref)
    err_pt = max_abs_diff(out_pt, out_ref)
    assert err <= 2 * err_pt + atol, (
        f"{name}: fused max error {err:.3e} vs reference-in-same-dtype error {err_pt:.3e} "
        f"(allowed {2 * err_pt + atol:.3e})"
    )


def default_device() -> torch.device:
    """CUDA when present, else the CPU (where Triton kernels run in Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
