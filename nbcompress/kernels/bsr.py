"""Products with block-sparse weights (``BSRMatrix``), 4 × 1 blocks on generated kernels.

Four output rows share each kept input column, so one input value (batch 1) or one
16-column row segment (tiles) loaded serves four rows: per 64 multiply-adds 7 loads and
64 bytes of input from L2, where CSR needs 10 loads and 256 bytes. The registry, the
measured kernel choice and the checks are shared with the CSR products
(:mod:`nbcompress.kernels.dispatch`), the convolution lives in
:mod:`nbcompress.kernels.conv`; other block shapes run a plain loop (``_numba.bsr_spmm``).
"""

from __future__ import annotations

import numpy as np
import torch

from nbcompress.kernels.csr import transposed
from nbcompress.kernels.dispatch import (
    BSR4_SPMV,
    BSR4_TILES,
    BSR_SPMM,
    TILE,
    balanced_rows,
    checked_input,
    fastest,
    recorded_run,
)
from nbcompress.kernels.formats import BSRMatrix
from nbcompress.kernels.layouts import block_rows, kblock

__all__ = ["BSR_PANEL", "bsr_matmul", "bsr_matmul_t_unchecked"]

#: 16-column tiles per panel: 64 columns, as the CSR tiles (panels of 1, 2 and 8 tiles
#: measured 0.8–1.0× of 4 here).
BSR_PANEL = 4


def bsr_matmul(mat: BSRMatrix, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Compute ``x @ W.T`` with a block-sparse weight; shapes as :func:`csr_matmul`.

    4 × 1 blocks (four output rows sharing an input column) run on register-blocked
    kernels: each input value or 16-column row segment loaded serves four rows. Other
    block shapes run a plain loop.

    Args:
        mat: The packed block-sparse weight.
        x: float32 input of shape (in,) or (batch × in).

    Returns:
        (out,) or (batch × out); for a batch above 1 a transposed view of a
        C-contiguous (out × batch) buffer, as from :func:`csr_matmul`.
    """
    x = checked_input(mat, BSRMatrix, x, "x")
    m = mat.shape[0]
    if mat.block == (4, 1) and (x.ndim == 1 or x.shape[0] == 1):
        xv = np.ascontiguousarray(x.reshape(-1))
        out = np.empty(m, dtype=np.float32)
        if m:
            args = (mat.indptr, mat.indices, mat.data.reshape(-1), xv, out)
            recorded = recorded_run(mat, ("b", 1))
            if recorded is None:
                fastest(mat, ("b", 1), {"bsr4": lambda: BSR4_SPMV.run(args, _bsr_types(mat))})
            else:  # the recorded one directly: batch-1 calls are mostly fixed cost
                BSR4_SPMV.run(args, _bsr_types(mat), recorded[1])
        return out if x.ndim == 1 else out.reshape(1, -1)
    x2 = x.reshape(-1, x.shape[-1])
    xt = transposed(x2) if x2.shape[0] > 1 else np.ascontiguousarray(x2.T)
    out = np.empty((m, xt.shape[1]), dtype=np.float32)
    bsr_matmul_t_unchecked(mat, xt, out)
    return out.reshape(-1) if x.ndim == 1 else out.T


def bsr_matmul_t_unchecked(mat: BSRMatrix, xt: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = W @ xt`` for a C-contiguous (in × N) ``xt``; callers validated already.

    4 × 1 blocks: tiles of 16 columns (then 8) in panels of :data:`BSR_PANEL` tiles, the
    last N mod 8 columns through the plain loop; for K above one block
    (``layouts.KBLOCK``) also over blocks of input rows (as the CSR ``kblocks``),
    whichever measured faster.
    """
    if not out.size:
        return out
    if mat.block != (4, 1):
        BSR_SPMM.run((mat.indptr, mat.indices, mat.data, xt, out), (mat.indices.dtype.char,))
        return out
    options = {"bsr4": lambda: _tiles(mat, xt, out, None)}
    kblk = kblock(mat.shape[1])
    if kblk < mat.shape[1]:  # K spans blocks of input rows: K-blocked, as the CSR kblocks
        options["bsr4_kb"] = lambda: _tiles(mat, xt, out, kblk)
    fastest(mat, ("bt", out.shape[1]), options)
    return out


def _tiles(mat: BSRMatrix, xt: np.ndarray, out: np.ndarray, kblk: int | None) -> None:
    # The 4 × 1 block tiles, widest first, then the plain loop for the last columns.
    m, n = out.shape
    bounds = balanced_rows(mat)
    indptr, indices, data, nkb = block_rows(mat, kblk or max(1, mat.shape[1]))
    pfk = kblk if nkb > 1 and n > TILE else 0  # as csr.run_tiles
    flat, data, done = out.reshape(-1), data.reshape(-1), 0
    for width, kernel in BSR4_TILES.items():
        ntile = (n - done) // width
        if ntile:
            args = (indptr, indices, data, xt.reshape(-1), n, n, flat, done, ntile, bounds)
            kernel.run((*args, BSR_PANEL, nkb, pfk), _bsr_types(mat))
            done += ntile * width
    if done < n:
        rest = np.empty((m, n - done), dtype=np.float32)
        plain = (mat.indptr, mat.indices, mat.data, np.ascontiguousarray(xt[:, done:]), rest)
        BSR_SPMM.run(plain, (mat.indices.dtype.char,))
        out[:, done:] = rest


def _bsr_types(mat: BSRMatrix) -> tuple[str, ...]:
    return ("bsr", mat.indices.dtype.char)
