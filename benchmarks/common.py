"""Shared benchmark plumbing: GPU timing, device peaks, environment info, JSON and plots.

Every benchmark runs its providers side by side in one process. GPU times come from
``triton.testing.do_bench`` (warm-up, CUDA events, L2 flushed between runs) as the median with
20th/80th percentiles. Without a GPU nothing is timed: interpreter or CPU timings of GPU kernels
mean nothing, so the scripts run a correctness smoke and say so.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

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


def gpu_available() -> bool:
    return torch.cuda.is_available()


def no_gpu_notice(what: str, instead: str = "the correctness smoke") -> str:
    msg = (
        f"[{what}] No CUDA GPU on this machine: no timings are taken (interpreter or CPU timings of "
        f"GPU kernels would be meaningless). Running {instead} instead."
    )
    print(msg)
    return msg


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


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS_DIR)
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
