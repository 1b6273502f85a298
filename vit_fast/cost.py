"""A per-step cost account: kernels launched, dtype casts, bytes moved, FLOPs and host syncs of one
training step, per phase, with a roofline estimate per GPU.

    python -m vit_fast.cost                       # the step `python -m vit_fast.train` runs, every backend
    python -m vit_fast.cost --mixup 0.8 --cutmix 1.0 --json cost.json
    python -m vit_fast.cost --pure                # fp32 forward, backward and AdamW only (the old account)

The step as trained (the default) is built by the training CLI's own code (``vit_fast.train``'s
``parse_args`` with its defaults, ``vit_fast.run.setup``, ``vit_fast.step``'s
``epoch_batches``/``next_batch`` and ``train_step``):
a batch drawn by ``DeviceLoader`` with its augmentation (crop, flip; mixup/cutmix when asked),
forward under bf16 autocast, the label-smoothed loss, backward, gradient clipping, AdamW as
``make_optimizer`` builds it and the learning-rate update of ``LRSchedule``. Its four phases are
``step_mod.PHASES``: data, forward_backward, clip, optimizer. The dataset is synthetic data of the
preset's image size and class count (what the data phase does does not depend on the pixels).

What is counted, per phase and per operator:

- launches: a dispatched aten operator counts once (views and allocations are free). A ``vit_fast``
  custom op counts as the kernels its launcher issues at that shape: each Triton op's module (found
  through ``vit_fast.fused.registry``) is asked for its ``launch_plan`` of the call, on the call's
  fake arguments and outputs, for a GPU (``Target(interpret=False, device_type="cuda",
  multiprocessors=132)``), the very function its real implementation runs; any torch operators
  the plan issues (a copy of a strided input) are recorded like any other; the C++ patch embedding
  is asked ``patch_embed.kernel_count``.
- bytes: every kernel reads each distinct tensor it is handed once and writes each output once
  (no cache reuse between kernels; what a kernel re-reads internally is ignored). For a Triton
  launch a tensor argument is written when it is the op's own (not one of its inputs) and no
  earlier kernel of the op wrote it; otherwise it is read. A tensor made inside a custom op and
  read by three of its kernels is read three times, as on the GPU.
- casts: standalone dtype conversions (``aten._to_copy``, or ``copy_`` between floating dtypes),
  kernels of their own that a fused kernel would have folded into its loads or stores.
- FLOPs: products from their shapes (mm, addmm, bmm, baddbmm, convolution and its backward,
  scaled-dot-product attention, our GEMM and attention kernels); anything else one per element written.
- host syncs: ``vit_fast.syncs.count_host_syncs`` over the same step.
- custom-op calls: Python-level calls of ``vit_fast`` ops (each costs a Python dispatch).

It runs on fake tensors (no data, no compute): any preset and batch size, every backend, in
seconds on a CPU; fake tensors need no GPU and no Triton interpreter.

A CPU stands in for the GPU; where that changes the account:

- autocast follows torch's CPU op lists, not CUDA's. Both run the matrix products (linear, addmm,
  mm, bmm, baddbmm, matmul, convolution, scaled_dot_product_attention) in bf16, which is where
  this model's casts come from. CUDA's also forces layer_norm, softmax and log_softmax to fp32
  (checked on this torch: under CUDA autocast a bf16 input comes out fp32, under CPU autocast
  bf16). So on CUDA the torch backend casts each LayerNorm's input up and its output back down
  for the next product (about four more casts per LayerNorm over forward and backward: some 76
  for vit-cifar, not in this account). The reference backend writes LayerNorm and softmax out in
  fp32 itself, and the fused backend calls no autocast-listed op but the products, so their casts
  are CUDA's.
- scaled-dot-product attention runs ``_scaled_dot_product_flash_attention_for_cpu``; CUDA's
  flash or memory-efficient kernels have the same inputs and outputs (one launch forward, one
  backward), so launches and bytes match.
- torch's foreach paths (``clip_grad_norm_``) refuse fake tensors by type; the account lets them
  through (``_foreach_on_fake_tensors``), so clipping runs ``_foreach_norm``/``_foreach_mul_`` as
  on a GPU. A multi-tensor operator (those two, ``_fused_adamw_``) counts once, where CUDA
  launches one kernel per chunk of its tensor lists.
- host syncs: no device-to-host or pageable host-to-device copy can happen on a CPU; the counter
  still sees every scalar read, tensor built from host data and data-dependent shape, which is
  where syncs come from (``vit_fast.syncs``).
- the LayerNorm backward's partial-sum grid follows the GPU's rule, 4 programs per multiprocessor
  of an H100 SXM (132): an A100's 108 would move a few kB less of fp32 partial sums.

The roofline estimate is a model, not a timing: per kernel max(FLOPs / peak, bytes / bandwidth)
on the named GPU (bf16 dense tensor-core peak for every kernel, so an fp32 product is modelled
too fast), summed ("graph": the step replayed from a CUDA graph), plus, for an uncaptured step
("eager"), host time of LAUNCH_OVERHEAD_S per launch and CUSTOM_OP_CALL_S per custom-op call
(their comments say where the figures come from). The sum is what the estimate reports; a step
with no host sync lets the host run ahead of the GPU, so max(host, graph) is the optimistic
bound. ``benchmarks/bench_train.py`` measures the step on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .cli import UsageError, errors_handled
from .config import BACKENDS, PRESETS, get_preset
from .paths import check_output_file
from .recipes import RECIPES

# Allocation-only or bookkeeping operators: no kernel reads or writes memory for them.
_FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
             "_local_scalar_dense", "copy_", "_unsafe_view", "is_same_size", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type", "set_"}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Host time per kernel launch of an uncaptured step, an assumption of this model: PyTorch's eager
# dispatch of one operator from Python (argument parsing, dispatcher, allocator) measured 3.5 us
# for a tiny CPU op on this project's development machine (its kernel included), and a GPU launch
# adds cudaLaunchKernel's 1-2 us; a GPU also needs a few microseconds between dependent small
# kernels. A CUDA graph replays all of a step's launches for one.
LAUNCH_OVERHEAD_S = 5e-6
# Extra host time of a Python-level custom-op call (torch.library's Python dispatch around the
# op's body): measured 17 us over its body's own ops on the same machine, assumed 15 us.
CUSTOM_OP_CALL_S = 15e-6


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # bf16 dense tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s


GPUS = {
    "H100": GPU("H100 SXM", 989e12, 3.35e12),
    "A100": GPU("A100 SXM", 312e12, 2.0e12),
}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (an expanded, stride-0 dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _numel(t: torch.Tensor) -> int:
    return tensor_bytes(t) // t.element_size()


def _is_view(func) -> bool:
    """True for operators whose outputs alias an input without writing it (view, transpose, ...)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


