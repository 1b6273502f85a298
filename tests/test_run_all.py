"""benchmarks/run_all.py in its quick mode writes a complete report directory."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_quick_writes_the_report(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["torch"] == torch.__version__
    assert all(step["status"] == "ok" for step in summary["steps"]), summary["steps"]
    names = {step["name"] for step in summary["steps"]}
    assert {"bench_attention", "bench_layernorm", "bench_mlp", "bench_patch_embed", "bench_data", "cost_account"} <= names
    for name in ("bench_attention", "bench_layernorm", "bench_mlp", "bench_patch_embed", "cost_account"):
        assert (out / f"{name}.json").exists(), name
    acc = summary["cost_account"]["backends"]
    assert acc["fused"]["bytes"] < acc["torch"]["bytes"] < acc["reference"]["bytes"]
    assert (out / "cost_account.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "SUMMARY.md").read_text()
    assert "Cost account" in md and "| fused |" in md
    if torch.cuda.is_available():
        assert summary["timed"] and "training_comparison" in summary
    else:
        assert not summary["timed"] and "no timings were taken" in md
        assert "aot_compile" in names
