"""The kernel registry: each jitted kernel with its serial twin, and its first call.

Each :class:`Kernel` is built once, below, from explicit references to the jitted
functions and their serial twins, so a missing kernel fails at import. With more than one
thread a kernel runs on torch's OpenMP threads where ``_gomp.py`` has a task function
for it, else its ``parallel=True`` build; with one thread its serial twin (no
thread-pool launch). The first call per signature compiles or loads from numba's disk
cache, one at a time, and reports its time to :mod:`~nbcompress.kernels.notices`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numba

from nbcompress.kernels import _generated_kernels as gen
from nbcompress.kernels import _gomp, _numba, notices
from nbcompress.kernels.threads import POOL, get_threads

__all__ = [
    "BSR4_SPMV",
    "BSR4_TILES",
    "BSR_SPMM",
    "CSR_COLS",
    "KERNELS",
    "PACK_COLS",
    "PACK_IM2COL",
    "PACK_ROWS",
    "PANELS",
    "SPMV",
    "SPMV8",
    "TILE",
    "TILE64",
    "TRANSPOSE",
    "Kernel",
    "callback",
]

#: Columns per ``tile64`` call unit.
TILE = gen.TILE

_COMPILED: set[tuple] = set()
_FIRST_CALL = threading.Lock()


@dataclass(frozen=True, eq=False)
class Kernel:
    """A jitted kernel on raw arrays and its serial twin.

    Attributes:
        name: Name in :data:`KERNELS` and in the compile-time warning.
        parallel: The build for more than one thread (``parallel=True``).
        serial: The build for one thread; the same function for kernels that are serial
            anyway (the memory-bound packing copies).
    """

    name: str
    parallel: Callable[..., None]
    serial: Callable[..., None]

    def run(self, args: tuple, dtypes: tuple = (), n: int | None = None) -> None:
        """Run on raw ``args``: the serial twin on one thread, else on the pool.

        The pool has one entry (:data:`~nbcompress.kernels.threads.POOL`): when another
        Python thread holds it, the serial twin runs here instead (same arguments).

        Args:
            args: The kernel's arguments, unchecked.
            dtypes: What distinguishes one compiled signature from another (for the
                one-time note about compilation).
            n: The thread count, if the caller has it already.
        """
        # Lean: small layers are mostly per-call overhead (no lock or numba call on 1 thread).
        n = n or get_threads()
        if n > 1 and POOL.acquire(blocking=False):
            try:
                found = _gomp.job(self.name, args, n)
                if found is not None:  # on torch's OpenMP threads (see _gomp.py)
                    _on_torch_threads(*found, n)
                    return
                if numba.get_num_threads() != n:
                    numba.set_num_threads(n)
                _invoke(self.parallel, args, (self.name, True, *dtypes))
            finally:
                POOL.release()
        else:
            _invoke(self.serial, args, (self.name, False, *dtypes))


def _invoke(kernel: Callable[..., None], args: tuple, key: tuple) -> None:
    if key in _COMPILED:
        kernel(*args)
        return
    # The first call per signature compiles (SLP vectorization on, which only matters
    # then) or loads from disk; the time (waiting for another thread's compilation
    # included: the user waits all the same) goes into the caller's one-line notice
    # (notices.py). One at a time: the SLP switch is process-wide; a kernel compiled while
    # another thread reset it is cached without.
    start = time.perf_counter()
    compiled = False
    with _FIRST_CALL:
        if key in _COMPILED:  # compiled meanwhile, e.g. by the background warm-up
            kernel(*args)
        else:
            misses = notices.cache_misses(kernel)
            with _numba.slp_enabled():
                kernel(*args)
            _COMPILED.add(key)
            compiled = notices.cache_misses(kernel) > misses
    notices.record(time.perf_counter() - start, compiled)


def callback(task: str) -> int:
    """The address of ``_gomp``'s C callback for task function ``task``.

    The first use compiles (or loads) it, timed into the caller's notice like any first
    call, under the first-call lock and the SLP switch.
    """
    key = ("omp", task)
    if key not in _COMPILED:
        start = time.perf_counter()
        with _FIRST_CALL:
            compiled = False
            if key not in _COMPILED:
                with _numba.slp_enabled():
                    compiled = _gomp.address(task)[1]
                _COMPILED.add(key)
        notices.record(time.perf_counter() - start, compiled)
    return _gomp.address(task)[0]


def _on_torch_threads(task: str, block: object, n: int) -> None:
    _gomp.launch(callback(task), block, n)


def _copy(name: str, kernel: Callable[..., None]) -> Kernel:
    # A serial copy kernel: memory-bound, so it has no pool variant.
    return Kernel(name, kernel, kernel)


SPMV = Kernel("csr_spmv", gen.csr_spmv, gen.csr_spmv_1)
SPMV8 = Kernel("csr_spmv8", gen.csr_spmv8, gen.csr_spmv8_1)
CSR_COLS = Kernel("csr_cols", gen.csr_cols, gen.csr_cols_1)
#: The panel kernels by width in columns, widest first.
PANELS = {
    16: Kernel("panel16", gen.panel16, gen.panel16_1),
    8: Kernel("panel8", gen.panel8, gen.panel8_1),
}
TILE64 = Kernel("tile64", gen.tile64, gen.tile64_1)
BSR4_SPMV = Kernel("bsr4_spmv", gen.bsr4_spmv, gen.bsr4_spmv_1)
#: The 4 × 1 block tile kernels by width in columns, widest first.
BSR4_TILES = {
    16: Kernel("bsr4_tile16", gen.bsr4_tile16, gen.bsr4_tile16_1),
    8: Kernel("bsr4_tile8", gen.bsr4_tile8, gen.bsr4_tile8_1),
}
BSR_SPMM = Kernel("bsr_spmm", _numba.bsr_spmm, _numba.bsr_spmm_1)
PACK_COLS = _copy("pack_cols", _numba.pack_cols)
PACK_ROWS = _copy("pack_rows", _numba.pack_rows)
PACK_IM2COL = _copy("pack_im2col", _numba.pack_im2col)
TRANSPOSE = _copy("transpose", _numba.transpose)

#: Every kernel by name.
KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (SPMV, SPMV8, CSR_COLS, *PANELS.values(), TILE64, BSR4_SPMV, *BSR4_TILES.values())
    + (BSR_SPMM, PACK_COLS, PACK_ROWS, PACK_IM2COL, TRANSPOSE)
}
if tuple(PANELS) != gen.PANEL_WIDTHS or tuple(BSR4_TILES) != gen.BSR_WIDTHS:
    raise ImportError("nbcompress.kernels: the registry's widths differ from the generated ones.")
