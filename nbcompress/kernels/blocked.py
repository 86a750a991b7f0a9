"""CSR weights split into blocks of input rows, for the tile kernel's cache blocking.

A 64-column tile of the input is a K × 256-byte slab; the tile kernel (``tile64`` in
``_panels.py``) reads one 256-byte row of it per nonzero. For K = 3072–4096 the slab
(0.8–1 MB) no longer sits in this CPU's 1 MB L2 next to the weight stream. Splitting the
weight's columns (the input's rows) into blocks of ``kblk`` keeps one block's slab in
L2 while every output row takes its partial sum from that block; the partial sums wait in
the output between blocks (one load and one store of 64 floats per row and block).

The blocked copy keeps CSR's arrays, only reordered block-major: ``indptr`` has
``nkb · M + 1`` entries, segment ``kb · M + i`` holding row i's nonzeros whose column lies
in block kb, in column order. It is built once per (weight, block size) and cached for
the weight's lifetime.
"""

from __future__ import annotations

import weakref

import numpy as np

from nbcompress.kernels.formats import CSRMatrix

__all__ = ["Blocked", "block_rows"]

Blocked = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # indptr, indices, data, nkb

_CACHE: weakref.WeakKeyDictionary[CSRMatrix, dict[int, Blocked]] = weakref.WeakKeyDictionary()


def block_rows(mat: CSRMatrix, kblk: int) -> Blocked:
    """``mat``'s nonzeros grouped by blocks of ``kblk`` columns, then by row.

    Args:
        mat: The packed weight.
        kblk: Columns per block (at least 1).

    Returns:
        ``(indptr, indices, data, nkb)``; for ``nkb == 1`` the matrix's own arrays.
    """
    m, k = mat.shape
    nkb = max(1, -(-k // kblk))
    if nkb == 1:
        return mat.indptr, mat.indices, mat.data, 1
    cached = _CACHE.setdefault(mat, {})
    if kblk not in cached:
        rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(mat.indptr))
        segment = (mat.indices // kblk).astype(np.int64) * m + rows
        order = np.argsort(segment, kind="stable")  # stable: columns stay sorted per row
        indptr = np.zeros(nkb * m + 1, dtype=np.int64)
        np.cumsum(np.bincount(segment, minlength=nkb * m), out=indptr[1:])
        cached[kblk] = (indptr, mat.indices[order], mat.data[order], nkb)
    return cached[kblk]