@dataclass
class Kernel:
    """One kernel launch: what the roofline is summed over."""

    bytes_read: int
    bytes_written: int
    flops: int
    cast: bool = False


@dataclass
class OpCost:
    launches: int = 0  # kernels
    calls: int = 0  # dispatches of the operator (for a custom op: Python-level calls)
    casts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flops: int = 0


@dataclass
class CostAccount:
    ops: dict[str, OpCost] = field(default_factory=lambda: defaultdict(OpCost))
    kernels: list[Kernel] = field(default_factory=list)

    def charge(self, key: str, kernels: list[Kernel]) -> None:
        cost = self.ops[key]
        cost.calls += 1
        for k in kernels:
            cost.launches += 1
            cost.casts += k.cast
            cost.bytes_read += k.bytes_read
            cost.bytes_written += k.bytes_written
            cost.flops += k.flops
        self.kernels.extend(kernels)

    def _sum(self, name: str) -> int:
        return sum(getattr(c, name) for c in self.ops.values())

    @property
    def launches(self) -> int:
        return self._sum("launches")

    @property
    def casts(self) -> int:
        return self._sum("casts")

    @property
    def bytes(self) -> int:
        return self._sum("bytes_read") + self._sum("bytes_written")

    @property
    def flops(self) -> int:
        return self._sum("flops")

    @property
    def custom_op_calls(self) -> int:
        return sum(c.calls for k, c in self.ops.items() if not k.startswith("aten::"))

    def host_s(self) -> float:
        """Modelled host time of an uncaptured step: LAUNCH_OVERHEAD_S per kernel, CUSTOM_OP_CALL_S
        more per custom-op call."""
        return len(self.kernels) * LAUNCH_OVERHEAD_S + self.custom_op_calls * CUSTOM_OP_CALL_S

    def roofline_s(self, gpu: GPU, captured: bool) -> float:
        """Modelled seconds: per kernel max(FLOPs / peak, bytes / bandwidth), summed, plus the host
        time (``host_s``) unless the step is replayed from a CUDA graph."""
        t = sum(max(k.flops / gpu.peak_flops, (k.bytes_read + k.bytes_written) / gpu.bandwidth) for k in self.kernels)
        return t + (0.0 if captured else self.host_s())

    def summary(self) -> dict:
        return {"launches": self.launches, "casts": self.casts, "bytes": self.bytes, "flops": self.flops,
                "custom_op_calls": self.custom_op_calls}

    def to_dict(self) -> dict:
        ops = sorted(self.ops.items(), key=lambda kv: -(kv[1].bytes_read + kv[1].bytes_written))
        return {**self.summary(), "ops": {k: vars(v) for k, v in ops}}


