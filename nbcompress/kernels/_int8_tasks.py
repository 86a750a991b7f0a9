"""The sparse int8 kernels of ``_int8_kernels.py`` on several threads (``_gomp.py``'s launch).

A call runs a task function (a ``numba.cfunc``) on every thread of torch's OpenMP team,
or of ``_pool.py``'s awake pool, as the float kernels of ``_generated_kernels.py`` do: the
function reads its arrays from a block of int64 words and runs the serial kernel on one
task at a time. A task is a block of slices (16 rows each, ``int8.py``) for one chunk of 8
batch columns; the layout holds one part per thread, a range of rows of about equal
nonzeros cut into blocks (``Sliced.bounds``), so each core reads the same rows of the
weight and writes the same outputs on every call, and thread ``i`` takes its own part's
tasks from the front, then the others' from their back. Each output row is computed by
the same serial code as on one thread, so the results are bit-identical to a serial call.

The batch is quantized to uint8 once per call into the block's own buffer. The previous
layer's output (``x.T`` C-contiguous, batch a multiple of 8) is quantized inside the
region: every thread takes pieces of the input rows (thread 0 from the front, the others
from the back, so each mostly reads the rows it wrote in the previous layer), first for
their ranges, then, once the last piece's thread has turned the ranges into scales, for
their words; a thread waits only for pieces another running thread has taken. Serially
before the region, the 3072 × 8 input of a BERT FFN's second layer cost 12–14 µs of a
~50 µs layer on 2 threads in a model call. Other inputs are quantized before the region
(:func:`~nbcompress.kernels._int8_kernels.quantize_into`).

Words of a block: 0–4 the header of ``_gomp._words`` (counting block, parts, tasks, 1,
``omp_get_thread_num`` or this thread's number), then address and size of ``sptr`` (5),
``idx`` (7), ``w`` (9), ``perm`` (11), the input (13), the output (15), ``scale`` (17),
``rowsum`` (19), ``bias`` (21), the slice bounds of the tasks (23), the quantized input
(25, see :func:`_buffer`), then the batch rows (27), the input features (28), the batch
chunks (29), the activation's code (30, ``_epilogue.ACTIVATIONS``), the pieces of the
in-region quantization (31, 0: quantized before), its counters (32–35: range pieces taken
(front: low 32 bits) and done, word pieces taken and done); then one 64-byte line per part.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from numba import carray, cfunc, njit, types

from nbcompress.kernels import _gomp, _pool, notices
from nbcompress.kernels._int8_kernels import (
    quantize_into,
    spmm_r1,
    spmm_r1_vnni,
    spmm_r4,
    spmm_r4_vnni,
    spmv_r1,
    spmv_r4,
    unpack,
)
from nbcompress.kernels._int8_quant import codes_rows, range_rows, scale_of
from nbcompress.kernels._simd import as_ptr, fetch_add, load, thread_num

__all__ = ["HEAD", "run_batch", "run_vector", "task_address"]

#: Words of a block before its parts' lines.
HEAD = 36
#: Input rows per piece of the in-region quantization (at most :data:`PIECES` pieces).
PIECE_ROWS = 128
PIECES = 16
_SIGNATURE = types.void(types.voidptr)
_FLAGS = {"boundscheck": False, "cache": True, "nogil": True}
_INDEX = {"H": np.uint16, "I": np.uint32}


@njit(**_FLAGS, inline="always")
def _owner(a):  # noqa: ANN001, ANN202 - numba function
    # Thread i owns part i (see _gomp.py); word 4 is libgomp's omp_get_thread_num, or this
    # thread's own number (below 4096, never an address) on _pool.py's workers.
    who = a[4]
    return (who if who < 4096 else thread_num(who)) % a[1]


@njit(**_FLAGS, inline="always")
def _next(a, own, k):  # noqa: ANN001, ANN202 - numba function
    # The next task for this thread, as kernel_templates._TASK_LOOP takes them: its own
    # part's from the front (k = 0), then the other parts' from their back. A part's two
    # counts share its line's first word (front: low 32 bits), so each task runs once.
    # Returns (task or -1 when none is left, k to pass again).
    nparts = a[1]
    while k < nparts:
        q = own + k
        if q >= nparts:
            q -= nparts
        line = a[0] + (HEAD + 8 * q) * 8
        part = carray(as_ptr(line), 3, np.int64)
        count = part[2] - part[1]
        taken = fetch_add(line, np.int64(1) if k == 0 else np.int64(1) << np.int64(32))
        front = taken & np.int64(0xFFFFFFFF)
        behind = taken >> np.int64(32)
        if front + behind >= count:
            k += 1
            continue
        return part[1] + (front if k == 0 else count - 1 - behind), k
    return np.int64(-1), k


@njit(**_FLAGS, inline="always")
def _take(a, word, own, pieces):  # noqa: ANN001, ANN202 - numba function
    # The next piece: thread 0 from the front (low 32 bits of the word), the others from
    # the back; -1 when none is left.
    mine = own == 0
    taken = fetch_add(a[0] + 8 * word, np.int64(1) if mine else np.int64(1) << np.int64(32))
    front, behind = taken & np.int64(0xFFFFFFFF), taken >> np.int64(32)
    if front + behind >= pieces:
        return np.int64(-1)
    return front if mine else pieces - 1 - behind


@njit(**_FLAGS, inline="always")
def _wait(a, word, count):  # noqa: ANN001, ANN202 - numba function
    # Until `count` pieces are done: each one taken is being run by a running thread.
    while load(a[0] + 8 * word) < count:
        pass


@njit(**_FLAGS, inline="always")
def _quantize_share(a, own, xt, buf, x8, xs, zp):  # noqa: ANN001, ANN202 - numba function
    # This thread's pieces of quantize_t: ranges per piece into the buffer's tail, the
    # scales (by the thread that finished the last range), then the words.
    kdim, n = xt.shape
    pieces = a[31]
    nw = x8.shape[0]
    tail = buf[nw + n :].view(np.float32)  # inv, zero points, then (lo, hi) per piece
    inv, zf, part = tail[:n], tail[n : 2 * n], tail[2 * n :]
    p = _take(a, 32, own, pieces)
    while p >= 0:
        lo = part[2 * n * p : 2 * n * p + n]
        range_rows(xt, kdim * p // pieces, kdim * (p + 1) // pieces, lo, part[2 * n * p + n :])
        if fetch_add(a[0] + 8 * 33, np.int64(1)) == pieces - 1:  # the last range: scales
            for b in range(n):
                low, high = part[b], part[n + b]
                for q in range(1, pieces):
                    low = min(low, part[2 * n * q + b])
                    high = max(high, part[2 * n * q + n + b])
                xs[b], zf[b], inv[b] = scale_of(low, high)
                zp[b] = np.int32(zf[b])
            fetch_add(a[0] + 8 * 33, np.int64(1))
        p = _take(a, 32, own, pieces)
    _wait(a, 33, pieces + 1)
    p = _take(a, 34, own, pieces)
    while p >= 0:
        codes_rows(xt, kdim * p // pieces, kdim * (p + 1) // pieces, inv, zf, x8)
        fetch_add(a[0] + 8 * 35, np.int64(1))
        p = _take(a, 34, own, pieces)
    _wait(a, 35, pieces)


# The builders below close over plain values only (rows per block, path, index type): a
# jitted kernel in a closure cell pickles differently in every process, so numba's disk
# cache never matched it and each process compiled the task functions again (~2 s).
def _vector_task(rows, index):  # noqa: ANN001, ANN202 - builds one task function
    def task(blk):  # noqa: ANN001, ANN202
        a = carray(blk, HEAD, np.int64)
        sptr = carray(as_ptr(a[5]), a[6], np.int64)
        idx = carray(as_ptr(a[7]), a[8], index)
        w = carray(as_ptr(a[9]), a[10], np.int8)
        perm = carray(as_ptr(a[11]), a[12], np.int32)
        x = carray(as_ptr(a[13]), a[14], np.float32)
        out = carray(as_ptr(a[15]), a[16], np.float32)
        scale = carray(as_ptr(a[17]), a[18], np.float32)
        bias = carray(as_ptr(a[21]), a[22], np.float32)
        bounds = carray(as_ptr(a[23]), a[24], np.int64)
        act = a[30]
        own = _owner(a)
        t, k = _next(a, own, 0)
        while t >= 0:
            s0, s1 = bounds[t], bounds[t + 1]
            if rows == 4:
                spmv_r4(sptr, idx, w, perm, scale, bias, x, out, s0, s1, act)
            else:
                spmv_r1(sptr, idx, w, perm, scale, bias, x, out, s0, s1, act)
            t, k = _next(a, own, k)

    return task


def _batch_task(key, index):  # noqa: ANN001, ANN202 - builds one task function
    rows, vnni = key[0], key[1] == "vnni"

    def task(blk):  # noqa: ANN001, ANN202
        a = carray(blk, HEAD, np.int64)
        sptr = carray(as_ptr(a[5]), a[6], np.int64)
        idx = carray(as_ptr(a[7]), a[8], index)
        w = carray(as_ptr(a[9]), a[10], np.int8)
        perm = carray(as_ptr(a[11]), a[12], np.int32)
        out = carray(as_ptr(a[15]), a[16], np.float32)
        scale = carray(as_ptr(a[17]), a[18], np.float32)
        rowsum = carray(as_ptr(a[19]), a[20], np.int32)
        bias = carray(as_ptr(a[21]), a[22], np.float32)
        bounds = carray(as_ptr(a[23]), a[24], np.int64)
        n = a[27]
        nchunk = a[29]
        act = a[30]
        buf = carray(as_ptr(a[25]), a[26], np.uint64)
        x8, xs, zp = unpack(buf, nchunk, a[28])
        own = _owner(a)
        if a[31]:
            xt = carray(as_ptr(a[13]), (a[28], n), np.float32)
            _quantize_share(a, own, xt, buf, x8, xs, zp)
        t, k = _next(a, own, 0)
        while t >= 0:
            j = t // nchunk
            c = t - j * nchunk
            s0, s1 = bounds[j], bounds[j + 1]
            head = (sptr, idx, w, perm, scale, rowsum, bias, x8, xs, zp, n, out)
            args = (*head, s0, s1, c, c + 1, act)
            if rows == 4:
                if vnni:
                    spmm_r4_vnni(*args)
                else:
                    spmm_r4(*args)
            elif vnni:
                spmm_r1_vnni(*args)
            else:
                spmm_r1(*args)
            t, k = _next(a, own, k)

    return task


#: Task functions by (kind, index type code): kind is ``1`` or ``4`` (rows per block) for
#: batch 1, ``(rows per block, path)`` for batches; compiled on first use.
_KEYS = ((1, "vnni"), (1, "portable"), (4, "vnni"), (4, "portable"))
_TASKS = {
    **{(rows, code): (_vector_task, rows) for rows in (1, 4) for code in "HI"},
    **{(key, code): (_batch_task, key) for key in _KEYS for code in "HI"},
}
_COMPILED: dict[tuple, int] = {}
_KEPT: list = []
_COMPILING = threading.Lock()


def task_address(kind: object, code: str) -> int:
    """The C callback of ``kind``'s task function for index type ``code`` (compiled once).

    The first use compiles (or loads from numba's disk cache); its time goes into the
    caller's one-line notice, as the registry's first calls do.
    """
    key = (kind, code)
    found = _COMPILED.get(key)
    if found is None:
        start = time.perf_counter()
        with _COMPILING:
            found = _COMPILED.get(key)
            compiled = False
            if found is None:
                build, kernel = _TASKS[key]
                fn = cfunc(_SIGNATURE, cache=True)(build(kernel, _INDEX[code]))
                compiled = not getattr(fn, "cache_hits", 0)
                _KEPT.append(fn)  # its machine code lives as long as the object
                found = _COMPILED[key] = fn.address
        notices.record(time.perf_counter() - start, compiled)
    return found


class _Job:
    """A launch prepared for one layout, call shape, bias and thread count.

    Kept on the layout: a model call's layers found every piece of it anew on each call
    (task function, the block's fixed words, whether the awake pool runs it), ~6 µs of
    Python a layer with the interpreter's data cold after each kernel, a third of a
    batch-1 layer's work on 2 threads. Whether ``_pool.py``'s workers run it is decided
    once (``_gomp``'s rule, ``NBCOMPRESS_OPENMP`` read then); a forked child's copy posts
    to workers that are not there and runs every task on the caller (the pool takes back
    unclaimed jobs), so it stays correct.
    """

    __slots__ = ("bias", "buf", "fn", "pool", "threads", "words")

    def __init__(self, lay: object, kind: object, inp: np.ndarray, out: np.ndarray,
                 bias: np.ndarray, scalars: tuple[int, ...], threads: int) -> None:  # fmt: skip
        n, kdim, nchunk, _act, pieces = scalars[:5]
        n8 = 8 * nchunk
        # Words, float32 scales and int32 zero points (quantize_into), then for the
        # in-region quantization 1/scale and zero points, and each piece's ranges. Used
        # only while the caller holds threads.POOL (one launch at a time).
        self.buf = np.zeros(nchunk * kdim + n8 + (n8 + pieces * n8 if pieces else 0), np.uint64)
        bounds = lay.bounds  # the layout's parts, each of _gomp.BLOCKS_PER_PART blocks
        arrays = (lay.sptr, lay.idx, lay.w, lay.perm, inp, out, lay.scale, lay.rowsum, bias)
        arrays = (*arrays, bounds, self.buf)
        self.words = _gomp._words(nchunk, bounds, arrays, scalars, threads)
        self.fn = task_address(kind, lay.idx.dtype.char)
        self.bias = bias  # held: its id in the key is never another array's
        self.threads = threads
        self.pool = _gomp._own_pool(threads)

    def launch(self, inp: np.ndarray, out: np.ndarray) -> None:
        """Run the tasks on ``inp`` into ``out`` (the caller holds threads.POOL)."""
        if self.pool:
            _pool.launch(self.fn, self.words, inp, out, self.threads)
        else:
            _gomp.launch(self.fn, _gomp.Block(self.words, inp, out), self.threads)


def _job(lay: object, key: tuple, *args: object) -> _Job:
    jobs = lay.__dict__.setdefault("_jobs", {})
    found = jobs.get(key)
    if found is None:
        found = jobs[key] = _Job(lay, *args)
    return found


def run_vector(
    lay: object, x: np.ndarray, bias: np.ndarray, out: np.ndarray, act: int, threads: int
) -> None:
    """``out = act(W x + bias)`` for one float32 input on ``threads`` threads.

    The caller holds :data:`~nbcompress.kernels.threads.POOL` and checked
    ``_gomp.available()``.
    """
    key = (1, x.shape[0], act, threads, id(bias))
    job = lay.__dict__.get("_jobs", _NONE).get(key)
    if job is None:
        scalars = (1, x.shape[0], 1, act, 0, 0, 0, 0, 0)
        job = _job(lay, key, lay.blk, x, out, bias, scalars, threads)
    job.launch(x, out)


_NONE: dict = {}


def run_batch(
    lay: object,
    x: np.ndarray,
    trans: bool,
    bias: np.ndarray,
    out: np.ndarray,
    path: str,
    act: int,
    threads: int,
) -> None:
    """``out = act(W xᵀ + bias)`` into the (M × N) ``out`` for a batch on ``threads`` threads.

    ``x`` is a C-contiguous (N × K) batch, or (K × N) when ``trans``; quantized inside
    the region when ``trans`` and N is a multiple of 8, else here on the calling thread.
    The caller holds :data:`~nbcompress.kernels.threads.POOL` and checked
    ``_gomp.available()``.
    """
    n, kdim = (x.shape[1], x.shape[0]) if trans else x.shape
    inside = trans and n % 8 == 0
    key = (n, kdim, act, threads, id(bias), path, inside)
    job = lay.__dict__.get("_jobs", _NONE).get(key)
    if job is None:
        pieces = max(1, min(PIECES, kdim // PIECE_ROWS)) if inside else 0
        scalars = (n, kdim, (n + 7) // 8, act, pieces, 0, 0, 0, 0)
        inp = x if inside else lay.zeros
        job = _job(lay, key, (lay.blk, path), inp, out.reshape(-1), bias, scalars, threads)
    if inside:
        job.launch(x, out.reshape(-1))
    else:
        quantize_into(x, trans, job.buf)
        job.launch(lay.zeros, out.reshape(-1))
