"""An estimate of each kernel's GPU time from its SASS and stated hardware figures (not a timing).

The roofline of ``vit_fast.cost_account`` (max(FLOPs / peak, bytes / bandwidth) per kernel) cannot
see work that is serial inside a program or limited by instruction issue. This estimate can: for
every distinct Triton launch of a step it compiles the launch for the GPU's architecture (sm_90
for the H100, sm_80 for the A100; ``vit_fast.aot``, in a child process outside Triton's
interpreter), reads the cubin's SASS (``vit_fast.sass``: loops, instructions per iteration,
tensor-core ops, barriers, global loads) and asks ``vit_fast.gpu_work`` how many iterations of
each loop each program runs. A launch's time is then the largest of four terms, plus the cost of
launching it:

- memory: bytes / HBM bandwidth (the account's bytes);
- tensor: tensor-core FLOPs / dense bf16 rate (FP32 rate for a kernel with no mma instruction);
- issue: sum over program classes of programs x warps x (sum over loops of instructions per
  iteration x iterations, plus the straight-line instructions) / (SMs x schedulers x clock x
  issue efficiency): every warp-instruction takes an issue slot of one of the SM's 4 schedulers;
- latency (the critical path): programs are handed to the SMs' slots (SMs x resident CTAs per SM,
  ``vit_fast.aot.resident_ctas``) in program-id order, each to the slot that frees first (a list
  schedule: programs of different lengths, as linear_bwd_kernel's, fill the slots as they free);
  the makespan in cycles over the clock. One program's length is its straight-line instructions
  (one per cycle) plus one global-load latency (its first loads) plus, per loop iteration, the
  larger of (a) the iteration's issue time for the warps that share a scheduler (instructions x
  warps per scheduler / issue efficiency; the warps per scheduler are those of the program's
  class resident on one SM: min(resident CTAs, ceil(class programs / SMs)) x warps / 4, at least
  1) and (b) one warp's serial path through the iteration:
  its instructions (one per cycle), the mma chain (mma instructions x the tensor core's interval
  per mma, plus one mma latency), barriers x barrier cost, and one global-load latency when the
  loop's loads are not pipelined (LDG with no LDGSTS/TMA copy in flight).

``launch_us`` is the per-kernel cost inside a CUDA graph (``GPUSpec.graph_launch_s``); the eager
step adds the account's host time (LAUNCH_OVERHEAD_S per launch, CUSTOM_OP_CALL_S per custom-op
call) as the roofline does. ``us`` = max(terms) + launch_us; ``bound`` names the largest term,
or "launch" when launch_us exceeds all of them.

Library kernels (cuBLAS GEMMs, SDPA, ATen elementwise and reductions, fused AdamW, the C++ patch
embedding) are not compiled here: they are estimated from their FLOPs and bytes at the stated
efficiencies of ``GPUSpec`` and a minimum latency (a load and a store round trip).

Every hardware figure is in ``GPUS`` with its source; the SASS profiles are cached on disk
(``$VIT_FAST_CACHE/sass`` or ``~/.cache/vit_fast/sass``) by launch, architecture, Triton version and
the kernels' source, so only the first run compiles.

API:

    estimate_step(step_account, gpu) -> StepEstimate      gpu: "H100" or "A100" (keys of GPUS)
    estimate_kernel(kernel, gpu, profile=None) -> KernelEstimate
    sass_profiles(kernels, capability) -> {spec key: (SassProfile, KernelResources)}
    ranked(estimate.kernels) -> rows aggregated by identical launch, largest total first
"""

from __future__ import annotations

import hashlib
import heapq
import importlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

from .cost_account import CUSTOM_OP_CALL_S, LAUNCH_OVERHEAD_S, Kernel