def merge(accounts: list[CostAccount]) -> CostAccount:
    total = CostAccount()
    for acc in accounts:
        for key, c in acc.ops.items():
            t = total.ops[key]
            for name, value in vars(c).items():
                setattr(t, name, getattr(t, name) + value)
        total.kernels.extend(acc.kernels)
    return total


# ----------------------------------------------------------------------------- FLOPs


def _mm_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    """2 M N K per product of (..., M, K) x (..., K, N)."""
    batch = math.prod(a.shape[:-2]) if a.dim() > 2 else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


def aten_flops(name: str, args: tuple, outs: list[torch.Tensor]) -> int:
    """FLOPs of an aten operator from its shapes; one per element written for the rest."""
    if name in ("mm", "bmm"):
        return _mm_flops(args[0], args[1])
    if name in ("addmm", "baddbmm"):
        return _mm_flops(args[1], args[2])
    if name == "convolution":  # 2 x outputs x (in_channels / groups) x kernel area
        w = args[1]
        return 2 * _numel(outs[0]) * math.prod(w.shape[1:])
    if name == "convolution_backward":  # the input and the weight gradients, each as much as the forward
        grad_out, w = args[0], args[2]
        return 2 * 2 * _numel(grad_out) * math.prod(w.shape[1:])
    if name.startswith("_scaled_dot_product") and "attention" in name:
        backward = "backward" in name  # (grad_out, q, k, ...) rather than (q, k, ...)
        q, k = (args[1], args[2]) if backward else (args[0], args[1])
        fwd = 4 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]  # Q K^T and P V
        return fwd * 5 // 2 if backward else fwd  # backward: S recomputed, dV, dP, dQ, dK
    return sum(_numel(t) for t in outs)


def launch_flops(launch, written_elements: int) -> int:
    """FLOPs of a planned Triton launch: our GEMM and attention kernels from their arguments,
    one per element written for the rest."""
    name = getattr(launch.kernel, "__name__", "") or getattr(getattr(launch.kernel, "fn", None), "__name__", "")
    a = launch.args
    if name == "linear_fwd_kernel":
        return 2 * a["M"] * a["N"] * a["K"]
    if name == "gelu_bwd_kernel":  # dY W2, and the pre-activation recomputed
        return 2 * a["M"] * a["N"] * (a["K_OUT"] + a["K_IN"])
    if name == "linear_bwd_kernel":  # dY^T X of each of its layers, and dY W for the input gradient
        c = launch.constexprs
        products = [(a["N"], a["K"])] * (c["LAYERS"] >= 1) + [(a["N2"], a["K2"])] * (c["LAYERS"] == 2)
        return 2 * a["M"] * sum(n * k for n, k in products + [(a["NX"], a["KX"])] * c["HAS_DX"])
    if name.startswith("attention_") and "Q" in a:
        per_product = 2 * math.prod(a["Q"].shape[:-1]) * a["N_CTX"] * a["HEAD_DIM"]  # one N x N x D product
        if name == "attention_fwd_kernel":
            return 2 * per_product
        if name == "attention_bwd_dkdv_kernel":  # S, dP, dV, dK (+ dQ when fused)
            return (5 if launch.constexprs.get("FUSE_DQ") else 4) * per_product
        if name == "attention_bwd_dq_kernel":  # S, dP, dQ
            return 3 * per_product
    return written_elements


# ----------------------------------------------------------------------------- recording


def _is_cast(name: str, args: tuple, outs: list[torch.Tensor]) -> bool:
    if name == "_to_copy":
        return bool(outs) and args[0].dtype in _FLOATS and outs[0].dtype in _FLOATS and args[0].dtype != outs[0].dtype
    if name == "copy_":
        return args[0].dtype in _FLOATS and args[1].dtype in _FLOATS and args[0].dtype != args[1].dtype
    return False


