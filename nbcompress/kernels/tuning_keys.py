"""The keys of the tuning record: what of a weight and an input decides a measured choice.

Weight pattern, rows, columns and a density bucket (:func:`matrix_key`, :func:`layer_key`),
and the input's extents rounded up to powers of two (:func:`shape_bucket`), so that 70,
100 and 128 rows share one measurement. Used by :mod:`~nbcompress.kernels.tuning`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["density_bucket", "layer_key", "matrix_key", "pow2", "shape_bucket"]


def pow2(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def density_bucket(density: float) -> int:
    """Density in percent, rounded to a step of 5 (90% sparse → 10)."""
    return int(round(float(density) * 20)) * 5


def matrix_key(mat: object) -> tuple:
    """What of a packed weight decides its kernels: pattern, dtype, rows, columns, density."""
    shape = mat.shape  # type: ignore[attr-defined]
    data = mat.data  # type: ignore[attr-defined]
    block = getattr(mat, "block", None)
    rows, cols = int(shape[0]), int(shape[1])
    nnz = int(np.prod(data.shape))
    pattern = f"bsr{block[0]}x{block[1]}" if block is not None else f"csr-{data.dtype.name}"
    return (pattern, mat.indices.dtype.name, rows, cols, density_bucket(nnz / max(1, rows * cols)))  # type: ignore[attr-defined]


def layer_key(weight: object, input_shape: tuple[int, ...], threads: int, *extra: object) -> tuple:
    """A key for a measured decision about one layer (e.g. ``sparsify_``'s dense vs sparse).

    Args:
        weight: The layer's weight (a CPU tensor without grad, or an array), out × anything.
        input_shape: The layer's input shape; bucketed by :func:`shape_bucket`.
        threads: The thread count the decision was measured at.
        extra: Whatever else decides it (layer type, allowed formats, the required gain).

    Returns:
        ``(rows, cols, density %, 4-row block fill %, *input bucket, *extra, threads)``.
    """
    w = np.asarray(weight)
    w = w.reshape(w.shape[0], -1)
    rows, cols = w.shape
    nz = w != 0
    nnz = int(nz.sum())
    fill = 0
    if rows % 4 == 0 and nnz:  # how well the nonzeros fill 4 × 1 blocks (bsr pays or not)
        blocks = int(nz.reshape(rows // 4, 4, cols).any(axis=1).sum())
        fill = density_bucket(nnz / (4 * blocks))
    dims = shape_bucket(("in", *input_shape))[1:]
    return (
        rows,
        cols,
        density_bucket(nnz / max(1, w.size)),
        fill,
        *dims,
        *map(str, extra),
        threads,
    )


def shape_bucket(key: tuple) -> tuple:
    """A kernel-choice key with its input extents rounded up to powers of two.

    ``("x", 100)`` → ``("x", 128)``; for ``("conv", N, C, H, W)`` the channels stay exact
    (they are the weight's) and N, H, W are rounded.
    """
    kind, *dims = key
    if kind == "conv" and len(dims) == 4:
        n, c, h, w = dims
        return (kind, pow2(n), c, pow2(h), pow2(w))
    return (kind, *(pow2(d) if isinstance(d, int) else d for d in dims))