@dataclass(frozen=True)
class GPUSpec:
    """Every hardware figure of the estimate, with its source (see ``GPUS``)."""

    name: str
    capability: int  # the SASS architecture compiled for
    sms: int
    schedulers_per_sm: int
    clock_hz: float  # boost clock
    bandwidth: float  # HBM bytes/s
    tensor_flops: float  # dense bf16 tensor-core FLOP/s
    fp32_flops: float  # non-tensor FP32 FLOP/s (FMA = 2)
    max_ctas_per_sm: int
    max_warps_per_sm: int
    shared_bytes_per_sm: int
    mma_latency_cycles: int  # one mma.sync, issue to result
    global_load_latency_cycles: int  # one global load that misses the caches
    alu_latency_cycles: int  # a dependent integer / FP32 instruction
    barrier_cycles: int  # one bar.sync of a CTA whose warps arrive together
    issue_efficiency: float  # achievable fraction of 1 warp-instruction / scheduler / clock
    graph_launch_s: float  # per kernel inside a CUDA graph: dispatch, ramp-up, drain
    gemm_efficiency: float  # cuBLAS at this model's GEMM shapes, of tensor_flops
    attention_efficiency: float  # SDPA (flash / memory-efficient) at head dim 16, of tensor_flops
    memory_efficiency: float  # streaming kernels, of bandwidth

    @property
    def tensor_flops_per_scheduler_cycle(self) -> float:
        """Dense bf16 FLOPs one scheduler's tensor core does per cycle at peak (an m16n8k16 mma,
        4096 FLOPs, takes 4096 / this cycles: ~4.3 on the H100, 8 on the A100)."""
        return self.tensor_flops / (self.sms * self.schedulers_per_sm * self.clock_hz)


# The source of every figure of GPUSpec (tests/test_gpu_time.py checks each field has one). An
# "assumption" is ours, with its rationale; nothing here was measured by this project.
SOURCES = {
    "sms": "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): 132 SMs on H100 SXM5; NVIDIA A100 "
           "Tensor Core GPU Architecture whitepaper (2020): 108 SMs",
    "schedulers_per_sm": "the same whitepapers: 4 processing blocks per SM, one warp scheduler each, "
                         "dispatching one warp-instruction per clock",
    "clock_hz": "H100 SXM5 1.98 GHz maximum boost (NVIDIA H100 datasheet / nvidia-smi max SM clock); A100 "
                "1410 MHz boost (A100 whitepaper; also observed under load by Chips and Cheese, 'Nvidia's H100: "
                "Funny L2, and Tons of Bandwidth', 2023)",
    "bandwidth": "NVIDIA H100 SXM datasheet 3.35 TB/s; A100 SXM4 80 GB datasheet 2.0 TB/s",
    "tensor_flops": "NVIDIA datasheets, dense (no sparsity) bf16 tensor core: H100 SXM 989 TFLOP/s, A100 312 TFLOP/s",
    "fp32_flops": "NVIDIA datasheets, FP32 (non-tensor): H100 SXM 67 TFLOP/s, A100 19.5 TFLOP/s",
    "max_ctas_per_sm": "CUDA C++ Programming Guide, 'Compute Capabilities' table: 32 resident blocks per SM "
                       "(8.0, 9.0)",
    "max_warps_per_sm": "the same table: 64 resident warps per SM (8.0, 9.0)",
    "shared_bytes_per_sm": "the same table: 164 KB (8.0) and 228 KB (9.0) shared memory per SM",
    "mma_latency_cycles": "assumption, 30 cycles: an mma.sync m16n8k16 takes one issue slot and 'a latency of 20+ "
                          "cycles' (the CuTe tutorial 'Hello, MMA', darshanbaslani.me); Luo et al., 'Benchmarking "
                          "and Dissecting the Nvidia Hopper GPU Architecture' (arXiv:2402.13499) measure mma "
                          "latencies of this order on A100 and H800",
    "global_load_latency_cycles": "about 400 cycles on V100, A100 and H100 (Table 3 of "
                                  "doi:10.1016/j.ultsonch.2023.106546, PMC10448217, compiling microbenchmark "
                                  "figures); the order of Jia et al., 'Dissecting the NVIDIA Volta GPU "
                                  "Architecture via Microbenchmarking' (arXiv:1804.06826); an unloaded pointer "
                                  "chase, so a floor under load",
    "alu_latency_cycles": "4 cycles for dependent arithmetic (the same Table 3); kept for reference, the "
                          "estimate charges one cycle per instruction of a warp's serial path",
    "barrier_cycles": "assumption, 30 cycles for a bar.sync whose warps arrive together (no source found); "
                      "it matters only for loops with many barriers (attention's backward)",
    "issue_efficiency": "assumption, 0.7 of one warp-instruction per scheduler per clock: no dual issue since "
                        "Volta, and dependency, bank and register-port stalls take the rest",
    "graph_launch_s": "assumption, 2 us per kernel of a CUDA graph: the GPU-side gap between dependent kernels "
                      "(dispatch, the first wave's ramp-up, the last wave's drain), the middle of issue 23's "
                      "1.5-3 us; a graph removes the host's launch cost (NVIDIA, 'Getting Started with CUDA "
                      "Graphs', developer.nvidia.com/blog/cuda-graphs), not this gap",
    "gemm_efficiency": "assumption: cuBLAS at M = 8320 rows and N, K of 192 to 768 runs 2-7 waves of 128 x 128 "
                       "tiles with K loops of 3-12 steps, so half the dense peak on the H100; 0.6 on the A100, "
                       "whose peak is 3x lower and easier to approach",
    "attention_efficiency": "assumption: SDPA at head dim 16 does only 16 multiply-adds per element it loads "
                            "and softmaxes, so 15% of the tensor peak on the H100, 25% on the A100",
    "memory_efficiency": "assumption: streaming (elementwise, reduction, AdamW) kernels reach 80% of the HBM "
                         "bandwidth, typical of a large copy on both GPUs",
}
GPUS = {
    "H100": GPUSpec("H100 SXM", 90, sms=132, schedulers_per_sm=4, clock_hz=1.98e9, bandwidth=3.35e12,
                    tensor_flops=989e12, fp32_flops=67e12, max_ctas_per_sm=32, max_warps_per_sm=64,
                    shared_bytes_per_sm=228 * 1024, mma_latency_cycles=30, global_load_latency_cycles=400,
                    alu_latency_cycles=4, barrier_cycles=30, issue_efficiency=0.7, graph_launch_s=2e-6,
                    gemm_efficiency=0.5, attention_efficiency=0.15, memory_efficiency=0.8),
    "A100": GPUSpec("A100 SXM", 80, sms=108, schedulers_per_sm=4, clock_hz=1.41e9, bandwidth=2.0e12,
                    tensor_flops=312e12, fp32_flops=19.5e12, max_ctas_per_sm=32, max_warps_per_sm=64,
                    shared_bytes_per_sm=164 * 1024, mma_latency_cycles=30, global_load_latency_cycles=400,
                    alu_latency_cycles=4, barrier_cycles=30, issue_efficiency=0.7, graph_launch_s=2e-6,
                    gemm_efficiency=0.6, attention_efficiency=0.25, memory_efficiency=0.8),
}

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}


