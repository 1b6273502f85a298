"""Count the host syncs of a piece of code, phase by phase, on any device (a CPU is enough).

    from vit_fast.syncs import count_host_syncs

    with count_host_syncs() as counter:
        with counter.phase("data"):
            x, y = next(batches)
        with counter.phase("forward_backward"):
            loss = model(x).sum(); loss.backward()
    counter.counts["data"].total        # 0 when the phase is sync-free
    counter.assert_sync_free("data", "forward_backward")   # AssertionError naming each sync

``counter.phase`` has the signature of ``vit_fast.step.train_step``'s ``phase`` argument, so a
training step can be counted as it runs: ``train_step(run, x, y, phase=counter.phase)``. Code
outside any phase is counted under ``OUTSIDE``. Phases nest; the innermost one is charged.

What counts, per phase (``SyncCounts``):

- ``local_scalar_dense``: ``aten._local_scalar_dense``, what ``.item()``, ``bool(t)``, ``int(t)``,
  ``float(t)`` and ``if t:`` become (and ``aten.is_nonzero``, ``aten.equal``, which return a
  host scalar): the host waits for the device to reach that value.
- ``item``: Python-level reads of a tensor's values (``Tensor.item``, ``tolist``, ``numpy``,
  ``__bool__``, ...), and ``aten.item`` where an op's body calls it. On a CPU tensor ``.tolist()``
  and ``.numpy()`` read memory without any aten op, so only the Python level sees them.
- ``device_to_host``: copies (``aten._to_copy``, ``aten.copy_``) from a non-CPU tensor into a CPU one.
- ``host_to_device_pageable``: copies from a CPU tensor that is not pinned into a non-CPU one
  (blocking: the host waits for the copy).
- ``host_data``: tensors built from host data inside the code (``torch.tensor(list)``,
  ``torch.as_tensor(array)`` reach ``aten.lift_fresh``); on a GPU each is a host-to-device copy.
- ``data_dependent``: ops whose output shape depends on the values (``nonzero``,
  ``masked_select``, ``unique``, ...): on a GPU they read a count back before they can allocate.
- ``total``: distinct syncs. A Python-level read counts once together with the aten ops it runs
  (``.item()`` on a CPU tensor is one ``item`` and one ``local_scalar_dense``, one sync).

How it sees them: a ``TorchDispatchMode`` sees every aten op that reaches the dispatcher,
forward and backward (autograd runs the backward ops through the same mode), on fake, CPU or
CUDA tensors alike; a ``TorchFunctionMode`` sees the Python-level reads. On a CPU the copies
between devices cannot happen, so a CPU run catches scalar reads, host data and data-dependent
shapes, which is where host syncs come from in practice.

The dispatcher runs a custom op's body with both modes switched off. For ops made with
``torch.library.custom_op`` (ours: ``vit_fast::*``) the counter runs the op's Python body itself,
under both modes, so a ``.item()`` or a ``torch.tensor(list)`` inside an op is counted too; an op
implemented in C++ (``vit_fast._C``) is opaque. Triton's interpreter (``TRITON_INTERPRET=1``)
copies kernel arguments through storages and numpy without tensor ops, so it adds no counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from torch import Tensor
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OUTSIDE = "outside"  # the phase charged for code outside any ``counter.phase(...)``

# Tensor methods that hand a tensor's values to the host.
HOST_READS = frozenset({"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__"})

# aten ops whose output size depends on the input's values.
DATA_DEPENDENT_OPS = frozenset({
    "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "bincount", "repeat_interleave", "histc",
})  # fmt: skip

# aten ops that return a tensor's value as a host scalar.
SCALAR_READ_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal"})

_NATIVE_NAMESPACES = ("aten", "prims")


@dataclass
class SyncCounts:
    """Host syncs of one phase, by kind (see the module docstring)."""

    local_scalar_dense: int = 0
    item: int = 0
    device_to_host: int = 0
    host_to_device_pageable: int = 0
    host_data: int = 0
    data_dependent: int = 0
    total: int = 0  # distinct syncs: a Python-level read counts once with the aten ops it runs

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SyncEvent:
    phase: str
    kind: str  # a SyncCounts field name
    what: str  # the op or method, e.g. "aten._local_scalar_dense" or "Tensor.item"


def _tensors(*trees) -> list[Tensor]:
    return [t for t in tree_flatten(trees)[0] if isinstance(t, Tensor)]


class HostSyncCounter:
    """Per-phase host-sync counts; made by ``count_host_syncs``, read after its block."""

    def __init__(self) -> None:
        self.counts: dict[str, SyncCounts] = {}
        self.events: list[SyncEvent] = []
        self._phases: list[str] = []
        self._read_depth = 0  # > 0 while a Python-level read runs: its aten ops belong to it

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the syncs of the block to phase ``name``."""
        self.counts.setdefault(name, SyncCounts())
        self._phases.append(name)
        try:
            yield
        finally:
            self._phases.pop()

    def _record(self, kind: str, what: str, distinct: bool) -> None:
        name = self._phases[-1] if self._phases else OUTSIDE
        counts = self.counts.setdefault(name, SyncCounts())
        setattr(counts, kind, getattr(counts, kind) + 1)
        if distinct:
            counts.total += 1
        self.events.append(SyncEvent(name, kind, what))

    def total(self, *phases: str) -> int:
        """Distinct syncs over ``phases`` (every phase seen when none is named)."""
        names = phases or tuple(self.counts)
        return sum(self.counts[p].total for p in names if p in self.counts)

    def assert_sync_free(self, *phases: str) -> None:
        """AssertionError naming every sync of ``phases`` (all phases when none is named)."""
        names = set(phases or self.counts)
        found = [f"{e.phase}: {e.kind} ({e.what})" for e in self.events if e.phase in names]
        if found:
            raise AssertionError(f"{len(found)} host sync(s): " + "; ".join(found))

    # The two modes call these.

    def _on_aten(self, func, args, kwargs, out) -> None:
        namespace = func.namespace
        name = func.overloadpacket.__name__
        distinct = self._read_depth == 0
        if namespace not in _NATIVE_NAMESPACES:
            return
        if name in SCALAR_READ_OPS:
            self._record("local_scalar_dense", f"aten.{name}", distinct)
        elif name == "item":  # seen as such below autograd, inside a custom op's body
            self._record("item", f"aten.{name}", distinct)
        elif name in DATA_DEPENDENT_OPS:
            self._record("data_dependent", f"aten.{name}", distinct)
        elif name.startswith("lift_fresh"):
            self._record("host_data", f"aten.{name}", distinct)
        elif name in ("_to_copy", "copy_"):
            src = _tensors(args[1] if name == "copy_" else args[0])
            dst = _tensors(out)
            if not src or not dst:
                return
            src_cpu, dst_cpu = src[0].device.type == "cpu", dst[0].device.type == "cpu"
            if not src_cpu and dst_cpu:
                self._record("device_to_host", f"aten.{name}", distinct)
            elif src_cpu and not dst_cpu and not src[0].is_pinned():
                self._record("host_to_device_pageable", f"aten.{name}", distinct)