def _aten_kernel(func, args, kwargs, out) -> Kernel | None:
    """The kernel of one dispatched aten operator, or None for views, allocations and metadata."""
    name = func.overloadpacket.__name__
    if func.namespace in ("prim", "profiler"):  # metadata queries, profiler markers
        return None
    if name in _FREE_OPS or _is_view(func):
        if not (name == "copy_" and args[0].shape):
            return None
    if name == "copy_":  # a real copy into a buffer: read source, write destination
        return Kernel(tensor_bytes(args[1]), tensor_bytes(args[0]), _numel(args[0]), _is_cast(name, args, []))
    read = sum(tensor_bytes(t) for t in _tensors((args, kwargs)))
    mutated = _tensors([a for a, arg in zip(args, func._schema.arguments)
                        if arg.alias_info is not None and arg.alias_info.is_write])
    mutated_ids = {id(t) for t in mutated}
    outs = [t for t in _tensors(out) if id(t) not in mutated_ids]
    written = sum(tensor_bytes(t) for t in mutated) + sum(tensor_bytes(t) for t in outs)
    return Kernel(read, written, aten_flops(name, args, mutated + outs), _is_cast(name, args, outs))


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _view_key(t: torch.Tensor) -> tuple:
    return _storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


class _Planner:
    """The kernels of one custom-op call on fake tensors: aten operators its plan issues, then its
    Triton launches (``launch_plan``'s), in that order."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        self.inputs = {_storage_key(t) for t in inputs}
        self.written: set[int] = set()
        self.kernels: list[Kernel] = []
        self.launches: list = []  # launch_plan()'s list, drained in order
        self.drained = 0
        # Storages are told apart by identity: keep the op's outputs alive so that none is freed and
        # its identity reused by a later allocation while the op is planned (launches hold theirs).
        self.alive: list[torch.Tensor] = []

    def drain(self) -> None:
        for launch in self.launches[self.drained:]:
            read = written = written_elements = 0
            seen = set()
            for t in launch.args.values():
                if not isinstance(t, torch.Tensor) or _view_key(t) in seen:
                    continue  # an unused pointer argument is another argument passed again
                seen.add(_view_key(t))
                s = _storage_key(t)
                if s not in self.inputs and s not in self.written:
                    written += tensor_bytes(t)
                    written_elements += _numel(t)
                    self.written.add(s)
                else:
                    read += tensor_bytes(t)
            self.kernels.append(Kernel(read, written, launch_flops(launch, written_elements)))
        self.drained = len(self.launches)

    def aten(self, kernel: Kernel, outs: list[torch.Tensor]) -> None:
        self.drain()
        self.kernels.append(kernel)
        self.written.update(_storage_key(t) for t in outs)
        self.alive.extend(outs)


class _KernelMode(TorchDispatchMode):
    """A dispatch mode that hands each operator to ``record``; with ``decompose``, composite operators
    are decomposed first."""

    decompose = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Inside a custom op called from the fake mode, composite operators (matmul, to) reach the
        # mode whole (the fake mode's python dispatcher is on); decomposed, they arrive as the
        # kernels they run (mm, _to_copy). The step itself reaches the mode decomposed already.
        if (self.decompose and func.namespace == "aten"
                and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")):
            with self:  # the mode is off inside its own dispatch: the pieces must reach it again
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out

    def record(self, func, args, kwargs, out) -> None:
        raise NotImplementedError


class _InnerRecorder(_KernelMode):
    decompose = True

    def __init__(self, planner: _Planner) -> None:
        super().__init__()
        self.planner = planner

    def record(self, func, args, kwargs, out) -> None:
        kernel = _aten_kernel(func, args, kwargs, out)
        if kernel is not None:
            self.planner.aten(kernel, _tensors(out))


def _patch_embed_kernels(op: str, args: tuple, outs: list[torch.Tensor]) -> list[Kernel]:
    """The C++ patch embedding has no launch objects to plan: its kernel count comes from
    ``patch_embed.kernel_count``, its bytes from the boundary of each of its parts (inputs read,
    outputs written) and its FLOPs from the projection (2 per patch, output channel and weight
    element), all charged to each part's first kernel. The forward is one part; the backward has
    two, each run only when needed: the image gradient (reads grad_out and the weight, writes the
    images' gradient) and the parameter gradients (reads grad_out, the images and the weight,
    writes all four: the unwanted ones are computed, then dropped)."""
    from .fused import patch_embed

    if op == "patch_embed":  # (images, weight, bias, cls_token, pos_embed) -> (B, N + 1, D)
        weight, tokens = args[1], outs[0].shape[1]
        batch, patches = args[0].shape[0], tokens - 1
        parts = [(patch_embed.kernel_count(op, batch, patches), _tensors(args), sum(map(tensor_bytes, outs)))]
    else:  # (grad_out (B, N + 1, D), images, weight, needs)
        grad_out, images, weight, needs = args
        batch, patches, dim = grad_out.shape[0], grad_out.shape[1] - 1, weight.shape[0]
        param_elements = weight.numel() + dim + dim + (patches + 1) * dim  # weight, bias, cls_token, pos_embed
        images_only, params_only = (True, False, False, False, False), (False, True, True, True, True)
        parts = [(patch_embed.kernel_count(op, batch, patches, images_only), [grad_out, weight],
                  images.numel() * images.element_size())] if needs[0] else []
        if any(needs[1:]):
            parts.append((patch_embed.kernel_count(op, batch, patches, params_only), [grad_out, images, weight],
                          param_elements * weight.element_size()))
    kernels = []
    for n, read, written in parts:
        if n:
            kernels += [Kernel(sum(map(tensor_bytes, read)), written, 2 * batch * patches * weight.numel())]
            kernels += [Kernel(0, 0, 0) for _ in range(n - 1)]
    return kernels


# The GPU a custom op's launches are planned for: no interpreter, CUDA arithmetic, and an H100
# SXM's 132 multiprocessors (the LayerNorm backward's grid follows them).
GPU_TARGET_MULTIPROCESSORS = 132


def _bound_args(func, args: tuple, kwargs: dict) -> tuple:
    """The call's arguments in its schema's order, defaults filled in."""
    bound = list(args)
    for arg in func._schema.arguments[len(args):]:
        bound.append(kwargs[arg.name] if arg.name in kwargs else arg.default_value)
    return tuple(bound)


def custom_op_kernels(func, args: tuple, kwargs: dict, out=None) -> list[Kernel]:
    """The kernels one call of the ``vit_fast`` op ``func`` issues on a GPU at these shapes, asked
    of its module's ``launch_plan`` (see the module docstring); ``out`` is the call's output (fake
    tensors; computed by the op's fake implementation when not given)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from .fused.launch import Target
    from .fused.registry import OPS

    name = func.overloadpacket.__name__
    entry = next((op for op in OPS if name in op.op_names), None)
    if entry is None or entry.kind != "triton":
        return _patch_embed_kernels(name, args, _tensors(out))
    module = importlib.import_module(entry.module)
    target = Target(interpret=False, device_type="cuda", multiprocessors=GPU_TARGET_MULTIPROCESSORS)
    # The plan is built on fake tensors (on their device, so device-keyed code such as
    # torch.autocast(x.device.type) behaves as it would): its torch operators compute nothing.
    fake = next((t.fake_mode for t in _tensors((args, kwargs, out)) if isinstance(t, FakeTensor)), None)
    entered = contextlib.nullcontext(fake) if fake is not None else FakeTensorMode(allow_non_fake_inputs=True)
    with entered as mode:
        if fake is None:
            args, kwargs, out = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                                         (args, kwargs, out))
        if out is None:
            out = func(*args, **kwargs)  # the op's fake implementation
        planner = _Planner(_tensors((args, kwargs)))
        with _InnerRecorder(planner):
            planner.launches = module.launch_plan(name, _bound_args(func, args, kwargs), tuple(_tensors(out)), target)
    planner.drain()
    return planner.kernels


