"""Jitted sparse kernels on raw arrays (no validation: see :mod:`nbcompress.kernels.csr`).

Conventions shared by every kernel:

* ``indptr`` int64 row pointers; ``indices`` unsigned column indices (uint16 when the
  input dimension allows, else uint32). Unsigned indices let LLVM drop numba's
  negative-index wraparound code in the inner loop (3–6× at batch 1, measured here).
* ``data`` float32 or int8 values; ``scale`` float32 per output row (ones for float32
  data), applied once per row, so the same code serves sparse fp32 and sparse int8.
* ``parallel=True`` even on one thread: numba then outlines the loop body with
  ``noalias`` arguments, which LLVM needs to vectorize (~3× at batch 8, measured here).
* The batched kernels read ``xt`` = x transposed (K × N), so that one nonzero multiplies
  a contiguous run of columns; the register-blocked ones live in ``_panels.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
from numba import njit, prange

__all__ = ["FASTMATH", "bsr_spmm", "csr_cols", "csr_spmv", "slp_enabled"]

# Contraction (FMA) and reassociation-free flags: the loop vectorizer is kept from turning
# the nonzero loop into slow gathers, while the SLP vectorizer may pack independent
# accumulators into SIMD registers.
FASTMATH = {"contract", "arcp", "nsz", "nnan", "ninf"}


@contextlib.contextmanager
def slp_enabled() -> Iterator[None]:
    """Compile with LLVM's SLP vectorizer on (numba turns it off by default).

    The flag is read when a function is compiled, so wrapping a call is enough for the
    first, compiling call; cached machine code keeps the vectorized form. The user's own
    setting is restored on exit.
    """
    config = numba.core.config
    old = config.SLP_VECTORIZE
    config.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        config.SLP_VECTORIZE = old


@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)
def csr_spmv(indptr, indices, data, scale, x, out):  # noqa: D103
    # Four independent accumulators: one alone would wait on each FMA's latency.
    for i in prange(indptr.shape[0] - 1):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        j = indptr[i]
        end = indptr[i + 1]
        while j + 4 <= end:
            a0 += np.float32(data[j]) * x[indices[j]]
            a1 += np.float32(data[j + 1]) * x[indices[j + 1]]
            a2 += np.float32(data[j + 2]) * x[indices[j + 2]]
            a3 += np.float32(data[j + 3]) * x[indices[j + 3]]
            j += 4
        while j < end:
            a0 += np.float32(data[j]) * x[indices[j]]
            j += 1
        out[i] = ((a0 + a1) + (a2 + a3)) * scale[i]


@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)
def csr_cols(indptr, indices, data, scale, xt, out, b_start):  # noqa: D103
    # Remainder columns (fewer than a panel): one strided dot product per column.
    for i in prange(indptr.shape[0] - 1):
        s = np.float32(scale[i])
        for b in range(b_start, xt.shape[1]):
            a0 = a1 = np.float32(0.0)
            j = indptr[i]
            end = indptr[i + 1]
            while j + 2 <= end:
                a0 += np.float32(data[j]) * xt[indices[j], b]
                a1 += np.float32(data[j + 1]) * xt[indices[j + 1], b]
                j += 2
            if j < end:
                a0 += np.float32(data[j]) * xt[indices[j], b]
            out[i, b] = (a0 + a1) * s


@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)
def bsr_spmm(indptr, indices, data, xt, out):  # noqa: D103
    # Block-sparse rows: data is (nblocks, R, C); indices count blocks along the input.
    r_size = data.shape[1]
    c_size = data.shape[2]
    n = xt.shape[1]
    for br in prange(indptr.shape[0] - 1):
        acc = np.zeros((r_size, n), dtype=np.float32)
        for j in range(indptr[br], indptr[br + 1]):
            c0 = np.int64(indices[j]) * c_size
            for r in range(r_size):
                row = acc[r]
                for c in range(c_size):
                    v = data[j, r, c]
                    xr = xt[c0 + c]
                    for b in range(n):
                        row[b] += v * xr[b]
        i0 = br * r_size
        for r in range(r_size):
            out[i0 + r] = acc[r]
