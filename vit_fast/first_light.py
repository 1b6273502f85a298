"""GPU first light: what a first session on one CUDA GPU must produce, in one command, in minutes.

    scripts/gpu_first_light.sh [--out DIR]            # build and install the package, then the below
    python -m vit_fast.first_light [--out DIR] [--budget-s 420] [--skip-tests]
    python -m vit_fast.first_light --dry-run          # on a CPU: the plan, the estimate, the writers

No GPU has run this project. This command is the first run on one (an H100, H200 or A100): it
takes the measurements the cost account's estimate is calibrated against, and everything else a
first session needs, under a hard time budget (8 minutes with the build, on one GPU machine of 16
cores; the shell wrapper passes what the build leaves). The stages, in order (``STAGES``):

1. environment: GPU name and SM count, driver, CUDA, torch, triton, Python, the commit.
2. estimate (CPU, beside the GPU stages): ``python -m vit_fast.cost --backends torch fused --json``,
   whose "estimate" section models every kernel of the step per GPU.
3. kernels: the default training step (vit-cifar, batch 128, bf16 autocast, the CLI's default
   recipe, built by ``vit_fast.run.setup`` as ``benchmarks/bench_train.py`` builds it) on the fused
   and the torch backends, captured in a CUDA graph (``vit_fast.step.GraphedStep``) and replayed
   under ``torch.profiler``; the GPU's events are grouped by kernel name and grid into median
   microseconds per launch and launches per step. The last eager warm-up step is profiled with the
   host's operators too, which names the aten operator behind each library kernel. Joined with the
   estimate (``join``), this is the calibration table: measured over estimated time per kernel.
4. bench_train: ``benchmarks/bench_train.py``'s own ``time_provider`` for torch (eager, CUDA graphs,
   torch.compile) and fused (eager, CUDA graphs) at vit-cifar, batch 128, the CLI's default recipe;
   its JSON (``bench_train.json``) written after every provider.
5. tests: ``python -m pytest -m gpu``, and the op parity files natively on CUDA, one process per file
   side by side (the ahead-of-time compile tests left out: they compile offline and do the same on
   any machine); pass/fail counts from pytest's verbose lines, so a group cut off by the budget
   still reports what it ran.

Each GPU stage runs in a subprocess with its own time limit (``Stage.budget_s``, cut to what the
overall budget leaves), killed with its process group when the limit passes; the report
(``first_light.json`` and ``FIRST_LIGHT.md`` in ``--out``, default
``results/gpu/<gpu-name>/``) is rewritten after every stage, so a stage that fails or runs out of
time leaves the others' results. Exit status: 0 when every stage finished, 1 otherwise (the report
says which), 1 with ``error: no CUDA GPU: first light needs one`` where there is no GPU.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .cli import errors_handled

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the package is installed editable from it
PRESET, BATCH = "vit-cifar", 128  # the default training job's model and batch
KERNEL_BACKENDS = ("fused", "torch")
PROFILED_REPLAYS = 5  # graph replays under the profiler, after the capture and two unprofiled replays
# bench_train providers, cheapest first so that a cut-off stage loses the compiled one, not the rest.
BENCH_PROVIDERS = ("fused/cuda-graphs", "torch/cuda-graphs", "fused/eager", "torch/eager", "torch/compile")
# Tests that only compile kernels ahead of time (for sm_80/sm_90, read with cuobjdump): they do the
# same on any machine and CI runs them; on a GPU they would only take the budget.
OFFLINE_TESTS = "not aot and not without_spills and not local_memory and not embeds_ptx"
DEFAULT_BUDGET_S = 420.0  # 8 minutes less about one for the build (scripts/gpu_first_light.sh passes the rest)
REPORT_RESERVE_S = 10.0  # kept back from the last stage for the join and the report


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float  # the stage's own limit; the overall budget can cut it shorter
    what: str
    needs_gpu: bool = True


STAGES = (
    Stage("environment", 15, "GPU name, SM count, driver, CUDA, torch, triton, Python, commit", needs_gpu=False),
    Stage("estimate", 180, "python -m vit_fast.cost --backends torch fused --json cost.json (CPU; runs beside "
          "the GPU stages)", needs_gpu=False),
    Stage("kernels", 130, f"the training step ({PRESET}, batch {BATCH}, bf16 autocast, default recipe), fused "
          f"and torch, CUDA graph replays under torch.profiler: per-kernel times beside the estimate"),
    Stage("bench_train", 110, f"benchmarks/bench_train.py's time_provider for {', '.join(BENCH_PROVIDERS)}"),
    Stage("tests", 150, "python -m pytest -m gpu, and the op parity files natively on CUDA (one process per "
          "file, the offline ahead-of-time compile tests left out)"),
)
STAGE = {s.name: s for s in STAGES}

# The cost account's GPUs, matched against torch.cuda.get_device_name() (first match wins), and what
# to say when the measured GPU is not the modelled one.
ESTIMATE_GPU_FOR = (
    ("H200", "H100 SXM", "an H200 is an H100 SXM with more and faster memory: 4.8 TB/s against 3.35 TB/s, the "
                         "same 989 dense bf16 TFLOP/s (NVIDIA H200 and H100 data sheets), so memory-bound "
                         "kernels should run faster than the H100 SXM estimate"),
    ("H100 PCIe", "H100 SXM", "an H100 PCIe has 114 SMs and 2.0 TB/s (NVIDIA H100 data sheet), fewer than the "
                              "modelled H100 SXM's 132 SMs and 3.35 TB/s"),
    ("H100 NVL", "H100 SXM", "an H100 NVL has 3.9 TB/s and 835 dense bf16 TFLOP/s (NVIDIA H100 data sheet), not "
                             "the modelled H100 SXM's figures"),
    ("H100", "H100 SXM", ""),
    ("A100", "A100 SXM", ""),
)


# ----------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def slug(name: str) -> str:
    """A GPU name as a folder name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def environment_info() -> dict:
    """What the results were measured on: benchmarking.environment() plus the SM count, memory,
    nvcc, CPU count, the extension's state and the commit."""
    import torch

    from .benchmarking import environment

    info = environment()
    info["cpu_count"] = os.cpu_count()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["memory_gb"] = round(props.total_memory / 1e9, 1)
        info["gpu_count"] = torch.cuda.device_count()
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
            info["nvcc"] = [ln for ln in out.splitlines() if ln.strip()][-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["nvcc"] = None
    try:
        from . import _C  # noqa: F401  the CUDA C++ patch embedding
        info["extension"] = "built"
    except ImportError as err:
        info["extension"] = f"missing: {err}"
    # A copy of the tree without .git can name its commit in FIRST_LIGHT_COMMIT.
    info["commit"] = _git("rev-parse", "HEAD") or os.environ.get("FIRST_LIGHT_COMMIT")
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["uncommitted_changes"] = None if status is None else bool(status)
    return info


def pick_estimate_gpu(gpu_name: str | None, available: list[str]) -> tuple[str | None, str]:
    """(the cost account's GPU whose figures stand for ``gpu_name``, a note saying how they differ)."""
    if not available:
        return None, "the cost account has no estimate"
    if gpu_name:
        for key, modelled, note in ESTIMATE_GPU_FOR:
            # The account's name ("H100 SXM"), else its short key ("H100").
            found = [a for a in available if a == modelled] or [a for a in available if a == modelled.split()[0]]
            if key in gpu_name and found:
                return found[0], (f"{gpu_name} measured against the {found[0]} estimate"
                                   + (f": {note}" if note else ""))
    first = available[0]
    if not gpu_name:
        return first, f"no GPU measured; the {first} estimate shown"
    return first, f"the cost account models no GPU like {gpu_name}; its {first} figures are shown, which do not describe it"


# ----------------------------------------------------------------------------- the kernel table


def grid3(grid) -> tuple[int, int, int] | None:
    """A launch grid as three ints (missing axes are 1); None when there is none."""
    if grid is None:
        return None
    if isinstance(grid, str):  # "12x128", "(12, 128)"
        grid = re.findall(r"\d+", grid) or None
        if grid is None:
            return None
    if isinstance(grid, (int, float)):
        grid = [grid]
    g = [int(v) for v in grid][:3]
    return tuple(g + [1] * (3 - len(g)))


def op_name(name: str) -> str:
    """An operator's name without its namespace and overload: "aten::addmm", "aten.addmm.default"
    and "addmm" are all "addmm"; other names (kernels, "vit_fast::attention") are kept."""
    for prefix in ("aten::", "aten."):
        if name.startswith(prefix):
            return name[len(prefix):].split(".")[0]
    if re.fullmatch(r"\w+\.\w+", name):  # op.overload
        return name.split(".")[0]
    return name


def trace_kernels(trace: dict) -> list[dict]:
    """The device work of a chrome trace (torch.profiler's export): kernels, memcpys and memsets as
    {"name", "grid", "us", "correlation"}."""
    found = []
    for e in trace.get("traceEvents", ()):
        if e.get("ph") != "X" or str(e.get("cat", "")).lower() not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        args = e.get("args") or {}
        found.append({"name": e["name"], "grid": grid3(args.get("grid")), "us": float(e.get("dur", 0.0)),
                      "correlation": args.get("correlation")})
    return found


def trace_kernel_ops(trace: dict) -> dict[tuple, list[str]]:
    """For each (kernel name, grid) of a trace with host operators: the operators around its
    launch, outermost first (e.g. ["aten::linear", "aten::addmm"]), found through the launch's
    correlation id and the operators open on the launching thread at that moment. The first launch
    of a (name, grid) speaks for all of them (a copy kernel launched by two operators is put down to
    the first)."""
    events = trace.get("traceEvents", ())
    launches, ops = {}, defaultdict(list)
    for e in events:
        cat = str(e.get("cat", "")).lower()
        if e.get("ph") != "X":
            continue
        if cat in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = (e.get("pid"), e.get("tid"), float(e["ts"]))
        elif cat in ("cpu_op", "user_annotation"):
            ops[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)),
                                                      e["name"]))
    found: dict[tuple, list[str]] = {}
    for k in trace_kernels(trace):
        key = (k["name"], k["grid"])
        if key in found or k["correlation"] not in launches:
            continue
        pid, tid, ts = launches[k["correlation"]]
        around = sorted((o for o in ops.get((pid, tid), ()) if o[0] <= ts <= o[1]), key=lambda o: (o[0], -o[1]))
        found[key] = [o[2] for o in around if not o[2].startswith("ProfilerStep")]
    return found


