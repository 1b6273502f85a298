"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, with no GPU present.

The third of the checks every kernel passes, after parity with ``vit_fast.reference`` and with
the PyTorch built-ins (both run in Triton's interpreter, no GPU needed): the interpreter runs a
kernel's arithmetic but not its code generation. Compiling every configuration a launcher can
pick for sm_80 (A100) and sm_90 (H100) catches what only the compiler sees (block shapes,
``tl.dot`` minimum sizes, dtype rules), and reading the cubin's resource usage with the
``cuobjdump`` shipped in the triton wheel tells registers, spills (LOCAL) and shared memory per
kernel.

The fused ops build their launches as ``vit_fast.fused.launch.Launch`` objects and run them;
``kernel_launch`` turns one into the ``KernelLaunch`` compiled here. The dependency goes this
way only: running an op never imports this module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from vit_fast.cli import errors_handled
from vit_fast.fused.launch import Launch, environment_without_interpreter
from vit_fast.fused.registry import OPS

# Maximum dynamic shared memory one block may use (CUDA programming guide, "Compute capabilities").
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)


@dataclass(frozen=True)
class SMLimits:
    """What one streaming multiprocessor holds at once, for the resident-CTA count of a kernel."""

    registers: int  # 32-bit registers per SM
    shared_bytes: int  # shared memory per SM (the carve-out at its largest)
    blocks: int  # resident blocks (CTAs) per SM
    threads: int  # resident threads per SM


# CUDA C++ Programming Guide, "Compute Capabilities", table "Technical Specifications per Compute
# Capability", columns 8.0 (A100) and 9.0 (H100): 64K registers, 164 KB / 228 KB shared memory,
# 32 blocks and 2048 threads per SM.
SM_LIMITS = {80: SMLimits(64 * 1024, 164 * 1024, 32, 2048), 90: SMLimits(64 * 1024, 228 * 1024, 32, 2048)}
# The same guide: of each SM's shared memory, 1 KB per resident block is reserved for system use
# (why a block may use 163 KB of sm_80's 164 KB). CUDA Occupancy Calculator: registers are
# allocated per warp in units of 256 (a thread's count rounded up to a multiple of 8).
RESERVED_SHARED_PER_BLOCK = 1024
REGISTER_ALLOCATION_UNIT = 256


@dataclass(frozen=True)
class KernelResources:
    name: str
    capability: int
    registers: int  # per thread
    spill_bytes: int  # LOCAL memory per thread: non-zero means registers spilled
    stack_bytes: int
    shared_bytes: int  # shared memory the launch requests (static + dynamic)
    # The cubin's disassembly (``nvdisasm -c -gi``: SASS with source lines), when asked for
    # (``compile_launches(..., sass=True)``, for ``vit_fast.gpu_time``); empty otherwise.
    sass: str = field(default="", repr=False, compare=False)

    @property
    def fits_shared_memory(self) -> bool:
        return self.shared_bytes <= SHARED_MEMORY_LIMIT[self.capability]

    @property
    def spills(self) -> bool:
        """Whether registers spilled. ptxas reports spills as LOCAL bytes, and sometimes only as a
        STACK frame; our kernels make no calls and hold no local arrays, so either is a spill."""
        return self.spill_bytes > 0 or self.stack_bytes > 0


def resident_ctas(resources: KernelResources, num_warps: int) -> tuple[int, str]:
    """How many CTAs of a kernel fit on one SM at once, and which limit binds ("registers",
    "shared", "threads" or "blocks"): the occupancy calculator's arithmetic on SM_LIMITS."""
    limits = SM_LIMITS[resources.capability]
    unit = REGISTER_ALLOCATION_UNIT
    registers_per_warp = -(-resources.registers * 32 // unit) * unit
    by_limit = {
        "registers": limits.registers // registers_per_warp // num_warps,
        "shared": limits.shared_bytes // (resources.shared_bytes + RESERVED_SHARED_PER_BLOCK),
        "threads": limits.threads // (32 * num_warps),
        "blocks": limits.blocks,
    }
    binding = min(by_limit, key=by_limit.get)
    return by_limit[binding], binding


def _nvidia_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}; the triton wheel ships it on Linux x86_64")
    return path


