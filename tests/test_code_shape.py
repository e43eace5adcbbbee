"""The shape rules of the product packages, checked on the source: short functions, one-way imports."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ops", "pipeline", "shards", "moco_core")
MAX_FUNCTION_LINES = 80
# Longer functions still waiting to be split: (file, function). This list only shrinks.
LONG_FUNCTIONS_ALLOWED = {("ops/cli_shards.py", "add_shards_parser")}
# package -> packages it must not import; shards may import only these pipeline modules
FORBIDDEN = {"pipeline": {"ops", "moco_core", "shards"}, "moco_core": {"ops", "pipeline", "shards"},
             "shards": {"ops", "moco_core"}}
SHARDS_MAY_USE = {"pipeline.dali_check", "pipeline.image_check"}


def sources(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(), filename=str(path))


def imported_names(tree: ast.Module, package: str) -> set[str]:
    """Absolute dotted names a file imports: `import a.b` gives a.b, `from a import b` gives a.b (relative
    imports resolved within the file's package)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, [package if node.level else "", node.module or ""]))
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name.removeprefix("mocostream.") for name in names}


def long_functions(files) -> list[tuple[str, str, int]]:
    return [(file, node.name, node.end_lineno - node.lineno + 1) for file, tree in files
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and (file, node.name) not in LONG_FUNCTIONS_ALLOWED]


def wrong_imports(package: str, files) -> list[tuple[str, str]]:
    wrong = []
    for file, tree in files:
        for name in imported_names(tree, package):
            top = name.split(".")[0]
            if top in FORBIDDEN[package] or (package == "shards" and top == "pipeline" and not any(
                    name == m or name.startswith(m + ".") for m in SHARDS_MAY_USE)):
                wrong.append((file, name))
    return wrong


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_80_lines(package):
    long = long_functions(sources(package))
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    wrong = wrong_imports(package, sources(package))
    assert not wrong, f"{package} imports what it must not: {wrong}"


def test_the_checks_find_a_long_function_and_a_wrong_import():
    """The rules above can fail: made-up source with a long function and forbidden imports is caught."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    made_up = [("pipeline/x.py", ast.parse(f"def long():\n{body}\n\ndef short():\n    pass\n"))]
    assert long_functions(made_up) == [("pipeline/x.py", "long", MAX_FUNCTION_LINES + 1)]
    assert wrong_imports("pipeline", [("pipeline/x.py", ast.parse("from mocostream.ops.train import train"))])
    assert wrong_imports("shards", [("shards/x.py", ast.parse("from pipeline import loader"))])
    assert not wrong_imports("shards", [("shards/x.py", ast.parse("from pipeline import dali_check"))])
    assert imported_names(ast.parse("from . import loader"), "pipeline") == {"pipeline.loader"}
    assert imported_names(ast.parse("import mocostream.pipeline.sources as s"), "shards") == {"pipeline.sources"}
    assert wrong_imports("pipeline", [("pipeline/x.py", ast.parse("from mocostream.ops import train"))])
