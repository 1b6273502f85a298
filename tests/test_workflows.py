"""The GitHub Actions workflows are valid YAML with the structure Actions requires."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml parses the workflow files (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def load(path):
    doc = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True; Actions reads it as "on".
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def test_there_are_workflows():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "gpu.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_structure(path):
    doc = load(path)
    assert isinstance(doc.get("name"), str) and doc.get("on"), f"{path.name}: needs a name and triggers"
    assert isinstance(doc.get("jobs"), dict) and doc["jobs"], f"{path.name}: no jobs"
    for job_id, job in doc["jobs"].items():
        assert "runs-on" in job, f"{path.name}: job {job_id} has no runs-on"
        assert isinstance(job.get("steps"), list) and job["steps"], f"{path.name}: job {job_id} has no steps"
        for i, step in enumerate(job["steps"]):
            assert isinstance(step, dict), f"{path.name}: {job_id} step {i} is not a mapping"
            assert ("uses" in step) != ("run" in step), f"{path.name}: {job_id} step {i} needs exactly one of uses/run"
            unknown = set(step) - {"name", "uses", "run", "with", "env", "if", "id", "shell", "working-directory",
                                   "continue-on-error", "timeout-minutes"}
            assert not unknown, f"{path.name}: {job_id} step {i} has unknown keys {unknown}"


def test_cpu_job_runs_ci_run_and_ci_run_runs_the_readme_command():
    ci = load(ROOT / ".github" / "workflows" / "ci.yml")
    runs = [s.get("run", "") for job in ci["jobs"].values() for s in job["steps"]]
    assert any(".ci/run" in r for r in runs)
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("pip install") and "pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text()


def test_gpu_job_builds_tests_and_uploads_the_report():
    gpu = load(ROOT / ".github" / "workflows" / "gpu.yml")
    (job,) = gpu["jobs"].values()
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    text = "\n".join(s.get("run", "") + s.get("uses", "") for s in job["steps"])
    assert "--no-build-isolation" in text and "pytest" in text and "python benchmarks/run_all.py" in text
    assert "actions/upload-artifact" in text
