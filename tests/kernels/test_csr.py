from __future__ import annotations

import numpy as np
import pytest
import torch

from nbcompress.kernels import (
    _numba,
    bsr_matmul,
    csr,
    csr_matmul,
    csr_matmul_t,
    dispatch,
    get_threads,
    pack_bsr,
    pack_csr,
    set_threads,
)
from nbcompress.kernels._epilogue import NO_BIAS
from tests.kernels.reference import bsr_product, csr_product, sparse_weight


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _dense(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (torch.from_numpy(x) @ torch.from_numpy(w).T).numpy()


# Batches chosen to hit every code path: SpMV (1), scalar columns (3), one 8-panel (8),
# one 16-panel (16), 16-panel + 8-panel copy + leftover columns (29), two 16-panels (32).
@pytest.mark.parametrize("batch", [1, 3, 8, 16, 29, 32])
@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
def test_csr_fp32_matches_reference_and_dense(rng, batch, density):
    w = sparse_weight(rng, 37, 50, density)
    x = rng.standard_normal((batch, 50)).astype(np.float32)
    mat = pack_csr(w)
    y = csr_matmul(mat, x)
    assert y.shape == (batch, 37)
    ref = csr_product(mat.indptr, mat.indices, mat.data, mat.scale, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, _dense(w, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8, 29])
def test_csr_int8_matches_reference_and_is_close_to_dense(rng, batch):
    w = sparse_weight(rng, 40, 64, 0.3)
    x = rng.standard_normal((batch, 64)).astype(np.float32)
    mat = pack_csr(w, int8=True)
    assert mat.data.dtype == np.int8 and mat.scale.dtype == np.float32
    y = csr_matmul(mat, x)
    ref = csr_product(mat.indptr, mat.indices, mat.data, mat.scale, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # Rounding error per weight is at most half a step (scale / 2).
    bound = np.abs(x) @ (np.abs(w) > 0).T * (mat.scale / 2)
    assert np.all(np.abs(y - _dense(w, x)) <= bound + 1e-4)


def test_int8_keeps_the_sparsity_pattern_and_row_peaks(rng):
    w = sparse_weight(rng, 10, 30, 0.4)
    mat = pack_csr(w, int8=True)
    assert mat.nnz == int((w != 0).sum())
    peaks = np.abs(mat.data.astype(np.int32)).reshape(-1)
    assert peaks.max() == 127
    np.testing.assert_allclose(mat.to_dense(), w, atol=float(mat.scale.max()) / 2 + 1e-7)


def test_indices_are_the_narrowest_unsigned_type(rng):
    assert pack_csr(np.eye(3, 65535, dtype=np.float32)).indices.dtype == np.uint16
    wide = np.zeros((3, 65536), dtype=np.float32)
    wide[0, 65535] = 2.0
    wide[2, 70] = -1.0
    mat = pack_csr(wide)
    assert mat.indices.dtype == np.uint32
    x = rng.standard_normal((2, 65536)).astype(np.float32)
    for xb in (x, x[:1]):
        np.testing.assert_allclose(csr_matmul(mat, xb), _dense(wide, xb), rtol=1e-6)


def test_in_features_above_65535_batched(rng):
    w = sparse_weight(rng, 5, 70000, 0.001)
    x = rng.standard_normal((9, 70000)).astype(np.float32)
    mat = pack_csr(w)
    assert mat.indices.dtype == np.uint32
    ref = csr_product(mat.indptr, mat.indices, mat.data, mat.scale, x)
    np.testing.assert_allclose(csr_matmul(mat, x), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 8, 17])
def test_edge_shapes(rng, batch):
    one = np.array([[3.0]], dtype=np.float32)
    x1 = rng.standard_normal((batch, 1)).astype(np.float32)
    np.testing.assert_allclose(csr_matmul(pack_csr(one), x1), 3.0 * x1, rtol=1e-6)
    zeros = np.zeros((6, 9), dtype=np.float32)
    mat = pack_csr(zeros)
    assert mat.nnz == 0
    y = csr_matmul(mat, rng.standard_normal((batch, 9)).astype(np.float32))
    assert y.shape == (batch, 6) and not y.any()
    empty = pack_csr(np.zeros((0, 9), dtype=np.float32))
    assert csr_matmul(empty, np.ones((batch, 9), np.float32)).shape == (batch, 0)


def test_non_contiguous_and_torch_inputs(rng):
    w = sparse_weight(rng, 20, 30, 0.3)
    mat = pack_csr(w)
    big = rng.standard_normal((30, 40)).astype(np.float32)
    x = big.T[::2]  # (20, 30), neither C- nor F-contiguous
    assert not x.flags.c_contiguous
    np.testing.assert_allclose(csr_matmul(mat, x), _dense(w, np.ascontiguousarray(x)), atol=1e-5)
    xt = torch.from_numpy(big)
    np.testing.assert_allclose(csr_matmul_t(mat, xt.T.T), w @ big, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(csr_matmul(mat, x[3]), w @ x[3], rtol=1e-5, atol=1e-5)


def test_matmul_t_writes_into_out(rng):
    w = sparse_weight(rng, 12, 7, 0.5)
    xt = rng.standard_normal((7, 40)).astype(np.float32)
    out = np.full((12, 40), np.nan, dtype=np.float32)
    assert csr_matmul_t(pack_csr(w), xt, out=out) is out
    np.testing.assert_allclose(out, w @ xt, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out:"):
        csr_matmul_t(pack_csr(w), xt, out=np.empty((12, 41), np.float32))


def test_parallel_variants_match_serial(rng):
    w = sparse_weight(rng, 33, 20, 0.4)
    mat = pack_csr(w)
    xt = rng.standard_normal((20, 48)).astype(np.float32)
    args = (mat.indptr, mat.indices, mat.data, mat.scale, xt)
    pack = csr.packer(dispatch.PACK_COLS, xt, rows=20)
    # Compiled as the wrappers compile them (SLP on): numba caches whatever compiles first.
    with _numba.slp_enabled():
        _check_parallel_variants(args, pack, w, xt)


def _check_parallel_variants(args, pack, w, xt):
    for width in (16, 8):
        outs = []
        panel = dispatch.PANELS[width]
        for kernel in (panel.parallel, panel.serial):
            out = np.zeros((33, 48), dtype=np.float32)
            kernel(*args[:4], pack(0, 48 // width, width), out, 0, 48 // width, 16, NO_BIAS, 0)
            outs.append(out)
        np.testing.assert_allclose(outs[0], w @ xt, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("block", [(4, 1), (1, 4), (4, 4)])
@pytest.mark.parametrize("batch", [1, 5])
def test_bsr_matches_reference_and_dense(rng, block, batch):
    w = sparse_weight(rng, 16, 24, 0.2)
    x = rng.standard_normal((batch, 24)).astype(np.float32)
    mat = pack_bsr(w, block)
    assert mat.block == block
    np.testing.assert_array_equal(mat.to_dense(), w)
    y = bsr_matmul(mat, x)
    np.testing.assert_allclose(y, bsr_product(mat.indptr, mat.indices, mat.data, x), atol=1e-5)
    np.testing.assert_allclose(y, _dense(w, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bsr_matmul(mat, x[0]), y[0], rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    mat = pack_csr(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="x: has 5 input features"):
        csr_matmul(mat, np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match="x: expected a float32"):
        csr_matmul(mat, np.ones((2, 4), np.float64))
    with pytest.raises(RuntimeError, match="inference-only"):
        csr_matmul(mat, torch.ones(2, 4, requires_grad=True))
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        pack_csr(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        pack_csr(np.array([[np.nan]], np.float32))
    with pytest.raises(ValueError, match="block:"):
        pack_bsr(np.ones((6, 4), np.float32), (4, 1))


def test_thread_count_follows_torch_unless_set():
    assert get_threads() == 1  # conftest: one torch thread, NUMBA_NUM_THREADS=1
    set_threads(1)
    try:
        assert get_threads() == 1
    finally:
        set_threads(None)
    with pytest.raises(ValueError, match="n: expected a positive integer"):
        set_threads(0)