class CostRecorder(_KernelMode):
    """Records every dispatched operator into a CostAccount: ``with CostRecorder(acc): ...``.

    ``phases`` (optional) maps a phase name to its account; ``phase(name)`` switches to it."""

    def __init__(self, account: CostAccount, phases: dict[str, CostAccount] | None = None) -> None:
        super().__init__()
        self.account = account
        self.phases = phases

    @contextlib.contextmanager
    def phase(self, name: str):
        outer = self.account
        self.account = self.phases.setdefault(name, CostAccount())
        try:
            yield
        finally:
            self.account = outer

    def record(self, func, args, kwargs, out) -> None:
        ns, name = func.namespace, func.overloadpacket.__name__
        if ns == "vit_fast":
            self.account.charge(f"{ns}::{name}", custom_op_kernels(func, args, kwargs, out))
            return
        kernel = _aten_kernel(func, args, kwargs, out)
        if kernel is not None:
            self.account.charge(f"{ns}::{name}", [kernel])


@contextlib.contextmanager
def _foreach_on_fake_tensors():
    """Let torch's foreach paths take fake tensors as they take real ones: ``clip_grad_norm_``
    (foreach=None) checks ``type(t)`` against a list of plain tensor types, so on fake tensors it
    would fall back to one norm and one multiply per parameter, a path no real device runs."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _foreach_utils

    types = [*_foreach_utils._foreach_supported_types, FakeTensor]
    with mock.patch.object(_foreach_utils, "_foreach_supported_types", types):
        yield


def _fake_parameters(model: torch.nn.Module, fake_mode) -> None:
    for module in model.modules():  # real (small) weights -> fake tensors of the same shapes
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(fake_mode.from_tensor(param.detach()),
                                                              requires_grad=param.requires_grad)


# ----------------------------------------------------------------------------- the pure step


def account_training_step(preset: str, batch_size: int, backend: str, **overrides) -> CostAccount:
    """Operators and bytes of a pure step (--pure): forward, backward, AdamW of ``preset``.

    fp32 parameters and activations, no autocast, no data phase, no clipping; AdamW in its
    multi-tensor (foreach) form; a steady-state step (the optimizer state already exists). The
    model is in training mode with dropout and stochastic depth off, so every backend runs the
    same math.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .model import ViTClassifier

    cfg = get_preset(preset, **overrides)
    account = CostAccount()
    model = ViTClassifier(cfg.replace(dropout=0.0, attn_dropout=0.0, drop_path=0.0), backend=backend)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_parameters(model, fake_mode)
    with fake_mode:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, foreach=True)
        images = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
        labels = torch.randint(cfg.num_classes, (batch_size,))
        model.train()

        def step():
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # the first step allocates the optimizer state; account for a steady-state step
        with CostRecorder(account):
            step()
    return account


