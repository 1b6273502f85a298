"""Our fused kernels or the library's, per op: chosen once at the start of a run, kept for the run.

The fused backend has, for most of its ops, a library kernel that does the same job: the torch
backend's path (``F.scaled_dot_product_attention``, ``F.layer_norm``, ``F.linear`` with its cuBLAS
backward, ``F.cross_entropy``, ``F.conv2d``). Which of the two is faster depends on the GPU, the
shapes and the dtype, so, as ``torch.backends.cudnn.benchmark`` does for convolutions, a run on a
CUDA device times both on its own shapes before its first step and keeps the faster per op. A user
never pays for a kernel of ours that loses on their GPU.

The ops with a library alternative (``KERNEL_OPS``; per op kind, since every block has the same
shapes), what "ours" and "library" run, and where the model dispatches them:

  ============== ============================================ ========================================
  op             ours (``--backend fused``)                   library (the torch backend's path)
  ============== ============================================ ========================================
  patch_embed    ``vit_fast::patch_embed`` (CUDA C++)          ``F.conv2d``, ``cat``, ``+ pos_embed``
  layernorm      ``vit_fast::layer_norm``, ``add_layer_norm``  ``F.layer_norm`` (and ``x + residual``)
  attention      ``vit_fast::attention_packed``                ``F.scaled_dot_product_attention``
  linear         ``vit_fast::linear`` (qkv, proj, head)        ``F.linear`` (cuBLAS forward and backward)
  mlp            ``vit_fast::mlp`` (fc1, GELU, fc2, residual)  ``F.linear``, ``F.gelu``, ``F.linear``
  cross_entropy  ``vit_fast::cross_entropy``                   ``F.cross_entropy(logits.float())``
  ============== ============================================ ========================================

Without autocast the fused backend's ``linear`` is ``F.linear`` itself (see ``vit_fast.ops.linear``),
so both sides time the same kernel and the tie rule keeps "ours". The data phase's fused kernels
(augment_policy, augment_finish) are not chosen here.

``mode`` ("auto", "ours", "library"): "ours" and "library" force every op; "auto" times each op's
forward + backward, as one encoder block runs it, at the run's per-rank batch, tokens, width, heads
and dtype under the run's autocast (the loss outside it, as the step computes it): ``WARMUP``
calls, then ``REPEATS`` samples of ``ITERS`` calls between two CUDA events, alternating ours and
library, median of the samples. Under ``--cuda-graphs`` each side is captured in a CUDA graph and
the replays are timed (the step replays a graph, so launch overhead does not count); otherwise
eager calls are timed, launch overhead included, as an eager step pays it. The library wins an op
only when its median is below ours by more than ``TIE_MARGIN``; a tie goes to ours. Timing draws its
inputs inside ``torch.random.fork_rng``, so the run's random streams are untouched.

"auto" runs ours without timing when timing is not possible or not wanted (``timing_unavailable``):
on the CPU, under Triton's interpreter (``TRITON_INTERPRET=1``), and when the environment variable
``VIT_FAST_NO_KERNEL_TIMING`` is set (``tests/conftest.py`` sets it, so tests on a GPU run our
kernels unless a test asks for the library).

Public API:
    KERNEL_OPS, MODES, TIE_MARGIN, NO_TIMING_ENV, LIBRARY_BACKEND
    KernelChoice             frozen: mode, the ops on the library, the medians when timed, a note
    choose_kernels(mode, timer=None, *, untimed_reason="", timed_on="") -> KernelChoice
    timing_unavailable(device) -> str | None           why "auto" cannot time here; None: it can
    Workload                 the run's shapes for the timing
    CudaTimer(workload, device)                        the timer of "auto" on a GPU: op -> (ours, library) us
    choose_for_run(requested, recorded, device, workload) -> (KernelChoice, log line)
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .config import ViTConfig

KERNEL_OPS = ("patch_embed", "layernorm", "attention", "linear", "mlp", "cross_entropy")
MODES = ("auto", "ours", "library")
KERNELS = ("ours", "library")
LIBRARY_BACKEND = "torch"  # the backend whose path is an op's library alternative
# The library must beat ours by more than this fraction of our median to be chosen: smaller
# differences are within what CUDA-event timing of microsecond kernels varies by from run to run
# (our choice of margin, not a measured figure), and a tie keeps our kernel.
TIE_MARGIN = 0.03
NO_TIMING_ENV = "VIT_FAST_NO_KERNEL_TIMING"  # set (to anything but "" or "0"): "auto" means ours, untimed
WARMUP, REPEATS, ITERS = 3, 7, 5

# op -> (ours median us, library median us)
Timer = Callable[[str], tuple[float, float]]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown kernel choice mode {mode!r}; expected one of {MODES}")
    return mode


def check_op(op: str) -> str:
    if op not in KERNEL_OPS:
        raise ValueError(f"unknown kernel op {op!r}; expected one of {KERNEL_OPS}")
    return op


@dataclass(frozen=True)
class KernelChoice:
    """The kernels a fused model runs, per op: ``library`` names the ops on the library's kernels
    (in KERNEL_OPS order), every other op runs ours. ``timings_us`` holds (op, ours, library)
    medians in microseconds when "auto" timed them, else (); ``note`` says how the choice was made
    (timed on which GPU, or why it was not timed). Set on a model once, before its first step."""

    mode: str = "ours"
    library: tuple[str, ...] = ()
    timings_us: tuple[tuple[str, float, float], ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        check_mode(self.mode)
        for op in self.library:
            check_op(op)
        if list(self.library) != [op for op in KERNEL_OPS if op in self.library]:
            raise ValueError(f"KernelChoice.library must list each op once, in KERNEL_OPS order; got {self.library}")
        for entry in self.timings_us:
            if (len(entry) != 3 or entry[0] not in KERNEL_OPS
                    or not all(isinstance(t, float) and math.isfinite(t) and t > 0 for t in entry[1:])):
                raise ValueError(f"KernelChoice.timings_us entries are (op, ours_us, library_us) with positive "
                                 f"finite times; got {entry!r}")

    def of(self, op: str) -> str:
        """"ours" or "library" for ``op`` (one of KERNEL_OPS)."""
        return "library" if check_op(op) in self.library else "ours"

    def backend_for(self, op: str, backend: str) -> str:
        """The backend that computes ``op`` for a model on ``backend``: the library's (the torch
        backend's path) for an op on the library under "fused", else ``backend`` unchanged."""
        return LIBRARY_BACKEND if backend == "fused" and self.of(op) == "library" else backend

    @property
    def timed(self) -> bool:
        return bool(self.timings_us)

    def describe(self) -> str:
        """The choice per op, with the medians when timed: ``attention=ours (12.1 vs 15.3 us) ...``."""
        times = {op: (ours, library) for op, ours, library in self.timings_us}
        parts = []
        for op in KERNEL_OPS:
            part = f"{op}={self.of(op)}"
            if op in times:
                part += f" ({times[op][0]:.1f} vs {times[op][1]:.1f} us)"
            parts.append(part)
        return " ".join(parts)

    def to_dict(self) -> dict:
        """What a checkpoint records as ``kernels`` (plain types: loads with weights_only)."""
        return {"mode": self.mode, "ops": {op: self.of(op) for op in KERNEL_OPS},
                "timings_us": {op: [ours, library] for op, ours, library in self.timings_us}, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> "KernelChoice":
        """The choice ``to_dict`` recorded; a ValueError naming what does not fit."""
        if not isinstance(d, dict) or not isinstance(d.get("ops"), dict) or not isinstance(d.get("mode"), str):
            raise ValueError(f"a kernel choice is a dict with 'mode' and 'ops' entries, got {d!r}")
        unknown = sorted(set(d["ops"]) - set(KERNEL_OPS))
        if unknown:
            raise ValueError(f"kernel choice names unknown ops {unknown}; known ops are {KERNEL_OPS}")
        bad = {op: k for op, k in d["ops"].items() if k not in KERNELS}
        if bad:
            raise ValueError(f"kernel choice {bad} is neither 'ours' nor 'library'")
        timings = d.get("timings_us", {})
        if not isinstance(timings, dict):
            raise ValueError(f"kernel choice 'timings_us' should be a dict, got {type(timings).__name__}")
        try:
            rows = tuple((op, float(timings[op][0]), float(timings[op][1])) for op in KERNEL_OPS if op in timings)
        except (TypeError, ValueError, IndexError) as err:
            raise ValueError(f"kernel choice 'timings_us' should map ops to [ours_us, library_us]: {err}") from None
        if len(rows) != len(timings):
            raise ValueError(f"kernel choice 'timings_us' names unknown ops {sorted(set(timings) - set(KERNEL_OPS))}")
        return cls(d["mode"], tuple(op for op in KERNEL_OPS if d["ops"].get(op) == "library"), rows,
                   str(d.get("note", "")))


def choose_kernels(mode: str, timer: Timer | None = None, *, untimed_reason: str = "",
                   timed_on: str = "") -> KernelChoice:
    """The choice of ``mode``. "ours" / "library": every op, nothing timed. "auto": with a ``timer``
    (op -> (ours_us, library_us) medians), the library for each op where it is faster than ours by
    more than TIE_MARGIN, ours otherwise; without one, ours for every op, untimed, the note saying
    why (``untimed_reason``)."""
    check_mode(mode)
    if mode == "ours":
        return KernelChoice("ours", note="forced by --kernels ours")
    if mode == "library":
        return KernelChoice("library", KERNEL_OPS, note="forced by --kernels library")
    if timer is None:
        return KernelChoice("auto", note=f"not timed, ours everywhere: {untimed_reason or 'no timer'}")
    rows, library = [], []
    for op in KERNEL_OPS:
        ours_us, library_us = (float(t) for t in timer(op))
        if not all(math.isfinite(t) and t > 0 for t in (ours_us, library_us)):
            raise RuntimeError(f"timing {op} gave {ours_us} us (ours) and {library_us} us (library): a time must be "
                               "positive and finite")
        rows.append((op, ours_us, library_us))
        if library_us < ours_us * (1.0 - TIE_MARGIN):
            library.append(op)
    return KernelChoice("auto", tuple(library), tuple(rows), note=f"timed{' on ' + timed_on if timed_on else ''}")


def timing_unavailable(device: torch.device) -> str | None:
    """Why "auto" cannot (or must not) time kernels on ``device``; None when it can."""
    from .fused.launch import interpreting  # the one place that reads TRITON_INTERPRET

    if os.environ.get(NO_TIMING_ENV, "") not in ("", "0"):
        return f"{NO_TIMING_ENV} is set"
    if device.type != "cuda":
        return f"the device is {device} (timing needs a CUDA device)"
    if interpreting():
        return "Triton's interpreter is on (TRITON_INTERPRET=1)"
    return None


# ------------------------------------------------------------------------------------------------
# Timing on a GPU.


@dataclass(frozen=True)
class Workload:
    """What a run's step computes, for timing one layer's ops on its shapes: the model config,
    the per-rank batch, bf16 autocast or not, the loss's label smoothing and targets (soft (B, K)
    under mixup/cutmix, else labels), and whether the step is replayed from a CUDA graph."""

    cfg: ViTConfig
    batch: int
    amp: bool
    label_smoothing: float = 0.0
    soft_targets: bool = False
    graphed: bool = False

    def describe(self) -> str:
        return (f"forward + backward of one block's ops at batch {self.batch} x {self.cfg.num_tokens} tokens x "
                f"width {self.cfg.dim}, {'bf16 autocast' if self.amp else 'fp32'}"
                f"{', CUDA-graph replays' if self.graphed else ', eager'}; median us, ours vs library")


class _OpCall:
    """One op's forward + backward on fixed random inputs: ``outputs(backend)`` runs the forward
    (under the run's autocast unless it is the loss), ``step(backend)`` forward and backward."""

    def __init__(self, op: str, w: Workload, device: torch.device) -> None:
        from .runtime import autocast

        self.op, self.w, self.device = check_op(op), w, device
        self.autocast = lambda: autocast(device, w.amp and op != "cross_entropy")
        cfg = w.cfg
        act = torch.bfloat16 if w.amp else torch.float32  # what the GEMMs hand on under autocast
        B, N, D, H = w.batch, cfg.num_tokens, cfg.dim, cfg.num_heads

        def t(*shape, dtype=torch.float32, scale=1.0, grad=True):
            return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)

        if op == "patch_embed":
            S, C, P = cfg.image_size, cfg.in_channels, cfg.patch_size
            self.images = t(B, C, S, S, grad=False)
            self.leaves = [t(D, C, P, P, scale=0.1), t(D, scale=0.1), t(1, 1, D, scale=0.02), t(1, N, D, scale=0.02)]
        elif op == "layernorm":
            self.leaves = [t(B, N, D), t(B, N, D, dtype=act), t(D), t(D), t(D), t(D)]
        elif op == "attention":
            self.leaves = [t(B, N, 3, H, cfg.head_dim, dtype=act)]
        elif op == "linear":
            self.leaves = [t(B, N, D, dtype=act), t(3 * D, D, scale=0.02), t(3 * D, scale=0.02),
                           t(B, N, D, dtype=act), t(D, D, scale=0.02), t(D, scale=0.02)]
        elif op == "mlp":
            Hd = cfg.mlp_hidden
            self.leaves = [t(B, N, D, dtype=act), t(Hd, D, scale=0.02), t(Hd, scale=0.02), t(D, Hd, scale=0.02),
                           t(D, scale=0.02), t(B, N, D)]
        else:  # cross_entropy
            K = cfg.num_classes
            self.leaves = [t(B, K, dtype=act)]
            self.target = (torch.softmax(torch.randn(B, K, device=device), -1) if w.soft_targets
                           else torch.randint(0, K, (B,), device=device))
        self.grads: dict[str, list[Tensor]] = {}

    def outputs(self, backend: str) -> list[Tensor]:
        cfg, L = self.w.cfg, self.leaves
        with self.autocast():
            if self.op == "patch_embed":
                return [ops.patch_embed(self.images, *L, backend)]
            if self.op == "layernorm":
                x, branch, w1, b1, w2, b2 = L
                y1 = ops.layer_norm(x, w1, b1, cfg.layer_norm_eps, backend)
                return [y1, *ops.add_layer_norm(branch, x, w2, b2, cfg.layer_norm_eps, backend)]
            if self.op == "attention":
                return [ops.attention_packed(L[0], 0.0, backend)]
            if self.op == "linear":
                return [ops.linear(L[0], L[1], L[2], backend), ops.linear(L[3], L[4], L[5], backend)]
            if self.op == "mlp":
                return [ops.mlp(*L[:5], cfg.gelu_approximate, backend, residual=L[5])]
        return [ops.cross_entropy(L[0], self.target, self.w.label_smoothing, backend)]

    def step(self, backend: str) -> list[Tensor]:
        """Forward and backward; returns the forward's outputs."""
        outs = self.outputs(backend)
        if backend not in self.grads:
            self.grads[backend] = [torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, self.leaves, self.grads[backend])
        return outs


