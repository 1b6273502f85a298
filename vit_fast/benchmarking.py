"""Shared benchmark plumbing: the entry point, providers, GPU timing, peaks, JSON and plots.

The scripts in ``benchmarks/`` import this module, which is installed with the package, so that
each of them runs as users type it: ``python benchmarks/bench_attention.py`` from the repository
root, by its full path from any directory, or as ``python -m benchmarks.bench_attention``. (A
module beside the scripts would need the repository root on ``sys.path``, which running a script
by its path does not give.) Import it before anything imports triton: without a GPU it selects
Triton's interpreter, which must be chosen before triton is first imported.

Every benchmark runs its providers side by side in one process. GPU times come from
``triton.testing.do_bench`` (warm-up, CUDA events, L2 flushed between runs) as the median with
20th/80th percentiles. Without a GPU nothing is timed: interpreter or CPU timings of GPU kernels
mean nothing, so the scripts run a correctness smoke and say so.

Providers are the backends of ``vit_fast.ops`` (``providers``), so the baselines are the model's
own code paths: "reference" (the readable spec), "torch" (PyTorch built-ins), "torch.compile"
(one of them under torch.compile) and "fused" (our registered ops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from vit_fast.testing import assert_parity, max_abs_diff

if not torch.cuda.is_available():
    # Without a GPU the smokes run the Triton kernels in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Published peak figures (NVIDIA data sheets): dense tensor-core TFLOP/s for 16-bit inputs and HBM
# bandwidth in GB/s. Matched against torch.cuda.get_device_name(); order matters (longest first).
GPU_PEAKS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 4800.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),  # SXM5
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100 80GB PCIe", 312.0, 1935.0),
    ("A100", 312.0, 1555.0),  # 40 GB
    ("L40S", 362.0, 864.0),
    ("A10", 125.0, 600.0),
]


PROVIDERS = ("reference", "torch", "torch.compile", "fused")
PASSES = ("forward", "forward_backward")


def gpu_available() -> bool:
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- entry point


def parser(doc: str, quick_help: str, script: str, default_out_dir: Path | None = None) -> argparse.ArgumentParser:
    """The arguments every script takes: --quick and --out-dir; scripts add their own.

    ``script`` is the calling script's ``__file__``: results go to ``results/`` beside it unless
    ``default_out_dir`` or ``--out-dir`` says otherwise, whatever the working directory."""
    default_out_dir = default_out_dir or Path(script).resolve().parent / "results"
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out-dir", type=Path, default=default_out_dir, help=f"where the output goes (default {default_out_dir})")
    return p


def run(name: str, args, run_gpu: Callable, run_cpu: Callable, on_gpu: bool | None = None) -> int:
    """The body of every script's main: one path (GPU unless ``on_gpu`` says otherwise), its JSON
    written even when it failed (the record is what one debugs from), then the exit status: 1 when
    the payload lists ``failures`` (each printed on stderr), else 0."""
    on_gpu = gpu_available() if on_gpu is None else on_gpu
    payload = run_gpu(args) if on_gpu else run_cpu(args)
    write_json(name, {"args": vars(args), **payload}, args.out_dir)
    for failure in payload.get("failures", ()):
        print(f"{name}: {failure}", file=sys.stderr)
    return 1 if payload.get("failures") else 0


# ----------------------------------------------------------------------------- providers


def providers(make: Callable[[str], Callable], compiled: str = "torch") -> dict[str, Callable]:
    """{provider: fn} from ``make(backend)``, a vit_fast.ops call with its backend bound;
    "torch.compile" compiles ``make(compiled)``. Dynamo is reset and shapes are static, so call
    this once per timed shape: past dynamo's recompile limit a later shape would silently run
    eagerly under the torch.compile label."""
    torch._dynamo.reset()
    table = {backend: make(backend) for backend in ("reference", "torch", "fused")}
    table["torch.compile"] = torch.compile(make(compiled), dynamic=False)
    return {name: table[name] for name in PROVIDERS}


def outputs_and_grads(fn: Callable, master: list[Tensor], grad_outs: list[Tensor], dtype) -> list[Tensor]:
    """``fn``'s outputs, then the gradients of all its inputs, from leaves cast from ``master`` to
    ``dtype`` (a fixed set of inputs run at several precisions)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in master]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    grads = torch.autograd.grad(outs, leaves, [g.to(dtype) for g in grad_outs])
    return [o.detach() for o in outs] + list(grads)


