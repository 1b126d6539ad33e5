"""Each test file stands alone, and each test checks something (read with ``ast``, nothing imported).

* No test module imports ``conftest`` or another ``test_*`` module: what tests share (functions,
  classes, constants) is in ``helpers.py``, fixtures in ``conftest.py``. Importing a test module
  from another one runs (and, under pytest, may collect) its tests' module twice and ties a file's
  tests to another file's private helpers.
* Every ``test_*`` function checks something in its own body (not only in a function it defines):
  an ``assert``, ``pytest.raises``/``pytest.warns``/``pytest.fail``, or a call of a checker whose
  name starts with ``assert_``, ``check_`` or ``expect_`` (``np.testing.assert_allclose``,
  ``stub.assert_no_pending_responses()``, the suite's ``check_journal``, ...). A test that only runs
  code passes whatever that code returns.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: Calls that check (by the called name's last part).
CHECKING_CALLS = frozenset({"raises", "warns", "fail"})
CHECKING_PREFIXES = ("assert_", "check_", "expect_")


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _forbidden_module(name: str) -> bool:
    top = name.split(".")[0]
    return top == "conftest" or top.startswith("test_")


def _cross_imports(source: str, where: str) -> list[str]:
    """Each import of ``conftest`` or of a ``test_*`` module in ``source``, function-local ones too."""
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{where}:{node.lineno} imports {n}" for n in names if _forbidden_module(n)]
    return found


def _own_nodes(function: ast.AST) -> list[ast.AST]:
    """The nodes of ``function``'s body, without those of functions, lambdas and classes it defines."""
    nodes, todo = [], list(ast.iter_child_nodes(function))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        nodes.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _checks(function: ast.AST) -> bool:
    for node in _own_nodes(function):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            called = node.func
            name = (
                called.attr
                if isinstance(called, ast.Attribute)
                else called.id
                if isinstance(called, ast.Name)
                else ""
            )
            if name in CHECKING_CALLS or name.startswith(CHECKING_PREFIXES):
                return True
    return False


def _tests_without_a_check(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{path.relative_to(TESTS)}:{node.lineno} {node.name}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
        and not _checks(node)
    ]


def test_no_test_module_imports_conftest_or_another_test_module() -> None:
    files = _python_files()
    assert TESTS / "helpers.py" in files and len(files) > 50
    problems = [
        problem
        for path in files
        for problem in _cross_imports(path.read_text(encoding="utf-8"), str(path.relative_to(TESTS)))
    ]
    assert not problems, "import these from helpers.py instead:\n" + "\n".join(problems)


def test_every_test_function_checks_something() -> None:
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 50
    problems = [problem for path in modules for problem in _tests_without_a_check(path)]
    assert not problems, "tests without an assert or a check:\n" + "\n".join(problems)


def test_the_rules_catch_what_they_are_about() -> None:
    """The two checks on made-up sources: each finds the case it is about and passes the others."""
    source = """
import conftest
from test_other import helper
from helpers import drop
import pytest

def test_runs_only():
    drop()

def test_asserts_only_inside_a_callback():
    def later():
        assert True
    drop(later)

def test_asserts():
    assert drop()

def test_raises():
    with pytest.raises(ValueError):
        drop()

def test_uses_a_checker():
    check_journal()
"""
    assert _cross_imports(source, "made_up.py") == [
        "made_up.py:2 imports conftest",
        "made_up.py:3 imports test_other",
    ]
    tree = ast.parse(source)
    functions = {n.name: _checks(n) for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert functions == {
        "test_runs_only": False,
        "test_asserts_only_inside_a_callback": False,
        "test_asserts": True,
        "test_raises": True,
        "test_uses_a_checker": True,
    }
