"""Jitted sparse kernels on raw arrays (no validation: see :mod:`nbcompress.kernels.csr`).

The CSR kernels are generated into ``_panels.py`` (see ``_generate.py``); this module
holds their shared settings and the block-sparse kernel.

Conventions shared by every kernel:

* ``indptr`` int64 row pointers; ``indices`` unsigned column indices (uint16 when the
  input dimension allows, else uint32). Unsigned indices let LLVM drop numba's
  negative-index wraparound code in the inner loop (3–6× at batch 1, measured here).
* ``data`` float32 or int8 values; ``scale`` float32 per output row (ones for float32
  data), applied once per row, so the same code serves sparse fp32 and sparse int8.
* ``parallel=True`` where results accumulate in memory: numba then outlines the loop
  body with ``noalias`` arguments, which LLVM needs to vectorize (~3× at batch 8 here).
* The batched kernels read ``xt`` = x transposed (K × N), so that one nonzero multiplies
  a contiguous run of columns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
from numba import njit, prange

__all__ = ["FASTMATH", "bsr_spmm", "slp_enabled"]

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
