"""Architecture rules of the layout (issue 10), checked over the source tree.

Each rule is a checker that takes a package directory and returns its offences as
``path:line: detail`` lines, so that a self-test can run it on a small synthetic tree written to
``tmp_path`` (proving it fails when the rule is broken) and the real test on ``nbcompress/``.
Static checks read the sources with :mod:`ast` and import nothing.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nbcompress"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# The notebook frontend and global drawing state: the engine and kernels never load them.
FRONTEND = ("IPython", "ipywidgets", "matplotlib.pyplot")


@dataclass(frozen=True)
class Import:
    """One imported name, as seen from the module whose source holds the statement."""

    importer: str  # dotted name of the importing module
    where: str  # "path:line: statement", for messages
    base: str  # the module the statement names, made absolute
    name: str | None  # the imported name of a ``from`` import
    local: bool  # inside a function body: runs on call, not on import
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs

    def targets(self) -> set[str]:
        """Dotted names this import may load (``from a import b``: a, and a.b if a module)."""
        child = {f"{self.base}.{self.name}"} if self.name not in (None, "*") else set()
        return {self.base} | child


def _in_order(places: Iterable[str]) -> list[str]:
    """``path:line: ...`` strings once each, by path then line number."""
    return sorted(set(places), key=lambda p: (p.split(":")[0], int(p.split(":")[1])))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def modules(pkg: Path) -> dict[str, Path]:
    """Every module of the package by dotted name; a package stands for its ``__init__``."""
    found = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _names_type_checking(test: ast.expr) -> bool:  # TYPE_CHECKING or typing.TYPE_CHECKING
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")[: None if is_package else -1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports_of(module: str, path: Path, pkg: Path) -> Iterator[Import]:
    rel = path.relative_to(pkg.parent)
    is_package = path.name == "__init__.py"

    def walk(nodes: Iterable[ast.AST], local: bool, tc: bool) -> Iterator[Import]:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                where = f"{rel}:{node.lineno}: {ast.unparse(node)}"
                for alias in node.names:
                    if isinstance(node, ast.Import):
                        yield Import(module, where, alias.name, None, local, tc)
                    else:
                        base = _absolute(node, module, is_package)
                        yield Import(module, where, base, alias.name, local, tc)
            elif isinstance(node, ast.If) and _names_type_checking(node.test):
                yield from walk(node.body, local, True)
                yield from walk(node.orelse, local, tc)
            else:
                inner = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                yield from walk(ast.iter_child_nodes(node), local or inner, tc)

    yield from walk([ast.parse(path.read_text(), str(path))], False, False)


def all_imports(pkg: Path) -> list[Import]:
    """Every import statement of every module of the package, function-local ones included."""
    return [imp for mod, path in modules(pkg).items() for imp in _imports_of(mod, path, pkg)]


def _wrong_way(imp: Import, pkg: str) -> bool:
    if not any(_under(imp.importer, f"{pkg}.{p}") for p in ("engine", "kernels", "timing")):
        return False
    targets = imp.targets()

    def hits(*prefixes: str) -> bool:
        return any(_under(t, p) for t in targets for p in prefixes)

    if _under(imp.importer, f"{pkg}.kernels") and hits(f"{pkg}.engine", f"{pkg}.notebook"):
        return True
    if imp.importer == f"{pkg}.timing" and hits(pkg):
        return True
    if imp.type_checking:
        return False
    if hits(*FRONTEND):
        return True
    # A result's .plot() / _repr_html_ may draw lazily, from the display layer only.
    notebook = [t for t in targets if _under(t, f"{pkg}.notebook")]
    lazy_drawing = imp.local and all(_under(t, f"{pkg}.notebook.display") for t in notebook)
    return bool(notebook) and not lazy_drawing


def import_direction_offences(pkg: Path) -> list[str]:
    """Engine, kernels and timing imports of the frontend, the notebook layer or a layer above."""
    return _in_order(imp.where for imp in all_imports(pkg) if _wrong_way(imp, pkg.name))


def import_graph(pkg: Path) -> dict[str, dict[str, list[Import]]]:
    """Module -> module it needs at some point -> the imports that make the edge.

    ``from a.b import c`` needs the module a.b.c if there is one, else a.b (c is defined in its
    ``__init__``), and first runs the ``__init__`` of packages a and a.b. The importer's own
    ancestor packages are left out of that last part: Python runs them before the importer's
    code, so passing through them cannot start a cycle (an ``__init__`` that imports nothing
    has no edges out and cannot close one either). TYPE_CHECKING-only imports never run.
    """
    mods = modules(pkg)
    graph: dict[str, dict[str, list[Import]]] = {m: {} for m in mods}
    for imp in all_imports(pkg):
        child = f"{imp.base}.{imp.name}"
        target = child if imp.name and child in mods else imp.base
        if imp.type_checking or target not in mods:
            continue
        parts = target.split(".")
        passed = [".".join(parts[:i]) for i in range(1, len(parts))]
        needs = [target] + [p for p in passed if not _under(imp.importer, p)]
        for need in needs:
            if need != imp.importer:
                graph[imp.importer].setdefault(need, []).append(imp)
    return graph


def strongly_connected(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each holds a cycle)."""
    index, low, stack, components = {}, {}, [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return sorted(components)


def cycle_offences(pkg: Path) -> list[str]:
    """One entry per import cycle: its modules, then every import between them."""
    graph = import_graph(pkg)
    found = []
    for component in strongly_connected(graph):
        members = set(component)
        inside = [imps for v in component for w, imps in graph[v].items() if w in members]
        edges = _in_order(imp.where for imps in inside for imp in imps)
        found.append("\n    ".join([f"cycle among {', '.join(component)}:", *edges]))
    return found


def module_size_offences(pkg: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    """Modules longer than ``limit`` lines, generated kernels excepted."""
    found = []
    for path in modules(pkg).values():
        lines = len(path.read_text().splitlines())
        if lines > limit and not path.name.startswith("_generated"):
            found.append(f"{path.relative_to(pkg.parent)}: {lines} lines (> {limit})")
    return sorted(found)


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body[1:] if ast.get_docstring(fn, clean=False) is not None else fn.body
    if not body:
        return 0
    first = min([body[0].lineno] + [d.lineno for d in getattr(body[0], "decorator_list", [])])
    return fn.end_lineno - first + 1


def function_size_offences(pkg: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions and methods whose body (docstring excluded) is longer than ``limit`` lines."""
    found = []
    for path in modules(pkg).values():
        if path.name.startswith("_generated"):
            continue
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = _body_lines(fn)
                if lines > limit:
                    where = f"{path.relative_to(pkg.parent)}:{fn.lineno}"
                    found.append(f"{where}: {fn.name}() body {lines} lines (> {limit})")
    return _in_order(found)


def private_import_offences(pkg: Path) -> list[str]:
    """``from x import _name`` inside the package where ``x._name`` is not a module."""
    mods = modules(pkg)
    private = [i for i in all_imports(pkg) if re.match(r"_(?!_)", i.name or "")]
    return _in_order(
        i.where for i in private if _under(i.base, pkg.name) and f"{i.base}.{i.name}" not in mods
    )


# --- the rules on the real tree ------------------------------------------------------------------


CHECKERS = [
    import_direction_offences,
    cycle_offences,
    module_size_offences,
    function_size_offences,
    private_import_offences,
]


@pytest.mark.parametrize("checker", CHECKERS, ids=lambda c: c.__name__.removesuffix("_offences"))
def test_package_obeys_rule(checker):
    offences = checker(PACKAGE)
    assert not offences, "\n".join(offences)


def test_importing_every_engine_and_kernels_module_loads_no_frontend():
    code = f"""if True:
        import importlib, pkgutil, sys
        _under = lambda name, prefix: name == prefix or name.startswith(prefix + ".")
        import nbcompress.engine, nbcompress.kernels, nbcompress.timing
        names = [m.name for p in (nbcompress.engine, nbcompress.kernels)
                 for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
        assert len(names) > 20, names
        for name in names:
            importlib.import_module(name)
            loaded = {{f for f in {FRONTEND!r} for m in sys.modules if _under(m, f)}}
            assert not loaded, f"importing {{name}} loaded {{sorted(loaded)}}"
    """
    path = os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}  # this tree's nbcompress, not an installed one
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


# --- each checker fails when its rule is broken (synthetic trees) --------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    """Write a package ``nbcompress`` under ``root``; an empty ``__init__`` where none given."""
    pkg = root / "nbcompress"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(text))
    for folder in [pkg, *(p for p in pkg.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return pkg


def test_import_direction_checker_flags_each_wrong_way_import(tmp_path):
    engine = """\
        from typing import TYPE_CHECKING
        try:
            import IPython
        except ImportError:
            pass
        if TYPE_CHECKING:
            from nbcompress.notebook.widgets import Explorer
        def plot():
            from nbcompress.notebook.display.figures import draw
            import matplotlib.pyplot as plt
        """
    files = {
        "engine/core/a.py": engine,
        "engine/b.py": "from nbcompress.notebook import display\nfrom matplotlib import pyplot",
        "kernels/k.py": "def f():\n    from nbcompress.engine.core import a\n",
        "timing.py": "import time\n\ndef f():\n    from nbcompress.kernels import k\n",
        "notebook/w.py": "import ipywidgets\nfrom nbcompress.engine.core.a import plot\n",
    }
    assert set(import_direction_offences(_tree(tmp_path, files))) == {
        "nbcompress/engine/b.py:1: from nbcompress.notebook import display",
        "nbcompress/engine/b.py:2: from matplotlib import pyplot",
        "nbcompress/engine/core/a.py:3: import IPython",
        "nbcompress/engine/core/a.py:10: import matplotlib.pyplot as plt",
        "nbcompress/kernels/k.py:2: from nbcompress.engine.core import a",
        "nbcompress/timing.py:4: from nbcompress.kernels import k",
    }


def test_cycle_checker_finds_cycles_closed_by_local_imports_or_package_inits(tmp_path):
    files = {
        "a.py": "from nbcompress import b\n",
        "b.py": "def f():\n    from nbcompress.a import x\n",
        # A TYPE_CHECKING-only import never runs: c and d are no cycle.
        "c.py": "import nbcompress.d\n",
        "d.py": "import typing\nif typing.TYPE_CHECKING:\n    from nbcompress.c import C\n",
        # Siblings reached through their own package: its __init__ has already run.
        "q/__init__.py": "from nbcompress.q.a import A\n",
        "q/a.py": "from nbcompress.q import b\n",
        "q/b.py": "",
        # A name defined by the __init__ needs it: p -> p.z -> p.
        "p/__init__.py": "from nbcompress.p.z import z\nhelper = 1\n",
        "p/z.py": "from nbcompress.p import helper\n",
        # Another package's __init__ runs on the way to its module: e -> k -> k.x -> e.
        "k/__init__.py": "from nbcompress.k.x import run\n",
        "k/x.py": "def run():\n    from nbcompress.e import go\n",
        "k/y.py": "v = 1\n",
        "e.py": "from nbcompress.k.y import v\n",
    }
    pkg = _tree(tmp_path, files)
    assert strongly_connected(import_graph(pkg)) == [
        ["nbcompress.a", "nbcompress.b"],
        ["nbcompress.e", "nbcompress.k", "nbcompress.k.x"],
        ["nbcompress.p", "nbcompress.p.z"],
    ]
    assert cycle_offences(pkg)[0] == (
        "cycle among nbcompress.a, nbcompress.b:\n"
        "    nbcompress/a.py:1: from nbcompress import b\n"
        "    nbcompress/b.py:2: from nbcompress.a import x"
    )


def test_module_size_checker_flags_401_lines(tmp_path):
    files = {"long.py": "x = 1\n" * 401, "ok.py": "x = 1\n" * 400, "_generated_k.py": "x\n" * 900}
    assert module_size_offences(_tree(tmp_path, files)) == ["nbcompress/long.py: 401 lines (> 400)"]


def test_function_size_checker_flags_a_61_line_body(tmp_path):
    long = 'def long():\n    """Doc."""\n' + "    x = 1\n" * 61
    ok = (
        'class C:\n    def ok(self):\n        """Doc.\n\n        More.\n        """\n'
        + "        x\n" * 60
    )
    files = {"m.py": long + ok, "_generated_k.py": "def k():\n" + "    x = 1\n" * 99}
    expected = ["nbcompress/m.py:1: long() body 61 lines (> 60)"]
    assert function_size_offences(_tree(tmp_path, files)) == expected


def test_private_import_checker_flags_private_names_that_are_not_modules(tmp_path):
    files = {
        "m.py": "_x = 1\n__all__ = []\n",
        "k/_impl.py": "",
        "k/rel.py": "def f():\n    from ..m import _x as y\n",
        "use.py": """\
            from nbcompress.m import _x
            from nbcompress.k import _impl
            import nbcompress.k._impl
            from nbcompress.m import __all__
            from os import _exit
            """,
    }
    assert set(private_import_offences(_tree(tmp_path, files))) == {
        "nbcompress/use.py:1: from nbcompress.m import _x",
        "nbcompress/k/rel.py:2: from ..m import _x as y",
    }