def _cuobjdump() -> str:
    return _nvidia_tool("cuobjdump")


def disassemble(cubin: str) -> str:
    """``nvdisasm -c -gi`` of a cubin file: its SASS, each run of instructions preceded by its
    source line and the chain of inlined calls it came through (``vit_fast.sass`` reads it)."""
    return subprocess.run([_nvidia_tool("nvdisasm"), "-c", "-gi", cubin], capture_output=True, text=True,
                          check=True).stdout


def compile_kernel(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, object],
    capability: int,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: tuple[str, ...] | list[str] = (),
    options: dict | None = None,
    sass: bool = False,
) -> KernelResources:
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_<capability>`` and read its resources.

    ``signature`` maps every argument name to a Triton type ("*fp16", "i32", "fp32", ...) or to
    "constexpr"; ``constexprs`` gives the value of each constexpr argument. ``divisible_by_16``
    names the pointer and integer arguments a real launch would see as multiples of 16 (Triton
    specialises on that at launch): without these hints every load compiles scalar and loops are
    not pipelined, and the registers and shared memory read off would be those of a kernel that
    never runs. ``options``: further compile options, as a launch passes them (``Launch.options``).

    Must run outside Triton's interpreter (under it ``@triton.jit`` functions are
    interpreted functions that cannot be compiled): see ``compile_launches``. With ``sass``, the
    result also holds the cubin's disassembly (``disassemble``).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {name: value for name, value in constexprs.items()}
    sig = dict(signature)
    for name in consts:
        sig[name] = "constexpr"
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, **(options or {})},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        cubin = f.name
    try:
        report = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        text = disassemble(cubin) if sass else ""
    finally:
        os.unlink(cubin)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"could not read resource usage of {fn.__name__} from cuobjdump:\n{report}")
    reg, stack, static_shared, local = (int(g) for g in match.groups())
    return KernelResources(
        name=fn.__name__,
        capability=capability,
        registers=reg,
        spill_bytes=local,
        stack_bytes=stack,
        shared_bytes=max(static_shared, int(kernel.metadata.shared)),
        sass=text,
    )


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel configuration as a launcher would run it, in a form that crosses processes.

    Constexpr values that are Triton dtypes are written as strings "tl.float32" etc.
    """

    module: str  # e.g. "vit_fast.kernels.attention"
    kernel: str  # the @triton.jit function's name in that module
    signature: dict = field(hash=False)  # non-constexpr argument name -> Triton type
    constexprs: dict = field(hash=False)
    divisible_by_16: tuple = ()
    num_warps: int = 4
    num_stages: int = 3
    options: dict = field(default_factory=dict, hash=False)  # further compile options (Launch.options)

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return f"{self.kernel}[{consts} warps={self.num_warps} stages={self.num_stages}]"


_POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}
# Data kernels (augment_policy, augment_finish) also take uint8 images, int indices and labels and
# bool flags.
_POINTER_TYPES.update({"uint8": "*u8", "int32": "*i32", "int64": "*i64", "bool": "*i1"})


def _triton_dtype_name(value) -> str:
    """tl.float32 -> "tl.float32": the name under which ``triton.language`` exports the dtype."""
    import triton.language as tl

    for name, candidate in vars(tl).items():
        if isinstance(candidate, tl.dtype) and candidate == value:
            return f"tl.{name}"
    raise ValueError(f"{value!r} is not a dtype exported by triton.language")


def launch_from_args(kernel_fn, args: dict, constexprs: dict, num_warps: int, num_stages: int,
                     options: dict | None = None) -> KernelLaunch:
    """The ``KernelLaunch`` a call ``kernel_fn[grid](**args, **constexprs, num_warps=..., num_stages=...)``
    compiles to, specialised from its concrete arguments the way Triton specialises at launch:

    - tensors become pointers ("*fp16", "*bf16", "*fp32", "*fp64"; "*u8", "*i32", "*i64", "*i1"
      for data kernels' images, indices and flags) marked divisible by 16 when
      16-byte aligned: every torch allocation is, so this reads the view's storage offset (meta
      tensors work, and the k and v views into a packed qkv tensor are judged like real ones);
    - ints equal to 1 become the constexpr 1; other ints are "i32" ("i64" past 32 bits), marked
      divisible by 16 when they are; bools are "i1"; floats are "fp32";
    - Triton dtypes among ``constexprs`` become "tl.<name>" strings, so the launch can cross
      processes (``compile_launches``).

    ``kernel_fn`` is the ``@triton.jit`` function, compiled or interpreted (both keep the Python
    function as ``.fn``), so launchers can describe GPU launches from a test run under
    Triton's interpreter. Without the hints the compiler would build scalar loads and unpipelined
    loops: the resources read off would be those of a kernel no launch runs.
    """
    import torch
    import triton.language as tl

    signature, consts, aligned = {}, {}, []
    for name in kernel_fn.arg_names:  # the kernel's argument order
        if name in constexprs:
            value = constexprs[name]
            consts[name] = _triton_dtype_name(value) if isinstance(value, tl.dtype) else value
            continue
        if name not in args:
            raise ValueError(f"{kernel_fn.fn.__name__}: no value for argument {name!r}")
        value = args[name]
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            if dtype not in _POINTER_TYPES:
                raise TypeError(f"{kernel_fn.fn.__name__}: tensor {name!r} has unsupported dtype {value.dtype}")
            signature[name] = _POINTER_TYPES[dtype]
            if value.storage_offset() * value.element_size() % 16 == 0:
                aligned.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                consts[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(
                f"{kernel_fn.fn.__name__}: cannot specialise argument {name!r} of type {type(value).__name__}"
            )
    unknown = set(args) | set(constexprs)
    unknown -= set(kernel_fn.arg_names)
    if unknown:
        raise ValueError(f"{kernel_fn.fn.__name__} has no arguments {sorted(unknown)}")
    return KernelLaunch(module=kernel_fn.fn.__module__, kernel=kernel_fn.fn.__name__, signature=signature,
                        constexprs=consts, divisible_by_16=tuple(aligned), num_warps=num_warps, num_stages=num_stages,
                        options=dict(options or {}))


def kernel_launch(launch: Launch) -> KernelLaunch:
    """The ``KernelLaunch`` that a fused op's ``Launch`` compiles to on a GPU."""
    return launch_from_args(launch.kernel, launch.args, launch.constexprs, launch.num_warps, launch.num_stages,
                            launch.options)