# ----------------------------------------------------------------------------- SASS profiles


def cache_dir() -> str:
    root = os.environ.get("VIT_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vit_fast")
    return os.path.join(root, "sass")


def _sources_digest(module: str) -> str:
    """A digest of the kernel package's sources: a cached profile is stale when any changes."""
    package = importlib.import_module(module.rsplit(".", 1)[0]) if "." in module else importlib.import_module(module)
    directory = os.path.dirname(package.__file__)
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def _cache_key(spec, capability: int) -> str:
    import triton

    from .sass import PROFILE_VERSION

    raw = json.dumps([spec.key, capability, triton.__version__, _sources_digest(spec.module), PROFILE_VERSION])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _kernel_package_dir(module: str) -> str:
    return os.path.dirname(importlib.import_module(module).__file__)


def sass_profiles(kernels, capability: int, progress: bool = True, chunk: int = 6) -> dict:
    """{spec key: (SassProfile, KernelResources)} for the distinct Triton launches among
    ``kernels`` (``Kernel``s with a ``spec``, or ``KernelLaunch``es), compiled for ``sm_<capability>``
    where the disk cache has none (progress on stderr)."""
    from .aot import KernelResources, compile_launches
    from .sass import SassProfile, SourceIndex, profile

    specs = {}
    for k in kernels:
        spec = getattr(k, "spec", k)
        if spec is not None and hasattr(spec, "key"):
            specs.setdefault(spec.key, spec)
    directory = cache_dir()
    result, missing = {}, []
    for key, spec in specs.items():
        path = os.path.join(directory, _cache_key(spec, capability) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            result[key] = (SassProfile.from_dict(d["profile"]), KernelResources(**d["resources"]))
        else:
            missing.append(spec)
    for start in range(0, len(missing), chunk):
        batch = missing[start:start + chunk]
        if progress:
            print(f"vit_fast.gpu_time: compiling launches {start + 1}-{start + len(batch)} of {len(missing)} for "
                  f"sm_{capability} (cached in {directory})", file=sys.stderr, flush=True)
        for spec, resources in compile_launches(batch, (capability,), sass=True):
            prof = profile(resources.sass, spec.kernel, capability, SourceIndex(_kernel_package_dir(spec.module)))
            resources = KernelResources(**{**asdict(resources), "sass": ""})
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, _cache_key(spec, capability) + ".json")
            with open(path + ".tmp", "w") as f:
                json.dump({"kernel": spec.describe(), "profile": prof.to_dict(), "resources": asdict(resources)}, f)
            os.replace(path + ".tmp", path)
            result[spec.key] = (prof, resources)
    return result


