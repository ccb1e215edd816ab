"""The layout of tests/: helpers live in plain modules (tests/fixtures.py, tests/cli.py,
tests/server.py, ...), conftest.py files hold fixtures only and nothing imports them, no test
module imports another, and every directory of tests is a package, so each test module has one
dotted name."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parent


def imports_of(root: Path, forbidden: Callable[[str], bool]) -> list[str]:
    """``path:line`` of every import under ``root`` that names a module part ``forbidden`` accepts,
    imports inside functions included."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from tests.serve import conftest` names it as an alias
                names = [node.module or ""] + [f"{node.module or ''}.{alias.name}" for alias in node.names]
            else:
                continue
            if any(forbidden(part) for name in names for part in name.split(".")):
                out.append(f"{path.relative_to(root).as_posix()}:{node.lineno}")
    return out


def conftest_imports(root: Path) -> list[str]:
    return imports_of(root, lambda part: part == "conftest")


def imports_of_test_modules(root: Path) -> list[str]:
    """Imports of a test module: what tests share lives in a plain module (tests/serve/images.py, ...)."""
    return imports_of(root, lambda part: part.startswith("test_"))


def non_fixtures(root: Path) -> list[str]:
    """``path:line name`` of every function or class at the top of a conftest.py under ``root`` that
    is neither a pytest fixture nor a pytest hook (``pytest_*``)."""

    def is_fixture(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(target, ast.Attribute) and target.attr == "fixture"

    out = []
    for path in sorted(root.rglob("conftest.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not node.name.startswith("pytest_") and not any(map(is_fixture, node.decorator_list)):
                    out.append(f"{path.relative_to(root).as_posix()}:{node.lineno} {node.name}")
    return out


def missing_inits(root: Path) -> list[str]:
    """The directories under ``root`` (``root`` included) that hold Python files but no __init__.py."""
    folders = {path.parent for path in root.rglob("*.py")}
    return sorted(folder.relative_to(root).as_posix() for folder in folders if not (folder / "__init__.py").is_file())


def test_no_test_module_imports_a_conftest():
    found = conftest_imports(TESTS)
    assert not found, "imports of a conftest module (move the helper to a plain module such as tests/fixtures.py): " + ", ".join(found)


def test_no_test_module_imports_another():
    found = imports_of_test_modules(TESTS)
    assert not found, "imports of a test module (move the helper to a plain module beside it): " + ", ".join(found)


def test_conftest_files_hold_fixtures_only():
    assert len(list(TESTS.rglob("conftest.py"))) >= 4  # the walk sees tests/ and its directories
    found = non_fixtures(TESTS)
    assert not found, "helpers in conftest.py (move them to a plain module): " + ", ".join(found)


def test_every_test_directory_is_a_package():
    assert {"export", "finetune", "serve"} <= {p.parent.name for p in TESTS.glob("*/test_*.py")}
    assert missing_inits(TESTS) == []


def test_the_checks_find_what_they_forbid(tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "serve" / "test_a.py").write_text(
        "from tests.serve.conftest import Server\n"
        "import tests.conftest\n"
        "from tests.serve import conftest\n"
        "from .conftest import x\n"
        "from . import conftest as c\n"
        "from tests.server import Server\n"  # a plain module: allowed
        "from tests import conftests_notes\n"  # a name that merely contains the word: allowed
        "def test_b():\n"
        "    from tests.export.conftest import run\n"
        "    from tests.serve.test_image_input import EPS\n"
        "    from . import test_c\n"
        "    from tests.serve.images import png_claiming\n"  # a plain module: allowed
    )
    (tmp_path / "serve" / "conftest.py").write_text(
        "import pytest\n"
        "@pytest.fixture(scope='session')\ndef a(): ...\n"
        "@pytest.fixture\ndef b(): ...\n"
        "def pytest_configure(config): ...\n"
        "def helper(): ...\n"
        "class Server: ...\n"
    )
    assert conftest_imports(tmp_path) == [f"serve/test_a.py:{n}" for n in (1, 2, 3, 4, 5, 9)]
    assert imports_of_test_modules(tmp_path) == [f"serve/test_a.py:{n}" for n in (10, 11)]
    assert non_fixtures(tmp_path) == ["serve/conftest.py:7 helper", "serve/conftest.py:8 Server"]
    assert missing_inits(tmp_path) == ["serve"]
    (tmp_path / "serve" / "__init__.py").write_text("")
    assert missing_inits(tmp_path) == []