def measured_groups(kernels: list[dict], steps: int, ops: dict[tuple, list[str]] | None = None) -> list[dict]:
    """Device events grouped by (name, grid): launches per step, median and total microseconds,
    the operators behind them; ``durations_us`` kept for pooling (dropped from the report)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for k in kernels:
        groups[(k["name"], k["grid"])].append(k["us"])
    rows = []
    for (name, grid), durations in groups.items():
        rows.append({"name": name, "grid": list(grid) if grid else None, "launches_per_step": len(durations) / steps,
                     "median_us": statistics.median(durations), "us_per_step": sum(durations) / steps,
                     "ops": (ops or {}).get((name, grid), []), "durations_us": durations})
    return sorted(rows, key=lambda r: -r["us_per_step"])


def _estimate_groups(kernels: list[dict]) -> dict[tuple, dict]:
    """The estimate's kernels grouped by (name, grid): launches, summed us, floor_us and launch_us.
    An entry is one launch unless it carries "launches" (or "count"), with its figures per launch."""
    groups: dict[tuple, dict] = {}
    for k in kernels:
        n = k.get("launches", k.get("count", 1)) or 1
        key = (op_name(str(k["name"])), grid3(k.get("grid")))
        g = groups.setdefault(key, {"launches": 0, "us": 0.0, "floor_us": 0.0, "launch_us": 0.0, "bound": set()})
        g["launches"] += n
        for field in ("us", "floor_us", "launch_us"):
            g[field] += n * float(k.get(field) or 0.0)
        if k.get("bound"):
            g["bound"].add(str(k["bound"]))
    return groups


def _measured_side(groups: list[dict]) -> dict:
    durations = [d for g in groups for d in g["durations_us"]]
    return {"launches_per_step": sum(g["launches_per_step"] for g in groups),
            "median_us": statistics.median(durations) if durations else None,
            "us_per_step": sum(g["us_per_step"] for g in groups)}


def _estimate_side(groups: list[dict]) -> dict:
    launches = sum(g["launches"] for g in groups)
    us = sum(g["us"] for g in groups)
    return {"launches_per_step": launches, "us": us / launches if launches else None, "us_per_step": us,
            "floor_us_per_step": sum(g["floor_us"] for g in groups),
            "launch_us_per_step": sum(g["launch_us"] for g in groups),
            "bound": "/".join(sorted(set().union(*(g["bound"] for g in groups)))) or None}


def _row(name: str, grid, match: str, measured: list[dict], estimated: list[dict]) -> dict:
    m = _measured_side(measured) if measured else None
    e = _estimate_side(estimated) if estimated else None
    ratio = m["us_per_step"] / e["us_per_step"] if m and e and e["us_per_step"] else None
    floor = m["us_per_step"] / e["floor_us_per_step"] if m and e and e["floor_us_per_step"] else None
    return {"name": name, "grid": list(grid) if grid else None, "match": match,
            "kernels": sorted({g["name"] for g in measured}), "measured": m, "estimate": e,
            "ratio": ratio, "ratio_to_floor": floor}


def join(measured: list[dict], estimate_kernels: list[dict]) -> list[dict]:
    """The calibration table: measured kernel groups (``measured_groups``) beside the estimate's
    kernels, per step. Matched, in order: by kernel name and grid ("name+grid": a Triton kernel
    whose planned grid is the launched one); by kernel name alone ("name": the grids differ); by
    operator ("op": the estimate names an aten operator, the measured library kernels launched
    inside it, the innermost such operator winning). What is left on either side is a row of its
    own ("measured only", "estimate only"). ``ratio`` is measured over estimated microseconds per
    step (> 1: slower than the estimate), ``ratio_to_floor`` the same over the estimate's floor."""
    est = _estimate_groups(estimate_kernels)
    left = list(measured)
    rows = []
    for (name, grid), e in list(est.items()):  # name and grid
        hit = [m for m in left if m["name"] == name and grid is not None and grid3(m["grid"]) == grid]
        if hit:
            rows.append(_row(name, grid, "name+grid", hit, [e]))
            left = [m for m in left if m not in hit]
            del est[(name, grid)]
    by_name: dict[str, list] = defaultdict(list)
    for (name, grid), e in est.items():
        by_name[name].append(((name, grid), e))
    for name, entries in list(by_name.items()):  # name alone
        hit = [m for m in left if m["name"] == name]
        if hit:
            rows.append(_row(name, None, "name", hit, [e for _, e in entries]))
            left = [m for m in left if m not in hit]
            del by_name[name]
    per_op: dict[str, list] = defaultdict(list)
    for m in left:  # the innermost operator the estimate names
        for op in reversed(m.get("ops") or []):
            if op_name(op) in by_name:
                per_op[op_name(op)].append(m)
                break
    for name, hit in per_op.items():
        rows.append(_row(name, None, "op", hit, [e for _, e in by_name.pop(name)]))
        left = [m for m in left if m not in hit]
    rows += [_row(m["name"], grid3(m["grid"]), "measured only", [m], []) for m in left]
    rows += [_row(name, grid, "estimate only", [], [e]) for entries in by_name.values() for (name, grid), e in entries]
    return sorted(rows, key=lambda r: (-(r["measured"] or {}).get("us_per_step", 0.0),
                                       -(r["estimate"] or {}).get("us_per_step", 0.0), r["name"]))