# ----------------------------------------------------------------------------- the estimate


@dataclass
class KernelEstimate:
    name: str
    grid: tuple | None
    phase: str
    us: float
    floor_us: float  # max(memory_us, tensor_us)
    launch_us: float
    bound: str  # "memory" | "tensor" | "issue" | "latency" | "launch"
    memory_us: float
    tensor_us: float
    issue_us: float
    latency_us: float
    programs: int = 0
    warps: int = 0
    ctas_per_sm: int = 0
    waves: float = 0.0  # programs / (SMs x resident CTAs per SM)
    loops: list = field(default_factory=list)  # per SASS loop: label, instructions, trips, mma, ...
    straight_instructions: int = 0
    undeclared_loops: list = field(default_factory=list)  # SASS loops no ProgramClass declares
    key: str = ""  # identical launches share it

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        del d["key"]
        return d


def _bound(terms: dict, launch_s: float) -> str:
    name = max(terms, key=terms.get)
    return "launch" if launch_s > terms[name] else name


def _library_estimate(kernel: Kernel, gpu: GPUSpec) -> tuple[float, float, float, float]:
    """(memory_s, tensor_s, issue_s, latency_s) of a kernel we do not compile: its issue is not
    known (0), its latency one load and one dependent store."""
    nbytes = kernel.bytes_read + kernel.bytes_written
    memory_s = nbytes / (gpu.bandwidth * gpu.memory_efficiency)
    if kernel.name in _GEMMS:
        tensor_s = kernel.flops / (gpu.tensor_flops * gpu.gemm_efficiency)
    elif kernel.name.startswith("_scaled_dot_product") or kernel.name.startswith("_flash_attention") \
            or kernel.name.startswith("_efficient_attention"):
        tensor_s = kernel.flops / (gpu.tensor_flops * gpu.attention_efficiency)
    else:
        tensor_s = kernel.flops / gpu.fp32_flops
    latency_s = 2 * gpu.global_load_latency_cycles / gpu.clock_hz  # a load and a dependent store
    return memory_s, tensor_s, 0.0, latency_s


def _schedule(lengths: list[tuple[int, float]], slots: int) -> float:
    """Makespan of programs (count, cycles each), in order, each to the first free of ``slots``."""
    heap = [0.0] * max(1, slots)
    end = 0.0
    for count, cycles in lengths:
        for _ in range(count):
            start = heapq.heappop(heap)
            heapq.heappush(heap, start + cycles)
            end = max(end, start + cycles)
    return end


def iteration_cycles(loop, gpu: GPUSpec, warps_per_scheduler: float) -> float:
    """Cycles of one source iteration of ``loop`` (a ``vit_fast.sass.LoopProfile``) on the
    critical path (module docstring, latency (a) and (b))."""
    n = loop.per_iteration("instructions")
    issue = n * warps_per_scheduler / gpu.issue_efficiency
    mma = loop.per_iteration("mma_flops") / gpu.tensor_flops_per_scheduler_cycle + gpu.mma_latency_cycles
    serial = (n + loop.per_iteration("barrier") * gpu.barrier_cycles + (mma if loop.own["mma"] else 0)
              + (gpu.global_load_latency_cycles if loop.own["global_load"] and not loop.pipelined else 0))
    return max(issue, serial)


