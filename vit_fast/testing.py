"""Helpers shared by the parity tests and the benchmarks' correctness smoke runs."""

from __future__ import annotations

import torch
from torch import Tensor


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_parity(out: Tensor, out_pt: Tensor, out_ref: Tensor, atol: float = 1e-5, name: str = "output") -> None:
    """The parity rule of DESIGN.md for low-precision results (the FlashAttention tests' rule).

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
    """CUDA when present, else the CPU (where Triton kernels run under TRITON_INTERPRET=1)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
