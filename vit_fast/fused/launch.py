"""What every fused Triton op shares at run time: the launch object, the interpreter switch, the
accumulation and dot-precision rules, and the device/dtype checks.

Public API:

    Launch(kernel, grid, args, constexprs, num_warps, num_stages=3, options={})   one planned kernel
                                        launch; .run()
    KernelConfig(block_m, block_n, num_warps, num_stages=3)   one kernel's tiles in an op's config
    interpreting()                      whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1)
    environment_without_interpreter()   os.environ for a child process that must compile, not interpret
    accumulation_dtype(dtype)           torch dtype of accumulators and statistics: fp64 for fp64, else fp32
    tl_accumulation_dtype(dtype)        the same as a Triton dtype (the kernels' ACC_DTYPE constexpr)
    input_precision(dtype)              tl.dot's input precision: "ieee" for fp32/fp64, "tf32" otherwise
    precision_constexprs(dtype)         {"ACC_DTYPE": ..., "INPUT_PRECISION": ...} for a launch
    SUPPORTED_DTYPES                    the floating dtypes every fused Triton op accepts
    check_device(name, t)               a device some kernel can run on: CUDA, or the CPU (interpreter)
    check_launchable(name, t)           check_device, and CPU tensors only under the interpreter
    check_same_device(tensors) / check_same_dtype_device(tensors)
    Target(interpret, device_type, multiprocessors)   where a launch plan runs: what its builders
                                        decide by device; Target.of(t) for the tensor t's device
    meta_tensor(*shape, dtype)          an empty meta tensor: what ahead-of-time and planned launches take
    VIT_CIFAR_TOKENS, planned_samples(rows)   the images (of vit-cifar's 65 tokens) that planned
                                        launches with a per-sample scale divide their rows into
    rows_per_sample_of(x, scale)        token rows per sample of x (..., D) under a per-sample (B,) scale

One builder per kernel launch returns a ``Launch``: the op runs it (``Launch.run``), and the
ahead-of-time compile tests convert the very same object (``vit_fast.aot.kernel_launch``), so what
is compiled ahead of time is what runs. Every fused Triton op module has one public
``launch_plan(op, args, outputs, target) -> list[Launch]``: the launches one call of its registered
op ``op`` makes with these arguments into these outputs on ``target``. Its real implementation
allocates the outputs and runs that plan; ``vit_fast.cost`` asks the same function, on fake tensors,
for a GPU's ``Target``. This module never imports ``vit_fast.aot``: running an op
needs none of the compiler machinery.

The checks are split by where they can run. ``check_device`` and the same-dtype/device checks
read only metadata and are called by the public functions, so they also fire on fake tensors
(``torch.compile``, ``vit_fast.cost``). ``check_launchable`` also asks whether a kernel can run on
this process's Triton: only the real implementations call it, never the fake ones, so an account
built on fake CPU tensors needs no interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vit_fast.config import PRESETS

_INTERPRET_VARIABLE = "TRITON_INTERPRET"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_HINT = ("the fused ops run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before triton "
                "is imported)")


def interpreting() -> bool:
    """Whether Triton runs ``@triton.jit`` functions in its interpreter (on CPU tensors). Triton reads
    the variable when a kernel module is imported; this reads it when asked, so set it before both."""
    return os.environ.get(_INTERPRET_VARIABLE, "0") == "1"


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class Target:
    """Where a launch plan runs: every decision an op's launch builders take by device. A plan for
    a GPU (``vit_fast.cost``'s, on fake tensors) passes it explicitly; a real implementation passes
    ``Target.of`` its tensor."""

    interpret: bool  # Triton's interpreter runs the kernels: its fixed tiles and INTERPRETING work-arounds
    device_type: str  # "cuda" or "cpu": device-dependent arithmetic (augment_finish's torch CUDA division)
    multiprocessors: int  # the GPU's SMs (0 off a GPU): grids sized by the GPU (LayerNorm's backward)

    @classmethod
    def of(cls, t: Tensor) -> Target:
        """The target of a real implementation on ``t``'s device, in this process."""
        if t.device.type == "cuda":
            index = t.device.index if t.device.index is not None else torch.cuda.current_device()
            return cls(interpreting(), "cuda", _multiprocessor_count(index))
        return cls(interpreting(), t.device.type, 0)


def environment_without_interpreter() -> dict[str, str]:
    """A copy of os.environ in which Triton compiles kernels: ``@triton.jit`` functions created
    under the interpreter cannot be compiled, so ahead-of-time compilation runs in a child process."""
    return {k: v for k, v in os.environ.items() if k != _INTERPRET_VARIABLE}


def meta_tensor(*shape: int, dtype: torch.dtype) -> Tensor:
    """An empty tensor of ``shape`` and ``dtype`` on the meta device (metadata, no memory): what the
    ahead-of-time builders (``aot_launches``) hand the launchers.
    A builder with a default dtype binds it: ``functools.partial(meta_tensor, dtype=dtype)``."""
    return torch.empty(shape, dtype=dtype, device="meta")


# Tokens per image of vit-cifar (32 x 32 images in 4 x 4 patches: 64 patches and the class token).
# The ahead-of-time reports size their sequences by it, and planned launches of ops that take
# stochastic depth's per-sample scale divide their token rows into images of this many tokens.
VIT_CIFAR_TOKENS = PRESETS["vit-cifar"].num_tokens


def planned_samples(rows: int) -> tuple[int, int]:
    """(samples, rows_per_sample) of a planned launch over ``rows`` token rows: vit-cifar images of
    VIT_CIFAR_TOKENS tokens, at least one image (fewer rows make one image of every row)."""
    samples = max(1, rows // VIT_CIFAR_TOKENS)
    return samples, rows // samples


def rows_per_sample_of(x: Tensor, scale: Tensor | None) -> int:
    """The rows of x (..., D), flattened to (rows, D), that share one entry of stochastic depth's
    per-sample (B,) ``scale`` (the kernels' ``rows_per_sample``); 1 without a scale."""
    rows = math.prod(x.shape[:-1])
    return rows // scale.shape[0] if scale is not None and scale.shape[0] else 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs accumulate in fp64 (they exist so gradcheck can verify the kernels), others in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulation_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def input_precision(dtype: torch.dtype) -> str:
    """fp32 (and fp64) operands get exact products ("ieee", no TF32 rounding) so fp32 tests can be
    tight; 16-bit operands ignore the setting ("tf32" is Triton's default)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def precision_constexprs(dtype: torch.dtype) -> dict:
    """The ACC_DTYPE and INPUT_PRECISION constexprs of a kernel whose inputs are ``dtype``."""
    return {"ACC_DTYPE": tl_accumulation_dtype(dtype), "INPUT_PRECISION": input_precision(dtype)}


def check_device(name: str, t: Tensor) -> None:
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} is on {t.device}; {_DEVICE_HINT}")


def check_launchable(name: str, t: Tensor) -> None:
    """Real implementations only (fake tensors run no kernel): the tensor's device can run Triton here."""
    check_device(name, t)
    if t.device.type == "cpu" and not interpreting():
        raise ValueError(f"{name} is on the CPU, which cannot run the Triton kernels without the interpreter; "
                         f"{_DEVICE_HINT}")


def _present(tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return present


def check_same_device(tensors: dict[str, Tensor | None]) -> None:
    """All given tensors (None entries are skipped) on one device that a kernel can run on."""
    present = _present(tensors)
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")
    check_device(first_name, first)


def check_same_dtype_device(tensors: dict[str, Tensor | None]) -> None:
    """All given tensors of one supported dtype (the first one's) and on one device."""
    present = _present(tensors)
    first_name, first = next(iter(present.items()))
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name} has dtype {first.dtype}; supported: float16, bfloat16, float32, float64")
    for name, t in present.items():
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "all tensors must have the same dtype")
    check_same_device(present)


@dataclass(frozen=True)
class KernelConfig:
    """One kernel's tiles and launch options, as an op's ``<Op>Config`` (from its ``choose_config``)
    holds them, one per kernel; the op's config says what a tile's rows and columns are."""

    block_m: int  # rows of a tile
    block_n: int  # columns of a tile
    num_warps: int
    num_stages: int = 3  # software-pipelining depth of a loop over tiles; Triton's default


@dataclass
class Launch:
    """One kernel launch as its builder plans it: the op runs it, the ahead-of-time tests compile it."""

    kernel: object  # the @triton.jit function
    grid: tuple  # programs per grid axis
    args: dict  # runtime arguments by name: tensors, ints, floats
    constexprs: dict  # compile-time arguments by name
    num_warps: int
    num_stages: int = 3  # Triton's default on NVIDIA GPUs
    # Further compile options, e.g. {"enable_fp_fusion": False} where a kernel must round every
    # multiply and add as torch's separate kernels do (no FMA contraction).
    options: dict = field(default_factory=dict)

    def run(self) -> None:
        first = next(v for v in self.args.values() if isinstance(v, Tensor))
        # Triton launches on the current CUDA device: make it the tensors' one.
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                                   num_stages=self.num_stages, **self.options)