def estimate_triton(kernel: Kernel, gpu: GPUSpec, prof, resources) -> KernelEstimate:
    from .aot import resident_ctas
    from .gpu_work import program_work

    spec = kernel.spec
    warps = spec.num_warps
    classes = program_work(kernel.name, kernel.args or {}, kernel.grid)
    programs = sum(c.programs for c in classes)
    declared = set().union(*(c.trips for c in classes)) if classes else set()
    undeclared = [lp.label or f"<unlabelled loop at {lp.start:#x}>" for lp in prof.loops if lp.label not in declared]
    ctas_per_sm, _ = resident_ctas(resources, warps)
    ctas_per_sm = max(1, ctas_per_sm)
    straight = prof.straight["instructions"]

    def warps_per_scheduler(c) -> float:
        # A class's programs spread over the SMs first (the block scheduler hands consecutive
        # programs to different SMs): they share an SM only when they outnumber the SMs, and
        # the short programs of other classes that pass through are not counted.
        active = min(ctas_per_sm, math.ceil(c.programs / gpu.sms))
        return max(1.0, active * warps / gpu.schedulers_per_sm)

    def trips(c, lp) -> int:
        # An undeclared loop counts as run once per program (a test fails on it: gpu_work); the
        # remainder of an unrolled loop is costed with its main loop.
        if lp.remainder:
            return 0
        return c.trips.get(lp.label, 1 if lp.label not in declared else 0)

    issue_warp_instructions, lengths = 0.0, []
    for c in classes:
        per_program = straight + sum(lp.per_iteration() * trips(c, lp) for lp in prof.loops)
        issue_warp_instructions += c.programs * warps * per_program
        cycles = straight + gpu.global_load_latency_cycles + sum(
            trips(c, lp) * iteration_cycles(lp, gpu, warps_per_scheduler(c)) for lp in prof.loops)
        lengths.append((c.programs, cycles))
    issue_s = issue_warp_instructions / (gpu.sms * gpu.schedulers_per_sm * gpu.clock_hz * gpu.issue_efficiency)
    latency_s = _schedule(lengths, gpu.sms * ctas_per_sm) / gpu.clock_hz
    has_mma = any(lp.own["mma"] for lp in prof.loops) or prof.straight["mma"] > 0
    memory_s = (kernel.bytes_read + kernel.bytes_written) / gpu.bandwidth
    tensor_s = kernel.flops / (gpu.tensor_flops if has_mma else gpu.fp32_flops)
    loops = [{"label": lp.label, "instructions": lp.per_iteration(), "unroll": lp.unroll, "remainder": lp.remainder,
              "mma": lp.own["mma"],
              "barriers": lp.own["barrier"], "global_loads": lp.own["global_load"], "shuffles": lp.own["shuffle"],
              "divisions": lp.own["divisions"], "conversions": lp.own["conversion"], "pipelined": lp.pipelined,
              "depth": lp.depth, "trips": [trips(c, lp) for c in classes]} for lp in prof.loops]
    return _finish(kernel, gpu, memory_s, tensor_s, issue_s, latency_s, programs=programs, warps=warps,
                   ctas_per_sm=ctas_per_sm, waves=programs / (gpu.sms * ctas_per_sm), loops=loops,
                   straight_instructions=straight, undeclared_loops=undeclared)


def _finish(kernel: Kernel, gpu: GPUSpec, memory_s, tensor_s, issue_s, latency_s, **extra) -> KernelEstimate:
    terms = {"memory": memory_s, "tensor": tensor_s, "issue": issue_s, "latency": latency_s}
    launch_s = gpu.graph_launch_s
    spec = kernel.spec
    key = json.dumps([kernel.name, kernel.grid, spec.key if spec is not None else None, kernel.bytes_read,
                      kernel.bytes_written, kernel.flops, kernel.phase])
    return KernelEstimate(name=kernel.name, grid=kernel.grid, phase=kernel.phase,
                          us=(max(terms.values()) + launch_s) * 1e6, floor_us=max(memory_s, tensor_s) * 1e6,
                          launch_us=launch_s * 1e6, bound=_bound(terms, launch_s), memory_us=memory_s * 1e6,
                          tensor_us=tensor_s * 1e6, issue_us=issue_s * 1e6, latency_us=latency_s * 1e6,
                          key=key, **extra)


def estimate_kernel(kernel: Kernel, gpu: str | GPUSpec, profile=None) -> KernelEstimate:
    """One kernel's estimate on ``gpu``; a Triton launch needs its ``(SassProfile, KernelResources)``
    (``sass_profiles``; compiled here when not given)."""
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    if kernel.spec is None:
        return _finish(kernel, gpu, *_library_estimate(kernel, gpu))
    if profile is None:
        profile = sass_profiles([kernel], gpu.capability)[kernel.spec.key]
    return estimate_triton(kernel, gpu, *profile)


@dataclass
class StepEstimate:
    backend: str
    gpu: str
    kernels: list[KernelEstimate]
    phase_ms: dict  # graphed, per phase
    total_ms: float  # graphed step: every phase
    eager_ms: float  # the kernels' own time plus the account's host time, as the roofline's eager

    @property
    def forward_backward_ms(self) -> float:
        return self.phase_ms.get("forward_backward", 0.0)

    def to_dict(self, top: int | None = None) -> dict:
        return {"total_ms": self.total_ms, "forward_backward_ms": self.forward_backward_ms,
                "eager_ms": self.eager_ms, "phase_ms": self.phase_ms,
                "kernels": [k.to_dict() for k in sorted(self.kernels, key=lambda k: -k.us)][:top],
                "ranked": ranked(self.kernels)}


