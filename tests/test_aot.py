"""vit_fast.aot itself: the ahead-of-time compile path that every kernel's resource test uses."""

import pytest

import sys
import types

from vit_fast import aot
from vit_fast.aot import SHARED_MEMORY_LIMIT, KernelLaunch, KernelResources, compile_launches, resident_ctas

pytest.importorskip("triton", reason="Triton is needed to compile kernels ahead of time")


def _layer_norm_launch() -> KernelLaunch:
    """The fused add+LayerNorm forward launch as its launcher builds it (fp16, width 256): built by
    the op's own builder, so the signature cannot drift from the kernel's."""
    import torch

    from vit_fast.fused import layernorm

    launches = layernorm.aot_launches(64, 256, torch.float16, residual=True)
    return next(launch for launch in launches if launch.kernel == "layer_norm_fwd_kernel")


def test_compile_launches_reads_resources_for_both_targets():
    launch = _layer_norm_launch()
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


def test_resident_ctas_follow_the_sm_limits():
    """The occupancy arithmetic, worked by hand from SM_LIMITS (64K registers, 164 / 228 KB shared
    memory, 32 blocks, 2048 threads per SM), 1 KB reserved per block and 256-register warp units."""
    def resources(capability, registers, shared):
        return KernelResources("k", capability, registers, spill_bytes=0, stack_bytes=0, shared_bytes=shared)

    # 52 registers round up to 56: 1792 per warp, 36 warps, 9 CTAs of 4 warps.
    assert resident_ctas(resources(80, 52, 2048), num_warps=4) == (9, "registers")
    # 24 registers would allow 21 CTAs of 4 warps; 2048 threads allow 16.
    assert resident_ctas(resources(90, 24, 2048), num_warps=4) == (16, "threads")
    # 100 KB + 1 KB reserved: one per sm_80 SM (164 KB), two per sm_90 SM (228 KB).
    assert resident_ctas(resources(80, 32, 100 * 1024), num_warps=4) == (1, "shared")
    assert resident_ctas(resources(90, 32, 100 * 1024), num_warps=4) == (2, "shared")
    # One-warp CTAs with few registers: the 32-block limit binds.
    assert resident_ctas(resources(80, 16, 0), num_warps=1) == (32, "blocks")


def test_report_prints_one_row_per_configuration_and_target(monkeypatch, capsys):
    """``python -m vit_fast.aot --op <op>`` prints the table of an op's ``aot_every_config()``
    (here a stand-in op with one launch, so the test compiles little); the exit status says
    whether anything spilled."""
    module = types.ModuleType("_aot_report_stand_in")
    module.aot_every_config = lambda: [_layer_norm_launch()]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(aot.REPORT_OPS, "stand_in", module.__name__)
    assert aot.main(["--op", "stand_in"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kernel", "dtype", "tiles", "warps", "stages", "sm", "REG", "SHARED", "LOCAL",
                                "STACK", "CTAs/SM"]
    # The tiles cell holds spaces ("M=4 N=256"): read the other cells from the end.
    rows = [line.split() for line in lines[1:3]]
    assert [row[0] for row in rows] == ["layer_norm_fwd_kernel"] * 2
    assert [row[-7] for row in rows] == ["sm_80", "sm_90"]
    assert all(row[-4] == "0" and row[-3] == "0" and int(row[-2]) > 0 for row in rows)  # LOCAL, STACK, CTAs
    assert "spilling (LOCAL or STACK > 0): 0" in lines[3]


def test_int64_tensors_become_i64_pointers():
    """Class labels reach kernels as int64 tensors (the cross-entropy's): "*i64", aligned like floats."""
    import torch

    from vit_fast.fused import cross_entropy

    forward = cross_entropy.aot_launches(128, 100, torch.bfloat16, soft=False)[0]
    assert forward.signature["Labels"] == "*i64" and "Labels" in forward.divisible_by_16
