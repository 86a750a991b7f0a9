"""Slow, obviously-correct reference implementations for the sparse kernels."""

from __future__ import annotations

import numpy as np


def csr_product(indptr, indices, data, scale, x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` from CSR arrays, one nonzero at a time in float64 (x: batch × in)."""
    rows = len(indptr) - 1
    y = np.zeros((x.shape[0], rows), dtype=np.float64)
    for b in range(x.shape[0]):
        for i in range(rows):
            total = 0.0
            for j in range(indptr[i], indptr[i + 1]):
                total += float(data[j]) * float(x[b, int(indices[j])])
            y[b, i] = total * float(scale[i])
    return y


def bsr_product(indptr, indices, data, x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` from block-sparse rows, one block entry at a time in float64."""
    _, r_size, c_size = data.shape
    y = np.zeros((x.shape[0], (len(indptr) - 1) * r_size), dtype=np.float64)
    for br in range(len(indptr) - 1):
        for j in range(indptr[br], indptr[br + 1]):
            for r in range(r_size):
                for c in range(c_size):
                    col = int(indices[j]) * c_size + c
                    y[:, br * r_size + r] += float(data[j, r, c]) * x[:, col].astype(np.float64)
    return y


def sparse_weight(rng: np.random.Generator, rows: int, cols: int, density: float) -> np.ndarray:
    """Random float32 weight with about ``density`` nonzeros and some empty rows."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random((rows, cols)) >= density] = 0
    if rows > 2:
        w[1] = 0  # an empty row
    return w