def calibration(measured: dict, cost: dict | None, gpu_name: str | None) -> dict:
    """Per backend, the measured kernels (``measured[backend]``: the kernels stage's part) joined with
    the cost account's estimate for the GPU nearest ``gpu_name``."""
    estimate = (cost or {}).get("estimate")
    result = {"estimate_available": bool(estimate), "backends": {}}
    if not estimate:
        result["note"] = ("the estimate was not available: the cost JSON has no \"estimate\" section"
                          if cost else "the estimate was not available: no cost JSON")
    gpus = sorted({g for b in (estimate or {}).values() for g in b})
    chosen, note = pick_estimate_gpu(gpu_name, gpus)
    if estimate:
        result["estimate_gpu"], result["note"] = chosen, note
    for backend in dict.fromkeys([*measured, *(estimate or {})]):
        m = measured.get(backend) or {}
        e = ((estimate or {}).get(backend) or {}).get(chosen) or {}
        groups = m.get("groups", [])
        rows = join(groups, e.get("kernels", []))
        entry = {k: v for k, v in m.items() if k not in ("groups", "eager_groups")}
        entry["measured_kernel_ms_per_step"] = sum(g["us_per_step"] for g in groups) / 1e3 if groups else None
        entry["estimate"] = {k: e.get(k) for k in ("total_ms", "forward_backward_ms")} if e else None
        entry["rows"] = rows
        result["backends"][backend] = entry
    return result


