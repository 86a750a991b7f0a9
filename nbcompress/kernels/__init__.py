"""Numba sparse kernels and the inference modules built on them.

Modules: ``formats`` (CSRMatrix, BSRMatrix, packing), ``layouts`` (derived layouts of a
packed weight), ``dispatch`` (kernel registry, measured kernel choice, input checks),
``csr`` / ``bsr`` / ``conv`` (the validating products), ``modules`` (SparseLinear,
SparseConv2d), ``threads``, ``tuning`` (the persistent record of measured choices),
``notices`` (one line about compilation per call), ``precompile`` (:func:`warmup`);
the jitted bodies in ``_numba``, ``_simd`` and ``_generated_kernels`` (written by
``tools/generate_kernels.py``).

Importing this package configures numba's threading so that its pool and torch's do not
spin against each other (see :mod:`nbcompress.kernels.threads`).
"""

from __future__ import annotations

# First: numba picks a cached function's locator when it is decorated, and _disk_cache's
# stamps a kernel with the package files it imports (an edit of one recompiles it).
from nbcompress.kernels import _disk_cache  # noqa: F401, I001
from nbcompress.kernels.threads import configure_threading

configure_threading()

from nbcompress.kernels.bsr import bsr_matmul  # noqa: E402 - threading must be configured first
from nbcompress.kernels.csr import csr_matmul, csr_matmul_t  # noqa: E402
from nbcompress.kernels.formats import BSRMatrix, CSRMatrix, pack_bsr, pack_csr  # noqa: E402
from nbcompress.kernels.notices import COMPILE_NOTICE  # noqa: E402
from nbcompress.kernels.precompile import WarmUp, warmup  # noqa: E402
from nbcompress.kernels.threads import get_threads, set_threads  # noqa: E402

__all__ = [
    "BSRMatrix",
    "COMPILE_NOTICE",
    "CSRMatrix",
    "WarmUp",
    "bsr_matmul",
    "csr_matmul",
    "csr_matmul_t",
    "get_threads",
    "pack_bsr",
    "pack_csr",
    "set_threads",
    "warmup",
]
