"""Packed sparse weights and the public, validating sparse × dense products.

Formats (all for ``y = x @ W.T`` with ``W`` of shape out × in):

* :class:`CSRMatrix` with float32 values, or int8 values plus one float32 scale per row
  (symmetric per-row quantization of the nonzeros);
* :class:`BSRMatrix`: block-sparse rows with dense R × C blocks.

Column indices are unsigned and as narrow as the input dimension allows (uint16 up to
65535 columns, else uint32). The jitted bodies in ``_numba.py``/``_panels.py`` trust
their arguments; the functions here check shape, dtype and contiguity first.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch

from nbcompress.kernels import _numba, _panels
from nbcompress.kernels.threads import get_threads

__all__ = [
    "BSRMatrix",
    "CSRMatrix",
    "bsr_matmul",
    "csr_matmul",
    "csr_matmul_t",
    "index_dtype",
    "pack_bsr",
    "pack_csr",
]

_COMPILED: set[str] = set()


def index_dtype(n_cols: int) -> np.dtype:
    """Narrowest unsigned dtype that can hold column indices below ``n_cols``."""
    return np.dtype(np.uint16 if n_cols <= 65535 else np.uint32)


@dataclass(frozen=True, eq=False)
class CSRMatrix:
    """A sparse weight in compressed sparse row form.

    Attributes:
        indptr: int64 row pointers, length ``rows + 1``.
        indices: Unsigned column indices (uint16 or uint32).
        data: float32 values, or int8 quantized values.
        scale: float32 per-row scale (ones for float32 values).
        shape: ``(rows, cols)`` = ``(out_features, in_features)``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    scale: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed arrays."""
        return sum(a.nbytes for a in (self.indptr, self.indices, self.data, self.scale))

    def to_dense(self) -> np.ndarray:
        """Dense float32 copy (dequantized for int8 values)."""
        out = np.zeros(self.shape, dtype=np.float32)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        out[rows, self.indices.astype(np.int64)] = self.data.astype(np.float32) * self.scale[rows]
        return out


@dataclass(frozen=True, eq=False)
class BSRMatrix:
    """A sparse weight as block-sparse rows of dense ``block`` = (R, C) tiles.

    Attributes:
        indptr: int64 block-row pointers, length ``rows / R + 1``.
        indices: Unsigned block-column indices (column = index × C).
        data: float32 blocks, shape ``(nblocks, R, C)``.
        shape: ``(rows, cols)``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    @property
    def block(self) -> tuple[int, int]:
        """Block shape (R, C)."""
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed arrays."""
        return sum(a.nbytes for a in (self.indptr, self.indices, self.data))

    def to_dense(self) -> np.ndarray:
        """Dense float32 copy."""
        r, c = self.block
        out = np.zeros(self.shape, dtype=np.float32)
        for br in range(self.indptr.shape[0] - 1):
            for j in range(self.indptr[br], self.indptr[br + 1]):
                col = int(self.indices[j]) * c
                out[br * r : br * r + r, col : col + c] = self.data[j]
        return out


def _as_weight(weight: torch.Tensor | np.ndarray, arg: str = "weight") -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu().numpy()
    if not isinstance(weight, np.ndarray) or weight.ndim != 2:
        raise ValueError(f"{arg}: expected a 2-D (out × in) weight, got {_describe(weight)}.")
    if not np.all(np.isfinite(weight)):
        raise ValueError(f"{arg}: contains NaN or infinity; sparse packing needs finite values.")
    return np.ascontiguousarray(weight, dtype=np.float32)


def pack_csr(weight: torch.Tensor | np.ndarray, *, int8: bool = False) -> CSRMatrix:
    """Pack the nonzeros of a 2-D weight as CSR.

    Args:
        weight: Dense (out × in) weight; its exact zeros are dropped.
        int8: Store values as int8 with one symmetric scale per row
            (``scale = max|row| / 127``); rows keep their sparsity pattern.

    Returns:
        The packed matrix.
    """
    w = _as_weight(weight)
    rows, cols = np.nonzero(w)
    indptr = np.zeros(w.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=w.shape[0]), out=indptr[1:])
    values = w[rows, cols]
    scale = np.ones(w.shape[0], dtype=np.float32)
    if int8:
        peak = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        values = np.clip(np.rint(values / scale[rows]), -127, 127).astype(np.int8)
    return CSRMatrix(
        indptr=indptr,
        indices=cols.astype(index_dtype(w.shape[1])),
        data=np.ascontiguousarray(values),
        scale=scale,
        shape=(int(w.shape[0]), int(w.shape[1])),
    )


def pack_bsr(weight: torch.Tensor | np.ndarray, block: tuple[int, int] = (4, 1)) -> BSRMatrix:
    """Pack a 2-D weight as block-sparse rows; a block is kept if any entry is nonzero.

    Args:
        weight: Dense (out × in) weight.
        block: Block shape (R, C); must divide the weight's shape.

    Returns:
        The packed matrix (zeros inside kept blocks are stored explicitly).
    """
    w = _as_weight(weight)
    r, c = (int(block[0]), int(block[1])) if len(block) == 2 else (0, 0)
    if r < 1 or c < 1 or w.shape[0] % r or w.shape[1] % c:
        raise ValueError(
            f"block: {tuple(block)} must be two positive integers dividing the weight shape "
            f"{w.shape}; e.g. (4, 1) for a weight with a multiple of 4 rows."
        )
    tiles = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c).transpose(0, 2, 1, 3)
    brow, bcol = np.nonzero(np.any(tiles != 0, axis=(2, 3)))
    indptr = np.zeros(tiles.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(brow, minlength=tiles.shape[0]), out=indptr[1:])
    return BSRMatrix(
        indptr=indptr,
        indices=bcol.astype(index_dtype(tiles.shape[1])),
        data=np.ascontiguousarray(tiles[brow, bcol]),
        shape=(int(w.shape[0]), int(w.shape[1])),
    )


def _describe(x: object) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"shape {tuple(x.shape)} dtype {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def _as_float32(x: torch.Tensor | np.ndarray, ndim: tuple[int, ...], arg: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            raise RuntimeError(
                f"{arg}: requires grad, but the sparse kernels are inference-only. Run under "
                "torch.no_grad() / torch.inference_mode(), or undo the sparsification to train."
            )
        if x.device.type != "cpu":
            raise ValueError(f"{arg}: the sparse kernels run on CPU; got a {x.device} tensor.")
        x = x.detach().numpy()
    if not isinstance(x, np.ndarray) or x.ndim not in ndim or x.dtype != np.float32:
        raise TypeError(f"{arg}: expected a float32 array with {ndim} dims, got {_describe(x)}.")
    return x


def _run(name: str, args: tuple, dtypes: tuple) -> None:
    # One thread: the serial twin (no pool launch). Kept lean: small layers are dominated
    # by per-call overhead. The first call per signature compiles (with SLP vectorization
    # on, which only matters then) or loads from disk, and says once what that cost.
    n = get_threads()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    kernel = getattr(_panels, name if n > 1 else name + "_1", None) or getattr(_numba, name)
    key = (name, n > 1, *dtypes)
    if key in _COMPILED:
        kernel(*args)
        return
    start = time.perf_counter()
    with _numba.slp_enabled():
        kernel(*args)
    _COMPILED.add(key)
    took = time.perf_counter() - start
    if took > 1.0:
        warnings.warn(
            f"nbcompress: sparse kernel {name} took {took:.1f} s to compile or load from "
            "numba's disk cache (once per session; later calls are fast).",
            stacklevel=3,
        )


def _check_cols(mat: CSRMatrix | BSRMatrix, k: int, arg: str) -> None:
    if k != mat.shape[1]:
        raise ValueError(
            f"{arg}: has {k} input features but the sparse weight expects {mat.shape[1]} "
            f"(weight shape {mat.shape})."
        )


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
    xt = np.ascontiguousarray(_as_float32(xt, (2,), "xt"))
    _check_cols(mat, xt.shape[0], "xt")
    m, n = mat.shape[0], xt.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous float32 array of shape {(m, n)}.")
    return matmul_t_unchecked(mat, xt, out)


def matmul_t_unchecked(mat: CSRMatrix, xt: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`csr_matmul_t` for callers that validated already (the modules)."""
    if out.size:
        _panels_then_rest(mat, _packer("pack_cols", xt, rows=xt.shape[0]), xt.shape[1], out)
    return out


