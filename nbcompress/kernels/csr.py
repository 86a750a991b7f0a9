"""The public, validating CSR products (``x @ W.T`` and ``W @ xt``).

The formats (:class:`CSRMatrix`, :class:`BSRMatrix`) live in
:mod:`nbcompress.kernels.formats` and are re-exported here; the kernel registry, the
measured choice and the input checks in :mod:`nbcompress.kernels.dispatch`; the
convolution in :mod:`nbcompress.kernels.conv`.

With 64 or more columns three kernels compete: packed column panels (16 wide, input
re-laid out first), 64-column tiles read in place from a row-major input, and the same
tiles over blocks of input rows (``kblocks``, see :mod:`nbcompress.kernels.layouts`).
At batch 1 a plain and an eight-row-padded SpMV compete (int8 weights: also the gathering
kernel of :mod:`nbcompress.kernels.int8`). The first call per (weight,
columns, threads) times them and keeps the fastest (:func:`~.dispatch.fastest`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from nbcompress.kernels._epilogue import NO_BIAS, epilogue
from nbcompress.kernels.dispatch import (
    CSR_COLS,
    PACK_COLS,
    PACK_ROWS,
    PANELS,
    SPMV,
    SPMV8,
    TILE,
    TILE64,
    TRANSPOSE,
    Kernel,
    balanced_rows,
    checked_input,
    fastest,
    recorded_run,
)
from nbcompress.kernels.formats import (
    BSRMatrix,
    CSRMatrix,
    index_dtype,
    pack_bsr,
    pack_csr,
)
from nbcompress.kernels.int8 import int8_matmul
from nbcompress.kernels.layouts import block_rows, kblock, pad_rows
from nbcompress.kernels.prepared import prepare, prepared

__all__ = [
    "BSRMatrix",
    "CSRMatrix",
    "csr_matmul",
    "csr_matmul_t",
    "index_dtype",
    "matmul_t_unchecked",
    "matmul_unchecked",
    "pack_bsr",
    "pack_csr",
    "packer",
    "panels_then_rest",
    "run_tiles",
    "tile_kinds",
    "transposed",
]

Packer = Callable[[int, int, int], np.ndarray]
_SPMV = {"spmv": SPMV, "spmv8": SPMV8}


def csr_matmul(mat: CSRMatrix, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Compute ``x @ W.T`` for ``x`` of shape (in,) or (batch × in).

    Args:
        mat: The packed weight.
        x: float32 input; any strides (a batch is transposed once into panels).

    Returns:
        (out,) for 1-D input; for 2-D input a (batch × out) array, which is a transposed
        view of a C-contiguous (out × batch) buffer (feeding it to the next sparse layer
        then needs no copy).
    """
    return matmul_unchecked(mat, checked_input(mat, CSRMatrix, x, "x"))


def matmul_unchecked(
    mat: CSRMatrix, x: np.ndarray, bias: np.ndarray = NO_BIAS, act: int = 0
) -> np.ndarray:
    """:func:`csr_matmul` for callers that validated already (the modules).

    Args:
        mat: The packed weight.
        x: float32 input (in,) or (batch × in).
        bias: Added to each output feature (empty: none); a fixed array per layer (the
            parallel launches cache their words by its identity).
        act: Activation code applied after the bias (``_epilogue.ACTIVATIONS``).
    """
    if x.ndim == 1 or x.shape[0] == 1:
        xv = np.ascontiguousarray(x.reshape(-1))
        out = np.empty(mat.shape[0], dtype=np.float32)
        if mat.shape[0]:
            _spmv(mat, xv, out, bias, act)
        return out if x.ndim == 1 else out.reshape(1, -1)
    out = np.empty((mat.shape[0], x.shape[0]), dtype=np.float32)
    if not out.size:
        return out.T

    def panels() -> None:
        panels_then_rest(mat, _row_packer(x), out, 0, bias, act)

    if x.shape[0] < TILE:
        plan = prepared(mat, x, bias, act)
        if plan is not None:  # the recorded choice's launches, found once (prepared.py)
            plan.run(x, out)
            return out.T
        fastest(mat, ("x", x.shape[0]), {"panels": panels})  # pool or one thread
        prepare(mat, x, out, bias, act)
    else:
        # The tiles read x transposed (in × batch): one copy, small next to the product.
        options = _tile_options(mat, lambda: transposed(x), out, bias, act)
        fastest(mat, ("x", x.shape[0]), {"panels": panels, **options})
    return out.T


