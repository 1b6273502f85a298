"""The GPU-time estimate from SASS (vit_fast.gpu_time, vit_fast.sass, vit_fast.gpu_work): the loop
parser on a hand-written listing, hand-checkable estimates of small kernels compiled here, every
loop of every Triton launch of the default fused step declared, and the JSON of the CLI.

Compiling needs no GPU (vit_fast.aot's child process); profiles are cached on disk, so a second
run only reads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
import triton
import triton.language as tl

from vit_fast import cost, gpu_time, gpu_work, sass
from vit_fast.aot import compile_launches, launch_from_args

H100 = gpu_time.GPUS["H100"]


@triton.jit
def copy_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=mask), mask=mask)


@triton.jit
def loop_kernel(X, Y, T, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    for t in range(T):  # a few FLOPs per element in registers, T times
        x = x * 1.0001 + 0.5
    tl.store(Y + offs, x)


_TOY_WORK = {
    "copy_kernel": lambda a, grid: [gpu_work.ProgramClass(grid[0], {})],
    "loop_kernel": lambda a, grid: [gpu_work.ProgramClass(grid[0], {"for t": a["T"]})],
}


@pytest.fixture
def toy(monkeypatch):
    """The toy kernels' program work declared, and this directory importable by the compiling
    child process (which imports a kernel by its module's name)."""
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    for name, work in _TOY_WORK.items():
        monkeypatch.setitem(gpu_work.PROGRAM_WORK, name, work)


def _toy_kernel(fn, n: int, block: int, extra: dict, flops: int = 0) -> cost.Kernel:
    x, y = torch.empty(n, device="meta"), torch.empty(n, device="meta")
    args = {"X": x, "Y": y, **extra}
    spec = launch_from_args(fn, args, {"BLOCK": block}, num_warps=4, num_stages=3)
    grid = (triton.cdiv(n, block),)
    return cost.Kernel(4 * n, 4 * n, flops, name=fn.fn.__name__, grid=grid, spec=spec,
                       args={**extra, "BLOCK": block})


def test_copy_kernel_memory_bound_when_big_and_launch_bound_when_tiny(toy):
    big = _toy_kernel(copy_kernel, 2**26, 1024, {"N": 2**26})
    tiny = _toy_kernel(copy_kernel, 1024, 1024, {"N": 1024})
    profiles = gpu_time.sass_profiles([big, tiny], H100.capability)
    e = gpu_time.estimate_kernel(big, H100, profiles[big.spec.key])
    memory_us = 2 * 4 * 2**26 / H100.bandwidth * 1e6  # bytes / bandwidth, by hand
    assert e.bound == "memory"
    assert e.memory_us == pytest.approx(memory_us) and e.floor_us == pytest.approx(memory_us)
    assert e.us == pytest.approx(memory_us + H100.graph_launch_s * 1e6)
    t = gpu_time.estimate_kernel(tiny, H100, profiles[tiny.spec.key])
    assert t.bound == "launch" and t.programs == 1
    assert t.us < 2 * H100.graph_launch_s * 1e6


def _sass_loops(text: str) -> list[tuple[int, int]]:
    """(start, end) of each backward branch in raw nvdisasm text, read independently of vit_fast.sass."""
    labels, branches, pending = {}, [], []
    for line in text.splitlines():
        if re.match(r"^\.L_x_\d+:", line.strip()):
            pending.append(line.strip()[:-1])
        m = re.match(r"^\s*/\*([0-9a-f]+)\*/\s+(.*);", line)
        if m:
            address = int(m.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            target = re.search(r"BRA `\((\.L_x_\d+)\)", m.group(2))
            if target:
                branches.append((address, target.group(1)))
    return [(labels[t], a) for a, t in branches if labels[t] < a]


def _opcodes(text: str, start: int, end: int) -> list[str]:
    ops = []
    for line in text.splitlines():
        m = re.match(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)", line)
        if m and start <= int(m.group(1), 16) <= end:
            ops.append(m.group(3))
    return ops


def test_loop_kernel_terms_follow_the_hand_formula_and_scale_with_trips(toy):
    programs, block = 66, 1024  # one program per SM or fewer: one wave, one CTA per SM
    # Neither trip count a multiple of 16, so both launches are one specialisation.
    kernels = {t: _toy_kernel(loop_kernel, programs * block, block, {"T": t}) for t in (1001, 2002)}
    assert kernels[1001].spec.key == kernels[2002].spec.key  # T is a run-time argument: one compile
    (spec, resources), = compile_launches([kernels[1001].spec], (H100.capability,), sass=True)
    prof, _ = gpu_time.sass_profiles([kernels[1001]], H100.capability)[spec.key]

    # What the SASS shows, counted from the raw listing: ptxas unrolls the loop (a main loop of u
    # source iterations per pass, then a remainder loop of one); u = FFMAs of the main / remainder.
    raw = sorted(_sass_loops(resources.sass), key=lambda se: se[1] - se[0])
    assert len(raw) == len(prof.loops) >= 1
    main_ops = _opcodes(resources.sass, *raw[-1])
    unroll = main_ops.count("FFMA") // _opcodes(resources.sass, *raw[0]).count("FFMA") if len(raw) > 1 else 1
    main = next(lp for lp in prof.loops if not lp.remainder)
    assert main.label == "for t" and main.unroll == unroll
    assert main.per_iteration() == pytest.approx(len(main_ops) / unroll)

    n, straight = main.per_iteration(), prof.straight["instructions"]
    estimates = {t: gpu_time.estimate_kernel(k, H100, (prof, resources)) for t, k in kernels.items()}
    rate = H100.sms * H100.schedulers_per_sm * H100.clock_hz * H100.issue_efficiency
    for t, e in estimates.items():
        assert e.issue_us == pytest.approx(programs * 4 * (straight + n * t) / rate * 1e6)
        # One warp per scheduler; no barrier, mma or load in the loop: an iteration is its issue time.
        per_iteration = max(n / H100.issue_efficiency, n)
        cycles = straight + H100.global_load_latency_cycles + t * per_iteration
        assert e.latency_us == pytest.approx(cycles / H100.clock_hz * 1e6)
        assert e.loops[[lp["label"] for lp in e.loops].index("for t")]["trips"] == [t]
    base_issue = programs * 4 * straight / rate * 1e6
    assert estimates[2002].issue_us - base_issue == pytest.approx(2 * (estimates[1001].issue_us - base_issue))
    base_latency = (straight + H100.global_load_latency_cycles) / H100.clock_hz * 1e6
    assert estimates[2002].latency_us - base_latency == pytest.approx(2 * (estimates[1001].latency_us - base_latency))


_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/                   ISETP.NE.AND P0, PT, R3, RZ, PT ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
        /*0060*/                   LDG.E R5, desc[UR4][R6.64] ;
        /*0070*/               @P1 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
"""


def test_sass_loop_parser_on_a_hand_written_nested_loop():
    instructions = sass.parse_sass(_LISTING)
    assert [i.address for i in instructions] == list(range(0, 0xA0, 0x10))
    loops = sass.find_loops(instructions)
    assert [(lp.start, lp.end) for lp in loops] == [(0x10, 0x70), (0x20, 0x50)]  # outer, inner
    assert loops[1].parent is loops[0] and loops[0].children == [loops[1]]
    prof = sass.profile(_LISTING, "toy", 90, None)
    outer, inner = prof.loops
    assert (outer.depth, inner.depth, inner.parent) == (0, 1, 0)
    assert inner.own["instructions"] == 4 and inner.own["mma"] == 1 and inner.own["barrier"] == 1
    assert inner.own["mma_flops"] == 2 * 16 * 8 * 16
    assert outer.own["instructions"] == 3 and outer.own["global_load"] == 1  # the inner loop's not counted
    assert prof.straight["instructions"] == 3  # MOV, EXIT and the trap (a self-branch is no loop)


@pytest.fixture(scope="module")
def fused_step():
    return cost.account_step_as_trained("vit-cifar", 128, "fused")


@pytest.mark.parametrize("gpu", ["H100", "A100"])
def test_every_loop_of_the_default_fused_step_is_declared(fused_step, gpu):
    """Every SASS loop of every Triton launch of the default step has a source label and trips in
    vit_fast.gpu_work (or is the remainder of an unrolled declared loop): a kernel edit that adds
    a loop fails here rather than being mis-estimated."""
    spec = gpu_time.GPUS[gpu]
    kernels = [k for acc in fused_step.phases.values() for k in acc.kernels if k.spec is not None]
    names = {k.name for k in kernels}
    assert {"linear_fwd_kernel", "linear_bwd_kernel", "gelu_bwd_kernel", "attention_fwd_kernel",
            "attention_bwd_dkdv_kernel", "layer_norm_fwd_kernel", "layer_norm_bwd_kernel",
            "cross_entropy_fwd_kernel", "augment_policy_kernel", "augment_finish_kernel"} <= names
    profiles = gpu_time.sass_profiles(kernels, spec.capability)
    seen = set()
    for k in kernels:
        if k.spec.key in seen:
            continue
        seen.add(k.spec.key)
        prof, _ = profiles[k.spec.key]
        classes = gpu_work.program_work(k.name, k.args, k.grid)
        declared = set().union(*(c.trips for c in classes))
        for lp in prof.loops:
            assert lp.label is not None, f"{k.spec.describe()}: a loop at {lp.start:#x} has no source label"
            assert lp.label in declared, f"{k.spec.describe()}: loop {lp.label!r} has no declared trips"
        e = gpu_time.estimate_kernel(k, spec, profiles[k.spec.key])
        assert e.undeclared_loops == [] and e.us > 0


def test_cli_json_has_the_estimate(tmp_path, capsys):
    out = tmp_path / "cost.json"
    cost.main(["--backends", "torch", "fused", "--json", str(out), "--top", "3", "--estimate-top", "5"])
    text = capsys.readouterr().out
    assert "GPU-time estimate" in text and "not a timing" in text and "linear_bwd_kernel" in text
    data = json.loads(out.read_text())
    assert "backends" in data and "roofline" in data["backends"]["fused"]  # the account's keys stay
    for backend in ("torch", "fused"):
        for name in ("H100 SXM", "A100 SXM"):
            e = data["estimate"][backend][name]
            assert e["total_ms"] == pytest.approx(sum(e["phase_ms"].values()))
            assert 0 < e["forward_backward_ms"] < e["total_ms"]
            assert len(e["kernels"]) == data["backends"][backend]["launches"]
            for k in e["kernels"]:
                assert {"name", "grid", "us", "floor_us", "launch_us", "bound"} <= set(k)
                assert k["bound"] in ("memory", "tensor", "issue", "latency", "launch")
                assert k["us"] >= k["floor_us"] + k["launch_us"] - 1e-9
    fused = data["estimate"]["fused"]["H100 SXM"]
    assert fused["kernels"][0]["us"] == max(k["us"] for k in fused["kernels"])


def test_every_hardware_figure_has_a_source():
    fields = {f.name for f in dataclasses.fields(gpu_time.GPUSpec)} - {"name", "capability"}
    assert fields == set(gpu_time.SOURCES)
    assert all(len(text) > 20 for text in gpu_time.SOURCES.values())
