"""The shape rules of the product packages, checked on the source: short functions, one-way imports, no
import circles between modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ops", "pipeline", "shards", "moco_core", "curate")
MAX_FUNCTION_LINES = 80
# package -> packages it must not import; shards may import only these pipeline modules. curate sits between
# ops (which runs it) and the packages it uses (pipeline, moco_core, shards for --materialise).
FORBIDDEN = {"pipeline": {"ops", "moco_core", "shards", "curate"}, "moco_core": {"ops", "pipeline", "shards", "curate"},
             "shards": {"ops", "moco_core", "curate"}, "curate": {"ops"}}
# The image checks: a shard the tool validates passes exactly the rules the loader trusts. The storage factory
# (fsspec and the standard library only): the shard tool writes with the trainer's timeouts and retries.
SHARDS_MAY_USE = {"pipeline.dali_check", "pipeline.image_check", "pipeline.filesystems"}
# Module-level names of pipeline/ and shards/ that functions change: per-process state, not settings.
PROCESS_STATE = {("shards/fetch.py", "_tars"): "the compressed archives a decode worker keeps open",
                 ("shards/fetch.py", "_row_group"): "the parquet row group a decode worker read last",
                 ("shards/workers.py", "_PARENT_ENDS"): "the pipe ends a forked worker must close",
                 ("shards/lock.py", "_HELD"): "the destination lock fds a forked worker must close"}
MUTATORS = {"update", "append", "extend", "add", "insert", "clear", "pop", "popitem", "setdefault", "remove",
            "discard", "__setitem__"}


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
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def module_name(file: str) -> str:
    """pipeline/loader.py -> pipeline.loader; pipeline/__init__.py -> pipeline."""
    return file.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def module_imports(file: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """The modules of `modules` this file imports, anywhere in it (inside functions too: a lazy import that
    closes a circle is still a circle, only found later). `from X import y` imports module X, and X.y as
    well when that is a module: Python runs X first and looks y up on it (a package's __init__ half done,
    inside a circle) before it falls back to the submodule. Relative imports resolve from the file's package."""
    package = module_name(file).split(".")
    if not file.endswith("/__init__.py"):
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
            base = base.strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        name = name.removeprefix("mocostream.")
        while name and name not in modules:  # a.b.c -> the longest prefix that is a module
            name = name.rpartition(".")[0]
        if name and name != module_name(file):
            found.add(name)
    return found


def import_circles(files) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan's strongly
    connected components of the module graph), each sorted."""
    files = list(files)
    modules = {module_name(file) for file, _ in files}
    graph = {module_name(file): module_imports(file, tree, modules) for file, tree in files}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(circles)


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


def test_no_import_circles():
    circles = import_circles(f for package in PACKAGES for f in sources(package))
    assert not circles, f"modules that import each other (move the shared part into its own module): {circles}"


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
    assert wrong_imports("curate", [("curate/x.py", ast.parse("from mocostream.ops.weights import read_backbone"))])
    assert wrong_imports("pipeline", [("pipeline/x.py", ast.parse("from mocostream.curate import select"))])
    assert not wrong_imports("curate", [("curate/x.py", ast.parse("from mocostream.shards import create_shards"))])


def _assigned_names(nodes) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def runtime_state(file: str, tree: ast.Module) -> set[tuple[str, str]]:
    """(file, name) of the module-level names that a function rebinds (`global`) or changes in place (a
    mutating method, an item assignment or deletion)."""
    top = _assigned_names(n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)))
    found = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        shared = top - _assigned_names(fn.body) - {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                found.update((file, name) for name in node.names)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.attr in MUTATORS:
                found.update({(file, node.func.value.id)} if node.func.value.id in shared else set())
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)) and \
                    isinstance(node.value, ast.Name) and node.value.id in shared:
                found.add((file, node.value.id))
    return found


def module_attribute_writes(file: str, tree: ast.Module, package: str, modules: set[str]) -> list[tuple[str, str]]:
    """(file, target) of assignments to an attribute of a pipeline/ or shards/ module (`sources.X = ...`)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                            for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, [package if node.level else "", node.module or ""]))
            aliases.update({a.asname or a.name: f"{module}.{a.name}" for a in node.names})
    def of_a_module(attribute) -> bool:
        head, _, rest = ast.unparse(attribute.value).partition(".")
        return ".".join(filter(None, [aliases.get(head, head), rest])).removeprefix("mocostream.") in modules

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            targets = [node.func.value]  # sources.CONFIG.update(...)
        found += [(file, ast.unparse(t)) for t in targets if isinstance(t, ast.Attribute) and of_a_module(t)]
    return found