def csr_matmul_t(mat: CSRMatrix, xt: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Compute ``W @ xt`` for ``xt`` of shape (in × N); returns (out × N).

    Columns are processed in register-blocked panels of 16 (then 8, then one at a time),
    each packed contiguously, so a panel of ``xt`` is reused by every row while it sits
    in cache; this is the tiling used for conv-as-GEMM inputs with thousands of columns.

    Args:
        mat: The packed weight.
        xt: float32 input, features along the first axis (made C-contiguous if needed).
        out: Optional C-contiguous float32 (out × N) result buffer.

    Returns:
        The (out × N) product, ``out`` if given.
    """
    xt = np.ascontiguousarray(checked_input(mat, CSRMatrix, xt, "xt", (2,), axis=0))
    m, n = mat.shape[0], xt.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous float32 array of shape {(m, n)}.")
    return matmul_t_unchecked(mat, xt, out)


def matmul_t_unchecked(mat: CSRMatrix, xt: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`csr_matmul_t` for callers that validated already (the modules)."""
    if not out.size:
        return out

    def panels() -> None:
        panels_then_rest(mat, packer(PACK_COLS, xt, rows=xt.shape[0]), out)

    if xt.shape[1] < TILE:
        panels()
    else:
        fastest(mat, ("t", xt.shape[1]), {"panels": panels, **_tile_options(mat, lambda: xt, out)})
    return out


def _tile_options(
    mat: CSRMatrix,
    xt: Callable[[], np.ndarray],
    out: np.ndarray,
    bias: np.ndarray = NO_BIAS,
    act: int = 0,
) -> dict[str, Callable[[], None]]:
    """The tile kernels for ``out = act(W @ xt() + bias)``, by name (see :func:`tile_kinds`)."""
    return {
        name: (lambda kblk=kblk: run_tiles(mat, xt(), out, kblk, bias, act))
        for name, kblk in tile_kinds(mat).items()
    }


def tile_kinds(mat: CSRMatrix) -> dict[str, int | None]:
    """Tile variants worth timing: whole columns, and K-blocked when K spans blocks.

    Returns:
        Option name → input rows per block (``None``: unblocked).
    """
    kinds: dict[str, int | None] = {"tiles": None}
    kblk = kblock(mat.shape[1])
    if kblk < mat.shape[1]:
        kinds["kblocks"] = kblk
    return kinds


def run_tiles(
    mat: CSRMatrix,
    xt: np.ndarray,
    out: np.ndarray,
    kblk: int | None = None,
    bias: np.ndarray = NO_BIAS,
    act: int = 0,
) -> None:
    """``out = act(W @ xt + bias)`` on the 64-column tiles, the last N mod 64 on the panels.

    The tiles read the row-major K × N input in place (no re-layout): one tile of every row
    is finished while that K × 64 slab of the input sits in L2 (or, with ``kblk``, one
    block of ``kblk`` input rows at a time, see ``layouts.py``).
    """
    n = xt.shape[1]
    ntile = n // TILE
    bounds = balanced_rows(mat)
    indptr, indices, data, nkb = block_rows(mat, kblk or max(1, mat.shape[1]))
    args = (indptr, indices, data, mat.scale, xt.reshape(-1), n, n, out.reshape(-1), 0, ntile)
    # Prefetch the next block (see tools/generate_kernels.py) only when the slab is not
    # contiguous: one tile's K × 64 slab (Linear's transposed batch of 64) the hardware
    # prefetchers follow, and there the extra instructions cost ~5%; 128–3136 columns:
    # 1.0–1.3× faster.
    pfk = kblk if nkb > 1 and n > TILE else 0
    tail = (bounds, nkb, pfk, bias, act)
    TILE64.run((*args, *tail), (mat.data.dtype.char, mat.indices.dtype.char))
    if ntile * TILE < n:
        pack = packer(PACK_COLS, xt, rows=xt.shape[0])
        panels_then_rest(mat, pack, out, ntile * TILE, bias, act)


def packer(kernel: Kernel, src: np.ndarray, *extra: Any, rows: int) -> Packer:
    """``(start, npan, width) -> (npan·rows × width)`` panels of ``src`` via ``kernel``.

    Args:
        kernel: A packing kernel (``PACK_COLS``, ``PACK_ROWS``, ``PACK_IM2COL``).
        src: Its input.
        extra: Its arguments between the input and ``start``.
        rows: Rows of one panel (the product's K).
    """

    def pack(start: int, npan: int, width: int) -> np.ndarray:
        xp = np.empty((npan * rows, width), dtype=np.float32)
        kernel.run((src, *extra, start, npan, width, xp))
        return xp

    return pack


def panels_then_rest(
    mat: CSRMatrix,
    pack: Packer,
    out: np.ndarray,
    done: int = 0,
    bias: np.ndarray = NO_BIAS,
    act: int = 0,
) -> None:
    """``out[:, done:] = act(W @ (the packed input) + bias)``: panels of 16 and 8, the rest.

    Whole panels of 16 (then 8) columns from ``done`` on, each packed contiguously so
    that one panel of the input (K × 16 floats) stays in L1/L2 while every row of the
    weight streams past it; the last < 8 columns go one at a time.
    """
    m, n = out.shape
    dtypes = (mat.data.dtype.char, mat.indices.dtype.char)
    csr = (mat.indptr, mat.indices, mat.data, mat.scale)
    rb = max(16, -(-m // 8))
    for width, kernel in PANELS.items():
        npan = (n - done) // width
        if npan:
            kernel.run((*csr, pack(done, npan, width), out, done, npan, rb, bias, act), dtypes)
            done += npan * width
    if done < n:
        # One "panel" of the leftover width is exactly those columns in K × rest layout.
        rest = np.empty((m, n - done), dtype=np.float32)
        CSR_COLS.run((*csr, pack(done, 1, n - done), rest, 0, bias, act), dtypes)
        out[:, done:] = rest


def _spmv(mat: CSRMatrix, xv: np.ndarray, out: np.ndarray, bias: np.ndarray, act: int) -> None:
    # Plain CSR, or rows padded to eight (see layouts.py), each on the pool or on one
    # thread, whichever measured faster for this weight (the recorded choice first); int8
    # weights also on the gathering kernel of int8.py (float inputs: same results up to
    # summation order), serial only.
    dtypes = (mat.data.dtype.char, mat.indices.dtype.char)

    def run(kind: str, threads: int | None = None) -> None:
        if kind == "sliced":
            int8_matmul(mat, xv, out=out)
            if act or bias.size:  # the epilogue the generated SpMVs have fused
                epilogue(out.reshape(-1, 1), bias, act)
            return
        arrays = pad_rows(mat) if kind == "spmv8" else (mat.indptr, mat.indices, mat.data)
        _SPMV[kind].run((*arrays, mat.scale, xv, out, bias, act), dtypes, threads)

    recorded = recorded_run(mat, ("v", 1))
    if recorded is None:
        options = {"spmv": lambda: run("spmv"), "spmv8": lambda: run("spmv8")}
        if mat.data.dtype == np.int8:  # the incumbent: what a forward-time plan runs first
            options = {"sliced": lambda: run("sliced"), **options}
        fastest(mat, ("v", 1), options)
    else:
        run(*recorded)


def _row_packer(x: np.ndarray) -> Packer:
    """Panels of the columns of ``x.T`` for a batch ``x`` (N × K) of any strides."""
    k = x.shape[1]
    if not x.flags.f_contiguous:
        return packer(PACK_ROWS, np.ascontiguousarray(x), rows=k)
    # The previous sparse layer's output (a transposed view, maybe through an elementwise
    # op that kept its strides): x.T is the K × N input already, and for N equal to a
    # panel width exactly the one packed panel itself (no copy at all).
    xt = x.T
    pack = packer(PACK_COLS, xt, rows=k)

    def whole_or_pack(start: int, npan: int, width: int) -> np.ndarray:
        return xt if (start, npan, width) == (0, 1, xt.shape[1]) else pack(start, npan, width)

    return whole_or_pack


def transposed(x: np.ndarray) -> np.ndarray:
    """``x`` (N × K, any strides) as a C-contiguous K × N array (read only).

    ``x.T`` itself when ``x`` is F-contiguous (the previous sparse layer's output: no
    copy); otherwise a copy by a serial numba kernel.
    """
    if x.flags.f_contiguous:
        return x.T
    xt = np.empty((x.shape[1], x.shape[0]), dtype=np.float32)
    # x's layout is part of numba's signature (a transposed view of the previous sparse
    # layer's output is F-ordered): each is a first call of its own.
    layout = "C" if x.flags.c_contiguous else "F" if x.flags.f_contiguous else "A"
    TRANSPOSE.run((x, xt), (layout,), 1)  # a serial kernel: no pool to size
    return xt
