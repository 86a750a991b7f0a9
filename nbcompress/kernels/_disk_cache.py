"""Numba's disk cache, made to follow the files a cached kernel calls into.

numba keys a ``cache=True`` function's saved machine code on its own file only: the index
next to it (``<module>.<name>-<line>.py<ver>.nbi``) holds that file's *source stamp* (its
content hash in numba 0.68, its mtime and size in older releases), and each entry the
function's own bytecode. Code compiled into it from another file — the ``_epilogue`` and ``_simd``
helpers inlined into ``_generated_kernels``, ``_int8_simd`` into ``_int8_kernels``,
``_simd`` into ``_pool`` — is in neither. So after an upgrade or an edit that changes only
such a helper, a new process loaded the old machine code, and computed the old results.

:class:`DependencyLocator`, put first in numba's list of cache locators when this module is
imported, stamps every function defined in a watched directory (this package by default,
:func:`watch` for more) with the content of its file *and* of every module of the same
top-level package that the file imports, transitively (read from the import statements,
nothing is imported). The directory and file names of the cache are those numba's own
locator chose; only the stamp differs, so when any of those files changes the index no
longer matches and numba compiles afresh, and rewrites it. A user's own
``NUMBA_CACHE_LOCATOR_CLASSES`` bypasses this (numba then consults only those classes).
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from numba.core import caching

__all__ = ["DependencyLocator", "dependencies", "digest", "install", "watch"]

#: Directories whose modules' cached functions get the dependency stamp.
WATCHED: list[Path] = [Path(__file__).resolve().parent]

# ``import a.b`` and ``from a.b import (c, d)`` at the start of a line; a match inside a
# docstring only adds a file to the stamp, which costs a recompile, never a stale load.
_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)"
    r"|import[ \t]+([\w. \t,]+))",
    re.MULTILINE,
)


def watch(directory: str | Path) -> None:
    """Give the cached functions of modules under ``directory`` the dependency stamp.

    Args:
        directory: A package directory (or any folder of modules); its subfolders count.
    """
    path = Path(directory).resolve()
    if path not in WATCHED:
        WATCHED.append(path)


def _package_root(path: Path) -> Path:
    """The folder holding ``path``'s top-level package (where absolute names start)."""
    root = path.parent
    while (root / "__init__.py").exists():
        root = root.parent
    return root


def _module_file(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _imported(path: Path) -> set[Path]:
    """Files of ``path``'s own top-level package that its import statements name."""
    root = _package_root(path)
    top = path.relative_to(root).parts[0]
    names: set[str] = set()
    for source, members, plain in _IMPORT.findall(path.read_text(encoding="utf-8")):
        if plain:
            names.update(part.split()[0] for part in plain.split(",") if part.strip())
            continue
        if source.startswith("."):  # relative: resolved against the importing package
            level = len(source) - len(source.lstrip("."))
            package = path.parent.relative_to(root).parts
            base = ".".join([*package[: len(package) - level + 1], source.lstrip(".")])
            source = base.rstrip(".")
        if source.split(".")[0] != top:
            continue
        words = [m.split()[0] for m in members.strip("()").split(",") if m.split()]
        # ``from pkg import sub``: the submodule, not pkg's __init__ (whose code is run,
        # not compiled into the caller); ``from mod import name``: mod.
        subs = [f"{source}.{w}" for w in words if _module_file(root, f"{source}.{w}")]
        names.update(subs)
        if len(subs) < len(words):
            names.add(source)
    found = {_module_file(root, name) for name in names if name.split(".")[0] == top}
    return {f for f in found if f is not None and f != path}


@functools.cache
def dependencies(path: str | Path) -> tuple[Path, ...]:
    """Every file of the same top-level package that ``path`` imports, transitively.

    Args:
        path: A Python source file.

    Returns:
        The files, sorted, ``path`` itself excluded.
    """
    start = Path(path).resolve()
    seen: set[Path] = set()
    todo = [start]
    while todo:
        for found in _imported(todo.pop()):
            if found not in seen and found != start:
                seen.add(found)
                todo.append(found)
    return tuple(sorted(seen))


@functools.cache
def digest(path: str | Path) -> str:
    """SHA-256 over the contents of ``path`` and of its :func:`dependencies`.

    Computed once per file and process (numba asks when each function is decorated).
    """
    start = Path(path).resolve()
    sha = hashlib.sha256()
    for file in (start, *dependencies(start)):
        name = file.name if file == start else str(file.relative_to(_package_root(start)))
        sha.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return sha.hexdigest()


def _watched(py_file: str) -> bool:
    try:
        path = Path(py_file).resolve()
    except OSError:
        return False
    return path.suffix == ".py" and any(path.is_relative_to(d) for d in WATCHED)


class DependencyLocator(getattr(caching, "_CacheLocator", object)):
    """numba's own locator for a function, with the dependency digest in its stamp."""

    def __init__(self, inner: caching._CacheLocator, py_file: str) -> None:
        self._inner = inner
        self._py_file = py_file

    def ensure_cache_path(self) -> None:  # noqa: D102 - numba's protocol
        self._inner.ensure_cache_path()

    def get_cache_path(self) -> str:  # noqa: D102
        return self._inner.get_cache_path()

    def get_disambiguator(self) -> str:  # noqa: D102
        return self._inner.get_disambiguator()

    def get_source_stamp(self) -> object:
        """Numba's own stamp of the function's file, and :func:`digest` of its imports."""
        return (self._inner.get_source_stamp(), digest(self._py_file))

    @classmethod
    def from_function(cls, py_func, py_file):  # noqa: D102 - None: not ours to stamp
        if not _watched(py_file):
            return None
        for other in _impl_class()._locator_classes:
            if other is cls:
                continue
            inner = other.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner, py_file)
        return None


def _impl_class() -> type | None:
    # ``CacheImpl`` in numba 0.68, ``_CacheImpl`` in older releases. Its list of locator
    # classes is shared by the function and cfunc caches (the task cfuncs of _gomp and
    # _int8_tasks too). None: a numba whose caching internals moved (numba's own stamps).
    found = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    return found if isinstance(getattr(found, "_locator_classes", None), list) else None


def install() -> None:
    """Put :class:`DependencyLocator` first in numba's locator list (idempotent).

    Must run before the first ``cache=True`` function of a watched module is decorated:
    numba picks a function's locator at decoration.
    """
    impl = _impl_class()
    if impl is not None and DependencyLocator not in impl._locator_classes:
        impl._locator_classes.insert(0, DependencyLocator)


install()
