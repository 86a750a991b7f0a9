"""Kernels run on torch's OpenMP threads (``_gomp.py``): every task once, same results."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nbcompress.kernels import _gomp, _numba, dispatch, pack_csr, registry
from nbcompress.kernels._epilogue import NO_BIAS
from nbcompress.kernels.csr import matmul_unchecked, transposed
from nbcompress.kernels.layouts import block_rows, pad_rows

pytestmark = pytest.mark.skipif(
    not _gomp.available(), reason="torch does not run on GNU OpenMP here"
)


def _matrix(m: int, k: int, int8: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=gen) * (torch.rand(m, k, generator=gen) < 0.1)
    w[3] = 0  # an empty row
    return pack_csr(w, int8=int8)


def _csr(mat, wide: bool) -> tuple:
    # The same weight with 32-bit indices, as a weight over 65535 columns would have.
    indices = mat.indices.astype(np.uint32) if wide else mat.indices
    return mat.indptr, indices, mat.data, mat.scale


def _both(kernel: registry.Kernel, args: tuple, out: np.ndarray, threads: int) -> np.ndarray:
    """``out`` after the serial twin, and after the same call on ``threads`` OpenMP threads."""
    with _numba.slp_enabled():  # as the wrappers compile them: numba caches the first build
        kernel.serial(*args)
    expected = out.copy()
    out[...] = np.nan
    found = _gomp.job(kernel.name, args, threads)
    assert found is not None
    registry._on_torch_threads(*found, threads)
    return expected


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("int8", "wide"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("act", [0, 2])
def test_tiles_panels_and_spmv_match_the_serial_twin_on_any_team_size(threads, int8, wide, act):
    # Bit for bit: each task runs the serial twin on its rows, in the twin's order. Three
    # threads on two cores: the third takes tasks from the front as well. With an
    # epilogue (bias and GELU): each task's rows get their own bias values.
    mat = _matrix(200, 300, int8)
    csr = _csr(mat, wide)
    rng = np.random.default_rng(0)
    epi = (rng.standard_normal(200, dtype=np.float32), act) if act else (NO_BIAS, 0)
    xt = rng.standard_normal((300, 130), dtype=np.float32)
    out = np.empty((200, 130), np.float32)
    for blocked in (None, 64):
        ip, ix, data, nkb = block_rows(mat, blocked or 300)
        ix = ix.astype(np.uint32) if wide else ix
        bounds = dispatch.row_bounds(mat.indptr, 7)
        args = (ip, ix, data, mat.scale, xt.reshape(-1), 130, 130, out.reshape(-1), 0, 2)
        expected = _both(registry.TILE64, (*args, bounds, nkb, 0, *epi), out, threads)
        np.testing.assert_array_equal(out[:, :128], expected[:, :128])
    for width, kernel in registry.PANELS.items():
        npan = 130 // width
        xp = np.ascontiguousarray(
            xt[:, : npan * width].reshape(300, npan, width).transpose(1, 0, 2).reshape(-1, width)
        )
        expected = _both(kernel, (*csr, xp, out, 0, npan, 32, *epi), out, threads)
        np.testing.assert_array_equal(out[:, : npan * width], expected[:, : npan * width])
    x = xt[:, 0].copy()
    for kernel, arrays in ((registry.SPMV, csr[:3]), (registry.SPMV8, pad_rows(mat))):
        ix = arrays[1].astype(np.uint32) if wide else arrays[1]
        vec = np.empty(200, np.float32)
        args = (arrays[0], ix, arrays[2], mat.scale, x, vec, *epi)
        expected = _both(kernel, args, vec, threads)
        np.testing.assert_array_equal(vec, expected)


def test_unsupported_index_types_fall_back_to_numbas_pool():
    mat = _matrix(20, 30, False)
    wide = mat.indices.astype(np.uint64)  # the direct convolution's offsets past 2**32
    args = (mat.indptr, wide, mat.data, mat.scale, np.ones(30, np.float32), np.empty(20))
    assert _gomp.job("csr_spmv", args, 2) is None
    assert _gomp.job("csr_cols", args, 2) is None  # no task function for this kernel


def test_f_ordered_batches_need_no_copy_and_give_the_same_product():
    # The previous sparse layer's output is a transposed view: read in place.
    mat = _matrix(64, 96, False)
    rng = np.random.default_rng(1)
    for batch in (8, 16, 20, 64, 70):
        xf = np.asfortranarray(rng.standard_normal((batch, 96), dtype=np.float32))
        assert np.shares_memory(transposed(xf), xf)
        np.testing.assert_array_equal(
            matmul_unchecked(mat, xf), matmul_unchecked(mat, np.ascontiguousarray(xf))
        )


def _child_status(env: dict[str, str], code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_switched_off_by_the_environment_and_never_in_a_forked_child():
    env = {**os.environ, "NBCOMPRESS_OPENMP": "0"}
    code = "from nbcompress.kernels import _gomp; print(_gomp.available())"
    assert _child_status(env, code) == "False"
    # libgomp's pool does not survive fork: a child of a process that used it runs
    # numba's pool instead.
    fork = (
        "import os\nfrom nbcompress.kernels import _gomp\nassert _gomp.available()\n"
        "r, w = os.pipe()\npid = os.fork()\n"
        "if pid == 0:\n    os.write(w, str(_gomp.available()).encode())\n    os._exit(0)\n"
        "os.waitpid(pid, 0)\nprint(os.read(r, 10).decode())\n"
    )
    assert _child_status(dict(os.environ), fork) == "False"