class CudaTimer:
    """The timer of "auto" on a CUDA device: ``timer(op)`` -> (ours, library) median microseconds
    of one forward + backward of ``op`` on ``workload``'s shapes (see the module docstring)."""

    def __init__(self, workload: Workload, device: torch.device, warmup: int = WARMUP, repeats: int = REPEATS,
                 iters: int = ITERS) -> None:
        self.w, self.device = workload, device
        if warmup < 1 or repeats < 1 or iters < 1:
            raise ValueError(f"CudaTimer needs warmup, repeats and iters >= 1, got {warmup}, {repeats}, {iters}")
        self.warmup, self.repeats, self.iters = warmup, repeats, iters

    def _runner(self, call: _OpCall, backend: str) -> Callable[[], None]:
        """What one timed sample runs: ``iters`` eager steps, or one replay of a graph of them."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as a capture requires
            for _ in range(self.warmup):
                call.step(backend)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if not self.w.graphed:
            def eager() -> None:
                for _ in range(self.iters):
                    call.step(backend)
            return eager
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.iters):
                call.step(backend)
        return graph.replay

    def __call__(self, op: str) -> tuple[float, float]:
        with torch.random.fork_rng(devices=[self.device]):
            call = _OpCall(op, self.w, self.device)
            runners = {"ours": self._runner(call, "fused"), "library": self._runner(call, LIBRARY_BACKEND)}
            samples: dict[str, list[float]] = {"ours": [], "library": []}
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for r in range(self.repeats):
                for kernels in (KERNELS if r % 2 == 0 else KERNELS[::-1]):  # alternate: drift hits both
                    start.record()
                    runners[kernels]()
                    end.record()
                    end.synchronize()
                    samples[kernels].append(start.elapsed_time(end) * 1000.0 / self.iters)  # ms -> us per call
        return statistics.median(samples["ours"]), statistics.median(samples["library"])


# ------------------------------------------------------------------------------------------------
# A run's choice: fresh, or the checkpoint's.


def choose_for_run(requested: str | None, recorded: dict | None, device: torch.device, workload: Workload,
                   timer: Timer | None = None) -> tuple[KernelChoice, str]:
    """The choice of a fused run and its one log line.

    ``requested`` is ``--kernels`` (None when not given); ``recorded`` the checkpoint's ``kernels``
    entry when resuming (None for a fresh run or a checkpoint without one). A resumed run keeps
    the recorded choice, not re-timed, unless ``--kernels`` names another mode: then the new
    mode's choice is made and the line says that it replaces the checkpoint's. ``timer`` overrides
    the CUDA timer (tests); "auto" times only where ``timing_unavailable`` allows."""
    if requested is not None:
        check_mode(requested)
    if recorded is not None:
        kept = KernelChoice.from_dict(recorded)
        if requested is None or requested == kept.mode:
            return kept, f"kernels ({kept.mode}, the checkpoint's choice, not re-timed; {kept.note}): {kept.describe()}"
    mode = requested or "auto"
    reason = timing_unavailable(device) if mode == "auto" else None
    if mode == "auto" and reason is None and timer is None:
        timer = CudaTimer(workload, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and reason is None else str(device)
    choice = choose_kernels(mode, timer if reason is None else None, untimed_reason=reason or "",
                            timed_on=f"{name}, {workload.describe()}")
    line = f"kernels ({mode}, {choice.note}): {choice.describe()}"
    if recorded is not None:
        line += (f"; --kernels {mode} replaces the checkpoint's {recorded.get('mode')!r} choice "
                 f"({KernelChoice.from_dict(recorded).describe()}): results differ in rounding from the "
                 "checkpointed run's from here on")
    return choice, line
