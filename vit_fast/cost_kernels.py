"""Recording a step's kernels into a cost account: the bytes, FLOPs and casts of each dispatched
aten operator, and of each ``vit_fast`` custom-op call the kernels its module's ``launch_plan``
makes on a GPU (the C++ patch embedding: ``patch_embed.kernel_count``). ``CostRecorder`` is the
dispatch mode that does it; ``vit_fast.cost``'s docstring says what is counted and how.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .cost_account import CostAccount, Kernel

# Allocation-only or bookkeeping operators: no kernel reads or writes memory for them.
_FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
             "_local_scalar_dense", "copy_", "_unsafe_view", "is_same_size", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type", "set_"}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    name = kernel_name(launch)
    a = launch.args
    if name == "linear_fwd_kernel":
        return 2 * a["M"] * a["N"] * a["K"]
    if name == "gelu_bwd_kernel":  # dY W2, and the pre-activation recomputed
        return 2 * a["M"] * a["N"] * (a["K_OUT"] + a["K_IN"])
    if name == "linear_bwd_kernel":  # dY^T X of each of its layers, and dY W for the input gradient
        c = launch.constexprs
        products = [(a["N"], a["K"])] * (c["LAYERS"] >= 1) + [(a["N2"], a["K2"])] * (c["LAYERS"] == 2)
        return 2 * a["M"] * sum(n * k for n, k in products + [(a["NX"], a["KX"])] * c["HAS_DX"])
    if name == "weight_grad_reduce_kernel":  # the slices' partials summed: one add per partial after the first
        return (a["slices"] - 1) * a["part_size"]
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
        return Kernel(tensor_bytes(args[1]), tensor_bytes(args[0]), _numel(args[0]), _is_cast(name, args, []),
                      name=name)
    read = sum(tensor_bytes(t) for t in _tensors((args, kwargs)))
    mutated = _tensors([a for a, arg in zip(args, func._schema.arguments)
                        if arg.alias_info is not None and arg.alias_info.is_write])
    mutated_ids = {id(t) for t in mutated}
    outs = [t for t in _tensors(out) if id(t) not in mutated_ids]
    written = sum(tensor_bytes(t) for t in mutated) + sum(tensor_bytes(t) for t in outs)
    return Kernel(read, written, aten_flops(name, args, mutated + outs), _is_cast(name, args, outs), name=name)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _view_key(t: torch.Tensor) -> tuple:
    return _storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def kernel_name(launch) -> str:
    """The ``@triton.jit`` function's name of a planned launch (compiled or interpreted)."""
    return getattr(launch.kernel, "__name__", "") or getattr(getattr(launch.kernel, "fn", None), "__name__", "")


def launch_identity(launch) -> dict:
    """Which launch a planned Triton ``Launch`` is, as ``Kernel`` fields: its kernel's name, grid,
    ``vit_fast.aot.KernelLaunch`` (what ``vit_fast.gpu_time`` compiles) and its arguments, a
    tensor by its shape (what ``vit_fast.gpu_work`` reads each program's work from)."""
    from .aot import kernel_launch

    args = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in launch.args.items()}
    return {"name": kernel_name(launch), "grid": tuple(int(g) for g in launch.grid), "spec": kernel_launch(launch),
            "args": {**args, **{k: v for k, v in launch.constexprs.items() if isinstance(v, (int, float, str))}}}


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
            self.kernels.append(Kernel(read, written, launch_flops(launch, written_elements),
                                       **launch_identity(launch)))
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
        parts = [("forward", patch_embed.kernel_count(op, batch, patches), _tensors(args),
                  sum(map(tensor_bytes, outs)))]
    else:  # (grad_out (B, N + 1, D), images, weight, needs)
        grad_out, images, weight, needs = args
        batch, patches, dim = grad_out.shape[0], grad_out.shape[1] - 1, weight.shape[0]
        param_elements = weight.numel() + dim + dim + (patches + 1) * dim  # weight, bias, cls_token, pos_embed
        images_only, params_only = (True, False, False, False, False), (False, True, True, True, True)
        parts = [("backward_images", patch_embed.kernel_count(op, batch, patches, images_only), [grad_out, weight],
                  images.numel() * images.element_size())] if needs[0] else []
        if any(needs[1:]):
            parts.append(("backward_params", patch_embed.kernel_count(op, batch, patches, params_only),
                          [grad_out, images, weight], param_elements * weight.element_size()))
    kernels = []
    for part, n, read, written in parts:
        if n:  # named patch_embed_<part>, the part's further kernels patch_embed_<part>_<i>
            kernels += [Kernel(sum(map(tensor_bytes, read)), written, 2 * batch * patches * weight.numel(),
                               name=f"patch_embed_{part}")]
            kernels += [Kernel(0, 0, 0, name=f"patch_embed_{part}_{i}") for i in range(2, n + 1)]
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
        self.phase_name = ""

    @contextlib.contextmanager
    def phase(self, name: str):
        outer, outer_name = self.account, self.phase_name
        self.account, self.phase_name = self.phases.setdefault(name, CostAccount()), name
        try:
            yield
        finally:
            self.account, self.phase_name = outer, outer_name

    def _charge(self, key: str, kernels: list[Kernel]) -> None:
        for k in kernels:
            k.phase = self.phase_name
        self.account.charge(key, kernels)

    def record(self, func, args, kwargs, out) -> None:
        ns, name = func.namespace, func.overloadpacket.__name__
        if ns == "vit_fast":
            self._charge(f"{ns}::{name}", custom_op_kernels(func, args, kwargs, out))
            return
        kernel = _aten_kernel(func, args, kwargs, out)
        if kernel is not None:
            self._charge(f"{ns}::{name}", [kernel])
