"""The shape of the test suite, checked on its source: test modules share code through helpers.py and fixtures
through conftest.py, never by importing one another; the quick tier (`pytest -m "not slow"`) still has tests
that use each product package."""
from __future__ import annotations

import ast
import functools

from helpers import REPO

PACKAGES = ("ops", "pipeline", "shards", "moco_core", "curate")


@functools.cache
def suite() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted((REPO / "tests").glob("*.py"))}


def imported_tops(tree: ast.Module) -> set[str]:
    """The top-level module names a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module.split(".")[0])
    return names


def cross_imports(trees: dict[str, ast.Module]) -> list[tuple[str, str]]:
    return sorted((name, top) for name, tree in trees.items() for top in imported_tops(tree)
                  if top.startswith("test_") or top == "conftest")


def is_slow_mark(node: ast.expr) -> bool:
    """`pytest.mark.slow`, alone or in a list (module `pytestmark`) or a decorator."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(is_slow_mark(e) for e in node.elts)
    return ast.unparse(node) == "pytest.mark.slow"


def module_is_slow(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
               and is_slow_mark(node.value) for node in tree.body)


def package_bindings(nodes) -> dict[str, str]:
    """Names the import statements among `nodes` bind to code of a product package: name -> package."""
    names = {}
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and not node.level and node.module.startswith("mocostream."):
            names.update({alias.asname or alias.name: node.module.split(".")[1] for alias in node.names})
        elif isinstance(node, ast.Import):
            names.update({alias.asname: alias.name.split(".")[1] for alias in node.names
                          if alias.asname and alias.name.startswith("mocostream.")})
    return names


def quick_tests_by_package(trees: dict[str, ast.Module]) -> dict[str, list[str]]:
    """package -> the tests outside the slow tier whose own code uses a name imported from it."""
    out: dict[str, list[str]] = {p: [] for p in PACKAGES}
    for name, tree in trees.items():
        if not name.startswith("test_") or module_is_slow(tree):
            continue
        module_names = package_bindings(tree.body)
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_") or any(
                    is_slow_mark(d) for d in fn.decorator_list):
                continue
            bound = {**module_names, **package_bindings(ast.walk(fn))}
            for package in sorted({bound[n.id] for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in bound}):
                out.setdefault(package, []).append(f"{name}::{fn.name}")
    return out


def test_no_test_module_imports_another():
    wrong = cross_imports(suite())
    assert not wrong, f"test modules importing test modules or conftest (share through helpers.py): {wrong}"


def test_the_quick_tier_uses_every_package():
    missing = [p for p, tests in quick_tests_by_package(suite()).items() if not tests]
    assert not missing, f"no test outside the slow tier uses {missing}"


def test_the_checks_find_a_test_import_and_a_package_only_slow_tests_use():
    """The checks above can fail: made-up test modules break each rule and are caught."""
    made_up = {
        "test_a": ast.parse("from test_b import cli\nimport conftest\nfrom helpers import TINY\n"),
        "test_slow": ast.parse("import pytest\nfrom mocostream.shards import verify\n"
                               "pytestmark = [pytest.mark.slow]\ndef test_x():\n    verify('d')\n"),
        "test_quick": ast.parse("import pytest\nfrom mocostream.pipeline.plan import rank_pieces\n"
                                "@pytest.mark.slow\ndef test_slow():\n    rank_pieces()\n"
                                "def test_unused():\n    pass\n"
                                "def test_local():\n    import mocostream.moco_core.knn as knn\n    knn.x()\n"
                                "def test_ops():\n    from mocostream.ops.cli import main\n    main([])\n"),
    }
    assert cross_imports(made_up) == [("test_a", "conftest"), ("test_a", "test_b")]
    assert quick_tests_by_package(made_up) == {"ops": ["test_quick::test_ops"], "pipeline": [], "shards": [],
                                               "moco_core": ["test_quick::test_local"], "curate": []}