def estimate_step(step, gpu: str, profiles: dict | None = None) -> StepEstimate:
    """The estimate of every kernel of ``step`` (a ``vit_fast.cost.StepAccount``) on ``gpu``
    ("H100" or "A100"), per phase and in all; compiles the step's Triton launches unless
    ``profiles`` (from ``sass_profiles``) has them."""
    spec = GPUS[gpu]
    kernels = [k for acc in step.phases.values() for k in acc.kernels]
    if profiles is None:
        profiles = sass_profiles(kernels, spec.capability)
    estimates, phase_ms = [], {}
    for phase, acc in step.phases.items():
        phase_ms[phase] = 0.0
        for k in acc.kernels:
            if not k.phase:
                k.phase = phase
            e = estimate_kernel(k, spec, profiles.get(k.spec.key) if k.spec is not None else None)
            estimates.append(e)
            phase_ms[phase] += e.us / 1e3
    total = sum(phase_ms.values())
    own_ms = sum(e.us - e.launch_us for e in estimates) / 1e3
    return StepEstimate(step.backend, spec.name, estimates, phase_ms, total, own_ms + step.total.host_s() * 1e3)


def ranked(estimates: list[KernelEstimate]) -> list[dict]:
    """Identical launches aggregated (same kernel, grid, arguments, bytes and phase), largest total
    first: name, grid, phase, count, us (each), total_us, floor_us, launch_us, bound, terms."""
    rows: dict[str, dict] = {}
    for e in estimates:
        row = rows.get(e.key)
        if row is None:
            rows[e.key] = row = {"name": e.name, "grid": list(e.grid) if e.grid is not None else None,
                                 "phase": e.phase, "count": 0, "us": e.us, "total_us": 0.0, "floor_us": e.floor_us,
                                 "launch_us": e.launch_us, "bound": e.bound, "memory_us": e.memory_us,
                                 "tensor_us": e.tensor_us, "issue_us": e.issue_us, "latency_us": e.latency_us,
                                 "waves": e.waves, "loops": e.loops}
        row["count"] += 1
        row["total_us"] += e.us
    return sorted(rows.values(), key=lambda r: -r["total_us"])


def format_estimates(estimates: dict, top: int = 15) -> str:
    """Per backend and GPU: the graphed step, its forward+backward phase, and the kernels ranked by
    estimated time. ``estimates``: {backend: {gpu key: StepEstimate}}."""
    lines = ["\nGPU-time estimate (from each kernel's SASS and the stated figures of vit_fast.gpu_time.GPUS; "
             "an estimate, not a timing): per kernel max(memory, tensor, issue, latency) + launch"]
    lines.append(f"{'backend':<10} {'GPU':<10} {'graph ms':>9} {'fwd+bwd ms':>11} {'eager ms':>9}")
    for backend, by_gpu in estimates.items():
        for e in by_gpu.values():
            lines.append(f"{backend:<10} {e.gpu:<10} {e.total_ms:>9.3f} {e.forward_backward_ms:>11.3f} "
                         f"{e.eager_ms:>9.3f}")
    for backend, by_gpu in estimates.items():
        for e in by_gpu.values():
            lines.append(f"\n{backend} on {e.gpu}: kernels ranked by estimated time (us each; x count)")
            lines.append(f"  {'kernel':<36} {'grid':>11} {'count':>5} {'us':>8} {'total us':>9} {'floor us':>9} "
                         f"{'launch':>6} {'issue':>7} {'latency':>8} {'bound':<8}")
            for r in ranked(e.kernels)[:top]:
                grid = "x".join(map(str, r["grid"])) if r["grid"] else "-"
                lines.append(f"  {r['name'][:36]:<36} {grid:>11} {r['count']:>5d} {r['us']:>8.2f} "
                             f"{r['total_us']:>9.1f} {r['floor_us']:>9.2f} {r['launch_us']:>6.1f} "
                             f"{r['issue_us']:>7.2f} {r['latency_us']:>8.2f} {r['bound']:<8}")
    return "\n".join(lines)


__all__ = ["GPUS", "GPUSpec", "KernelEstimate", "StepEstimate", "cache_dir", "estimate_kernel", "estimate_step",
           "estimate_triton", "format_estimates", "iteration_cycles", "ranked", "sass_profiles",
           "LAUNCH_OVERHEAD_S", "CUSTOM_OP_CALL_S"]
