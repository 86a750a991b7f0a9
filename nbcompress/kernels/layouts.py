"""Derived layouts of a CSR weight, each built once and cached for the weight's lifetime.

* :func:`block_rows`: nonzeros grouped by blocks of input rows, for the tile kernel's
  cache blocking.
* :func:`pad_rows`: every row padded with zeros to a multiple of 8 nonzeros, for the
  eight-accumulator SpMV (``csr_spmv8``).

Blocked rows. A 64-column tile of the input is a K × 256-byte slab; the tile kernel (``tile64`` in
``_generated_kernels.py``) reads one 256-byte row of it per nonzero. For K = 3072–4096 the slab
(0.8–1 MB) no longer sits in this CPU's 1 MB L2 next to the weight stream. Splitting the
weight's columns (the input's rows) into blocks of ``kblk`` keeps one block's slab in
L2 while every output row takes its partial sum from that block; the partial sums wait in
the output between blocks (one load and one store of 64 floats per row and block).

The blocked copy keeps CSR's arrays, only reordered block-major: ``indptr`` has
``nkb · M + 1`` entries, segment ``kb · M + i`` holding row i's nonzeros whose column lies
in block kb, in column order.

Padded rows. The batch-1 kernel's cost per row (~60 cycles here: two mispredicted loop
exits, one of them the 0–3 leftover nonzeros, and the final sum) was a third of its time
on 3072 × 768 at 90% (77 nonzeros per row). Rows padded to a multiple of 8 with explicit
zeros (column 0, value 0: they add 0 · x[0]) need no leftover loop, and eight
accumulators halve the FMA dependency chains: 1.1–1.25× measured, for 3–5% more bytes at
90% (4.5 padding entries per row on average, more in relative terms for very short rows;
the measured choice in ``dispatch.py`` keeps the plain kernel where that loses).
"""

from __future__ import annotations

import weakref

import numpy as np

from nbcompress.kernels.formats import BSRMatrix, CSRMatrix

__all__ = [
    "KBLOCK",
    "Blocked",
    "block_rows",
    "kblock",
    "pad_rows",
    "release",
    "SCRATCH_KEEP",
]

Blocked = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # indptr, indices, data, nkb

_CACHE: weakref.WeakKeyDictionary[CSRMatrix | BSRMatrix, dict] = weakref.WeakKeyDictionary()
#: Nonzeros per row of the padded layout are a multiple of this.
PAD = 8
#: Input rows per block for the K-blocked tiles (``kblocks``): a 64-column slab of 256 rows
#: is 64 KB, which stays in L1/L2 beside the weight stream (160–384 measured alike here;
#: unblocked 0.8–1 MB slabs for K = 3072–4096 ran 1.2–1.35× slower at batch 64). Sized for
#: this CPU's caches but only a speed setting: any block size gives the same results.
KBLOCK = 256
#: Scratch buffers kept per weight, name and Python thread: the most recently used input
#: geometries (a model run at a few resolutions in turn reuses its buffers; one run at
#: ever new sizes does not hoard one per size).
SCRATCH_KEEP = 4


def kblock(k: int) -> int:
    """Input rows per block for the K-blocked tiles of a weight with ``k`` columns.

    ``k`` itself (one block) when ``k`` is at most :data:`KBLOCK`.
    """
    # Equal blocks of about KBLOCK rows (3072 → 12 × 256, 1152 → 5 × 231, not 4 + a stub).
    nkb = max(1, -(-k // KBLOCK))
    return -(-k // nkb)


def block_rows(mat: CSRMatrix | BSRMatrix, kblk: int) -> Blocked:
    """``mat``'s nonzeros grouped by blocks of ``kblk`` columns, then by row.

    Args:
        mat: The packed weight; block-sparse in R × 1 blocks (rows are then block rows).
        kblk: Columns per block (at least 1).

    Returns:
        ``(indptr, indices, data, nkb)``; for ``nkb == 1`` the matrix's own arrays.
    """
    m, k = mat.indptr.shape[0] - 1, mat.shape[1]
    nkb = max(1, -(-k // kblk))
    if nkb == 1:
        return mat.indptr, mat.indices, mat.data, 1
    cached = _CACHE.setdefault(mat, {})
    if ("k", kblk) not in cached:
        rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(mat.indptr))
        segment = (mat.indices // kblk).astype(np.int64) * m + rows
        order = np.argsort(segment, kind="stable")  # stable: columns stay sorted per row
        indptr = np.zeros(nkb * m + 1, dtype=np.int64)
        np.cumsum(np.bincount(segment, minlength=nkb * m), out=indptr[1:])
        cached["k", kblk] = (indptr, mat.indices[order], mat.data[order], nkb)
    return cached["k", kblk]


def pad_rows(mat: CSRMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mat`` with every row padded by explicit zeros to a multiple of :data:`PAD` entries.

    Args:
        mat: The packed weight.

    Returns:
        ``(indptr, indices, data)``; padding entries have column 0 and value 0.
    """
    cached = _CACHE.setdefault(mat, {})
    if "pad" not in cached:
        count = np.diff(mat.indptr)
        indptr = np.zeros_like(mat.indptr)
        np.cumsum(-(-count // PAD) * PAD, out=indptr[1:])
        rows = np.repeat(np.arange(mat.shape[0], dtype=np.int64), count)
        slot = indptr[rows] + np.arange(mat.nnz, dtype=np.int64) - mat.indptr[rows]
        indices = np.zeros(indptr[-1], dtype=mat.indices.dtype)
        data = np.zeros(indptr[-1], dtype=mat.data.dtype)
        indices[slot] = mat.indices
        data[slot] = mat.data
        cached["pad"] = (indptr, indices, data)
    return cached["pad"]


def release(mat: CSRMatrix | BSRMatrix, keep: set) -> None:
    """Drop ``mat``'s cached layouts other than ``keep`` (``"pad"``, ``("k", kblk)``, taps).

    Each layout is a full copy of the weight; one that lost the measured kernel choice
    would otherwise double or triple the memory a sparse layer holds at run time.
    """
    cached = _CACHE.get(mat, {})
    # "blocks" keeps every blocked layout (the channel-blocked direct conv's block size
    # depends on the geometry).
    kinds = {"blocks": {"k"}}
    kept = set().union(*(v for k, v in kinds.items() if k in keep))
    # list(): a snapshot, as other Python threads may add layouts meanwhile.
    for key in [k for k in list(cached) if k not in keep and k[0] not in kept]:
        cached.pop(key, None)
