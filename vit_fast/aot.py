"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, with no GPU present.

Rung 3 of the verification ladder in DESIGN.md: the interpreter runs a kernel's arithmetic but
not its code generation. Compiling every configuration a launcher can pick for sm_80 (A100) and
sm_90 (H100) catches what only the compiler sees (block shapes, ``tl.dot`` minimum sizes, dtype
rules), and reading the cubin's resource usage with the ``cuobjdump`` shipped in the triton
wheel tells registers, spills (LOCAL) and shared memory per kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# Maximum dynamic shared memory one block may use (CUDA programming guide, "Compute capabilities").
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)


@dataclass(frozen=True)
class KernelResources:
    name: str
    capability: int
    registers: int  # per thread
    spill_bytes: int  # LOCAL memory per thread: non-zero means registers spilled
    stack_bytes: int
    shared_bytes: int  # shared memory the launch requests (static + dynamic)

    @property
    def fits_shared_memory(self) -> bool:
        return self.shared_bytes <= SHARED_MEMORY_LIMIT[self.capability]


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}; the triton wheel ships it on Linux x86_64")
    return path


def compile_kernel(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, object],
    capability: int,
    num_warps: int = 4,
    num_stages: int = 3,
) -> KernelResources:
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_<capability>`` and read its resources.

    ``signature`` maps every argument name to a Triton type ("*fp16", "i32", "fp32", ...) or to
    "constexpr"; ``constexprs`` gives the value of each constexpr argument.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {name: value for name, value in constexprs.items()}
    sig = dict(signature)
    for name in consts:
        sig[name] = "constexpr"
    src = ASTSource(fn, signature=sig, constexprs=consts)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        cubin = f.name
    try:
        report = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
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
    )
