"""Parallel tasks on a static partition by nonzeros, on torch's threads or the awake pool."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nbcompress.kernels import _gomp, _numba, _pool, dispatch, pack_csr, registry
from nbcompress.kernels._epilogue import NO_BIAS
from tools.kernel_templates import TASK_WORDS

needs_gomp = pytest.mark.skipif(
    not _gomp.available(), reason="torch does not run on GNU OpenMP here"
)


@pytest.fixture(autouse=True)
def _vectorized():
    # As the registry compiles them: numba caches on disk whichever build comes first, and
    # a twin compiled here without the SLP vectorizer would be the slow one everywhere.
    with _numba.slp_enabled():
        yield


def _skewed_indptr(rng: np.random.Generator, m: int) -> np.ndarray:
    # Row lengths from 0 to ~400 with a dense head: equal rows would be unequal work.
    lengths = rng.integers(0, 40, m)
    lengths[: m // 10] *= 10
    return np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)


@pytest.mark.parametrize(("parts", "blocks"), [(1, 1), (2, 4), (3, 4), (4, 2)])
def test_partition_parts_hold_about_equal_nonzeros(parts, blocks):
    rng = np.random.default_rng(parts * 10 + blocks)
    indptr = _skewed_indptr(rng, 3000)
    bounds = _gomp.partition(indptr, parts, blocks)
    assert bounds.shape == (parts * blocks + 1,) and bounds.dtype == np.int64
    assert bounds[0] == 0 and bounds[-1] == 3000 and np.all(np.diff(bounds) >= 0)
    longest = np.diff(indptr).max()
    per_part = np.diff(indptr[bounds[::blocks]])
    # Each part within one row of an equal share (a cut falls between rows).
    assert np.all(np.abs(per_part - indptr[-1] / parts) <= longest)
    for q in range(parts):
        edges = bounds[q * blocks : (q + 1) * blocks + 1]
        share = per_part[q] / blocks
        assert np.all(np.abs(np.diff(indptr[edges]) - share) <= longest)
    # By rows the dense head would give the first part far more than its share.
    by_rows = np.diff(indptr[np.linspace(0, 3000, parts + 1).astype(int)])
    if parts > 1:
        assert by_rows.max() - by_rows.min() > 2 * (per_part.max() - per_part.min())


def test_partition_of_tiny_and_empty_matrices_has_empty_blocks():
    one_row = _gomp.partition(np.array([0, 5]), 2, 4)
    assert one_row.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert _gomp.partition(np.array([0]), 2, 2).tolist() == [0, 0, 0, 0, 0]


def test_balanced_rows_is_one_block_on_one_thread_else_a_partition_per_thread(monkeypatch):
    mat = pack_csr(np.random.default_rng(0).standard_normal((90, 40)).astype(np.float32))
    with dispatch.serial():
        assert dispatch.balanced_rows(mat).tolist() == [0, 90]
    monkeypatch.setattr(dispatch, "get_threads", lambda: 3)
    np.testing.assert_array_equal(dispatch.balanced_rows(mat), _gomp.partition(mat.indptr, 3))


@needs_gomp
def test_the_awake_pool_only_where_torchs_workers_sleep(monkeypatch):
    monkeypatch.delenv("NBCOMPRESS_OPENMP", raising=False)
    monkeypatch.setitem(_gomp._STATE, "sleep2", 0)  # measured: torch's workers spin
    assert not _gomp._own_pool(2)
    monkeypatch.setitem(_gomp._STATE, "sleep2", 1)  # measured: they sleep after a region
    assert _gomp._own_pool(2)
    monkeypatch.setenv("NBCOMPRESS_OPENMP", "torch")
    assert not _gomp._own_pool(2)
    monkeypatch.setitem(_gomp._STATE, "sleep2", 0)
    monkeypatch.setenv("NBCOMPRESS_OPENMP", "pool")
    assert _gomp._own_pool(2)


def _matrix(m: int, k: int, int8: bool = False):
    gen = torch.Generator().manual_seed(m + k)
    w = torch.randn(m, k, generator=gen) * (torch.rand(m, k, generator=gen) < 0.1)
    w[: m // 8] = torch.randn(m // 8, k, generator=gen)  # dense rows: parts by nonzeros
    return pack_csr(w, int8=int8)


def _cases(mat, rng: np.random.Generator) -> list[tuple[registry.Kernel, tuple, np.ndarray]]:
    """(kernel, args, output) of a tile, a panel and an SpMV call on ``mat``."""
    m, k = mat.shape
    csr = (mat.indptr, mat.indices, mat.data, mat.scale)
    xt = rng.standard_normal((k, 130), dtype=np.float32)
    out = np.empty((m, 130), np.float32)
    bounds = _gomp.partition(mat.indptr, 2)
    tile = (*csr, xt.reshape(-1), 130, 130, out.reshape(-1), 0, 2, bounds, 1, 0, NO_BIAS, 0)
    xp = np.ascontiguousarray(xt[:, :16])
    pout = np.empty((m, 16), np.float32)
    vec = np.empty(m, np.float32)
    return [
        (registry.TILE64, tile, out[:, :128]),
        (registry.PANELS[16], (*csr, xp, pout, 0, 1, 32, NO_BIAS, 0), pout),
        (registry.SPMV, (*csr, xt[:, 0].copy(), vec, NO_BIAS, 0), vec),
    ]


@needs_gomp
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("int8", [False, True])
def test_the_awake_pool_matches_the_serial_twin_bit_for_bit(threads, int8):
    # The same task functions as on torch's threads: each task once, rows in the twin's order.
    assert _pool.ready(threads)
    rng = np.random.default_rng(threads)
    for kernel, args, result in _cases(_matrix(301, 250, int8), rng):
        kernel.serial(*args)
        expected = result.copy()
        for pool in ("torch", "own"):
            result[...] = np.nan
            name, blk = _gomp.job(kernel.name, args, threads)
            fn = _gomp.address(name)[0]
            if pool == "own":
                _pool.launch(fn, blk.words, blk.inp, blk.out, threads)
            else:
                _gomp._run(_gomp._STATE["entry"], fn, blk.words, blk.inp, blk.out, threads)
            np.testing.assert_array_equal(result, expected, err_msg=f"{kernel.name} {pool}")


@needs_gomp
def test_thread_i_takes_its_own_part_first():
    # One caller posing as thread 1, with part 0's tasks all taken already: exactly the
    # rows of part 1 are computed (thread 1 owns part 1, and a task is never run twice).
    mat = _matrix(200, 120)
    x = np.random.default_rng(0).standard_normal(120, dtype=np.float32)
    out = np.full(200, np.nan, np.float32)
    args = (mat.indptr, mat.indices, mat.data, mat.scale, x, out, NO_BIAS, 0)
    name, blk = _gomp.job("csr_spmv", args, 2)
    words = blk.words.copy()
    words[0], words[4], words[13], words[15] = words.ctypes.data, 1, x.ctypes.data, out.ctypes.data
    head = TASK_WORDS["spmv"]  # the words before the parts' lines
    words[head] = words[head + 2] - words[head + 1]  # part 0: every front task taken
    task = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_gomp.address(name)[0])
    task(words.ctypes.data)
    bounds = _gomp.partition(mat.indptr, 2)
    split = bounds[_gomp.BLOCKS_PER_PART]
    assert np.isnan(out[:split]).all()
    expected = np.empty(200, np.float32)
    registry.SPMV.serial(*args[:5], expected, NO_BIAS, 0)
    np.testing.assert_array_equal(out[split:], expected[split:])


@needs_gomp
def test_the_awake_pool_is_not_used_in_a_forked_child():
    code = (
        "import os\nfrom nbcompress.kernels import _pool\nassert _pool.ready(2)\n"
        "r, w = os.pipe()\npid = os.fork()\n"
        "if pid == 0:\n    os.write(w, str(_pool.ready(2)).encode())\n    os._exit(0)\n"
        "os.waitpid(pid, 0)\nprint(os.read(r, 10).decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
