"""Sparse int8 products ``x @ W.T`` for ``SparseLinear``'s ``csr_int8`` and ``bsr_int8``.

The weight (int8 values, one float scale per output row; element-wise CSR or 4 × 1
blocks) is re-laid out once into slices of 16 rows (or 16 block rows), one vector lane
per row, rows sorted by length so that a slice pads little (0.2–0.3% on pruned BERT
layers; see ``_int8_kernels.py`` for the arrays). A step of a slice then reads one input
per lane with one gather, and no row needs a horizontal sum:

* batch 1: float32 inputs, int8 weights converted to float, float accumulation (no
  activation rounding): 16 nonzeros per ``vgatherdps``; a 4 × 1 block's four rows share
  the gathered input. 768 → 3072 at 90%: 44 µs against 186 µs for the CSR kernel here.
* batch ≥ 2: the inputs are quantized per batch row to uint8 with a zero point (as
  ONNX Runtime's dynamic int8 does) into chunks of 8 batch columns, one 64-bit word per
  input row; one gather then fetches 8 rows' inputs for 8 columns, and ``vpdpbusd``
  adds 4 steps' products per int32 lane exactly. Without AVX512-VNNI the same exact
  sums come from widened 16-bit products (:func:`nbcompress.kernels.cpu.sparse_int8_path`
  picks the path; both are bit-identical). Each output is scaled once:
  ``(acc − zp·Σw) · scale_row · scale_x``.
"""

from __future__ import annotations

import threading

import numpy as np

from nbcompress.kernels import _gomp
from nbcompress.kernels._int8_kernels import FUSED, quantize_u8, spmv_r1, spmv_r4
from nbcompress.kernels._int8_tasks import run_batch, run_vector
from nbcompress.kernels.cpu import sparse_int8_path
from nbcompress.kernels.dispatch import SERIAL, fastest, recorded_choice
from nbcompress.kernels.formats import BSRMatrix, CSRMatrix
from nbcompress.kernels.threads import POOL, get_threads

__all__ = ["LANES", "Sliced", "int8_matmul", "quantize_batch", "sliced"]

#: Rows per slice (one vector lane each).
LANES = 16
_BUILDING = threading.Lock()
#: Steps per group (``vpdpbusd`` sums 4 products per lane).
STEPS = 4