# ----------------------------------------------------------------------------- the step as trained


@dataclass
class StepAccount:
    """The account of one training step as ``python -m vit_fast.train`` runs it, per phase."""

    backend: str
    phases: dict[str, CostAccount]  # vit_fast.step.PHASES, in order
    syncs: dict[str, int]  # distinct host syncs per phase
    amp: bool = True

    @property
    def total(self) -> CostAccount:
        return merge(list(self.phases.values()))

    def roofline(self) -> dict:
        """Modelled milliseconds per GPU: {gpu: {"graph": ms, "eager": ms}}."""
        total = self.total
        return {key: {"graph_ms": total.roofline_s(gpu, captured=True) * 1e3,
                      "eager_ms": total.roofline_s(gpu, captured=False) * 1e3,
                      "host_ms": total.host_s() * 1e3} for key, gpu in GPUS.items()}

    def to_dict(self) -> dict:
        total = {**self.total.summary(), "host_syncs": sum(self.syncs.values())}
        # The totals also sit at the top, where readers of the pure account's JSON find them.
        return {**total, "amp": self.amp, "total": total,
                "phases": {p: {**a.to_dict(), "host_syncs": self.syncs.get(p, 0)} for p, a in self.phases.items()},
                "roofline": self.roofline()}


def training_args(preset: str, batch_size: int, backend: str, extra: list[str] | tuple[str, ...] = ()):
    """The training CLI's resolved configuration (vit_fast.train.TrainConfig) for ``preset`` at
    ``batch_size`` on a synthetic dataset of the
    preset's image size and class count: every recipe option at its CLI default unless ``extra``
    sets it (e.g. ``["--mixup", "0.8"]``)."""
    from . import train

    cfg = get_preset(preset)
    argv = ["--preset", preset, "--batch-size", str(batch_size), "--backend", backend, "--dataset", "synthetic",
            "--synthetic-classes", str(cfg.num_classes), "--synthetic-size", str(2 * batch_size),
            "--image-size", str(cfg.image_size), "--device", "cpu", "--no-download", *extra]
    return train.parse_args(argv)  # the recipe resolved, as the CLI resolves it


