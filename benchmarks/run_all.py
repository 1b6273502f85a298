"""One command for the whole validation: parity suite, op benchmarks, training benchmark, report.

    python benchmarks/run_all.py [--out-dir report] [--quick] [--skip-tests]

On a CUDA machine (run_gpu): the test suite on the GPU (bf16 included), every op benchmark, the training
benchmark, and a short real training comparison (same seed and steps with --fused and with the
torch backend: loss agreement and images/s). Without a GPU (run_cpu): the CPU-meaningful parts (parity
under the Triton interpreter, the per-step cost account, the ahead-of-time compile checks) and a
plain statement that no timings were taken.

The report directory gets summary.json (environment: GPU, driver, torch/triton/CUDA versions, and
every figure), SUMMARY.md (tables), the benchmarks' own JSON and PNG files, and logs/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from vit_fast import benchmarking as common
from vit_fast.benchmarking import environment, gpu_available
from vit_fast.fused import registry

ROOT = Path(__file__).resolve().parents[1]

# Derived from the one list of fused ops (vit_fast.fused.registry.OPS): each op's benchmark and
# test file, then the pipeline's benchmark and the whole model's tests.
OP_BENCHMARKS = (*(Path(script).stem for script in registry.benchmark_scripts()), "bench_data")
PARITY_TESTS = registry.parity_tests()


def run_step(name: str, cmd: list[str], out: Path, timeout: float) -> dict:
    """Run one step as a subprocess, log its output, never let it take the others down."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[run_all] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = "timeout", f"{err.stdout or ''}{err.stderr or ''}\n[run_all] timed out after {timeout:.0f} s"
    log.write_text(text if isinstance(text, str) else text.decode())
    seconds = time.perf_counter() - t0
    status = "ok" if rc == 0 else f"failed ({rc})"
    tail = [ln for ln in str(text).splitlines() if ln.strip()][-1:] or [""]
    print(f"[run_all] {name}: {status} in {seconds:.0f} s  {tail[0][:160]}", flush=True)
    return {"name": name, "status": status, "seconds": round(seconds, 1), "log": str(log.relative_to(out)),
            "last_line": tail[0]}


def speedup_rows(payload, source: str) -> list[dict]:
    """Every dict in a benchmark's JSON that carries speedup_* tables, flattened for the summary."""
    rows = []

    def walk(node):
        if isinstance(node, dict):
            tables = {k: v for k, v in node.items() if k.startswith("speedup_") and isinstance(v, dict)}
            if tables:
                shape = {k: v for k, v in node.items() if isinstance(v, (int, float, str)) and not k.startswith("speedup")}
                for k, table in tables.items():
                    rows.append({"benchmark": source, "pass": k[len("speedup_"):], "shape": shape,
                                 **{f"vs {p}": s for p, s in table.items() if isinstance(s, (int, float))}})
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(payload)
    return rows


