"""Parallel kernels on torch's own OpenMP threads, woken and put to sleep by torch's runtime.

Why. On two cores numba's ``workqueue`` pool cost 100–160 µs per parallel region here (its
workers sleep between regions, and waking a sleeping thread took ~45 µs in this VM), and
torch's OpenMP workers spin for a few milliseconds after each of torch's own regions (a
GELU between two sparse layers), taking half a core from any other pool: the parallel
kernels ran no faster than their serial twins inside a model. torch's libgomp pool,
given our work, has neither problem: its workers are awake after a torch op and stay
awake between our layers (a region costs ~2 µs), and no second pool competes with it.

How. Each supported kernel has a task function per data and index type
(``{kernel}_task_{data}{index}`` in ``_generated_kernels.py``), compiled on first use as a
C callback (``numba.cfunc``, cached on disk). A call packs the arrays' addresses and
sizes and the scalars into an int64 block and calls libgomp's ``GOMP_parallel`` with that
callback, from a ``nogil`` numba function: every thread of torch's team runs tasks
(row blocks × column tiles or panels of the serial twin) taken from counters in the
block, one thread from the front and one from the back, so that each core keeps its
rows of the weight in its L2 from call to call and a thread slowed by other work
simply takes fewer.

Only where torch runs on GNU OpenMP (Linux wheels) and only in the process that found it
(libgomp's pool does not survive ``fork``); elsewhere :func:`job` returns ``None`` and the
registry runs numba's ``parallel=True`` build. ``NBCOMPRESS_OPENMP=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from numba import cfunc, njit, types

from nbcompress.kernels import _generated_kernels as gen
from nbcompress.kernels._simd import gomp_parallel

__all__ = ["address", "available", "job", "launch"]

_STATE: dict[str, int] = {}
_LOCK = threading.Lock()
_CALLBACKS: dict[str, object] = {}
_SIGNATURE = types.void(types.voidptr)
#: Task-function suffix of each (data, index) dtype pair.
Encoder = Callable[[tuple, int], "tuple[str, np.ndarray] | None"]
_CODES = {("f", "H"): "fH", ("f", "I"): "fI", ("b", "H"): "bH", ("b", "I"): "bI"}


def _find_entry() -> int:
    """Address of ``GOMP_parallel`` in the libgomp torch uses, or 0."""
    if os.environ.get("NBCOMPRESS_OPENMP", "1") == "0" or not sys.platform.startswith("linux"):
        return 0
    if "OpenMP" not in torch.__config__.parallel_info():
        return 0
    root = str(Path(torch.__file__).resolve().parent.parent)
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    # torch's own copy (torch/lib or torch.libs), not another libgomp some package loaded.
    paths = {line.split(None, 5)[-1] for line in maps if "libgomp" in line and root in line}
    for path in sorted(paths):
        try:
            entry = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        return ctypes.cast(entry, ctypes.c_void_p).value or 0
    return 0


def available() -> bool:
    """Whether kernels can run on torch's OpenMP threads in this process."""
    pid = os.getpid()
    if _STATE.get("pid") != pid:
        with _LOCK:
            if _STATE.get("pid") != pid:
                # Found once per process; a forked child never uses the parent's pool.
                _STATE["entry"] = _find_entry() if "pid" not in _STATE else 0
                _STATE["pid"] = pid
    return bool(_STATE["entry"])


def address(name: str) -> tuple[int, bool]:
    """The C callback of task function ``name``: its address, and whether it compiled now.

    The caller holds the registry's first-call lock and numba's SLP switch (the serial
    twin inside is compiled for the callback's array types).
    """
    fn = _CALLBACKS.get(name)
    compiled = False
    if fn is None:
        fn = cfunc(_SIGNATURE, cache=True)(getattr(gen, name))
        compiled = not getattr(fn, "cache_hits", 0)
        _CALLBACKS[name] = fn
    return fn.address, compiled


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _block(ntasks: int, arrays: tuple[np.ndarray, ...], scalars: tuple[int, ...]) -> np.ndarray:
    words = [0, 0, ntasks, 1, 0]  # see the task functions' header (kernel_templates.py)
    for a in arrays:
        words += (_addr(a), a.size)
    blk = np.array(words + list(scalars), dtype=np.int64)
    blk[0] = _addr(blk)
    return blk


def _tile(args: tuple, threads: int) -> tuple[str, np.ndarray] | None:
    indptr, indices, data, scale, b, bs, n, out, col0, ntile, bounds, nkb, pfk = args
    ntasks = ntile * (bounds.shape[0] - 1)
    blk = _block(ntasks, (indptr, indices, data, scale, b, out, bounds), (bs, n, col0, nkb, pfk))
    return "tile64", blk


def _panel(width: int) -> Encoder:
    def encode(args: tuple, threads: int) -> tuple[str, np.ndarray] | None:
        indptr, indices, data, scale, xp, out, col0, npan, rb = args
        kdim = xp.shape[0] // max(npan, 1)
        m = indptr.shape[0] - 1
        if not (kdim and m and out.flags.c_contiguous and xp.flags.c_contiguous):
            return None
        # Sixteen row blocks per thread and panel whatever the caller's split (sized for
        # numba's static schedule): evens out threads slowed by other work.
        rb = max(16, -(-m // (16 * threads)))
        ntasks = npan * -(-m // rb)
        scalars = (kdim, out.shape[1], col0, rb, npan)
        return f"panel{width}", _block(ntasks, (indptr, indices, data, scale, xp, out), scalars)

    return encode


def _spmv(name: str) -> Encoder:
    def encode(args: tuple, threads: int) -> tuple[str, np.ndarray] | None:
        m = args[0].shape[0] - 1
        # Eight tasks per thread: small enough to even out rows of unequal length.
        rows = max(32, -(-m // (8 * threads)))
        return name, _block(-(-m // rows), args, (rows,))

    return encode


_ENCODERS: dict[str, Encoder] = {
    "tile64": _tile,
    **{f"panel{w}": _panel(w) for w in gen.PANEL_WIDTHS},
    "csr_spmv": _spmv("csr_spmv"),
    "csr_spmv8": _spmv("csr_spmv8"),
}


def job(kernel: str, args: tuple, threads: int) -> tuple[str, np.ndarray] | None:
    """``(task function name, block)`` for running ``kernel(*args)`` on torch's threads.

    ``None`` when this kernel, its dtypes or this process cannot (the caller then runs
    numba's parallel build).
    """
    encode = _ENCODERS.get(kernel)
    if encode is None or not available():
        return None
    code = _CODES.get((args[2].dtype.char, args[1].dtype.char))
    if code is None:  # e.g. the direct convolution's 64-bit tap offsets
        return None
    found = encode(args, threads)
    if found is None:
        return None
    name, blk = found
    return f"{name}_task_{code}", blk


@njit(nogil=True, cache=True)
def _run(entry, fn, blk, threads):  # noqa: ANN001, ANN202 - numba function
    gomp_parallel(entry, fn, blk.ctypes.data, threads)


def launch(fn: int, blk: np.ndarray, threads: int) -> None:
    """Run callback ``fn`` on ``blk`` on ``threads`` of torch's OpenMP threads (GIL released)."""
    _run(_STATE["entry"], fn, blk, threads)