class Sliced:
    """An int8 weight in the sliced layout of ``_int8_kernels.py``, for ``parts`` threads.

    The rows (block rows) are cut into ``parts`` ranges of about equal nonzeros, at
    multiples of 16 rows, and sorted by length within each range: a thread that runs a
    part writes only that range's outputs. Sorted across the whole weight, two threads
    wrote the same cache lines of the output all the time (768 → 3072 at 90%, batch 8:
    2 threads 131 µs against 119 on one; 78 µs with each thread's rows together).

    Attributes:
        sptr: int64 group pointers per slice.
        idx: Column (block column) per lane and step, the matrix's index dtype.
        w: int8 weights per group, lane-major (``R`` rows of a block one after another).
        perm: int32 row (block row) of each lane, -1 for padding lanes.
        scale: float32 scale per output row.
        rowsum: int32 sum of each output row's int8 weights.
        blk: Rows per block (1: element-wise, 4: 4 × 1 blocks).
        bounds: int64 slice bounds of the tasks: each part cut into
            ``_gomp.BLOCKS_PER_PART`` blocks of about equal work (``parts × blocks + 1``).
        nsl: Slices.
        shape: ``(rows, cols)`` of the weight.
    """

    def __init__(self, mat: CSRMatrix | BSRMatrix, parts: int = 1) -> None:
        blk = 4 if isinstance(mat, BSRMatrix) else 1
        nrows = mat.indptr.shape[0] - 1
        count = np.diff(mat.indptr)
        cuts = _cuts(mat.indptr, parts, LANES)  # whole slices: no padding lanes
        first = np.zeros(parts + 1, dtype=np.int64)  # each part's first slice
        np.cumsum(-(-np.diff(cuts) // LANES), out=first[1:])
        nsl = int(first[-1])
        perm = np.full(nsl * LANES, -1, dtype=np.int32)
        for q in range(parts):
            lo, hi = cuts[q], cuts[q + 1]
            order = lo + np.argsort(-count[lo:hi], kind="stable")
            perm[first[q] * LANES : first[q] * LANES + hi - lo] = order
        used = np.flatnonzero(perm >= 0)
        longest = np.zeros(nsl * LANES, dtype=np.int64)
        longest[used] = count[perm[used]]
        groups = -(-longest.reshape(nsl, LANES).max(axis=1, initial=0) // STEPS)
        sptr = np.zeros(nsl + 1, dtype=np.int64)
        np.cumsum(groups, out=sptr[1:])
        self.bounds = _task_bounds(sptr, first)
        self.nsl = nsl
        # Where every stored value goes: its row's lane, its step within the row.
        pos = np.empty(nrows, dtype=np.int64)
        pos[perm[used]] = used
        rows = np.repeat(np.arange(nrows), count)
        step = np.arange(mat.indices.shape[0]) - mat.indptr[rows]
        lane, group = pos[rows] % LANES, sptr[pos[rows] // LANES] + step // STEPS
        st = step % STEPS
        ngroups = int(sptr[-1])
        self.idx = np.zeros(ngroups * STEPS * LANES, dtype=mat.indices.dtype)
        self.idx[group * 64 + st * LANES + lane] = mat.indices
        self.w = np.zeros(ngroups * 64 * blk, dtype=np.int8)
        values = mat.data.reshape(mat.indices.shape[0], blk)
        for i in range(blk):
            self.w[group * 64 * blk + 64 * i + 4 * lane + st] = values[:, i]
        self.sptr, self.perm, self.blk = sptr, perm, blk
        self.scale = np.ascontiguousarray(mat.scale, dtype=np.float32)
        m = mat.shape[0]
        out_rows = np.repeat(rows, blk) * blk + np.tile(np.arange(blk), rows.shape[0])
        sums = np.bincount(out_rows, weights=values.reshape(-1), minlength=m)
        self.rowsum = sums.astype(np.int32)
        self.zeros = np.zeros(m, dtype=np.float32)  # the bias of a layer without one
        self.shape = mat.shape

    def bias(self, bias: np.ndarray) -> np.ndarray:
        """``bias`` as the one array object kept for its memory (C-contiguous float32).

        A module passes a new numpy view of its bias tensor on every call; the parallel
        kernels' blocks are cached per array object (``_gomp._words``), so views of the
        same memory map to the first one (which keeps that memory alive).
        """
        held = self.__dict__.get("_bias")
        if held is not None and held[1] is bias:  # a run executor passes the same array
            return bias
        addr = bias.__array_interface__["data"][0]
        if held is not None and held[0] == addr and held[2] == (bias.shape, bias.strides):
            return held[1]
        plain = np.ascontiguousarray(bias, dtype=np.float32)
        if plain is bias and bias.shape == self.zeros.shape:
            self.__dict__["_bias"] = (addr, bias, (bias.shape, bias.strides))
        return plain

    @property
    def nbytes(self) -> int:
        """Bytes held by the layout."""
        arrays = (self.sptr, self.idx, self.w, self.perm, self.scale, self.rowsum)
        return sum(a.nbytes for a in arrays)


def sliced(mat: CSRMatrix | BSRMatrix, parts: int = 1) -> Sliced:
    """``mat``'s sliced layout for ``parts`` threads, built on first use, kept while ``mat`` lives.

    Args:
        mat: An int8 CSR matrix, or an int8 block-sparse one in 4 × 1 blocks.
        parts: Threads the layout is cut for (one range of rows each).
    """
    # Kept in the matrix's own __dict__ (a plain dict lookup per call, where a weak-key
    # dictionary costs microseconds of Python once its objects are out of the caches).
    held = mat.__dict__.get("_sliced")
    if held is None:
        held = {}
        object.__setattr__(mat, "_sliced", held)  # frozen dataclass: set once, same lifetime
    lay = held.get(parts)
    if lay is None:
        with _BUILDING:  # one layout per (matrix, parts), whichever Python thread asks first
            lay = held.get(parts)
            if lay is None:
                lay = held[parts] = Sliced(mat, parts)
    return lay


def _task_bounds(sptr: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Each part's slices (from ``first[q]``) cut into blocks of about equal groups."""
    bounds = [np.zeros(1, dtype=np.int64)]
    for q in range(first.shape[0] - 1):
        lo, hi = int(first[q]), int(first[q + 1])
        if hi > lo:
            bounds.append(lo + _gomp.partition(sptr[lo : hi + 1], 1)[1:])
        else:  # an empty part: empty blocks
            bounds.append(np.full(_gomp.BLOCKS_PER_PART, lo, dtype=np.int64))
    return np.concatenate(bounds)


def _cuts(indptr: np.ndarray, parts: int, align: int) -> np.ndarray:
    """Row bounds of ``parts`` ranges of about equal nonzeros, at multiples of ``align``."""
    m = indptr.shape[0] - 1
    shares = np.linspace(0, indptr[-1], parts + 1)[1:-1]
    inner = np.searchsorted(indptr, shares)
    inner = np.clip(np.rint(inner / align).astype(np.int64) * align, 0, m)
    return np.maximum.accumulate(np.concatenate(([0], inner, [m])))


def quantize_batch(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x`` (N × K float32) as uint8 with a scale and a zero point per row.

    Each row's range ``[min(x, 0), max(x, 0)]`` maps onto 0 … 255 (zero exact), as ONNX
    Runtime's dynamic quantization does: ``q = clip(rint(x · (1/scale)) + zp, 0, 255)``.

    Returns:
        ``(x8, scale, zero_point)``: ``x8`` is (⌈N/8⌉·K) uint64 words, chunk c's word k
        holding columns 8c … 8c+7 of input row k (missing columns 0), and
        ``x[b] ≈ scale[b] · (q[b] − zero_point[b])``.
    """
    n, k = x.shape
    n8 = -(-n // 8) * 8
    if n8 != n or not x.flags.c_contiguous:
        padded = np.zeros((n8, k), dtype=np.float32)
        padded[:n] = x
        x = padded
    scale = np.empty(n8, dtype=np.float32)
    zf = np.empty(n8, dtype=np.float32)
    x8 = np.empty(n8 // 8 * k, dtype=np.uint64)
    quantize_u8(x, x8, scale, zf)
    return x8, scale[:n], zf[:n].astype(np.int32)


def int8_matmul(
    mat: CSRMatrix | BSRMatrix,
    x: np.ndarray,
    bias: np.ndarray | None = None,
    path: str | None = None,
    out: np.ndarray | None = None,
    act: int = 0,
) -> np.ndarray:
    """``act(x @ W.T + bias)`` for an int8 sparse weight; callers validated ``x`` (… × K float32).

    With more than one thread (:func:`~nbcompress.kernels.threads.get_threads`) the slices
    run on torch's OpenMP threads (``_int8_tasks.py``) or on one thread, whichever
    :func:`~nbcompress.kernels.dispatch.fastest` measured faster for this weight and batch
    (at batch 1 waking the second core can cost more than it saves); the results are the
    same bits either way.

    Args:
        mat: int8 CSR (``csr_int8``) or int8 4 × 1 block-sparse (``bsr_int8``) weight.
        x: (K,) or (N × K) float32 input, any strides.
        bias: Optional float32 (M,) bias, added in the kernels' last pass.
        path: ``"vnni"`` or ``"portable"`` for batches (default:
            :func:`~nbcompress.kernels.cpu.sparse_int8_path`); the results are the same.
        out: For 1-D input, an optional float32 (M,) result buffer.
        act: The activation's code in :data:`~nbcompress.kernels._epilogue.ACTIVATIONS`
            (0: none), applied after the bias in the same pass.

    Returns:
        (M,) for 1-D input; else an (N × M) array, the transpose of a C-contiguous one.
    """
    threads = get_threads()
    if threads > 1 and not _gomp.available():
        threads = 1
    lay = sliced(mat, threads)
    m = mat.shape[0]
    if bias is None:
        bias = lay.zeros
    elif threads > 1:  # the parallel kernels' blocks are cached per bias array
        bias = lay.bias(bias)
    if x.ndim == 1 or x.shape[0] == 1:
        out = np.empty(m, dtype=np.float32) if out is None else out
        xv = np.ascontiguousarray(x.reshape(-1))
        if threads == 1 and m:  # the lean path: batch-1 layers are mostly fixed costs
            spmv = spmv_r4 if lay.blk == 4 else spmv_r1
            spmv(lay.sptr, lay.idx, lay.w, lay.perm, lay.scale, bias, xv, out, 0, lay.nsl, act)
        elif m:
            _run(mat, (lay, xv, False, bias, out, None, act), 1, threads)
        return out if x.ndim == 1 else out.reshape(1, -1)
    n = x.shape[0]
    # Written (M × N), returned as its (N × M) transpose, as the float kernels do: a row's
    # batch columns are stored together (one vector store, where the (N × M) output took
    # 8 scalar stores a row apart), and the next layer's quantizer reads such an input
    # (x.T C-contiguous, also through an elementwise op that kept its strides) without a
    # transposing copy (_int8_quant.py).
    y = np.empty((m, n), dtype=np.float32)
    if y.size:
        trans = x.flags.f_contiguous and not x.flags.c_contiguous
        xc = x.T if trans else np.ascontiguousarray(x)
        _run(mat, (lay, xc, trans, bias, y, path or sparse_int8_path(), act), n, threads)
    return y.T


def _run(mat: CSRMatrix | BSRMatrix, args: tuple, n: int, threads: int) -> None:
    """The product on the threads measured faster (serial where no pool is available)."""
    if threads == 1:
        _serial(*args)
        return
    key = ("i8", n)
    choice = recorded_choice(mat, key, threads)  # recorded_run without asking the threads again
    if choice is None:
        fastest(mat, key, {"sliced": lambda: _on_threads(args, get_threads())})
    else:
        _on_threads(args, 1 if choice.endswith(SERIAL) else threads)


def _on_threads(args: tuple, threads: int) -> None:
    # One launch at a time on the pool (threads.POOL, as registry.Kernel.run): a Python
    # thread that finds it taken runs serially on its own thread instead of waiting.
    if threads > 1 and POOL.acquire(blocking=False):
        try:
            lay, x, trans, bias, out, path, act = args
            if path is None:
                run_vector(lay, x, bias, out, act, threads)
            else:
                run_batch(lay, x, trans, bias, out, path, act, threads)
        finally:
            POOL.release()
    else:
        _serial(*args)


def _serial(
    lay: Sliced,
    x: np.ndarray,
    trans: bool,
    bias: np.ndarray,
    out: np.ndarray,
    path: str | None,
    act: int,
) -> None:
    if path is None:
        spmv = spmv_r4 if lay.blk == 4 else spmv_r1
        spmv(lay.sptr, lay.idx, lay.w, lay.perm, lay.scale, bias, x, out, 0, lay.nsl, act)
    else:
        kernel = FUSED[lay.blk, path]
        args = (lay.sptr, lay.idx, lay.w, lay.perm, lay.scale, lay.rowsum, bias, x, trans)
        kernel(*args, out.reshape(-1), act)
