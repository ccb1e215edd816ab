"""The house rules that an AST walk can check: no import cycle between the project's modules and
imports that flow one way between the packages (imports inside functions count: Python resolves
them at call time, and no import-time test sees a cycle hidden in a function body), no function
runs past 100 lines, and the task names are spelled in ferry/tasks.py only."""

from __future__ import annotations

import ast
from pathlib import Path

from ferry.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ferry", "runtime", "finetune", "export", "bench", "serve", "predict")
MAX_FUNCTION_LINES = 100

# What each package may import (imports inside functions count). serve/ and predict/ sit on the
# torch-free runtime only; a stage never imports a later one.
MAY_IMPORT = {
    "ferry": {"ferry"},
    "runtime": {"ferry", "runtime"},
    "serve": {"ferry", "runtime", "serve"},
    "predict": {"ferry", "runtime", "predict"},
    "finetune": {"ferry", "runtime", "finetune"},
    "export": {"ferry", "runtime", "finetune", "export"},
    "bench": {"ferry", "runtime", "finetune", "export", "bench"},
}
# The two modules that run stages, and import them inside the functions that need them.
DISPATCHERS = {"ferry.cli", "ferry.pipeline"}


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """{dotted module name: file} of every module of ``packages`` under ``root``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from export import parity` imports the module export.parity; `from export.parity import judge`, export.parity
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` imports a.b.c, or the module that defines c
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {name: imported(name, path, known) for name, path in known.items()}


def test_no_import_cycle_between_the_project_modules():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 40 and graph["export.export"]  # the walk sees the project
    found = cycles(graph)
    assert not found, "import cycles (imports inside functions count): " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) + ")" for c in found)


def test_the_walk_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import helper\n")
    (pkg / "b.py").write_text("def helper():\n    from . import c\n    return c\n")
    (pkg / "c.py").write_text("def back():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import b\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def python_files(root: Path) -> list[Path]:
    """Every Python file of the project: the packages, the benchmarks and the tests."""
    out = []
    for top in (*PACKAGES, "benchmarks", "tests"):
        out += sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in sorted(graph.items()):
        if name in DISPATCHERS:
            continue
        allowed = MAY_IMPORT[name.split(".")[0]]
        bad += [f"{name} -> {t}" for t in sorted(targets) if t.split(".")[0] not in allowed]
    return bad


def long_functions(files: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function longer than ``limit`` lines, decorators excluded."""
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno} {node.name} ({lines} lines)")
    return out


def docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
        if isinstance(node, (ast.Module, ast.ClassDef)):  # attribute docstrings: a string right after an assignment
            for before, after in zip(node.body, node.body[1:]):
                if isinstance(before, (ast.Assign, ast.AnnAssign)) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    ids.add(id(after.value))
    return ids


def task_literals(files: list[Path], names: tuple[str, ...] = TASKS) -> list[str]:
    """``path:line`` of every string in code (docstrings are prose, not counted) that spells a task name."""
    out = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        prose = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                if any(name in node.value for name in names):
                    out.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}")
    return out


def test_imports_flow_one_way_between_the_packages():
    graph = import_graph(ROOT, PACKAGES)
    assert {n.split(".")[0] for n in graph} == set(PACKAGES)  # the walk sees every package
    bad = upward_imports(graph)
    assert not bad, "imports against the layering (ferry <- runtime <- finetune <- export <- bench; runtime <- serve, predict): " + "; ".join(bad)


def test_the_layering_check_finds_an_upward_import(tmp_path):
    for package, body in {"runtime": "def f():\n    from export import writer\n", "export": "", "ferry": "import runtime.a\n"}.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / ("a.py" if package != "export" else "writer.py")).write_text(body)
    (tmp_path / "ferry" / "cli.py").write_text("def main():\n    import export.writer\n")
    graph = import_graph(tmp_path, ("ferry", "runtime", "export"))
    assert upward_imports(graph) == ["ferry.a -> runtime.a", "runtime.a -> export.writer"]


def test_no_function_is_longer_than_100_lines():
    files = python_files(ROOT)
    assert len(files) > 80
    long = long_functions(files)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)


def test_the_length_check_counts_a_long_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("@dec\ndef ok():\n" + "    x = 1\n" * 99 + "\nasync def long():\n" + "    x = 1\n" * 100)
    assert long_functions([f]) == [f"{f}:103 long (101 lines)"]


def test_task_names_are_spelled_in_ferry_tasks_only():
    files = [p for p in python_files(ROOT) if p != ROOT / "ferry" / "tasks.py"]
    found = task_literals(files)
    assert not found, "task names written as literals outside ferry/tasks.py (use ferry.tasks): " + ", ".join(found)
    assert task_literals([ROOT / "ferry" / "tasks.py"])  # and the walk does see them where they are


def test_the_literal_check_skips_docstrings_only(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(f'"""About {TASKS[1]}."""\nX = 1\n"""{TASKS[0]} too."""\ndef g():\n    return f"a {{1}} {TASKS[0]} model"\n')
    assert task_literals([f]) == [f"{f}:5"]
