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
(row blocks × column tiles or panels of the serial twin). The rows are split into one part
per thread of about equal nonzeros (:func:`partition`), each a few row blocks; thread
``i`` (libgomp's thread number: the caller is 0) takes its own part's blocks from the
front, then the other parts' from their back. So each core reads the same rows of the
weight on every call (they stay in its L2 across calls, where taking blocks from one
shared counter handed the rows to whichever thread came first), and a thread slowed by
other work simply leaves some of its blocks to the others. The block's fixed words are
cached per weight and call shape; a launch writes only the input and output addresses.

Where torch's workers sleep right after each region (``OMP_WAIT_POLICY=PASSIVE`` when
torch loaded libgomp; measured once, :func:`workers_sleep`) every region pays a wake-up
(~75 µs here), so the same task functions run on the pool of ``_pool.py`` instead, which
stays awake between layers. ``NBCOMPRESS_OPENMP=torch`` or ``=pool`` forces either.

Only where torch runs on GNU OpenMP (Linux wheels) and only in the process that found it
(libgomp's pool does not survive ``fork``); elsewhere :func:`job` returns ``None`` and the
registry runs numba's ``parallel=True`` build. ``NBCOMPRESS_OPENMP=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from numba import cfunc, njit, types

from nbcompress.kernels import _generated_kernels as gen
from nbcompress.kernels import _pool
from nbcompress.kernels._simd import gomp_parallel

__all__ = ["Block", "address", "available", "job", "launch", "partition", "prewake"]

_STATE: dict[str, int] = {}
#: Row blocks per part (per thread): the unit another thread can take over.
BLOCKS_PER_PART = 4
_LOCK = threading.Lock()
_CALLBACKS: dict[str, object] = {}
_SIGNATURE = types.void(types.voidptr)
#: Task-function suffix of each (data, index) dtype pair.
Encoder = Callable[[tuple, int], "tuple[str, Block] | None"]
_CODES = {("f", "H"): "fH", ("f", "I"): "fI", ("b", "H"): "bH", ("b", "I"): "bI"}


def _find_entry() -> tuple[int, int]:
    """Addresses of ``GOMP_parallel`` and ``omp_get_thread_num`` in torch's libgomp, or 0s."""
    if os.environ.get("NBCOMPRESS_OPENMP", "1") == "0" or not sys.platform.startswith("linux"):
        return 0, 0
    if "OpenMP" not in torch.__config__.parallel_info():
        return 0, 0
    root = str(Path(torch.__file__).resolve().parent.parent)
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0, 0
    # torch's own copy (torch/lib or torch.libs), not another libgomp some package loaded.
    paths = {line.split(None, 5)[-1] for line in maps if "libgomp" in line and root in line}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            entry, number = lib.GOMP_parallel, lib.omp_get_thread_num
        except (OSError, AttributeError):
            continue
        found = [ctypes.cast(f, ctypes.c_void_p).value or 0 for f in (entry, number)]
        return (found[0], found[1]) if all(found) else (0, 0)
    return 0, 0


def available() -> bool:
    """Whether kernels can run on torch's OpenMP threads in this process."""
    pid = os.getpid()
    if _STATE.get("pid") != pid:
        with _LOCK:
            if _STATE.get("pid") != pid:
                # Found once per process; a forked child never uses the parent's pool.
                found = _find_entry() if "pid" not in _STATE else (0, 0)
                _STATE["entry"], _STATE["thread_num"] = found
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


def partition(indptr: np.ndarray, parts: int, blocks: int = BLOCKS_PER_PART) -> np.ndarray:
    """Row bounds of ``parts`` parts of about equal nonzeros, each cut into ``blocks`` blocks.

    Part ``q`` is the rows from ``bounds[q * blocks]`` to ``bounds[(q + 1) * blocks]``; its
    blocks again hold about equal nonzeros. Exactly ``parts * blocks`` blocks: a part
    with fewer rows than ``blocks`` has empty ones (the kernels skip them).

    Args:
        indptr: CSR row pointers (of rows or of 4 × 1 block rows).
        parts: Parts, one per thread.
        blocks: Row blocks per part.

    Returns:
        ``parts * blocks + 1`` non-decreasing int64 row bounds from 0 to the row count.
    """
    m = indptr.shape[0] - 1
    cum = indptr.astype(np.float64)
    # The part cuts first (shares of the whole), then each part's block cuts (shares of
    # the part), each at the row boundary nearest its share.
    outer = _cuts(cum, np.linspace(cum[0], cum[-1], parts + 1), 0, m)
    bounds = [0]
    for lo, hi in zip(outer[:-1], outer[1:], strict=True):
        bounds += _cuts(cum, np.linspace(cum[lo], cum[hi], blocks + 1), lo, hi)[1:]
    return np.asarray(bounds, dtype=np.int64)


def _cuts(cum: np.ndarray, shares: np.ndarray, lo: int, hi: int) -> list[int]:
    """Rows ``lo..hi`` cut where the running nonzero count ``cum`` is nearest each share."""
    at = np.clip(np.searchsorted(cum, shares[1:-1]), lo + 1, hi)
    nearer = cum[at] - shares[1:-1] > shares[1:-1] - cum[at - 1]
    inner = np.maximum.accumulate(np.clip(at - nearer, lo, hi))
    return [lo, *inner.tolist(), hi]


class Block(NamedTuple):
    """What :func:`launch` needs besides the callback.

    Attributes:
        words: The block's fixed words (see :func:`_words`).
        inp: The input, whose address the launch writes into the block.
        out: The output, likewise (the only words that change from call to call).
    """

    words: np.ndarray
    inp: np.ndarray
    out: np.ndarray


#: Per weight (the id of its row pointers, held weakly): its partitions by thread count
#: and the fixed words of its blocks by call shape. Building a block in Python took
#: ~10 µs per call (an array's address costs ~1 µs), ~5% of a batch-8 layer on 2 threads.
_HELD: dict[int, tuple[weakref.ref, dict]] = {}


def _held(indptr: np.ndarray) -> dict:
    key = id(indptr)
    held = _HELD.get(key)
    if held is None or held[0]() is not indptr:
        held = (weakref.ref(indptr, lambda _r, k=key, d=_HELD: d.pop(k, None)), {})
        _HELD[key] = held
    return held[1]


def _partition_of(indptr: np.ndarray, parts: int) -> np.ndarray:
    cached = _held(indptr)
    found = cached.get(parts)
    if found is None:
        found = cached[parts] = partition(indptr, parts)
    return found


def _words(
    ncols: int,
    bounds: np.ndarray,
    arrays: tuple[np.ndarray, ...],
    scalars: tuple[int, ...],
    threads: int,
) -> np.ndarray:
    """The fixed words of a block, cached per weight and call shape.

    Header, arrays, scalars, then one 8-word line per part (counters, first task, end
    task; see kernel_templates.py). ``bounds`` has ``parts × k`` row blocks when it is a
    partition for ``threads``; tasks are numbered row block major, ``ncols`` column
    tiles or panels per row block. The block's own address and those of ``arrays[4]``
    and ``arrays[5]`` (input and output) are left 0 for :func:`launch`; the other arrays
    are kept alive with the words (so their ids in the key are never another array's).
    """
    cached = _held(arrays[0])
    key = (
        ncols,
        threads,
        scalars,
        *((0 if i in (4, 5) else id(a), a.size) for i, a in enumerate(arrays)),
    )
    held = cached.get(key)
    if held is not None:
        return held[0]
    nblocks = bounds.shape[0] - 1
    parts = threads if nblocks % threads == 0 else 1
    ntasks = nblocks * ncols
    words = [0, parts, ntasks, 1, _STATE["thread_num"]]
    for i, a in enumerate(arrays):
        words += (0 if i in (4, 5) else _addr(a), a.size)
    words += scalars
    head, per = len(words), ntasks // parts
    words += [0] * (8 * parts)
    for q in range(parts):
        words[head + 8 * q + 1 : head + 8 * q + 3] = (q * per, (q + 1) * per)
    fixed = np.array(words, dtype=np.int64)
    cached[key] = (fixed, tuple(a for i, a in enumerate(arrays) if i not in (4, 5)))
    return fixed


def _tile(args: tuple, threads: int) -> tuple[str, Block] | None:
    indptr, indices, data, scale, b, bs, n, out, col0, ntile, bounds, nkb, pfk, bias, act = args
    arrays = (indptr, indices, data, scale, b, out, bounds, bias)
    words = _words(ntile, bounds, arrays, (bs, n, col0, nkb, pfk, act), threads)
    return "tile64", Block(words, b, out)


def _panel(width: int) -> Encoder:
    def encode(args: tuple, threads: int) -> tuple[str, Block] | None:
        indptr, indices, data, scale, xp, out, col0, npan, _rb, bias, act = args
        kdim = xp.shape[0] // max(npan, 1)
        m = indptr.shape[0] - 1
        if not (kdim and m and out.flags.c_contiguous and xp.flags.c_contiguous):
            return None
        bounds = _partition_of(indptr, threads)
        arrays = (indptr, indices, data, scale, xp, out, bounds, bias)
        words = _words(npan, bounds, arrays, (kdim, out.shape[1], col0, npan, act), threads)
        return f"panel{width}", Block(words, xp, out)

    return encode


def _spmv(name: str) -> Encoder:
    def encode(args: tuple, threads: int) -> tuple[str, Block] | None:
        bounds = _partition_of(args[0], threads)
        arrays = (*args[:6], bounds, args[6])  # the bias after the bounds, as in the tiles
        words = _words(1, bounds, arrays, (args[7],), threads)
        return name, Block(words, args[4], args[5])

    return encode


_ENCODERS: dict[str, Encoder] = {
    "tile64": _tile,
    **{f"panel{w}": _panel(w) for w in gen.PANEL_WIDTHS},
    "csr_spmv": _spmv("csr_spmv"),
    "csr_spmv8": _spmv("csr_spmv8"),
}


def job(kernel: str, args: tuple, threads: int) -> tuple[str, Block] | None:
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
def _run(entry, fn, words, inp, out, threads):  # noqa: ANN001, ANN202 - numba function
    blk = words.copy()  # the task counters start at 0 (and a call may run in another)
    blk[0] = blk.ctypes.data
    blk[13] = inp.ctypes.data  # every task function's input and output words
    blk[15] = out.ctypes.data
    gomp_parallel(entry, fn, blk.ctypes.data, threads)
    return blk[0]  # read after the region: numba would free the block after its last use


def launch(fn: int, blk: Block, threads: int) -> None:
    """Run callback ``fn`` on ``blk`` on ``threads`` threads (GIL released).

    On torch's OpenMP threads, or, where those sleep right after each region, on the pool
    of ``_pool.py`` that stays awake between layers (``NBCOMPRESS_OPENMP=torch`` or
    ``=pool`` decides instead).
    """
    if _own_pool(threads):
        _pool.launch(fn, blk.words, blk.inp, blk.out, threads)
    else:
        _run(_STATE["entry"], fn, blk.words, blk.inp, blk.out, threads)


def prewake(threads: int) -> None:
    """Wake the awake pool's parked workers if the next launch on ``threads`` will use it."""
    if threads > 1 and available() and _own_pool(threads):
        _pool.wake(threads)


def _own_pool(threads: int) -> bool:
    chosen = os.environ.get("NBCOMPRESS_OPENMP", "").strip().lower()
    if chosen == "torch" or (chosen != "pool" and not workers_sleep(threads)):
        return False
    return _pool.ready(threads)


@cfunc(_SIGNATURE, cache=True)
def _nothing(blk):  # noqa: ANN001, ANN202 - C callback
    pass


#: A parallel region slower than this when it follows another by 0.3 ms had to wake
#: sleeping workers (spinning ones start it in ~2–5 µs here, sleeping ones in ~50–80 µs).
WAKE_SECONDS = 2e-5


def workers_sleep(threads: int) -> bool:
    """Whether torch's OpenMP workers sleep at once after a region (measured once).

    libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` when torch loads it, and the
    variables may have changed since (nbcompress itself sets a default for runtimes
    loaded later), so the policy is measured: empty regions 0.3 ms apart.
    """
    key = f"sleep{threads}"
    if key not in _STATE:
        times = []
        for _ in range(7):
            _run_empty(_STATE["entry"], _nothing.address, threads)
            time.sleep(3e-4)
            start = time.perf_counter()
            _run_empty(_STATE["entry"], _nothing.address, threads)
            times.append(time.perf_counter() - start)
        _STATE[key] = int(sorted(times)[3] > WAKE_SECONDS)
    return bool(_STATE[key])


@njit(nogil=True, cache=True)
def _run_empty(entry, fn, threads):  # noqa: ANN001, ANN202 - numba function
    gomp_parallel(entry, fn, 0, threads)
