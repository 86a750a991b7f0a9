"""The batch-1 kernels: plain CSR (``csr_spmv``) and rows padded to eight (``csr_spmv8``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbcompress.kernels import (
    _numba,
    csr_matmul,
    dispatch,
    get_threads,
    layouts,
    pack_csr,
    set_threads,
)
from nbcompress.kernels._epilogue import NO_BIAS
from nbcompress.kernels.layouts import PAD, pad_rows
from tests.kernels.reference import csr_product, sparse_weight


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _forced(mat, x: np.ndarray, choice: str) -> np.ndarray:
    dispatch.set_choices(mat, {("v", 1, get_threads()): choice})
    y = csr_matmul(mat, x)
    assert dispatch.kernel_choices(mat) == {("v", 1, get_threads()): choice}
    return y


@pytest.mark.parametrize("choice", ["spmv", "spmv8"])
@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("cols", [50, 70000])
def test_both_spmv_kernels_match_reference_and_dense(rng, choice, density, int8, cols):
    w = sparse_weight(rng, 37, cols, density if cols < 1000 else density / 100)
    x = rng.standard_normal(cols).astype(np.float32)
    mat = pack_csr(w, int8=int8)
    y = _forced(mat, x, choice)
    ref = csr_product(mat.indptr, mat.indices, mat.data, mat.scale, x[None])[0]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    if not int8:
        want = (torch.from_numpy(w) @ torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("choice", ["spmv", "spmv8"])
def test_spmv_edge_shapes(rng, choice):
    one = pack_csr(np.array([[3.0]], np.float32))
    np.testing.assert_allclose(_forced(one, np.array([2.0], np.float32), choice), [6.0])
    zeros = pack_csr(np.zeros((6, 9), np.float32))
    assert not _forced(zeros, np.ones(9, np.float32), choice).any()
    big = rng.standard_normal((30, 9)).astype(np.float32)
    x = big.T[2]  # a strided view
    w = sparse_weight(rng, 5, 30, 0.5)
    np.testing.assert_allclose(_forced(pack_csr(w), x, choice), w @ x, rtol=1e-5, atol=1e-5)


def test_padded_rows_hold_the_same_matrix(rng):
    w = sparse_weight(rng, 11, 40, 0.3)
    mat = pack_csr(w)
    indptr, indices, data = pad_rows(mat)
    assert np.all(np.diff(indptr) % PAD == 0)
    assert np.all(np.diff(indptr) - np.diff(mat.indptr) < PAD)
    padded = np.zeros_like(w)
    for i in range(11):
        for j in range(indptr[i], indptr[i + 1]):
            padded[i, indices[j]] += data[j]
    np.testing.assert_array_equal(padded, w)
    assert pad_rows(mat)[0] is indptr  # built once per weight


def test_parallel_spmv8_matches_serial(rng):
    w = sparse_weight(rng, 45, 30, 0.3)
    mat = pack_csr(w)
    x = rng.standard_normal(30).astype(np.float32)
    outs = []
    with _numba.slp_enabled():  # as the wrappers compile them: numba caches the first build
        for kernel in (dispatch.SPMV8.parallel, dispatch.SPMV8.serial):
            out = np.full(45, np.nan, dtype=np.float32)
            kernel(*pad_rows(mat), mat.scale, x, out, NO_BIAS, 0)
            outs.append(out)
    np.testing.assert_allclose(outs[0], w @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_batch_one_choice_is_measured_once(rng):
    mat = pack_csr(sparse_weight(rng, 20, 30, 0.3))
    x = rng.standard_normal((1, 30)).astype(np.float32)
    y = csr_matmul(mat, x)
    ((key, choice),) = dispatch.kernel_choices(mat).items()
    assert key == ("v", 1, get_threads()) and choice in {"spmv", "spmv8"}
    np.testing.assert_array_equal(csr_matmul(mat, x), y)


def test_two_threads_give_the_same_results(rng):
    w = sparse_weight(rng, 64, 40, 0.3)
    x = rng.standard_normal(40).astype(np.float32)
    set_threads(2)
    try:
        for choice in ("spmv", "spmv8"):
            y = _forced(pack_csr(w), x, choice)
            np.testing.assert_allclose(y, w @ x, rtol=1e-5, atol=1e-5)
    finally:
        set_threads(None)


@pytest.mark.parametrize("choice", ["spmv", "spmv8"])
def test_a_layout_that_lost_the_choice_is_released(rng, choice):
    mat = pack_csr(sparse_weight(rng, 20, 600, 0.3))
    pad_rows(mat)
    layouts.block_rows(mat, 256)
    dispatch.set_choices(mat, {("v", 1, 1): choice, ("x", 64, 1): "tiles"})
    dispatch.release_unused(mat)
    assert set(layouts._CACHE[mat]) == ({"pad"} if choice == "spmv8" else set())
    dispatch.set_choices(mat, dispatch.kernel_choices(mat) | {("x", 64, 1): "kblocks"})
    layouts.block_rows(mat, layouts.kblock(600))
    dispatch.release_unused(mat)
    assert ("k", layouts.kblock(600)) in layouts._CACHE[mat]