def _python_impl(func, args) -> Callable | None:
    """The Python body of a ``torch.library.custom_op`` for the device of its tensor arguments, or
    None (an aten op, or an op implemented in C++)."""
    opdef = OPDEFS.get(func._schema.name)
    if opdef is None or func._overloadname != "default":
        return None
    if any(isinstance(t, FakeTensor) for t in _tensors(args)):
        return None  # under a fake mode the op's fake implementation runs, not its body
    devices = {t.device.type for t in _tensors(args)}
    fns = opdef._backend_fns
    device_fn = fns.get(devices.pop()) if len(devices) == 1 else None
    return device_fn or fns.get(None) or opdef._init_fn


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter
        self.function_mode: TorchFunctionMode | None = None  # count_host_syncs sets it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _python_impl(func, args) if func.namespace not in _NATIVE_NAMESPACES else None
        if impl is not None:
            # The dispatcher runs an op's body with every mode switched off: run it here, under
            # both modes, so that its aten ops and Python-level reads are counted.
            with self.function_mode, self:
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        self.counter._on_aten(func, args, kwargs, out)
        return out


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        counter = self.counter
        if name not in HOST_READS:
            return func(*args, **(kwargs or {}))
        counter._record("item", f"Tensor.{name}", distinct=counter._read_depth == 0)
        counter._read_depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            counter._read_depth -= 1


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """Count the host syncs of the block, per ``counter.phase``; see the module docstring."""
    counter = HostSyncCounter()
    function_mode, dispatch_mode = _FunctionCounter(counter), _DispatchCounter(counter)
    dispatch_mode.function_mode = function_mode
    with function_mode, dispatch_mode:
        yield counter