# ----------------------------------------------------------------------------- the GPU stages (subprocesses)


def load_bench_train():
    """benchmarks/bench_train.py, loaded by its path (it is a script of the checkout, not a module of the package)."""
    path = ROOT / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("_first_light_bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _export_trace(prof, path: Path) -> dict:
    """The profile as a chrome trace, kept gzipped at ``path``; the trace's dict."""
    raw = path.with_suffix("")  # x.json.gz -> x.json
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return trace


def profile_backend(bench, backend: str, trace_dir: Path) -> dict:
    """The kernels of the training step on ``backend``, replayed from its CUDA graph: the last eager
    warm-up step profiled with host operators (which operator launched what), then, after the capture
    and two replays, PROFILED_REPLAYS replays profiled on the device only."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as run_dir:
        run = bench.training_run(PRESET, BATCH, backend, "cuda-graphs", [], run_dir)
        run.model.train()
        step = bench.step_fn(run)
        graphed = run.graph
        if graphed is None:
            raise RuntimeError("the run has no CUDA graph: --cuda-graphs did not take")
        while graphed.eager_steps < graphed.warmup_steps - 1:  # compile, autotune, optimizer state
            step()
        torch.cuda.synchronize()
        eager_trace = None
        if graphed.eager_steps < graphed.warmup_steps:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            eager_trace = _export_trace(prof, trace_dir / f"{backend}_eager_step.json.gz")
        for _ in range(3):  # the capture, then two replays
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start.record()
            for _ in range(PROFILED_REPLAYS):
                step()
            end.record()
            torch.cuda.synchronize()
        graph_trace = _export_trace(prof, trace_dir / f"{backend}_graph_replays.json.gz")
        step_ms = start.elapsed_time(end) / PROFILED_REPLAYS
        recipe = {k: getattr(run.config, k, None) for k in ("recipe", "mixup", "cutmix", "clip_grad", "drop_path")}
    ops = trace_kernel_ops(eager_trace) if eager_trace else {}
    replayed = trace_kernels(graph_trace)
    result = {"mode": "cuda-graphs", "profiled_steps": PROFILED_REPLAYS, "recipe": recipe,
              "step_ms_under_profiler": step_ms, "groups": measured_groups(replayed, PROFILED_REPLAYS, ops)}
    if eager_trace:
        eager = trace_kernels(eager_trace)
        result["eager_step"] = {"launches": len(eager), "kernel_ms": sum(k["us"] for k in eager) / 1e3}
    if not replayed:  # a profiler that does not see inside graphs: fall back on the eager step's kernels
        result["mode"], result["profiled_steps"] = "eager (the profiler saw no kernel inside the graph)", 1
        result["groups"] = measured_groups(trace_kernels(eager_trace or {}), 1, ops)
    return result


def _write_part(out: Path, name: str, payload: dict) -> None:
    part = out / "parts" / f"{name}.json"
    part.parent.mkdir(parents=True, exist_ok=True)
    tmp = part.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, part)


def stage_kernels(out: Path) -> None:
    import torch

    bench = load_bench_train()
    trace_dir = out / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)
    part = {}
    for backend in KERNEL_BACKENDS:
        t0 = time.perf_counter()
        try:
            part[backend] = profile_backend(bench, backend, trace_dir)
        except Exception as err:  # noqa: BLE001 - recorded, and the other backend still runs
            part[backend] = {"error": f"{type(err).__name__}: {err}"}
        part[backend]["seconds"] = round(time.perf_counter() - t0, 1)
        torch.cuda.empty_cache()
        _write_part(out, "kernels", part)
        print(f"[first_light] kernels: {backend} done in {part[backend]['seconds']} s", flush=True)


def stage_bench_train(out: Path) -> None:
    import torch

    from .benchmarking import device_peaks, write_json

    bench = load_bench_train()
    row = {"preset": PRESET, "batch": BATCH}
    args = {"presets": [PRESET], "batch_sizes": [BATCH], "providers": list(BENCH_PROVIDERS), "extra": [],
            "note": "the CLI's default recipe (bench_train.py's own default turns mixup and cutmix off)"}
    for name in BENCH_PROVIDERS:
        backend, mode = name.split("/")
        try:
            row[name] = bench.time_provider(PRESET, BATCH, backend, mode, [])
        except torch.cuda.OutOfMemoryError:
            row[name] = {"error": "out of memory"}
        except Exception as err:  # noqa: BLE001 - recorded, and the next provider still runs
            row[name] = {"error": f"{type(err).__name__}: {err}"}
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        base = row.get(bench.BASELINE, {}).get("ms")
        for r in row.values():
            if isinstance(r, dict) and "ms" in r and base:
                r["speedup_vs_baseline"] = base / r["ms"]
        write_json("bench_train", {"args": args, "timed": True, "device": device_peaks(), "baseline": bench.BASELINE,
                                   "rows": [row]}, out)


# ----------------------------------------------------------------------------- running stages


def _kill(proc: subprocess.Popen) -> None:
    """End a stage's process and its children (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:  # the child holds its own descriptor
        return subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, str]:
    """Wait for every process until ``timeout`` seconds from now; kill the rest. {name: status}."""
    end = time.monotonic() + max(timeout, 0.0)
    status = {}
    for name, proc in procs.items():
        try:
            rc = proc.wait(max(end - time.monotonic(), 0.0))
            status[name] = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            _kill(proc)
            status[name] = f"timed out after {timeout:.0f} s"
    return status


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _stage_errors(name: str, out: Path) -> list[str]:
    """The backends (kernels) or providers (bench_train) whose part of a stage failed."""
    path = out / "parts" / "kernels.json" if name == "kernels" else out / "bench_train.json"
    if not path.exists():
        return []
    payload = json.loads(path.read_text())
    entries = payload.items() if name == "kernels" else payload.get("rows", [{}])[0].items()
    return [k for k, v in entries if isinstance(v, dict) and "error" in v]


