"""vit_fast.fused.registry.OPS is the one list of fused ops: it matches what is registered under
torch.ops.vit_fast, every file it names exists, every reference resolves, and the lists derived
from it (the AOT report's ops, benchmarks/run_all.py's parity tests and benchmarks) and the op
table of docs/kernels.md agree with it."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from vit_fast.fused import registry
from vit_fast.fused.registry import OPS

ROOT = Path(__file__).resolve().parents[1]


def _dispatcher_ops() -> set[str]:
    """The vit_fast ops the dispatcher knows once every op module is imported."""
    from vit_fast.fused import patch_embed

    assert patch_embed.extension_available(), f"{patch_embed._LOAD_ERROR}; rebuild with: {patch_embed.REBUILD_COMMAND}"
    for op in OPS:
        importlib.import_module(op.module)
    return {name.removeprefix("vit_fast::") for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("vit_fast::")}


def _ops_defined_in_sources() -> set[str]:
    """Every vit_fast op the sources define, imported or not: custom_op("vit_fast::<name>") in the
    package and m.def("<name>(...)") in csrc/ (its TORCH_LIBRARY(vit_fast, m) block)."""
    names = set()
    for path in (ROOT / "vit_fast").rglob("*.py"):
        names |= set(re.findall(r"custom_op\(\s*\"vit_fast::(\w+)\"", path.read_text()))
    for path in (ROOT / "csrc").glob("*.cpp"):
        names |= set(re.findall(r"m\.def\(\s*\"(\w+)\(", path.read_text()))
    return names


def test_registry_matches_the_registered_ops():
    listed = registry.registered_ops()
    assert len(set(listed)) == len(listed), f"an op is listed twice: {listed}"
    assert set(listed) == _dispatcher_ops(), "registry.OPS and torch.ops.vit_fast disagree"
    assert set(listed) == _ops_defined_in_sources(), "registry.OPS and the sources' op definitions disagree"
    assert len({op.name for op in OPS}) == len(OPS)


def test_each_op_has_one_backward_per_forward():
    # CONTRIBUTING: one backward op per forward (a backward may serve several forwards, as
    # LayerNorm's does); patch_embed's used to have two.
    for op in OPS:
        assert op.kind in registry.KINDS, op
        assert all(backward is None or backward.endswith("_backward") for _, backward in op.registered), op
        assert len(op.forwards) == len(set(op.forwards)), op
    assert registry.backward_of()["patch_embed_backward"] == ("patch_embed",)
    assert registry.backward_of()["layer_norm_backward"] == ("layer_norm", "add_layer_norm")


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_listed_files_exist_and_references_resolve(op):
    assert op.module == f"vit_fast.fused.{op.name}"
    assert (ROOT / "vit_fast" / "fused" / f"{op.name}.py").is_file()
    assert (ROOT / op.kernel_file).is_file(), op.kernel_file
    assert op.kernel_file.startswith("kernels/" if op.kind == "triton" else "csrc/"), op
    assert (ROOT / op.test).is_file(), op.test
    if op.benchmark is not None:
        assert (ROOT / op.benchmark).is_file(), op.benchmark
    assert op.references
    for reference in op.references:
        assert callable(_resolve(reference)), reference


def test_derived_lists():
    from vit_fast import aot

    triton = [op for op in OPS if op.kind == "triton"]
    assert aot.REPORT_OPS == {op.name: op.module for op in triton}
    for op in triton:  # what `python -m vit_fast.aot --op <name>` calls
        assert callable(importlib.import_module(op.module).aot_every_config), op.name
    parity = registry.parity_tests()
    # The three files benchmarks/run_all.py's hand-written list had left out.
    assert {"tests/test_cross_entropy.py", "tests/test_fused_augment_policy.py",
            "tests/test_fused_augment_finish.py"} <= set(parity)
    assert all((ROOT / path).is_file() for path in parity)
    assert set(registry.registered_ops("cuda")) == {"patch_embed", "patch_embed_backward"}


def _load_run_all():
    spec = importlib.util.spec_from_file_location("_run_all_under_test", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_derives_its_lists_and_imports_only_the_package():
    run_all = _load_run_all()
    assert run_all.PARITY_TESTS == registry.parity_tests()
    stems = [Path(script).stem for script in registry.benchmark_scripts()]
    assert [b for b in run_all.OP_BENCHMARKS if b in stems] == stems
    assert all((ROOT / "benchmarks" / f"{bench}.py").is_file() for bench in run_all.OP_BENCHMARKS)
    # Run by path (`python benchmarks/run_all.py`): only the standard library and the installed
    # package, never a `benchmarks` package or the tests.
    tree = ast.parse((ROOT / "benchmarks" / "run_all.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))
    outside = {name for name in imported if name not in sys.stdlib_module_names and name != "vit_fast"}
    assert not outside - {"matplotlib"}, outside  # matplotlib: the report's plot, a dependency


def _docs_table_rows() -> list[str]:
    text = (ROOT / "docs" / "kernels.md").read_text()
    section = text.split("## Where each op lives", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return rows[1:]  # below the header (the separator starts with "| ---")


def test_docs_table_agrees_with_the_registry():
    rows = [row for row in _docs_table_rows() if not row.startswith("| ---")]
    assert len(rows) == len(OPS), rows
    for op in OPS:
        # An op's row is the one naming exactly its registered ops (two ops may share a test file).
        matching = [row for row in rows if set(re.findall(r"`vit_fast::(\w+)`", row)) == set(op.op_names)]
        assert len(matching) == 1, (op.name, matching)
        row = matching[0]
        assert f"`{op.test}`" in row, (op.name, op.test)
        assert f"`{op.kernel_file}`" in row, (op.name, op.kernel_file)
        if op.benchmark is not None:
            assert f"`{op.benchmark}`" in row, (op.name, op.benchmark)
        else:
            assert "| none" in row, (op.name, row)
