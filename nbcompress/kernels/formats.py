"""Packed sparse weight formats: CSR and BSR, float32 or int8 with per-row scales.

Column indices are unsigned and as narrow as the input dimension allows (uint16 up to
65535 columns, else uint32), so the jitted kernels need no negative-index handling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BSRMatrix",
    "CSRMatrix",
    "describe",
    "index_dtype",
    "pack_bsr",
    "pack_csr",
    "row_scales",
    "ungroup",
]


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
        data: float32 blocks, shape ``(nblocks, R, C)``; or int8 (``bsr_int8``).
        shape: ``(rows, cols)``.
        scale: float32 per-row scale of int8 blocks; ``None`` for float32 blocks.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]
    scale: np.ndarray | None = None

    @property
    def block(self) -> tuple[int, int]:
        """Block shape (R, C)."""
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed arrays."""
        arrays = (self.indptr, self.indices, self.data)
        return sum(a.nbytes for a in arrays) + (0 if self.scale is None else self.scale.nbytes)

    def to_dense(self) -> np.ndarray:
        """Dense float32 copy (dequantized for int8 blocks)."""
        r, c = self.block
        out = np.zeros(self.shape, dtype=np.float32)
        for br in range(self.indptr.shape[0] - 1):
            for j in range(self.indptr[br], self.indptr[br + 1]):
                col = int(self.indices[j]) * c
                out[br * r : br * r + r, col : col + c] = self.data[j]
        return out if self.scale is None else out * self.scale[:, None]


def describe(x: object) -> str:
    """``x`` for an error message: shape and dtype of an array or tensor, else its type."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"shape {tuple(x.shape)} dtype {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def _as_weight(weight: torch.Tensor | np.ndarray, arg: str = "weight") -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu().numpy()
    if not isinstance(weight, np.ndarray) or weight.ndim != 2:
        raise ValueError(f"{arg}: expected a 2-D (out × in) weight, got {describe(weight)}.")
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
        scale = row_scales(w)
        values = np.clip(np.rint(values / scale[rows]), -127, 127).astype(np.int8)
    return CSRMatrix(
        indptr=indptr,
        indices=cols.astype(index_dtype(w.shape[1])),
        data=np.ascontiguousarray(values),
        scale=scale,
        shape=(int(w.shape[0]), int(w.shape[1])),
    )


def row_scales(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 scale per row of ``w``: ``max|row| / 127`` (1 for a zero row)."""
    peak = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    return np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)


def pack_bsr(
    weight: torch.Tensor | np.ndarray, block: tuple[int, int] = (4, 1), *, int8: bool = False
) -> BSRMatrix:
    """Pack a 2-D weight as block-sparse rows; a block is kept if any entry is nonzero.

    Args:
        weight: Dense (out × in) weight.
        block: Block shape (R, C); must divide the weight's shape.
        int8: Store int8 blocks with one symmetric scale per row (as :func:`pack_csr`).

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
    data, scale = tiles[brow, bcol], None
    if int8:
        scale = row_scales(w)
        per_row = scale.reshape(-1, r)[brow][:, :, None]
        data = np.clip(np.rint(data / per_row), -127, 127).astype(np.int8)
    return BSRMatrix(
        indptr=indptr,
        indices=bcol.astype(index_dtype(tiles.shape[1])),
        data=np.ascontiguousarray(data),
        shape=(int(w.shape[0]), int(w.shape[1])),
        scale=scale,
    )


def ungroup(mat: CSRMatrix | BSRMatrix, groups: int) -> CSRMatrix | BSRMatrix:
    """A grouped convolution's packed weight as that of the equivalent ungrouped one.

    Output rows of group g read only group g's input channels. The grouped (out × K)
    weight (K = in/groups·kh·kw, columns relative to the group) becomes (out ×
    groups·K): each row's columns move to its group's span. The zeros between the spans
    are never stored, so the kernels skip them and the products cost what the grouped
    weight's nonzeros cost.

    Args:
        mat: The packed grouped weight; block-sparse blocks must each lie in one group
            (R divides out/groups).
        groups: The convolution's groups.

    Returns:
        The packed (out × groups·K) weight, sharing ``mat``'s values.
    """
    m, k = mat.shape
    per = m // groups
    if isinstance(mat, CSRMatrix):
        rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(mat.indptr))
        cols = mat.indices.astype(np.int64) + rows // per * k
        indices = cols.astype(index_dtype(groups * k))
        return CSRMatrix(mat.indptr, indices, mat.data, mat.scale, (m, groups * k))
    r, c = mat.block
    if per % r:
        raise ValueError(f"mat: blocks of {r} rows straddle groups of {per} rows.")
    brows = np.repeat(np.arange(m // r, dtype=np.int64), np.diff(mat.indptr))
    cols = mat.indices.astype(np.int64) + brows * r // per * (k // c)
    indices = cols.astype(index_dtype(groups * k // c))
    return BSRMatrix(mat.indptr, indices, mat.data, (m, groups * k))