def account_step_as_trained(preset: str = "vit-cifar", batch_size: int = 128, backend: str = "torch",
                            extra: list[str] | tuple[str, ...] = ()) -> StepAccount:
    """The account of one steady-state training step as the CLI runs it (see the module docstring).

    ``setup`` builds the run on the CPU; its parameters, optimizer (``make_optimizer``), schedule
    (``make_schedule``), non-finite watch and loader tensors are then made fake, rebuilt by
    vit_fast.run's own builders where they hold parameters. bf16 autocast is on (the CLI's default on
    CUDA). One step runs un-recorded (the optimizer state is allocated there), the next is recorded.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import distributed as dist_mod
    from . import optim
    from . import run as run_mod
    from . import step as step_mod
    from .syncs import count_host_syncs

    with tempfile.TemporaryDirectory() as out_dir:
        config = training_args(preset, batch_size, backend, [*extra, "--out-dir", out_dir])
        with contextlib.redirect_stdout(io.StringIO()):  # setup's start line
            run = run_mod.setup(config, dist_mod.World(), torch.device("cpu"))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_parameters(run.model, fake_mode)
    loader = run.train_loader
    data = loader.data
    data.images, data.labels = fake_mode.from_tensor(data.images), fake_mode.from_tensor(data.labels)
    for name in ("_mean", "_std", "_classes"):
        setattr(loader, name, fake_mode.from_tensor(getattr(loader, name)))
    run.amp = True
    phases: dict[str, CostAccount] = {p: CostAccount() for p in step_mod.PHASES}
    with fake_mode, _foreach_on_fake_tensors():
        groups = optim.param_groups(run.model, config.weight_decay)
        run.optimizer = optim.make_optimizer(groups, config.lr, (config.beta1, config.beta2), run.device)
        run.scheduler = run_mod.make_schedule(config, run.optimizer, len(run.train_loader))
        run.watch = optim.NonFiniteWatch(run.device)
        run.model.train()
        batches = step_mod.epoch_batches(run, 0)
        step_mod.train_step(run, *step_mod.next_batch(batches))  # allocates the optimizer state
        recorder = CostRecorder(CostAccount(), phases)
        with count_host_syncs() as counter, recorder:
            def phase(name):
                stack = contextlib.ExitStack()
                stack.enter_context(counter.phase(name))
                stack.enter_context(recorder.phase(name))
                return stack

            x, y = step_mod.next_batch(batches, phase)
            step_mod.train_step(run, x, y, phase)
    syncs = {p: counter.counts[p].total if p in counter.counts else 0 for p in step_mod.PHASES}
    outside = counter.total() - sum(syncs.values())
    if outside or recorder.account.launches:
        raise RuntimeError(f"the step ran work outside its phases ({recorder.account.launches} kernels, "
                           f"{outside} host syncs); vit_fast.step.PHASES should cover all of it")
    return StepAccount(backend, phases, syncs)


# ----------------------------------------------------------------------------- output


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f}"


def format_step_table(accounts: dict[str, StepAccount]) -> str:
    """Per backend and phase: launches, casts, custom-op calls, GB moved, GFLOP, host syncs; then
    the roofline model per GPU."""
    lines = [f"{'backend':<10} {'phase':<17} {'launches':>8} {'casts':>6} {'op calls':>8} {'GB moved':>9} "
             f"{'GFLOP':>8} {'syncs':>6}"]
    for name, step in accounts.items():
        rows = [*step.phases.items(), ("total", step.total)]
        for phase, acc in rows:
            syncs = sum(step.syncs.values()) if phase == "total" else step.syncs.get(phase, 0)
            lines.append(f"{name:<10} {phase:<17} {acc.launches:>8d} {acc.casts:>6d} {acc.custom_op_calls:>8d} "
                         f"{_gb(acc.bytes):>9} {acc.flops / 1e9:>8.1f} {syncs:>6d}")
    lines.append("\nroofline model (not a timing): graph = sum over kernels of max(FLOPs/peak, bytes/bandwidth); "
                 f"eager adds {LAUNCH_OVERHEAD_S * 1e6:.0f} us per launch and {CUSTOM_OP_CALL_S * 1e6:.0f} us per "
                 "custom-op call of host time")
    lines.append(f"{'backend':<10} " + " ".join(f"{gpu.name + ' ' + mode:>20}" for gpu in GPUS.values()
                                                 for mode in ("graph ms", "eager ms")))
    for name, step in accounts.items():
        r = step.roofline()
        lines.append(f"{name:<10} " + " ".join(f"{r[key][mode]:>20.3f}" for key in GPUS
                                               for mode in ("graph_ms", "eager_ms")))
    return "\n".join(lines)


def format_table(accounts: dict[str, CostAccount], top: int = 12) -> str:
    lines = []
    base = accounts.get("reference")
    lines.append(f"{'backend':<10} {'launches':>9} {'casts':>6} {'GB moved':>9} {'vs reference':>22}")
    for name, acc in accounts.items():
        rel = f"{acc.launches / base.launches:.2f}x ops, {acc.bytes / base.bytes:.2f}x bytes" if base else ""
        lines.append(f"{name:<10} {acc.launches:>9d} {acc.casts:>6d} {_gb(acc.bytes):>9} {rel:>22}")
    for name, acc in accounts.items():
        lines.append(f"\n{name}: top operators by bytes")
        lines.append(f"  {'operator':<44} {'calls':>6} {'kernels':>8} {'MB read':>10} {'MB written':>11}")
        for op, c in list(acc.to_dict()["ops"].items())[:top]:
            lines.append(f"  {op:<44} {c['calls']:>6d} {c['launches']:>8d} {c['bytes_read'] / 1e6:>10.1f} "
                         f"{c['bytes_written'] / 1e6:>11.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vit_fast.cost",
                                description="Per-step cost account (kernels, casts, bytes, FLOPs, host syncs) "
                                            "of a training step, with a roofline model per GPU")
    p.add_argument("--preset", default="vit-cifar", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="the training recipe (default: the training CLI's default)")
    p.add_argument("--mixup", type=float, default=None, help="override the recipe's mixup Beta(alpha, alpha)")
    p.add_argument("--cutmix", type=float, default=None, help="override the recipe's cutmix Beta(alpha, alpha)")
    p.add_argument("--pure", action="store_true",
                   help="the fp32 forward + backward + AdamW step only (no data, autocast or clipping)")
    p.add_argument("--top", type=int, default=12, help="operators listed per backend")
    p.add_argument("--json", help="write the account here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with errors_handled():  # a UsageError exits 2 (--mixup and --cutmix are checked by the training CLI's rules)
        return _main(args)


def _main(args: argparse.Namespace) -> dict:
    if args.batch_size <= 0 or args.top < 0:
        raise UsageError(f"--batch-size must be positive and --top >= 0, got {args.batch_size} and {args.top}")
    if args.json:  # before the accounts, which take a while
        check_output_file(args.json, "--json")
    if args.pure:
        accounts = {b: account_training_step(args.preset, args.batch_size, b) for b in args.backends}
        print(f"cost account of a pure training step: {args.preset}, batch {args.batch_size}, fp32, AdamW (foreach)")
        print("(a model of memory traffic and launches, not a timing)\n")
        print(format_table(accounts, args.top))
        result = {"preset": args.preset, "batch_size": args.batch_size, "step": "pure", "dtype": "float32",
                  "backends": {b: a.to_dict() for b, a in accounts.items()}}
    else:
        extra = [f"--{name}={value}" for name, value in (("recipe", args.recipe), ("mixup", args.mixup),
                                                          ("cutmix", args.cutmix)) if value is not None]
        trained = training_args(args.preset, args.batch_size, "torch", extra)  # what the step runs
        args.recipe, args.mixup, args.cutmix = trained.recipe, trained.mixup, trained.cutmix
        steps = {b: account_step_as_trained(args.preset, args.batch_size, b, extra) for b in args.backends}
        print(f"cost account of the training step as trained: {args.preset}, batch {args.batch_size}, "
              f"bf16 autocast, recipe {args.recipe} (mixup {args.mixup}, cutmix {args.cutmix}, "
              f"clip {trained.clip_grad}, drop-path {trained.drop_path})")
        print("(a model of memory traffic, launches and host syncs, not a timing; CPU autocast stands in "
              "for CUDA's: see `python -c 'import vit_fast.cost; help(vit_fast.cost)'`)\n")
        print(format_step_table(steps))
        print(format_table({b: s.total for b, s in steps.items()}, args.top))
        result = {"preset": args.preset, "batch_size": args.batch_size, "step": "as_trained",
                  "recipe": args.recipe, "mixup": args.mixup, "cutmix": args.cutmix, "launch_overhead_s": LAUNCH_OVERHEAD_S,
                  "custom_op_call_s": CUSTOM_OP_CALL_S,
                  "gpus": {k: vars(g) for k, g in GPUS.items()},
                  "backends": {b: s.to_dict() for b, s in steps.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
