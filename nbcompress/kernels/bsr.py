"""Products with 4 × 1 block-sparse weights (``BSRMatrix``), on the kernels of ``_panels.py``.

Four output rows share each kept input column, so one input value (batch 1) or one
16-column row segment (tiles) loaded serves four rows: per 64 multiply-adds 7 loads and
64 bytes of input from L2, where CSR needs 10 loads and 256 bytes. Dispatch, the measured
kernel choice and the padded-image scaffolding of the direct convolution are shared with
the CSR products (``csr.py``); other block shapes run a plain loop (``_numba.bsr_spmm``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from nbcompress.kernels._generate import BSR_WIDTHS
from nbcompress.kernels.csr import (
    SERIAL,
    TILE,
    as_float32,
    channel_block,
    check_cols,
    check_matrix,
    fastest,
    kblock,
    over_padded_images,
    recorded_choice,
    row_blocks,
    run_kernel,
    transposed,
)
from nbcompress.kernels.formats import BSRMatrix
from nbcompress.kernels.layouts import block_rows
from nbcompress.kernels.threads import get_threads

__all__ = ["bsr_conv_unchecked", "bsr_matmul", "bsr_matmul_t_unchecked"]

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
    check_matrix(mat, BSRMatrix, "pack_bsr", "csr_matmul")
    x = as_float32(x, (1, 2), "x")
    check_cols(mat, x.shape[-1], "x")
    m = mat.shape[0]
    if mat.block == (4, 1) and (x.ndim == 1 or x.shape[0] == 1):
        xv = np.ascontiguousarray(x.reshape(-1))
        out = np.empty(m, dtype=np.float32)
        if m:
            args = (mat.indptr, mat.indices, mat.data.reshape(-1), xv, out)
            n = get_threads()
            choice = recorded_choice(mat, ("b", 1), n)
            if choice is None:
                kernel = {"bsr4": lambda: run_kernel("bsr4_spmv", args, _bsr_types(mat))}
                fastest(mat, ("b", 1), kernel)
            else:  # the recorded one directly: batch-1 calls are mostly fixed cost
                run_kernel("bsr4_spmv", args, _bsr_types(mat), 1 if choice.endswith(SERIAL) else n)
        return out if x.ndim == 1 else out.reshape(1, -1)
    x2 = x.reshape(-1, x.shape[-1])
    xt = transposed(x2) if x2.shape[0] > 1 else np.ascontiguousarray(x2.T)
    out = np.empty((m, xt.shape[1]), dtype=np.float32)
    bsr_matmul_t_unchecked(mat, xt, out)
    return out.reshape(-1) if x.ndim == 1 else out.T


def bsr_matmul_t_unchecked(mat: BSRMatrix, xt: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = W @ xt`` for a C-contiguous (in × N) ``xt``; callers validated already.

    4 × 1 blocks: tiles of 16 columns (then 8) in panels of :data:`BSR_PANEL` tiles, the
    last N mod 8 columns through the plain loop; for K above one block (``csr.KBLOCK``)
    also over blocks of input rows (as the CSR ``kblocks``), whichever measured faster.
    """
    m, n = out.shape
    if not out.size:
        return out
    if mat.block != (4, 1):
        run_kernel(
            "bsr_spmm", (mat.indptr, mat.indices, mat.data, xt, out), (mat.indices.dtype.char,)
        )
        return out

    def run(kblk: int | None) -> None:
        bounds = row_blocks(mat, 1 if get_threads() == 1 else 4 * get_threads())
        indptr, indices, data, nkb = block_rows(mat, kblk or max(1, mat.shape[1]))
        pfk = kblk if nkb > 1 and n > TILE else 0  # as _tiles
        flat, data, done = out.reshape(-1), data.reshape(-1), 0
        for width in BSR_WIDTHS:
            ntile = (n - done) // width
            if ntile:
                args = (indptr, indices, data, xt.reshape(-1), n, n, flat, done, ntile, bounds)
                run_kernel(f"bsr4_tile{width}", (*args, BSR_PANEL, nkb, pfk), _bsr_types(mat))
                done += ntile * width
        if done < n:
            rest = np.empty((m, n - done), dtype=np.float32)
            plain = (mat.indptr, mat.indices, mat.data, np.ascontiguousarray(xt[:, done:]), rest)
            run_kernel("bsr_spmm", plain, (mat.indices.dtype.char,))
            out[:, done:] = rest

    options = {"bsr4": lambda: run(None)}
    kblk = kblock(mat.shape[1])
    if kblk < mat.shape[1]:  # K spans blocks of input rows: K-blocked, as the CSR kblocks
        options["bsr4_kb"] = lambda: run(kblk)
    fastest(mat, ("bt", n), options)
    return out


def bsr_conv_unchecked(
    mat: BSRMatrix, images: np.ndarray, geom: tuple, out: np.ndarray, unfold: Callable
) -> None:
    """Block-sparse conv of N images into ``out``; arguments as :func:`conv_unchecked`.

    Each image unfolded and multiplied, or (4 × 1 blocks, stride 1) the direct
    convolution on the zero-padded image, whichever measured faster.
    """
    geom = tuple(int(g) for g in geom)

    def unfolded() -> None:
        for i, o in enumerate(out):
            bsr_matmul_t_unchecked(mat, unfold(i), o)

    options: dict[str, Callable[[], object]] = {"unfold": unfolded}
    if mat.block == (4, 1) and geom[2] == geom[3] == 1:
        options["direct"] = lambda: _direct_conv_bsr(mat, images, geom, out)
        kblk = channel_block(images.shape[1], geom)
        if kblk < mat.shape[1]:
            options["direct_kb"] = lambda: _direct_conv_bsr(mat, images, geom, out, kblk)
    fastest(mat, ("conv", *images.shape), options)


def _bsr_types(mat: BSRMatrix) -> tuple[str, ...]:
    return ("bsr", mat.indices.dtype.char)


def _direct_conv_bsr(
    mat: BSRMatrix, images: np.ndarray, geom: tuple, out: np.ndarray, kblk: int | None = None
) -> None:
    # The 4 × 1 block tile kernel over each zero-padded image, as _direct_conv.
    width = BSR_WIDTHS[0]
    indptr, _, data, nkb = block_rows(mat, kblk or max(1, mat.shape[1]))
    data = data.reshape(-1)

    def run(offs: np.ndarray, padded: np.ndarray, flat: np.ndarray, ntile: int, bounds) -> None:
        args = (indptr, offs, data, padded, 1, ntile * width, flat, 0, ntile, bounds)
        run_kernel(f"bsr4_tile{width}", (*args, BSR_PANEL, nkb, 0), ("bsr", offs.dtype.char))

    over_padded_images(mat, images, geom, out, width, kblk, run)
