"""The cost account's data types and its tables: a ``Kernel`` (bytes read and written, FLOPs, a
cast or not), per-operator ``OpCost`` totals, a ``CostAccount`` of one step (or phase) with its
roofline model per ``GPU``, a ``StepAccount`` of the step as trained (per phase, with host syncs),
and the text tables ``python -m vit_fast.cost`` prints. No recording here: ``vit_fast.cost_kernels``
fills the accounts, ``vit_fast.cost`` drives the step (its docstring says what is counted and how).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

# Host time per kernel launch of an uncaptured step, an assumption of this model: PyTorch's eager
# dispatch of one operator from Python (argument parsing, dispatcher, allocator) measured 3.5 us
# for a tiny CPU op on this project's development machine (its kernel included), and a GPU launch
# adds cudaLaunchKernel's 1-2 us; a GPU also needs a few microseconds between dependent small
# kernels. A CUDA graph replays all of a step's launches for one.
LAUNCH_OVERHEAD_S = 5e-6
# Extra host time of a Python-level custom-op call (torch.library's Python dispatch around the
# op's body): measured 17 us over its body's own ops on the same machine, assumed 15 us.
CUSTOM_OP_CALL_S = 15e-6
# Host time of a step replayed from one CUDA graph (--cuda-graphs, data phase included): the Python
# call of CUDAGraph.replay (one cudaGraphLaunch) and the epoch loop's integer updates; no tensor
# is made and no op dispatched (tests/test_step.py counts none). Assumed, not measured: a Python
# call into the runtime costs a few microseconds on the development machine and a graph launch
# a few more; 10 us is the figure until a GPU measures it.
GRAPH_REPLAY_S = 10e-6


def host_time_per_step(launches: int, custom_op_calls: int) -> dict[str, float]:
    """Modelled host seconds of one step: eager (every launch and custom-op call dispatched from
    Python) and graphed (one replay)."""
    return {"eager_s": launches * LAUNCH_OVERHEAD_S + custom_op_calls * CUSTOM_OP_CALL_S,
            "graphed_s": GRAPH_REPLAY_S}


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # bf16 dense tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s


GPUS = {
    "H100": GPU("H100 SXM", 989e12, 3.35e12),
    "A100": GPU("A100 SXM", 312e12, 2.0e12),
}


@dataclass
class Kernel:
    """One kernel launch: what the roofline is summed over, and which launch it was (for the
    GPU-time estimate, ``vit_fast.gpu_time``): ``name`` is the Triton kernel's function name, the
    aten operator's name ("mm", "_fused_adamw_") or "patch_embed_<part>" for the C++ kernels;
    ``grid`` the programs per grid axis of a Triton launch (None for library kernels); ``spec`` its
    ``vit_fast.aot.KernelLaunch`` (None otherwise); ``args`` its non-tensor arguments with the
    tensors' shapes (what ``vit_fast.gpu_work`` reads the programs' work from); ``phase`` the step
    phase it ran in, when recorded by phase."""

    bytes_read: int
    bytes_written: int
    flops: int
    cast: bool = False
    name: str = ""
    grid: tuple | None = None
    spec: object = field(default=None, repr=False, compare=False)
    args: dict | None = field(default=None, repr=False, compare=False)
    phase: str = ""


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