Packer = Callable[[int, int, int], np.ndarray]


def _packer(name: str, src: np.ndarray, *extra: Any, rows: int) -> Packer:
    """``(start, npan, width) -> (npan·rows × width)`` panels of ``src`` via kernel ``name``."""

    def pack(start: int, npan: int, width: int) -> np.ndarray:
        xp = np.empty((npan * rows, width), dtype=np.float32)
        _run(name, (src, *extra, start, npan, width, xp), ())
        return xp

    return pack


def _panels_then_rest(mat: CSRMatrix, pack: Packer, n: int, out: np.ndarray) -> None:
    # Automatic tiling: whole panels of 16 (then 8) columns, each packed contiguously so
    # that one panel of the input (K × 16 floats) stays in L1/L2 while every row of the
    # weight streams past it; the last < 8 columns go one at a time.
    m = out.shape[0]
    dtypes = (mat.data.dtype.char, mat.indices.dtype.char)
    csr = (mat.indptr, mat.indices, mat.data, mat.scale)
    rb = max(16, -(-m // 8))
    done = 0
    for width in (16, 8):
        npan = (n - done) // width
        if npan:
            _run(f"panel{width}", (*csr, pack(done, npan, width), out, done, npan, rb), dtypes)
            done += npan * width
    if done < n:
        # One "panel" of the leftover width is exactly those columns in K × rest layout.
        rest = np.empty((m, n - done), dtype=np.float32)
        _run("csr_cols", (*csr, pack(done, 1, n - done), rest, 0), dtypes)
        out[:, done:] = rest


def conv_unchecked(mat: CSRMatrix, img: np.ndarray, geom: tuple, out: np.ndarray) -> None:
    """Sparse conv of one C × H × W image into ``out`` (M × Ho·Wo), unfolding on the fly.

    Args:
        mat: The packed (out × C·kh·kw) weight.
        img: C-contiguous float32 image.
        geom: ``(kh, kw, sh, sw, ph, pw, dh, dw, wo)``.
        out: C-contiguous float32 result.
    """
    pack = _packer("pack_im2col", img, tuple(int(g) for g in geom), rows=mat.shape[1])
    _panels_then_rest(mat, pack, out.shape[1], out)


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
    x = _as_float32(x, (1, 2), "x")
    _check_cols(mat, x.shape[-1], "x")
    return matmul_unchecked(mat, x)


def matmul_unchecked(mat: CSRMatrix, x: np.ndarray) -> np.ndarray:
    """:func:`csr_matmul` for callers that validated already (the modules)."""
    if x.ndim == 1 or x.shape[0] == 1:
        xv = np.ascontiguousarray(x.reshape(-1))
        out = np.empty(mat.shape[0], dtype=np.float32)
        if mat.shape[0]:
            args = (mat.indptr, mat.indices, mat.data, mat.scale, xv, out)
            _run("csr_spmv", args, (mat.data.dtype.char, mat.indices.dtype.char))
        return out if x.ndim == 1 else out.reshape(1, -1)
    x = np.ascontiguousarray(x)
    out = np.empty((mat.shape[0], x.shape[0]), dtype=np.float32)
    if out.size:
        _panels_then_rest(mat, _packer("pack_rows", x, rows=x.shape[1]), x.shape[0], out)
    return out.T


def bsr_matmul(mat: BSRMatrix, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Compute ``x @ W.T`` with a block-sparse weight; shapes as :func:`csr_matmul`.

    Args:
        mat: The packed block-sparse weight.
        x: float32 input of shape (in,) or (batch × in).

    Returns:
        (out,) or (batch × out).
    """
    x = _as_float32(x, (1, 2), "x")
    _check_cols(mat, x.shape[-1], "x")
    xt = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    out = np.empty((mat.shape[0], xt.shape[1]), dtype=np.float32)
    if mat.shape[0]:
        _run("bsr_spmm", (mat.indptr, mat.indices, mat.data, xt, out), (mat.indices.dtype.char,))
    return out.reshape(-1) if x.ndim == 1 else out.T