def kernel_launches(launches: Iterable[Launch]) -> list[KernelLaunch]:
    """``kernel_launch`` of each, distinct ones only (in first-seen order)."""
    return list({k.key: k for k in map(kernel_launch, launches)}.values())


def _compile_launch(launch: KernelLaunch, capability: int, sass: bool = False) -> KernelResources:
    import importlib

    import triton.language as tl

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    consts = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
              for k, v in launch.constexprs.items()}
    return compile_kernel(fn, launch.signature, consts, capability, launch.num_warps, launch.num_stages,
                          launch.divisible_by_16, launch.options, sass)


class CompileError(RuntimeError):
    """The compiling process failed (no Triton, no cuobjdump, a compiler error); the message ends
    with that process's stderr."""


def compile_launches(launches, targets=TARGETS, timeout: float = 1800,
                     sass: bool = False) -> list[tuple[KernelLaunch, KernelResources]]:
    """Compile each distinct launch for each target in a fresh Python process outside Triton's
    interpreter (so this works from a test session that runs the kernels in the interpreter);
    with ``sass``, each result holds the cubin's disassembly too."""
    unique = list({launch.key: launch for launch in launches}.values())
    env = environment_without_interpreter()
    payload = json.dumps({"launches": [asdict(launch) for launch in unique], "targets": list(targets),
                          "sass": sass})
    child = subprocess.run([sys.executable, "-m", "vit_fast.aot", "--child"], input=payload, env=env,
                           capture_output=True, text=True, timeout=timeout)
    if child.returncode != 0:
        raise CompileError(f"ahead-of-time compilation failed:\n{child.stderr[-6000:]}")
    results = json.loads(child.stdout.splitlines()[-1])
    return [(unique[i], KernelResources(**r)) for i, r in results]


