"""What each program of a Triton launch does: how many times it runs each loop of its kernel.

The SASS of a kernel (``vit_fast.sass``) says what one iteration of each loop issues; only the
launch's arguments say how many iterations a program runs, and programs of one grid may differ
(``linear_bwd_kernel``: weight-gradient tiles of one or two layers, then input-gradient tiles,
each a branch with its own loop). So every Triton kernel the fused ops launch states its
programs' work here, as a list of ``ProgramClass`` in program-id order (the order a GPU hands
programs to its SMs): how many programs, and per loop the iterations each of them runs in all.

A loop is named by its source (``vit_fast.sass.SourceIndex.loop_label``): the calls from the
kernel down to the ``for`` statement, each callee numbered (``#k``) when its caller calls it
more than once, then ``for <target>``; e.g. ``_weight_grad_tile#2/for m_start`` is the ``for
m_start`` loop of the second ``_weight_grad_tile`` call in ``linear_bwd_kernel``. A nested
loop's count is its iterations per program in all (the outer loop's times the inner's).
tests/test_gpu_time.py checks that every loop in the SASS of every launch of the default step
is declared here, so a kernel edit that adds a loop fails a test instead of being mis-estimated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgramClass:
    programs: int  # programs of the grid that do this work
    trips: dict = field(default_factory=dict)  # loop label -> iterations per program (absent: 0)


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _programs(grid: tuple) -> int:
    return math.prod(int(g) for g in grid)


def _one_class(loops: Callable[[dict], dict]) -> Callable[[dict, tuple], list[ProgramClass]]:
    """A kernel whose programs all run the same loops (``loops(args)`` -> trips)."""
    return lambda a, grid: [ProgramClass(_programs(grid), loops(a))]


def _linear_bwd(a: dict, grid: tuple) -> list[ProgramClass]:
    """Weight-gradient programs of the first layer, of the second (LAYERS == 2), then DX tiles: the
    kernel's own program order (``linear_bwd_kernel``). A layer's weight-gradient programs run
    slice-major (``slices`` slices of ``rows_per_slice`` rows, the last one shorter); in a layer
    with a bias, the tiles of the first column (pid_k == 0) run the bias-summing loop
    (``_weight_grad_rows#1``), the others ``#2``, and without a bias every tile runs ``#3``. Per
    slice the bias tiles are listed before the others (on the GPU they interleave within the
    slice: the list schedule is the same up to that order)."""
    classes, used = [], 0
    slices, per_slice, m, block_m = int(a["slices"]), int(a["rows_per_slice"]), int(a["M"]), int(a["BLOCK_M"])
    layers = [(a["N"], a["K"], a["HAS_BIAS"]), (a["N2"], a["K2"], a["HAS_BIAS2"])][:a["LAYERS"]]
    for layer, (n, k, has_bias) in enumerate(layers, start=1):
        tiles_n, tiles_k = _cdiv(n, a["BLOCK_N"]), max(_cdiv(k, a["BLOCK_K"]), 1)
        for s in range(slices):
            trips = _cdiv(max(0, min(m, (s + 1) * per_slice) - s * per_slice), block_m)
            loop = f"_weight_grad_tile#{layer}/_weight_grad_rows#{{}}/for m_start"
            if has_bias:
                classes.append(ProgramClass(tiles_n, {loop.format(1): trips}))
                classes.append(ProgramClass(tiles_n * (tiles_k - 1), {loop.format(2): trips}))
            else:
                classes.append(ProgramClass(tiles_n * tiles_k, {loop.format(3): trips}))
            used += tiles_n * tiles_k
    if a["HAS_DX"] and _programs(grid) > used:
        classes.append(ProgramClass(_programs(grid) - used,
                                    {"_input_grad_tile/_matmul_tile/for k_start": _cdiv(a["NX"], a["DX_BLOCK_K"])}))
    return classes


def _layer_norm_bwd(a: dict, grid: tuple) -> list[ProgramClass]:
    """Program p reduces rows [p * rows_per_program, min(M, (p + 1) * rows_per_program)) in tiles
    of BLOCK_M; the last programs may have fewer rows or none."""
    per, block, m = int(a["rows_per_program"]), int(a["BLOCK_M"]), int(a["M"])
    counts: dict[int, int] = {}
    for p in range(_programs(grid)):
        rows = max(0, min(m, (p + 1) * per) - p * per)
        counts[_cdiv(rows, block)] = counts.get(_cdiv(rows, block), 0) + 1
    return [ProgramClass(n, {"for tile_start": trips}) for trips, n in counts.items()]


def _augment_finish(a: dict, grid: tuple) -> list[ProgramClass]:
    """Programs (pair, tile): those of tile 0 also write both target rows (when TARGETS)."""
    pairs, tiles = int(grid[0]), int(grid[1]) if len(grid) > 1 else 1
    # Grid order is x fastest: every pair's tile 0 comes first, then tiles 1, 2, ...
    first = {"_target_rows/for k0": _cdiv(a["K"], a["BLOCK_K"])} if a.get("TARGETS") else {}
    return [ProgramClass(pairs, first), ProgramClass(pairs * (tiles - 1), {})]


# The op families of augment_policy_kernel's step (one branch per family runs per step); the
# estimate assumes each family equally likely, so each family's channel loop runs S * C / 6 times
# per program on average (rounded up): the policy draws ops at random per image and step.
_AUGMENT_FAMILIES = ("_geometric", "_blend", "_sharpness", "_pointwise", "_autocontrast", "_equalize")


def _augment_policy(a: dict, grid: tuple) -> list[ProgramClass]:
    steps, channels = int(a["S"]), int(a["C"])
    per_family = _cdiv(steps * channels, len(_AUGMENT_FAMILIES))
    trips = {"for ci": channels, "for s": steps}
    trips.update({f"{family}/for ci": per_family for family in _AUGMENT_FAMILIES})
    return [ProgramClass(_programs(grid), trips)]


# Kernel name -> fn(args, grid) -> [ProgramClass]: ``args`` are the launch's arguments (a tensor by
# its shape) and constexprs, as ``vit_fast.cost_kernels.launch_identity`` records them.
PROGRAM_WORK: dict[str, Callable[[dict, tuple], list[ProgramClass]]] = {
    "linear_fwd_kernel": _one_class(lambda a: {"_matmul_tile/for k_start": _cdiv(a["K"], a["BLOCK_K"])}),
    "gelu_bwd_kernel": _one_class(lambda a: {"for k_start": _cdiv(a["K_OUT"], a["BLOCK_K"]),
                                             "_matmul_tile/for k_start": _cdiv(a["K_IN"], a["BLOCK_K"])}),
    "linear_bwd_kernel": _linear_bwd,
    "weight_grad_reduce_kernel": _one_class(lambda a: {}),  # its slices are unrolled (SLICES constexpr)
    "row_scale_kernel": _one_class(lambda a: {}),
    "attention_fwd_kernel": _one_class(lambda a: {"for start_n": _cdiv(a["N_CTX"], a["BLOCK_N"])}),
    "attention_bwd_preprocess_kernel": _one_class(lambda a: {}),
    "attention_bwd_dkdv_kernel": _one_class(lambda a: {"for start_m": _cdiv(a["N_CTX"], a["BLOCK_M"])}),
    "attention_bwd_dq_kernel": _one_class(lambda a: {"for start_n": _cdiv(a["N_CTX"], a["BLOCK_N"])}),
    "layer_norm_fwd_kernel": _one_class(lambda a: {}),
    "layer_norm_bwd_kernel": _layer_norm_bwd,
    "column_sum_kernel": _one_class(lambda a: {"for p_start": _cdiv(a["P"], a["BLOCK_P"])}),
    "cross_entropy_fwd_kernel": _one_class(lambda a: {"for start": _cdiv(a["B"], a["BLOCK_B"])}),
    "cross_entropy_bwd_kernel": _one_class(lambda a: {}),
    "augment_policy_kernel": _augment_policy,
    "augment_finish_kernel": _augment_finish,
    # The draws: every loop (Philox rounds, policy steps, erasing tries, Gamma proposals) is a
    # static range, unrolled; the noise kernel has none either.
    "augment_draw_kernel": _one_class(lambda a: {}),
    "normal_fill_kernel": _one_class(lambda a: {}),
}


def program_work(name: str, args: dict, grid: tuple) -> list[ProgramClass]:
    """The programs of a launch of kernel ``name`` and the loop iterations each runs."""
    if name not in PROGRAM_WORK:
        raise KeyError(f"no program work declared for Triton kernel {name!r}; add it to "
                       f"vit_fast.gpu_work.PROGRAM_WORK (known: {', '.join(sorted(PROGRAM_WORK))})")
    classes = PROGRAM_WORK[name](args, tuple(grid))
    if sum(c.programs for c in classes) != _programs(grid):
        raise ValueError(f"{name}: the declared program classes cover {sum(c.programs for c in classes)} programs, "
                         f"the grid {tuple(grid)} has {_programs(grid)}")
    return [c for c in classes if c.programs]
