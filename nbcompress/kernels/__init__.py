"""Numba sparse kernels and the inference modules built on them.

Importing this package configures numba's threading so that its pool and torch's do not
spin against each other (see :mod:`nbcompress.kernels.threads`).
"""

from __future__ import annotations

from nbcompress.kernels.threads import configure_threading

configure_threading()

from nbcompress.kernels.bsr import bsr_matmul  # noqa: E402 - threading must be configured first
from nbcompress.kernels.csr import (  # noqa: E402
    BSRMatrix,
    CSRMatrix,
    csr_matmul,
    csr_matmul_t,
    pack_bsr,
    pack_csr,
)
from nbcompress.kernels.threads import get_threads, set_threads  # noqa: E402

__all__ = [
    "BSRMatrix",
    "CSRMatrix",
    "bsr_matmul",
    "csr_matmul",
    "csr_matmul_t",
    "get_threads",
    "pack_bsr",
    "pack_csr",
    "set_threads",
]
