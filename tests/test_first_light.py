"""``python -m vit_fast.first_light``: the join of measured kernels with the estimate, the report
writers, the dry run and the refusal without a GPU, on synthetic data (nothing here is a
measurement; the figures are made up to exercise the code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_fast import first_light as fl

ROOT = Path(__file__).resolve().parents[1]


def _kernel(name, grid, us, corr):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": 0.0, "dur": us,
            "args": {"grid": list(grid), "block": [128, 1, 1], "correlation": corr}}


def synthetic_eager_trace() -> dict:
    """A chrome trace as torch.profiler writes it: host operators, launches, kernels."""
    ops = [{"ph": "X", "cat": "cpu_op", "name": "aten::linear", "pid": 1, "tid": 7, "ts": 10.0, "dur": 30.0},
           {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "pid": 1, "tid": 7, "ts": 12.0, "dur": 20.0},
           {"ph": "X", "cat": "cpu_op", "name": "vit_fast::attention", "pid": 1, "tid": 7, "ts": 50.0, "dur": 10.0},
           {"ph": "X", "cat": "cpu_op", "name": "aten::mul", "pid": 1, "tid": 7, "ts": 70.0, "dur": 5.0}]
    launches = [{"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 7, "ts": 15.0,
                 "dur": 2.0, "args": {"correlation": 1}},
                {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "pid": 1, "tid": 7, "ts": 52.0,
                 "dur": 2.0, "args": {"correlation": 2}},
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 7, "ts": 71.0,
                 "dur": 2.0, "args": {"correlation": 3}}]
    kernels = [_kernel("sm90_xmma_gemm_bf16", (4, 8, 1), 9.0, 1), _kernel("attention_fwd_kernel", (12, 128, 1), 20.0, 2),
               _kernel("vectorized_elementwise_kernel", (64, 1, 1), 2.0, 3)]
    return {"traceEvents": ops + launches + kernels}


def synthetic_replays(steps: int) -> list[dict]:
    """The device events of ``steps`` graph replays (no host operators)."""
    trace = {"traceEvents": [e for _ in range(steps) for e in (
        _kernel("sm90_xmma_gemm_bf16", (4, 8, 1), 10.0, None),
        _kernel("attention_fwd_kernel", (12, 128, 1), 20.0, None),
        _kernel("attention_fwd_kernel", (12, 128, 1), 22.0, None),
        _kernel("layernorm_fwd_kernel", (128, 1, 1), 5.0, None),  # planned with another grid
        _kernel("vectorized_elementwise_kernel", (64, 1, 1), 3.0, None),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "dur": 1.0, "args": {}},
    )]}
    return fl.trace_kernels(trace)


ESTIMATE_KERNELS = [
    {"name": "attention_fwd_kernel", "grid": [12, 128], "us": 10.0, "floor_us": 8.0, "launch_us": 2.0, "bound": "memory"},
    {"name": "attention_fwd_kernel", "grid": [12, 128], "us": 10.0, "floor_us": 8.0, "launch_us": 2.0, "bound": "memory"},
    {"name": "layernorm_fwd_kernel", "grid": [65], "us": 4.0, "floor_us": 3.0, "launch_us": 1.0, "bound": "memory"},
    {"name": "aten.addmm.default", "grid": None, "us": 5.0, "floor_us": 4.0, "launch_us": 1.0, "bound": "compute"},
    {"name": "cross_entropy_fwd_kernel", "grid": [128], "us": 2.0, "floor_us": 1.0, "launch_us": 1.0, "bound": "memory"},
]


def test_trace_attribution_names_the_innermost_operators():
    ops = fl.trace_kernel_ops(synthetic_eager_trace())
    assert ops[("sm90_xmma_gemm_bf16", (4, 8, 1))] == ["aten::linear", "aten::addmm"]
    assert ops[("attention_fwd_kernel", (12, 128, 1))] == ["vit_fast::attention"]
    assert ops[("vectorized_elementwise_kernel", (64, 1, 1))] == ["aten::mul"]


def test_join_matches_by_name_grid_then_name_then_operator_and_keeps_both_leftovers():
    steps = 2
    groups = fl.measured_groups(synthetic_replays(steps), steps, fl.trace_kernel_ops(synthetic_eager_trace()))
    rows = {r["name"]: r for r in fl.join(groups, ESTIMATE_KERNELS)}
    att = rows["attention_fwd_kernel"]
    assert att["match"] == "name+grid" and att["grid"] == [12, 128, 1]
    assert att["measured"]["launches_per_step"] == 2 and att["measured"]["median_us"] == 21.0
    assert att["measured"]["us_per_step"] == 42.0 and att["estimate"]["us_per_step"] == 20.0
    assert att["ratio"] == pytest.approx(2.1) and att["ratio_to_floor"] == pytest.approx(42.0 / 16.0)
    ln = rows["layernorm_fwd_kernel"]
    assert ln["match"] == "name" and ln["grid"] is None and ln["ratio"] == pytest.approx(5.0 / 4.0)
    mm = rows["addmm"]  # the library kernel found through the operator that launched it
    assert mm["match"] == "op" and mm["kernels"] == ["sm90_xmma_gemm_bf16"] and mm["ratio"] == pytest.approx(2.0)
    assert rows["vectorized_elementwise_kernel"]["match"] == "measured only"
    assert rows["vectorized_elementwise_kernel"]["estimate"] is None and rows["vectorized_elementwise_kernel"]["ratio"] is None
    assert rows["Memcpy DtoD (Device -> Device)"]["match"] == "measured only"
    ce = rows["cross_entropy_fwd_kernel"]
    assert ce["match"] == "estimate only" and ce["measured"] is None and ce["estimate"]["launches_per_step"] == 1
    assert len(rows) == 6


def test_estimate_gpu_for_the_measured_gpu():
    both = ["A100 SXM", "H100 SXM"]
    chosen, note = fl.pick_estimate_gpu("NVIDIA H200", both)
    assert chosen == "H100 SXM" and "H200" in note and "4.8 TB/s" in note
    assert fl.pick_estimate_gpu("NVIDIA H100 80GB HBM3", both)[0] == "H100 SXM"
    assert fl.pick_estimate_gpu("NVIDIA A100-SXM4-80GB", both)[0] == "A100 SXM"
    chosen, note = fl.pick_estimate_gpu("NVIDIA L40S", both)
    assert chosen == "A100 SXM" and "do not describe it" in note
    assert fl.pick_estimate_gpu("NVIDIA H200", [])[0] is None
    assert fl.pick_estimate_gpu("NVIDIA H200", ["A100", "H100"])[0] == "H100"  # keyed by the short names
    assert fl.grid3("12x128") == (12, 128, 1) and fl.grid3([5]) == (5, 1, 1) and fl.grid3(None) is None


def _report(calibration: dict) -> dict:
    env = {"gpu": "NVIDIA H200", "sm_count": 132, "memory_gb": 150.0, "date_utc": "2026-01-01T00:00:00+00:00",
           "commit": "0" * 40, "driver": "x", "cuda_runtime": "13.0", "torch": "t", "triton": "t", "python": "3.12"}
    return {"environment": env, "budget_s": 420.0, "install_s": 50.0, "dry_run": False,
            "stages": [{"name": "kernels", "status": "ok", "seconds": 60.0, "limit_s": 130.0, "what": "w"}],
            "calibration": calibration, "checks": [],
            "tests": {"gpu-marked": {"status": "timed out after 150 s", "selected": 21, "passed": 18, "failed": 1,
                                     "errors": 0, "skipped": 0, "not_reached": 2, "failed_tests": ["tests/t.py::x"]}}}


def test_calibration_and_markdown_with_and_without_the_estimate(tmp_path):
    steps = 2
    groups = fl.measured_groups(synthetic_replays(steps), steps, fl.trace_kernel_ops(synthetic_eager_trace()))
    measured = {"fused": {"mode": "cuda-graphs", "profiled_steps": steps, "groups": groups},
                "torch": {"error": "RuntimeError: boom", "seconds": 1.0}}
    cost = {"estimate": {"fused": {"H100 SXM": {"total_ms": 0.5, "forward_backward_ms": 0.4, "kernels": ESTIMATE_KERNELS},
                                   "A100 SXM": {"total_ms": 1.0, "forward_backward_ms": 0.8, "kernels": []}}}}
    cal = fl.calibration(measured, cost, "NVIDIA H200")
    assert cal["estimate_available"] and cal["estimate_gpu"] == "H100 SXM"
    fused = cal["backends"]["fused"]
    assert fused["measured_kernel_ms_per_step"] == pytest.approx(0.061) and fused["estimate"]["total_ms"] == 0.5
    assert "groups" not in fused and "durations_us" not in json.dumps(cal)
    assert cal["backends"]["torch"]["error"] == "RuntimeError: boom" and cal["backends"]["torch"]["rows"] == []
    fl.write_report(_report(cal), tmp_path)
    md = (tmp_path / "FIRST_LIGHT.md").read_text()
    assert md.startswith("# GPU first light: NVIDIA H200") and "Measurements on one NVIDIA H200" in md
    assert "0" * 40 in md and "H100 SXM estimate" in md and "measurement failed: RuntimeError: boom" in md
    assert "| `attention_fwd_kernel` | 12x128x1 | name+grid | 2 | 2 | 21.0 | 10.0 | 42.0 | 20.0 | 2.10 |" in md
    assert "| gpu-marked | timed out after 150 s | 21 | 18 | 1 | 0 | 0 | 2 |" in md
    assert json.loads((tmp_path / "first_light.json").read_text())["calibration"]["estimate_gpu"] == "H100 SXM"
    # Without an estimate (a cost JSON from before the estimate existed) the measured table still stands.
    cal = fl.calibration(measured, {"backends": {}}, "NVIDIA H200")
    assert not cal["estimate_available"] and "not available" in cal["note"]
    assert {r["match"] for r in cal["backends"]["fused"]["rows"]} == {"measured only"}
    assert "not available" in fl.markdown(_report(cal))


def test_pytest_counts_from_a_cut_off_and_a_finished_run():
    cut = ("collected 10 items / 4 deselected\n"
           "tests/test_a.py::test_x[cuda] PASSED                  [ 16%]\n"
           "tests/test_a.py::test_y SKIPPED (no reason)           [ 33%]\n"
           "tests/test_a.py::test_z FAILED                        [ 50%]\n")
    c = fl.pytest_counts(cut)
    assert (c["selected"], c["passed"], c["skipped"], c["failed"], c["not_reached"], c["finished"]) == (6, 1, 1, 1, 3, False)
    assert c["failed_tests"] == ["tests/test_a.py::test_z"]
    done = cut + "===== 1 failed, 4 passed, 1 skipped, 4 deselected in 12.50s =====\n"
    c = fl.pytest_counts(done)
    assert (c["passed"], c["failed"], c["not_reached"], c["finished"]) == (4, 1, 0, True)


def test_dry_run_writes_the_report_from_a_given_cost_json(tmp_path, capsys):
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"estimate": {"fused": {"H100 SXM": {"total_ms": 0.5, "forward_backward_ms": 0.4,
                                                                     "kernels": ESTIMATE_KERNELS}}}}))
    out = tmp_path / "out"
    assert fl.main(["--dry-run", "--cost-json", str(cost), "--out", str(out)]) == 0
    report = json.loads((out / "first_light.json").read_text())
    assert report["dry_run"] and [s["name"] for s in report["stages"]] == [
        "environment", "kernels", "bench_train", "tests", "estimate"]
    rows = report["calibration"]["backends"]["fused"]["rows"]
    assert {r["match"] for r in rows} == {"estimate only"} and len(rows) == 4
    md = (out / "FIRST_LIGHT.md").read_text()
    assert md.startswith("# GPU first light (dry run): nothing measured") and "no time on this page was measured" in md


def test_help_and_the_refusal_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fl.main(["--help"])
    assert exit_info.value.code == 0 and "--dry-run" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal does not apply")
    proc = subprocess.run([sys.executable, "-m", "vit_fast.first_light", "--out", "unused"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: no CUDA GPU: first light needs one (torch.cuda.is_available() is False); "
        "`python -m vit_fast.first_light --dry-run` checks the plan on a CPU")


def test_a_stage_whose_part_failed_is_not_ok(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "kernels.json").write_text(json.dumps({"fused": {"groups": []}, "torch": {"error": "x"}}))
    (tmp_path / "bench_train.json").write_text(json.dumps({"rows": [{"preset": "vit-cifar", "batch": 128,
                                                                     "torch/eager": {"ms": 1.0}, "fused/eager": {"error": "y"}}]}))
    assert fl._with_errors("ok", fl._stage_errors("kernels", tmp_path)) == "failed: error in torch"
    assert fl._with_errors("timed out after 110 s", fl._stage_errors("bench_train", tmp_path)) == (
        "timed out after 110 s: error in fused/eager")
    assert fl._with_errors("ok", fl._stage_errors("bench_train", tmp_path / "nothing")) == "ok"


def test_the_gpu_path_with_stand_in_stages(tmp_path, monkeypatch):
    """The command's GPU path end to end on a CPU: every subprocess it starts is replaced by a stand-in
    that writes what the real one would (made-up figures), one of them running past its limit."""
    out = tmp_path / "out"
    steps = 2
    groups = fl.measured_groups(synthetic_replays(steps), steps, fl.trace_kernel_ops(synthetic_eager_trace()))
    kernels_part = {"fused": {"mode": "cuda-graphs", "profiled_steps": steps, "groups": groups},
                    "torch": {"error": "RuntimeError: boom"}}
    bench = {"rows": [{"preset": "vit-cifar", "batch": 128, "fused/cuda-graphs": {
        "ms": 2.0, "ms_p20": 1.9, "ms_p80": 2.1, "images_per_s": 64000.0, "peak_memory_gb": 1.5}}]}
    cost = {"estimate": {"fused": {"H100 SXM": {"total_ms": 0.5, "forward_backward_ms": 0.4, "kernels": ESTIMATE_KERNELS}}}}
    pytest_out = ("collected 3 items\ntests/test_a.py::test_x PASSED [ 33%]\ntests/test_a.py::test_y FAILED [ 66%]\n"
                  "tests/test_a.py::test_z PASSED [100%]\n===== 1 failed, 2 passed in 1.00s =====\n")

    def writer(path: Path, payload: dict, then: str = "") -> str:
        return f"import pathlib, time; p = pathlib.Path({str(path)!r}); p.parent.mkdir(parents=True, exist_ok=True); " \
               f"p.write_text({json.dumps(payload)!r}); {then}"

    real_start = fl._start

    def stand_in(argv, log):
        if "--stage" in argv and argv[argv.index("--stage") + 1] == "kernels":
            code = writer(out / "parts" / "kernels.json", kernels_part)
        elif "--stage" in argv:  # bench_train: its first provider, then past the stage's limit
            code = writer(out / "bench_train.json", bench, "time.sleep(60)")
        elif "vit_fast.cost" in argv:
            code = writer(Path(argv[argv.index("--json") + 1]), cost)
        else:
            assert argv[1:3] == ["-m", "pytest"], argv
            code = f"import sys; print({pytest_out!r}); sys.exit(1)"
        return real_start([sys.executable, "-c", code], log)

    env = {"gpu": "NVIDIA H200", "sm_count": 132, "date_utc": "2026-01-01T00:00:00+00:00", "commit": "c" * 40}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fl, "environment_info", lambda: dict(env))
    monkeypatch.setattr(fl, "_start", stand_in)
    monkeypatch.setattr(fl, "pytest_groups", lambda: {"gpu-marked": ["-m", "gpu"]})
    monkeypatch.setitem(fl.STAGE, "bench_train", fl.Stage("bench_train", 2, "stand-in"))
    assert fl.main(["--out", str(out), "--budget-s", "60"]) == 1
    report = json.loads((out / "first_light.json").read_text())
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status == {"environment": "ok", "kernels": "failed: error in torch", "bench_train": "timed out after 2 s",
                      "tests": "not ok: gpu-marked", "estimate": "ok"}
    assert report["title"] == "GPU first light: measurements on NVIDIA H200"
    assert report["calibration"]["estimate_gpu"] == "H100 SXM"
    rows = {r["name"]: r for r in report["calibration"]["backends"]["fused"]["rows"]}
    assert rows["attention_fwd_kernel"]["ratio"] == pytest.approx(2.1)
    assert report["bench_train"]["rows"][0]["fused/cuda-graphs"]["ms"] == 2.0
    assert report["tests"]["gpu-marked"]["passed"] == 2 and report["tests"]["gpu-marked"]["failed"] == 1
    md = (out / "FIRST_LIGHT.md").read_text()
    assert "| fused/cuda-graphs | 2.000 | 1.900-2.100 | 64000 | 1.50 |" in md and "| torch/compile | not reached |" in md
