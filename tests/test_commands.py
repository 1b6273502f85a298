"""Every command the documentation shows runs as written.

A new user copies commands from the README: ``python benchmarks/bench_attention.py``, ``python -m
vit_fast.train``, the console scripts. Each is run here with ``--help`` in a fresh interpreter, the
way a shell runs it, so that a renamed module, a moved script or an import that only works from the
repository root fails the suite instead of the user. Benchmark scripts are also run by their full
path from another directory and with ``-m``. Commands run concurrently (each one mostly imports
torch) to keep the file to a few seconds of wall time per core.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "__init__.py")
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("**/*.md"))]

# `python -m pkg.mod`, `python path/to/script.py`: what the documentation tells users to type.
_MODULE = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")
_SCRIPT = re.compile(r"python3? ((?:[\w.-]+/)*[\w-]+\.py)\b")


def console_scripts() -> dict[str, str]:
    """The package's console scripts (name -> entry point), as installed."""
    return {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
            if ep.value.split(":")[0].split(".")[0] == "vit_fast"}


def documented_commands() -> set[tuple[str, ...]]:
    """Every distinct program the documentation shows, as the argv prefix a shell would run."""
    found: set[tuple[str, ...]] = set()
    scripts = console_scripts()
    for doc in DOCS:
        text = doc.read_text()
        # `python -m pytest` is the suite itself: CI runs it as the README writes it (.ci/run).
        found |= {("-m", m.rstrip(".")) for m in _MODULE.findall(text) if m != "pytest"}
        found |= {(s,) for s in _SCRIPT.findall(text) if not s.startswith(("setup.py", "csrc/"))}
        found |= {(name,) for name in scripts if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}
    return found


def _run(argv: list[str], cwd: Path) -> tuple[list[str], int, str]:
    # What a user's shell has: no PYTHONPATH pointing into the checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    return argv, proc.returncode, proc.stdout + proc.stderr


def run_concurrently(commands: list[tuple[list[str], Path]]) -> list[str]:
    """Run each (argv, cwd); the failures, each with its output's tail (an empty list: all passed).
    A pass exits 0 and prints a usage line, never a traceback."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda c: _run(*c), commands))
    failures = []
    for argv, rc, out in results:
        if rc != 0 or "usage:" not in out or "Traceback" in out:
            failures.append(f"$ {shlex.join(argv)}  -> exit {rc}\n{out[-1500:]}")
    return failures


def _program(prefix: tuple[str, ...]) -> list[str]:
    if prefix[0] == "-m" or prefix[0].endswith(".py"):
        return [sys.executable, *(prefix if prefix[0] == "-m" else (str(ROOT / prefix[0]),))]
    script = Path(sysconfig.get_path("scripts")) / prefix[0]
    return [str(script)]


def test_documented_commands_exist():
    """The scan finds what the README is known for (a broken scan would pass the test below vacuously)."""
    commands = documented_commands()
    assert ("benchmarks/bench_attention.py",) in commands and ("-m", "vit_fast.train") in commands, commands
    for prefix in commands:
        if prefix[0].endswith(".py"):
            assert (ROOT / prefix[0]).is_file(), f"the documentation shows `python {prefix[0]}`, which does not exist"


def test_every_documented_command_runs_as_written():
    """Each command of README.md, CONTRIBUTING.md and docs/ with --help, from the repository root."""
    commands = sorted(documented_commands())
    scripts = console_scripts()
    for prefix in commands:
        if prefix[0] in scripts and not (Path(sysconfig.get_path("scripts")) / prefix[0]).exists():
            pytest.fail(f"console script {prefix[0]} is documented but not installed next to {sys.executable}; "
                        "install the package (pip install -e .)")
    failures = run_concurrently([(_program(p) + ["--help"], ROOT) for p in commands])
    assert not failures, "\n\n".join(failures)


def test_benchmark_scripts_run_by_path_from_anywhere_and_as_modules(tmp_path):
    """Every script in benchmarks/ by its full path from another directory (the repository root is
    then on no search path) and as a module from the root (`python -m benchmarks.<name>`)."""
    assert len(BENCHMARKS) >= 7, BENCHMARKS
    commands = [([sys.executable, str(p), "--help"], tmp_path) for p in BENCHMARKS]
    commands += [([sys.executable, "-m", f"benchmarks.{p.stem}", "--help"], ROOT) for p in BENCHMARKS]
    failures = run_concurrently(commands)
    assert not failures, "\n\n".join(failures)
