"""vit_fast.aot itself: the ahead-of-time compile path that every kernel's resource test uses."""

import pytest

from vit_fast.aot import SHARED_MEMORY_LIMIT, KernelLaunch, compile_launches

pytest.importorskip("triton", reason="Triton is needed to compile kernels ahead of time")


def test_compile_launches_reads_resources_for_both_targets():
    sig = dict(X="*fp16", RES="*fp16", W="*fp16", B="*fp16", Y="*fp16", S="*fp16", Mean="*fp32", Rstd="*fp32",
               stride_xm="i32", stride_resm="i32", stride_ym="i32", stride_sm="i32", M="i32", N="i32", eps="fp32")
    consts = dict(stride_xn=1, stride_resn=1, HAS_RESIDUAL=True, BLOCK_M=4, BLOCK_N=256, BF16_RNE_IN_SOFTWARE=False)
    launch = KernelLaunch("vit_fast.kernels.layernorm", "layer_norm_fwd_kernel", sig, consts, ("X", "RES", "Y"))
    results = compile_launches([launch, launch])  # duplicates compile once
    assert [r.capability for _, r in results] == [80, 90]
    for _, r in results:
        assert r.name == "layer_norm_fwd_kernel" and 0 < r.registers <= 255
        assert r.spill_bytes == 0 and r.fits_shared_memory
    assert SHARED_MEMORY_LIMIT[90] > SHARED_MEMORY_LIMIT[80]


def test_compile_errors_are_reported():
    bad = KernelLaunch("vit_fast.kernels.layernorm", "layer_norm_fwd_kernel", {"X": "*fp16"}, {})
    with pytest.raises(RuntimeError, match="ahead-of-time compilation failed"):
        compile_launches([bad])