def _with_errors(status: str, errors: list[str]) -> str:
    if not errors:
        return status
    return f"{'failed' if status == 'ok' else status}: error in {', '.join(errors)}"


def pytest_groups() -> dict[str, list[str]]:
    """The tests stage's pytest invocations, one process each: the gpu-marked tests, then each op's
    parity file (vit_fast.fused.registry) natively, without its offline compile tests."""
    from .fused import registry

    groups = {"gpu-marked": ["-m", "gpu"]}
    for path in dict.fromkeys(registry.parity_tests()):
        if "aot" not in Path(path).stem:
            groups[Path(path).stem] = [path, "-m", "not gpu", "-k", OFFLINE_TESTS]
    return groups


_RESULT = re.compile(r"^\S+::\S*\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")
_COLLECTED = re.compile(r"collected (\d+) items?(?: / (\d+) deselected)?")


def pytest_counts(text: str) -> dict:
    """Counts from pytest's verbose output: per-test lines (present even when the run was cut off),
    the collected and deselected numbers, and the closing summary line when there is one."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
    key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "xfailed",
           "XPASS": "xpassed"}
    failed = []
    for line in text.splitlines():
        m = _RESULT.match(line)
        if m:
            counts[key[m.group(1)]] += 1
            if m.group(1) in ("FAILED", "ERROR"):
                failed.append(line.split()[0])
    collected = _COLLECTED.search(text)
    selected = None
    if collected:
        selected = int(collected.group(1)) - int(collected.group(2) or 0)
    summary = [ln for ln in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", ln)]
    finished = bool(summary)
    if finished:
        for n, word in _SUMMARY.findall(summary[-1]):
            word = "errors" if word.startswith("error") else word
            if word in counts:
                counts[word] = int(n)
    ran = sum(counts.values())
    return {**counts, "selected": selected, "finished": finished,
            "not_reached": (selected - ran) if selected is not None and selected >= ran else None,
            "failed_tests": failed[:50]}


def stage_tests(out: Path, timeout: float) -> dict:
    procs = {}
    for name, selection in pytest_groups().items():
        argv = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--no-header", *selection]
        procs[name] = _start(argv, out / "logs" / f"tests_{name}.log")
    status = _finish(procs, timeout)
    groups = {}
    for name in procs:
        text = (out / "logs" / f"tests_{name}.log").read_text(errors="replace")
        if "No module named pytest" in text:
            status[name] = "not run: pytest is not installed here"
        groups[name] = {"selection": " ".join(pytest_groups()[name]), "status": status[name], **pytest_counts(text)}
    return groups


# ----------------------------------------------------------------------------- the report


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _grid(g) -> str:
    return "x".join(str(v) for v in g) if g else "-"


def markdown(report: dict) -> str:
    """FIRST_LIGHT.md: the header (what was measured on which GPU, when, at which commit), the stages,
    the calibration table per backend, bench_train and the tests."""
    env = report["environment"]
    gpu = env.get("gpu")
    dry = report.get("dry_run")
    lines = [f"# GPU first light: {gpu}" if gpu and not dry else "# GPU first light (dry run): nothing measured", ""]
    if dry:
        lines += [f"**A dry run on a machine without a CUDA GPU ({env.get('platform')}): no time on this page was "
                  "measured.** It checks the plan, the estimate and the writers; the figures shown are the cost "
                  "account's estimates.", ""]
    else:
        lines += [f"**Measurements on one {gpu}** ({env.get('sm_count')} SMs, {env.get('memory_gb')} GB), taken "
                  f"{env.get('date_utc')} by `python -m vit_fast.first_light`. Figures marked *estimate* are the "
                  "cost account's model, not measurements.", ""]
    commit = env.get("commit") or "unknown (no git)"
    lines += [f"- commit: `{commit}`" + (" with uncommitted changes" if env.get("uncommitted_changes") else ""),
              f"- driver {env.get('driver')}, CUDA runtime {env.get('cuda_runtime')}, nvcc: {env.get('nvcc')}",
              f"- torch {env.get('torch')}, triton {env.get('triton')}, Python {env.get('python')}, "
              f"{env.get('cpu_count')} CPUs; extension: {env.get('extension')}",
              f"- budget: {report['budget_s']:.0f} s for the stages below"
              + (f" (the install took {report['install_s']:.0f} s before them)" if report.get("install_s") is not None
                 else ""), "",
              "## Stages", "", "| stage | status | seconds | limit s | what |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {_fmt(s.get('seconds'), '.0f')} | "
                     f"{_fmt(s.get('limit_s'), '.0f')} | {s.get('what', '')} |")
    cal = report.get("calibration")
    if cal:
        lines += ["", "## Kernels per training step, measured beside the estimate", "",
                  f"{PRESET}, batch {BATCH}, bf16 autocast, the training CLI's default recipe, the step replayed "
                  "from one CUDA graph. Measured: median microseconds per launch over the profiled replays, and "
                  "their sum per step. Estimate: the cost account's model (" + (cal.get("note") or "") + "). "
                  "Ratio: measured / estimated microseconds per step (> 1: slower than modelled); ratio to "
                  "floor: the same against the estimate's floor.", ""]
        for backend, b in cal["backends"].items():
            lines += [f"### {backend}", ""]
            if b.get("error"):
                lines += [f"measurement failed: {b['error']}", ""]
            est = b.get("estimate") or {}
            lines.append(f"- measured kernel time per step: {_fmt(b.get('measured_kernel_ms_per_step'), '.3f')} ms "
                         f"(mode {b.get('mode', '-')}, {b.get('profiled_steps', '-')} steps; step under the profiler "
                         f"{_fmt(b.get('step_ms_under_profiler'), '.3f')} ms)")
            lines.append(f"- *estimate*: step {_fmt(est.get('total_ms'), '.3f')} ms, forward + backward "
                         f"{_fmt(est.get('forward_backward_ms'), '.3f')} ms")
            lines += ["", "| kernel | grid | match | launches/step | *est.* | median us/launch | *est.* us/launch "
                      "| us/step | *est.* us/step | ratio | ratio to floor | *est.* bound |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in b["rows"]:
                m, e = r["measured"] or {}, r["estimate"] or {}
                name = r["name"] if len(r["name"]) <= 60 else r["name"][:57] + "..."
                if r["match"] == "op" and r["kernels"]:
                    name += f" ({len(r['kernels'])} kernel{'s' if len(r['kernels']) > 1 else ''})"
                lines.append(f"| `{name}` | {_grid(r['grid'])} | {r['match']} | {_fmt(m.get('launches_per_step'), 'g')} "
                             f"| {_fmt(e.get('launches_per_step'), 'g')} | {_fmt(m.get('median_us'))} | "
                             f"{_fmt(e.get('us'))} | {_fmt(m.get('us_per_step'))} | {_fmt(e.get('us_per_step'))} | "
                             f"{_fmt(r['ratio'], '.2f')} | {_fmt(r['ratio_to_floor'], '.2f')} | {e.get('bound') or '-'} |")
            lines.append("")
    bench = report.get("bench_train")
    if bench and bench.get("rows"):
        row = bench["rows"][0]
        lines += ["## Training step, bench_train (measured)", "",
                  f"{PRESET}, batch {BATCH}, the CLI's default recipe; step time from `triton.testing.do_bench` "
                  "(median, 20th-80th percentile).", "",
                  "| provider | ms | p20-p80 ms | images/s | peak GB | speedup over torch/eager |", "|---|---|---|---|---|---|"]
        for name in BENCH_PROVIDERS:
            r = row.get(name)
            if r is None:
                lines.append(f"| {name} | not reached | | | | |")
            elif "error" in r:
                lines.append(f"| {name} | {r['error'][:120]} | | | | |")
            else:
                lines.append(f"| {name} | {r['ms']:.3f} | {r['ms_p20']:.3f}-{r['ms_p80']:.3f} | "
                             f"{r['images_per_s']:.0f} | {r['peak_memory_gb']:.2f} | {_fmt(r.get('speedup_vs_baseline'), '.2f')} |")
        lines.append("")
    tests = report.get("tests")
    if tests:
        lines += ["## Tests on the GPU", "", "| group | status | selected | passed | failed | errors | skipped | not reached |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, t in tests.items():
            lines.append(f"| {name} | {t['status']} | {_fmt(t.get('selected'), 'd')} | {t['passed']} | {t['failed']} "
                         f"| {t['errors']} | {t['skipped']} | {_fmt(t.get('not_reached'), 'd')} |")
        failed = [f for t in tests.values() for f in t.get("failed_tests", ())]
        if failed:
            lines += ["", "Failed: " + ", ".join(f"`{f}`" for f in failed[:40])]
        lines.append("")
    if report.get("checks"):
        lines += ["## Checks", ""] + [f"- {c}" for c in report["checks"]] + [""]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """first_light.json and FIRST_LIGHT.md in ``out`` (each replaced whole)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("first_light.json", json.dumps(report, indent=2, default=str)), ("FIRST_LIGHT.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


# ----------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vit_fast.first_light",
                                description="GPU first light: environment, per-kernel times beside the estimate, "
                                            "bench_train and the CUDA tests on one GPU, under a time budget")
    p.add_argument("--out", type=Path, default=None,
                   help="where the results go (default results/gpu/<gpu-name>/ in the checkout)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"hard limit for all stages, in seconds (default {DEFAULT_BUDGET_S:.0f}: 8 minutes less the build)")
    p.add_argument("--skip-tests", action="store_true", help="leave out the tests stage")
    p.add_argument("--dry-run", action="store_true",
                   help="without a GPU: check the stages, the estimate and its join, and write the report files")
    p.add_argument("--cost-json", type=Path, default=None,
                   help="use this `python -m vit_fast.cost --json` output rather than running the account")
    p.add_argument("--install-log", type=Path, default=None, help=argparse.SUPPRESS)  # from the shell wrapper
    p.add_argument("--install-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--install-status", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage", choices=("kernels", "bench_train"), default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with errors_handled(OSError):
        if args.stage:  # one GPU stage, in its own process
            out = Path(args.out)
            (stage_kernels if args.stage == "kernels" else stage_bench_train)(out)
            return 0
        return run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    from .cli import UsageError

    if args.budget_s <= 0:
        raise UsageError(f"--budget-s must be positive, got {args.budget_s}")
    if args.cost_json is not None and not args.cost_json.is_file():
        raise UsageError(f"--cost-json {args.cost_json} is not a file")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: first light needs one (torch.cuda.is_available() is False); "
                         "`python -m vit_fast.first_light --dry-run` checks the plan on a CPU")
    start = time.monotonic()
    deadline = start + args.budget_s

    def left() -> float:
        return deadline - time.monotonic()

    t0 = time.monotonic()
    env = environment_info()
    gpu = env.get("gpu")
    out = (args.out or ROOT / "results" / "gpu" / (slug(gpu) if gpu and not args.dry_run else "dry-run")).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    report = {"title": f"GPU first light: measurements on {gpu}" if gpu and not args.dry_run
              else "GPU first light (dry run): nothing measured",
              "gpu": gpu, "date_utc": env["date_utc"], "commit": env.get("commit"), "dry_run": args.dry_run,
              "budget_s": args.budget_s, "install_s": args.install_s, "environment": env, "stages": [],
              "checks": []}
    stages = report["stages"]
    if args.install_s is not None:
        stages.append({"name": "install", "status": args.install_status or "ok", "seconds": args.install_s,
                       "limit_s": None, "what": "pip install --no-build-isolation --no-deps -e . (the extension's build)",
                       "log": "logs/install.log"})
        if args.install_log and args.install_log.is_file() and args.install_log.resolve() != (out / "logs" / "install.log"):
            shutil.copyfile(args.install_log, out / "logs" / "install.log")
    stages.append({"name": "environment", "status": "ok", "seconds": round(time.monotonic() - t0, 1),
                   "limit_s": STAGE["environment"].budget_s, "what": STAGE["environment"].what})
    print(f"[first_light] {report['title']}; results in {out}", flush=True)
    write_report(report, out)

    def record(name: str, status: str, t_start: float, limit: float | None, **extra) -> None:
        stages.append({"name": name, "status": status, "seconds": round(time.monotonic() - t_start, 1),
                       "limit_s": limit, "what": STAGE[name].what, **extra})
        print(f"[first_light] {name}: {status} in {stages[-1]['seconds']:.0f} s", flush=True)
        write_report(report, out)

    # The estimate: the cost account on the CPU, beside the GPU stages.
    cost_path = out / "cost.json"
    estimate_proc, t_estimate = None, time.monotonic()
    if args.cost_json is not None:
        if args.cost_json.resolve() != cost_path:
            shutil.copyfile(args.cost_json, cost_path)
    else:
        if cost_path.exists():
            cost_path.unlink()
        estimate_proc = _start([sys.executable, "-m", "vit_fast.cost", "--backends", *KERNEL_BACKENDS,
                                "--json", str(cost_path)], out / "logs" / "estimate.log")

    for name in ("kernels", "bench_train"):
        limit = min(STAGE[name].budget_s, left() - REPORT_RESERVE_S)
        if args.dry_run:
            bench = load_bench_train()
            missing = [p for p in BENCH_PROVIDERS if p.split("/")[1] not in bench.MODES
                       or p.split("/")[0] not in bench.BACKENDS]
            if missing:
                raise SystemExit(f"benchmarks/bench_train.py has no provider {missing}")
            record(name, "not run (dry run: needs a CUDA GPU)", time.monotonic(), limit)
            continue
        if limit <= 0:
            record(name, "not run: the budget was spent", time.monotonic(), 0)
            continue
        t_stage = time.monotonic()
        status = _finish({name: _start([sys.executable, "-m", "vit_fast.first_light", "--stage", name, "--out", str(out)],
                                       out / "logs" / f"{name}.log")}, limit)[name]
        if name == "bench_train" and (out / "bench_train.json").exists():
            report["bench_train"] = json.loads((out / "bench_train.json").read_text())
        status = _with_errors(status, _stage_errors(name, out))
        record(name, status, t_stage, limit, log=f"logs/{name}.log", last_line=_last_line(out / "logs" / f"{name}.log"))

    if args.skip_tests:
        record("tests", "not run (--skip-tests)", time.monotonic(), None)
    elif args.dry_run:
        groups = pytest_groups()
        missing = [g for g, sel in groups.items() if sel[0].endswith(".py") and not (ROOT / sel[0]).is_file()]
        if missing:
            raise SystemExit(f"the tests stage names test files that do not exist: {missing}")
        report["checks"].append(f"tests stage: {len(groups)} pytest processes: " + "; ".join(
            f"{g}: {' '.join(s)}" for g, s in groups.items()))
        record("tests", "not run (dry run: needs a CUDA GPU)", time.monotonic(), STAGE["tests"].budget_s)
    else:
        limit = min(STAGE["tests"].budget_s, left() - REPORT_RESERVE_S)
        t_stage = time.monotonic()
        if limit <= 0:
            record("tests", "not run: the budget was spent", t_stage, 0)
        else:
            report["tests"] = stage_tests(out, limit)
            bad = [g for g, t in report["tests"].items() if t["status"] != "ok"]
            record("tests", "ok" if not bad else f"not ok: {', '.join(bad)}", t_stage, limit)

    if estimate_proc is not None:
        limit = max(min(STAGE["estimate"].budget_s - (time.monotonic() - t_estimate), left() - 3), 0.0)
        status = _finish({"estimate": estimate_proc}, limit)["estimate"]
        record("estimate", status, t_estimate, STAGE["estimate"].budget_s, log="logs/estimate.log")
    else:
        record("estimate", f"ok (from {args.cost_json})", t_estimate, None)
    cost = json.loads(cost_path.read_text()) if cost_path.exists() else None
    kernels_part = out / "parts" / "kernels.json"
    measured = json.loads(kernels_part.read_text()) if kernels_part.exists() else {}
    report["calibration"] = calibration(measured, cost, None if args.dry_run else gpu)
    if args.dry_run:
        report["checks"].append("benchmarks/bench_train.py loads and has the providers " + ", ".join(BENCH_PROVIDERS))
        report["checks"].append("the join and the report writers ran on the estimate alone (every row 'estimate only')"
                                if report["calibration"]["estimate_available"] else report["calibration"]["note"])
    write_report(report, out)
    print(f"[first_light] wrote {out / 'first_light.json'} and {out / 'FIRST_LIGHT.md'}", flush=True)
    print(f"[first_light] calibration: {report['calibration'].get('note')}", flush=True)
    failed = [s["name"] for s in stages if not s["status"].startswith(("ok", "not run (dry run", "not run (--skip"))]
    if failed:
        print(f"[first_light] not ok: {', '.join(failed)} (see {out / 'FIRST_LIGHT.md'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