def parity_errors(names: list[str], fused: list[Tensor], same_dtype: list[Tensor], wide: list[Tensor]) -> tuple[dict, list[str]]:
    """Max errors of the fused results and of the reference in the same (16-bit) dtype against the
    wide reference, and the parity-rule failures (vit_fast.testing.assert_parity) as messages."""
    errors, failures = {}, []
    for name, a, b, c in zip(names, fused, same_dtype, wide):
        try:
            assert_parity(a, b, c, name=name)
        except AssertionError as e:
            failures.append(str(e))
            print(f"  {e}")
        errors[name] = {"fused": max_abs_diff(a, c), "reference_same_dtype": max_abs_diff(b, c)}
    return errors, failures


def no_gpu_notice(what: str, instead: str = "the correctness smoke") -> str:
    msg = (
        f"[{what}] No CUDA GPU on this machine: no timings are taken (interpreter or CPU timings of "
        f"GPU kernels would be meaningless). Running {instead} instead."
    )
    print(msg)
    return msg


# ----------------------------------------------------------------------------- GPU timing


def device_peaks() -> dict:
    """Peak 16-bit tensor TFLOP/s and HBM GB/s of the current GPU, or None where unknown."""
    name = torch.cuda.get_device_name()
    for key, tflops, gbps in GPU_PEAKS:
        if key in name:
            return {"gpu": name, "peak_tflops": tflops, "peak_gbps": gbps}
    return {"gpu": name, "peak_tflops": None, "peak_gbps": None}


def time_cuda(fn, warmup: int = 25, rep: int = 100) -> dict:
    """Median and 20/80th percentile milliseconds of ``fn()`` on the GPU."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": median, "ms_p20": p20, "ms_p80": p80}


def time_passes(fn: Callable, inputs: list[Tensor], leaves: list[Tensor], grad_outs) -> dict[str, dict]:
    """Forward (no grad) and forward + backward (gradients of ``leaves``) timings of ``fn(*inputs)``."""
    with torch.no_grad():
        forward = time_cuda(lambda: fn(*inputs))
    forward_backward = time_cuda(lambda: torch.autograd.grad(fn(*inputs), leaves, grad_outs))
    return {"forward": forward, "forward_backward": forward_backward}


def with_rates(times: dict[str, dict], work: dict[str, float], unit: str, scale: float,
               peak: float | None, pct_key: str) -> dict[str, dict]:
    """Each pass's timing plus its rate (``work`` per second / ``scale``, e.g. TFLOP/s from FLOPs and
    1e12) under ``unit`` and, where the device's peak is known, the percentage of it."""
    entry = {}
    for pass_name, t in times.items():
        rate = work[pass_name] / (t["ms"] * 1e-3) / scale
        entry[pass_name] = {**t, unit: rate, pct_key: 100 * rate / peak if peak else None}
    return entry


def add_speedups(row: dict) -> None:
    """row["speedup_<pass>"]: every provider's time over the fused one's (> 1: fused is faster)."""
    for pass_name in PASSES:
        fused_ms = row["providers"]["fused"][pass_name]["ms"]
        row[f"speedup_{pass_name}"] = {
            name: e[pass_name]["ms"] / fused_ms for name, e in row["providers"].items() if name != "fused"
        }


def kernel_times(fn: Callable, reps: int = 20) -> dict[str, float]:
    """Mean device milliseconds per call of ``fn`` spent in each GPU kernel it launches, by kernel
    name, from torch.profiler: it reads the kernels inside an op without reaching into the op's
    private launchers, so it measures exactly what the op runs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # compile and autotune outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == DeviceType.CUDA:
            times[event.key] = times.get(event.key, 0.0) + event.device_time_total / 1e3 / reps
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def environment() -> dict:
    info = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "gpu": None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        except Exception:  # nvidia-smi is absent in some containers
            info["driver"] = None
    return info


def write_json(name: str, payload: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": environment(), **payload}, indent=2, default=str))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def plot_lines(path: Path, x: list, series: dict[str, list], xlabel: str, ylabel: str, title: str, logx: bool = False) -> Path:
    """One PNG line plot, a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path
