"""Jitted sparse kernels on raw arrays (no validation: see :mod:`nbcompress.kernels.dispatch`).

The CSR and 4 × 1 block kernels are generated into ``_generated_kernels.py`` (by
``tools/generate_kernels.py``); this module holds their shared settings, the plain
block-sparse loop and the packing copies.

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

__all__ = [
    "FASTMATH",
    "bsr_spmm",
    "bsr_spmm_1",
    "pack_cols",
    "pack_im2col",
    "pack_rows",
    "slp_enabled",
    "transpose",
]

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


def _bsr_spmm(indptr, indices, data, xt, out):  # noqa: D103
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


# The pool and the serial twin (suffix _1, as in _generated_kernels.py): block shapes
# other than 4 × 1, and the last N mod 8 columns of the 4 × 1 tiles, on the thread count
# the caller chose.
_BSR_FLAGS = {"fastmath": FASTMATH, "boundscheck": False, "cache": True, "nogil": True}
bsr_spmm = njit(parallel=True, **_BSR_FLAGS)(_bsr_spmm)
bsr_spmm_1 = njit(parallel=False, **_BSR_FLAGS)(_bsr_spmm)


# Packing: the panel kernels read their input panel-major (npan·K × W), so that a panel
# sits in a few contiguous pages. These copy into that layout in one pass; memory-bound,
# so they run serially (no pool launch for small inputs).


@njit(boundscheck=False, cache=True, nogil=True)
def pack_cols(xt, start, npan, width, xp):  # noqa: D103
    # From K × N (features × columns): columns start + p·W + l. Copied in tiles of 32 rows
    # × 32 panels so that reads and writes each stay within ~32 pages (row- or panel-order
    # alone touched a new page on every 64-byte access: TLB-bound in this VM), with
    # unsigned offsets so the lane loop has no wraparound code.
    k = xt.shape[0]
    w = np.uint64(width)
    for r0 in range(0, k, 32):
        r1 = min(r0 + 32, k)
        for p0 in range(0, npan, 32):
            for r in range(r0, r1):
                src = xt[r]
                for p in range(p0, min(p0 + 32, npan)):
                    dst = xp[p * k + r]
                    c0 = np.uint64(start + p * width)
                    for lane in range(w):
                        dst[lane] = src[c0 + lane]


@njit(boundscheck=False, cache=True, nogil=True)
def transpose(x, xt):  # noqa: D103
    # x (N × K, any strides) into xt (K × N, C-contiguous), 96 features at a time: that
    # chunk of xt (24 KB at N = 64) stays in L1 while eight batch rows at a time fill it.
    # 1.5× numpy's x.T copy for a 64 × 3072 batch here (207 vs 311 µs).
    n, k = x.shape
    nu = np.uint64(n)
    flat = xt.reshape(-1)
    for k0 in range(0, k, 96):
        k1 = min(k0 + 96, k)
        for b0 in range(0, n, 8):
            b1 = min(b0 + 8, n)
            for kk in range(k0, k1):
                base = np.uint64(kk) * nu
                for b in range(b0, b1):
                    flat[base + np.uint64(b)] = x[b, kk]


@njit(boundscheck=False, cache=True, nogil=True)
def pack_rows(x, start, npan, width, xp):  # noqa: D103
    # From N × K (a batch of rows, e.g. Linear input): rows start + p·W + l.
    k = x.shape[1]
    for p in range(npan):
        for lane in range(width):
            src_row = start + p * width + lane
            for r in range(k):
                xp[p * k + r, lane] = x[src_row, r]


@njit(boundscheck=False, cache=True, nogil=True)
def pack_im2col(img, geom, start, npan, width, xp):  # noqa: D103
    # Conv input (C × H × W) straight into panels of the unfolded (C·kh·kw × Ho·Wo)
    # matrix, without materialising the unfold: geom = kh, kw, sh, sw, ph, pw, dh, dw, wo.
    # Writes are sequential; reads hit the (cache-resident) image a few rows at a time.
    kh, kw, sh, sw, ph, pw, dh, dw, wo = geom
    c_in, h, w = img.shape
    k = c_in * kh * kw
    y0 = np.empty(width, dtype=np.int64)
    x0 = np.empty(width, dtype=np.int64)
    for p in range(npan):
        for lane in range(width):
            n = start + p * width + lane
            y0[lane] = (n // wo) * sh - ph
            x0[lane] = (n % wo) * sw - pw
        for r in range(k):
            c = r // (kh * kw)
            dy = ((r // kw) % kh) * dh
            dx = (r % kw) * dw
            row = p * k + r
            for lane in range(width):
                y = y0[lane] + dy
                xx = x0[lane] + dx
                inside = 0 <= y < h and 0 <= xx < w
                xp[row, lane] = img[c, y, xx] if inside else np.float32(0.0)
