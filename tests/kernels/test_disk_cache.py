"""numba's disk cache follows the files a cached kernel calls into (``_disk_cache``).

numba stamps a cached function with its own file only: a process loaded the old machine
code of ``_generated_kernels`` after only ``_epilogue.py`` or ``_simd.py`` had changed.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

from numba.core.ccallback import CFunc
from numba.core.dispatcher import Dispatcher

import nbcompress.kernels
from nbcompress.kernels import _disk_cache
from nbcompress.kernels._disk_cache import DependencyLocator

KERNELS = Path(nbcompress.kernels.__file__).parent


def _cached() -> dict[str, object]:
    """Every module-level ``cache=True`` dispatcher and cfunc of the kernels package."""
    found = {}
    for info in pkgutil.iter_modules(nbcompress.kernels.__path__):
        module = importlib.import_module(f"nbcompress.kernels.{info.name}")
        for name, obj in vars(module).items():
            mine = getattr(obj, "__module__", None) == module.__name__
            if mine and isinstance(obj, Dispatcher | CFunc) and obj._cache.cache_path:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_cached_kernel_that_imports_kernels_is_stamped_with_them():
    # The locator is picked at decoration: a module decorated before _disk_cache was
    # imported keeps numba's own stamp, which is enough only for a module that imports no
    # other module of the package (today _epilogue, imported first by csr.py).
    cached = _cached()
    assert len(cached) > 40, sorted(cached)
    locators = {n: f._cache._impl.locator for n, f in cached.items()}
    stamped = {n for n, loc in locators.items() if isinstance(loc, DependencyLocator)}
    assert "_generated_kernels.tile64" in stamped
    files = {n: sys.modules[f.__module__].__file__ for n, f in cached.items()}
    plain = sorted(n for n in set(cached) - stamped if _disk_cache.dependencies(files[n]))
    assert not plain, f"decorated before nbcompress.kernels._disk_cache was imported: {plain}"


def test_the_kernels_depend_on_the_helpers_they_inline():
    def deps(name: str) -> set[str]:
        return {p.name for p in _disk_cache.dependencies(KERNELS / f"{name}.py")}

    assert {"_epilogue.py", "_simd.py", "_numba.py"} <= deps("_generated_kernels")
    assert {"_epilogue.py", "_int8_simd.py", "_int8_quant.py"} <= deps("_int8_kernels")
    assert {"_simd.py"} <= deps("_pool")
    assert {"_generated_kernels.py", "_int8_kernels.py", "_simd.py"} <= deps("_int8_tasks")
    assert "modules.py" not in deps("_int8_tasks")  # a package's __init__ is not followed


def _package(root: Path, name: str, value: int) -> Path:
    pkg = root / name
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        textwrap.dedent(f"""
        from numba import njit

        from {name} import b
        from .c import h


        @njit(cache=True)
        def f():
            return b.g() + h()
        """)
    )
    (pkg / "b.py").write_text(f"from numba import njit\n\n\n@njit\ndef g():\n    return {value}\n")
    (pkg / "c.py").write_text("from numba import njit\n\n\n@njit\ndef h():\n    return 0\n")
    return pkg


def test_digest_follows_absolute_and_relative_imports(tmp_path):
    pkg = _package(tmp_path, "pkgd", 1)
    assert {p.name for p in _disk_cache.dependencies(pkg / "a.py")} == {"b.py", "c.py"}
    before = _disk_cache.digest(pkg / "a.py")
    _disk_cache.digest.cache_clear()
    (pkg / "c.py").write_text((pkg / "c.py").read_text().replace("return 0", "return 5"))
    assert _disk_cache.digest(pkg / "a.py") != before


_CHILD = """
import importlib.util, sys
sys.path.insert(0, {root!r})
spec = importlib.util.spec_from_file_location("_disk_cache", {module!r})
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)  # installs the locator (no torch: only numba)
dc.watch({watched!r})
import pkgw.a, pkgn.a
values = [m.a.f() for m in (pkgw, pkgn)]
hits = [sum(m.a.f.stats.cache_hits.values()) for m in (pkgw, pkgn)]
print(*values, *hits)
"""


def _run(root: Path) -> list[int]:
    code = _CHILD.format(root=str(root), module=_disk_cache.__file__, watched=str(root / "pkgw"))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return [int(v) for v in done.stdout.split()]


def test_a_changed_dependency_recompiles_the_cached_caller(tmp_path):
    # pkgw is watched, pkgn (the same code) is not: the control shows numba's own hazard.
    for name in ("pkgw", "pkgn"):
        _package(tmp_path, name, 1)
    assert _run(tmp_path) == [1, 1, 0, 0]  # compiled and saved
    assert _run(tmp_path) == [1, 1, 1, 1]  # both loaded from the disk cache
    for name in ("pkgw", "pkgn"):
        b = tmp_path / name / "b.py"
        b.write_text(b.read_text().replace("return 1", "return 2"))
    watched, plain, *_ = _run(tmp_path)
    assert watched == 2, "stale machine code loaded for a function whose import changed"
    assert plain == 1, "numba now follows imports itself: _disk_cache may be dropped"