def product_modules() -> set[str]:
    return {p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".") for package in ("pipeline", "shards", "curate")
            for p in (REPO / package).rglob("*.py")}


@pytest.mark.parametrize("package", ("pipeline", "shards", "curate"))
def test_no_module_level_settings_change_at_run_time(package):
    """Settings travel as arguments (a Storage, a config), never through module globals that something
    fills in at run time; what functions do change at module level is listed per-process state."""
    found = set().union(*(runtime_state(f, tree) for f, tree in sources(package)))
    changed = sorted(found - set(PROCESS_STATE))
    assert not changed, f"module-level names changed at run time (pass them as arguments): {changed}"
    stale = sorted(k for k in PROCESS_STATE if k[0].startswith(package + "/") and k not in found)
    assert not stale, f"PROCESS_STATE lists what no longer changes (remove it): {stale}"


@pytest.mark.parametrize("package", PACKAGES)
def test_nothing_assigns_to_a_pipeline_or_shards_module(package):
    modules = product_modules()
    found = [w for f, tree in sources(package) for w in module_attribute_writes(f, tree, package, modules)]
    assert not found, f"assignments to another module's globals: {found}"


def test_storage_settings_are_no_module_globals():
    """The storage settings that travelled through module globals and the trainer's environment are gone:
    pipeline/ and shards/ take a Storage (pipeline/filesystems.py) from their caller."""
    for package in ("pipeline", "shards"):
        for file, tree in sources(package):
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            assert not names & {"S3_CLIENT_CONFIG", "ALLOW_EXTERNAL_SHARDS"}, file
            texts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            assert not [t for t in texts if t.startswith("MOCOSTREAM_")], f"{file} reads an option from the environment"


def test_the_state_checks_find_runtime_settings():
    """The checks above can fail: made-up modules that fill in, rebind or patch settings are caught."""
    made_up = ast.parse("CONFIG = {}\nALLOW = False\nCACHE = {}\n"
                        "def at_start(c):\n    CONFIG.update(c)\n"
                        "def allow():\n    global ALLOW\n    ALLOW = True\n"
                        "def put(k, v):\n    CACHE[k] = v\n"
                        "def local():\n    CONFIG = {}\n    CONFIG.update(a=1)\n")
    assert runtime_state("pipeline/x.py", made_up) == {("pipeline/x.py", n) for n in ("CONFIG", "ALLOW", "CACHE")}
    modules = {"pipeline.sources"}
    for source in ("from mocostream.pipeline import sources\nsources.ALLOW = True",
                   "from . import sources\nsources.ALLOW = True",
                   "import mocostream.pipeline.sources as s\ns.ALLOW = True",
                   "import mocostream.pipeline.sources\nmocostream.pipeline.sources.ALLOW = True",
                   "from . import sources\nsources.CONFIG.update(a=1)"):
        assert module_attribute_writes("ops/x.py", ast.parse(source), "pipeline", modules), source
    assert not module_attribute_writes("ops/x.py", ast.parse("from .sources import S\nS.x = 1\nself.y = 2"),
                                       "pipeline", modules)


def test_the_circle_check_finds_made_up_circles():
    """A circle through a lazy import, one through a package's __init__, one over three modules; a chain is none."""
    made_up = {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "from .b import x",
        "pipeline/b.py": "def f():\n    from mocostream.pipeline import a",  # lazy: still a circle
        "pipeline/c.py": "from . import a",  # c -> a -> b, nothing back to c
        "shards/__init__.py": "from .create import create_shards",
        "shards/create.py": "from . import rejects",  # reads `rejects` off the half-imported package
        "shards/rejects.py": "import json",
        "ops/x.py": "import mocostream.ops.y",
        "ops/y.py": "from ..ops import z",
        "ops/z.py": "from mocostream.ops.x import main",
    }
    files = [(file, ast.parse(text)) for file, text in made_up.items()]
    assert import_circles(files) == [["ops.x", "ops.y", "ops.z"], ["pipeline.a", "pipeline.b"], ["shards", "shards.create"]]
    assert import_circles([f for f in files if f[0] != "pipeline/b.py" and not f[0].startswith("shards/")
                           and f[0] != "ops/z.py"]) == []
    assert module_imports("shards/create.py", ast.parse("from .rejects import parse"),
                          {"shards", "shards.create", "shards.rejects"}) == {"shards.rejects"}