def cost_account_png(accounts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(accounts)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    axes[0].bar(names, [accounts[n]["launches"] for n in names], color=["#888", "#4a7", "#c53"][: len(names)])
    axes[0].set_title("operators launched per step")
    axes[1].bar(names, [accounts[n]["bytes"] / 1e9 for n in names], color=["#888", "#4a7", "#c53"][: len(names)])
    axes[1].set_title("GB moved per step (model)")
    fig.suptitle("vit-cifar, batch 128, the step as trained: cost account (a model, not a timing)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_comparison(out: Path, quick: bool, data_dir: str | None) -> tuple[dict, list[dict]]:
    """The same seed and steps with --fused and with the torch backend (GPU only)."""
    steps = []
    runs = {}
    common_args = ["--epochs", "1" if quick else "2", "--seed", "0", "--batch-size", "128"]
    if data_dir and (Path(data_dir) / "cifar-100-python").exists():
        common_args += ["--dataset", "cifar100", "--data-dir", data_dir, "--no-download"]
    else:
        common_args += ["--dataset", "synthetic", "--synthetic-size", "10000" if quick else "50000",
                        "--synthetic-classes", "100"]
    for backend in ("torch", "fused"):
        run_dir = out / "train" / backend
        steps.append(run_step(f"train_{backend}", [sys.executable, "-m", "vit_fast.train", "--backend", backend,
                                                   "--out-dir", str(run_dir), "--overwrite", *common_args], out, 3600))
        metrics = run_dir / "metrics.jsonl"
        runs[backend] = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.exists() else []
    result = {"args": common_args, "runs": runs}
    if runs["torch"] and runs["fused"]:
        a, b = runs["torch"][-1], runs["fused"][-1]
        result["train_loss_abs_diff"] = abs(a["train_loss"] - b["train_loss"])
        result["top1"] = {"torch": a["top1"], "fused": b["top1"]}
        result["images_per_s"] = {"torch": a["images_per_s"], "fused": b["images_per_s"]}
        result["speedup"] = b["images_per_s"] / a["images_per_s"]
    return result, steps


def write_summary_md(out: Path, summary: dict) -> None:
    env = summary["environment"]
    lines = ["# vit_fast validation report", "",
             f"- date (UTC): {env['date_utc']}", f"- GPU: {env.get('gpu') or 'none'}"
             + (f" (driver {env.get('driver')}, capability {env.get('capability')})" if env.get("gpu") else ""),
             f"- torch {env['torch']}, triton {env.get('triton')}, CUDA runtime {env.get('cuda_runtime')}", ""]
    if not summary["timed"]:
        lines += ["**No GPU on this machine: no timings were taken.** What ran: parity under the Triton "
                  "interpreter, the per-step cost account, and the ahead-of-time compile checks.", ""]
    lines += ["## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in summary["steps"]]
    acc = summary.get("cost_account")
    if acc:
        ref = acc["backends"]["reference"]
        lines += ["", f"## Cost account: {acc['preset']}, batch {acc['batch_size']}, "
                  f"{'fp32 pure step' if acc.get('step') == 'pure' else 'the step as trained'} (a model, not a timing)", "",
                  "| backend | operators | GB moved | ops vs reference | bytes vs reference |", "|---|---|---|---|---|"]
        for name, a in acc["backends"].items():
            lines.append(f"| {name} | {a['launches']} | {a['bytes'] / 1e9:.2f} | {a['launches'] / ref['launches']:.2f}x "
                         f"| {a['bytes'] / ref['bytes']:.2f}x |")
    if summary["speedups"]:
        lines += ["", "## Fused speedups (GPU, measured in this run)", "", "| benchmark | pass | shape | speedups |", "|---|---|---|---|"]
        for r in summary["speedups"]:
            shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
            sp = ", ".join(f"{k} x{v:.2f}" for k, v in r.items() if k.startswith("vs "))
            lines.append(f"| {r['benchmark']} | {r['pass']} | {shape} | {sp} |")
    tc = summary.get("training_comparison")
    if tc and "speedup" in tc:
        lines += ["", "## Training comparison (same seed and steps)", "",
                  f"- images/s: torch {tc['images_per_s']['torch']:.0f}, fused {tc['images_per_s']['fused']:.0f} "
                  f"(x{tc['speedup']:.2f}); final train loss differs by {tc['train_loss_abs_diff']:.4f}"]
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n")


def benchmark_step(name: str, out: Path, quick: bool, timeout: float) -> dict:
    """One benchmark script run by its path, as users run it; its JSON and plots written into ``out``."""
    return run_step(name, [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out-dir", str(out),
                           *(["--quick"] if quick else [])], out, timeout)


def summarise(out: Path, steps: list[dict], timed: bool) -> dict:
    """The cost account step (meaningful everywhere), then every benchmark's JSON gathered."""
    cost_json = out / "cost_account.json"
    steps.append(run_step("cost_account", [sys.executable, "-m", "vit_fast.cost", "--preset", "vit-cifar",
                                           "--batch-size", "128", "--json", str(cost_json)], out, 900))
    summary = {"environment": environment(), "timed": timed, "steps": steps, "speedups": [], "benchmarks": {}}
    if not timed:
        summary["notice"] = "No GPU on this machine: no timings were taken."
    for bench in OP_BENCHMARKS + ("bench_train",):
        path = out / f"{bench}.json"
        if path.exists():
            payload = json.loads(path.read_text())
            summary["benchmarks"][bench] = payload
            if timed:
                summary["speedups"] += speedup_rows(payload, bench)
    if cost_json.exists():
        summary["cost_account"] = json.loads(cost_json.read_text())
        cost_account_png({k: v for k, v in summary["cost_account"]["backends"].items()}, out / "cost_account.png")
    return summary


def run_gpu(args) -> dict:
    """The test suite on the GPU, every benchmark timed, the training benchmark and comparison."""
    out, py = args.out_dir, sys.executable
    steps = []
    if not args.skip_tests:  # the quick mode runs the kernels' parity files only (the suite also runs this script)
        steps.append(run_step("tests", [py, "-m", "pytest", "-q", *(PARITY_TESTS if args.quick else ())], out, 5400))
    steps += [benchmark_step(bench, out, args.quick, 3600) for bench in OP_BENCHMARKS]
    steps.append(benchmark_step("bench_train", out, args.quick, 7200))
    summary = summarise(out, steps, timed=True)
    summary["training_comparison"], train_steps = training_comparison(out, args.quick, args.data_dir)
    steps += train_steps
    return summary


def run_cpu(args) -> dict:
    """Parity under the interpreter (or, quick, the ahead-of-time compile checks), every
    benchmark's correctness smoke, and the cost account; nothing timed."""
    out, py = args.out_dir, sys.executable
    steps = []
    if args.quick and not args.skip_tests:  # the interpreter parity of every op is what the benchmarks' smokes check
        steps.append(run_step("aot_compile", [py, "-m", "pytest", "-q", "tests/test_aot.py"], out, 900))
    elif not args.skip_tests:
        steps.append(run_step("parity_and_aot", [py, "-m", "pytest", "-q", *PARITY_TESTS], out, 3600))
    steps += [benchmark_step(bench, out, args.quick, 3600) for bench in OP_BENCHMARKS]
    return summarise(out, steps, timed=False)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "smoke everything (minutes): the test suite's mode", __file__, default_out_dir=Path("report"))
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest (e.g. CI already did)")
    p.add_argument("--data-dir", default="./data", help="CIFAR-100 for the training comparison, if present")
    args = p.parse_args(argv)
    args.out_dir = Path(args.out_dir).resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = run_gpu(args) if gpu_available() else run_cpu(args)
    out = args.out_dir
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_summary_md(out, summary)
    failed = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
    print(f"[run_all] report in {out}: SUMMARY.md, summary.json" + (f"; FAILED: {failed}" if failed else "; all steps ok"))
    if not summary["timed"]:
        print("[run_all] No GPU on this machine: no timings were taken.")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