def _child_main() -> None:
    payload = json.load(sys.stdin)
    results = []
    for i, d in enumerate(payload["launches"]):
        launch = KernelLaunch(**{**d, "divisible_by_16": tuple(d["divisible_by_16"])})
        for capability in payload["targets"]:
            results.append((i, asdict(_compile_launch(launch, capability, payload.get("sass", False)))))
    print(json.dumps(results))


# The Triton ops of the registry (``vit_fast.fused.registry.OPS``), name -> module: each module
# offers ``aot_every_config()``, every launch its launchers can make, over the dtypes and sizes
# that select a different configuration. (The CUDA C++ op's compiled kernels are checked by
# tests/test_patch_embed.py with cuobjdump.)
REPORT_OPS = {op.name: op.module for op in OPS if op.kind == "triton"}
_REPORT_COLUMNS = ("kernel", "dtype", "tiles", "warps", "stages", "sm", "REG", "SHARED", "LOCAL", "STACK", "CTAs/SM")


def _report_rows(results: list[tuple[KernelLaunch, KernelResources]]) -> list[tuple[str, ...]]:
    tile_names = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_B", "BLOCK_K", "FUSE_DQ", "N_CTX")  # N_CTX: a length of 1 is specialised
    rows = []
    for launch, r in results:
        pointer = next((t for t in launch.signature.values() if t.startswith("*")), "?")
        tiles = " ".join(f"{k.removeprefix('BLOCK_')}={launch.constexprs[k]}" for k in tile_names
                         if k in launch.constexprs)
        # A length that is a multiple of 16 compiles apart (Triton specialises on it): say so.
        tiles += "".join(f" {k}%16=0" for k in ("N_CTX", "M", "N") if k in launch.divisible_by_16)
        ctas, binding = resident_ctas(r, launch.num_warps)
        rows.append((launch.kernel, pointer.lstrip("*"), tiles, str(launch.num_warps), str(launch.num_stages),
                     f"sm_{r.capability}", str(r.registers), str(r.shared_bytes), str(r.spill_bytes),
                     str(r.stack_bytes), f"{ctas} ({binding})"))
    return rows


def report(ops: Iterable[str], targets=TARGETS) -> list[tuple[KernelLaunch, KernelResources]]:
    """Compile every configuration of ``ops`` (keys of REPORT_OPS) for ``targets``, print one table
    row per kernel configuration and target, and return the results."""
    import importlib

    launches = [launch for op in ops for launch in importlib.import_module(REPORT_OPS[op]).aot_every_config()]
    results = compile_launches(launches, targets)
    rows = [_REPORT_COLUMNS, *_report_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_REPORT_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    spilling = [r for _, r in results if r.spills]
    limits = "; ".join(f"sm_{c}: {l.registers // 1024}K registers, {l.shared_bytes // 1024} KB shared, {l.blocks} "
                       f"blocks, {l.threads} threads" for c, l in SM_LIMITS.items())
    print(f"{len(results)} kernel configurations x targets; spilling (LOCAL or STACK > 0): {len(spilling)}. "
          f"CTAs/SM from the per-SM limits ({limits}), {RESERVED_SHARED_PER_BLOCK} B of shared memory reserved "
          f"per CTA, registers allocated per warp in units of {REGISTER_ALLOCATION_UNIT}")
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vit_fast.aot",
        description="Compile every kernel configuration of the fused ops for sm_80 and sm_90 (no GPU needed) "
                    "and print registers, shared memory, LOCAL and STACK bytes and resident CTAs per SM.")
    parser.add_argument("--op", choices=sorted(REPORT_OPS), action="append",
                        help="report this op only (repeatable; default: every op)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # compile_launches' worker
    args = parser.parse_args(argv)
    if args.child:
        _child_main()
        return 0
    with errors_handled(CompileError, subprocess.TimeoutExpired):
        results = report(args.op or sorted(REPORT_OPS))
    return 1 if any(r.spills or not r.fits_shared_memory for _, r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
