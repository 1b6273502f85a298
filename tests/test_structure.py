"""The package's import structure, read from the source (ast; imports inside functions included):
no import cycle among vit_fast's modules, and the data side's one-way layers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (kernels/ is installed as vit_fast.kernels)."""
    found = {}
    for folder, package in ((ROOT / "vit_fast", "vit_fast"), (ROOT / "kernels", "vit_fast.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: read by type checkers for annotations,
    never executed, so they cannot take part in an import cycle (the training step names the run's
    type, ``TrainingRun``, that way while the run imports the step)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                                         or getattr(node.test, "attr", None) == "TYPE_CHECKING"):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the vit_fast modules it imports anywhere in its source (except under ``if
    TYPE_CHECKING:``). ``from package import name`` counts as importing the submodule
    ``package.name`` when there is one, else the package; a module's own parent packages are not
    counted."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets.update(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names)
        graph[name] = {t for t in map(known, (t for t in targets if t.startswith("vit_fast"))) if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "vit_fast.fused.augment_finish" in graph["vit_fast.augment.pipeline"]  # imported in fused_batch
    assert "vit_fast.kernels.augment_policy" in graph["vit_fast.fused.augment_policy"]


def test_import_graph_skips_type_checking_imports():
    graph = import_graph()
    assert "vit_fast.step" in graph["vit_fast.run"]  # run_step, GraphedStep, ...
    assert "vit_fast.run" not in graph["vit_fast.step"]  # only TrainingRun, for annotations


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    described = ["; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found]
    assert not found, f"import cycles: {described}"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_data_side_depends_one_way():
    """datasets <- augment.* <- loader <- (preview, train); the recipes hand out the augmentation
    config, so nothing of the data side below the commands imports them."""
    graph = import_graph()

    def reach(module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            for m in graph[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        return seen

    commands = {"vit_fast.data", "vit_fast.preview", "vit_fast.train", "vit_fast.run", "vit_fast.step",
                "vit_fast.recipes", "vit_fast.cost"}
    assert not reach("vit_fast.datasets") & {"vit_fast.loader", "vit_fast.augment.pipeline", *commands}
    for name in [m for m in graph if m.startswith("vit_fast.augment.")]:
        assert not reach(name) & {"vit_fast.datasets", "vit_fast.loader", *commands}, name
    assert not reach("vit_fast.loader") & commands
    assert reach("vit_fast.recipes") <= {"vit_fast.augment.config"}
