"""The 4 × 1 block-sparse kernels (``bsr4_spmv``, ``bsr4_tile16/8``) against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbcompress.kernels import _numba, bsr_matmul, csr, dispatch, layouts, pack_bsr, threads
from nbcompress.kernels.layouts import block_rows
from tests.kernels.reference import bsr_product


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def block_weight(rng: np.random.Generator, rows: int, cols: int, density: float) -> np.ndarray:
    """Weight whose nonzeros come in 4 × 1 blocks (a few zeros inside kept blocks too)."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    keep = rng.random((rows // 4, 1, cols)) < density
    w = (w.reshape(rows // 4, 4, cols) * keep).reshape(rows, cols)
    w[rng.random((rows, cols)) < 0.05] = 0  # explicit zeros stored inside blocks
    if rows >= 8:
        w[4:8] = 0  # an empty block row
    return w


def _dense(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (torch.from_numpy(x) @ torch.from_numpy(w).T).numpy()


# 1: SpMV; 3: leftover loop only; 8: one 8-tile; 16: one 16-tile; 29: 16 + 8 + 5 leftover;
# 64: one panel of four 16-tiles; 90: a panel and a part panel, an 8-tile and leftovers.
@pytest.mark.parametrize("batch", [1, 3, 8, 16, 29, 64, 90])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_bsr4_matches_reference_and_dense(rng, batch, density):
    w = block_weight(rng, 24, 40, density)
    mat = pack_bsr(w, (4, 1))
    x = rng.standard_normal((batch, 40)).astype(np.float32)
    y = bsr_matmul(mat, x)
    assert y.shape == (batch, 24)
    np.testing.assert_allclose(y, bsr_product(mat.indptr, mat.indices, mat.data, x), atol=1e-4)
    np.testing.assert_allclose(y, _dense(w, x), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(bsr_matmul(mat, x[0]), y[0], rtol=1e-6, atol=1e-5)


def test_bsr4_non_contiguous_input_and_torch_tensor(rng):
    w = block_weight(rng, 16, 30, 0.3)
    mat = pack_bsr(w, (4, 1))
    big = rng.standard_normal((140, 60)).astype(np.float32)
    x = big[::2, ::2]  # (70, 30), strided both ways
    assert not x.flags.c_contiguous
    np.testing.assert_allclose(bsr_matmul(mat, x), _dense(w, np.ascontiguousarray(x)), atol=1e-4)
    xt = torch.from_numpy(np.ascontiguousarray(x[:1]))
    np.testing.assert_allclose(bsr_matmul(mat, xt), _dense(w, x[:1]), atol=1e-4)


def test_bsr4_in_features_above_65535_widen_indices(rng):
    w = np.zeros((8, 65540), dtype=np.float32)
    w[0:4, 65539] = [1.0, 2.0, 3.0, 4.0]
    w[4:8, 70] = -1.0
    mat = pack_bsr(w, (4, 1))
    assert mat.indices.dtype == np.uint32
    x = rng.standard_normal((20, 65540)).astype(np.float32)
    for xb in (x[:1], x):
        np.testing.assert_allclose(bsr_matmul(mat, xb), _dense(w, xb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kblk", [36, 10])  # one block of input rows, or four
def test_bsr4_parallel_kernels_match_serial(rng, kblk):
    w = block_weight(rng, 48, 36, 0.4)
    mat = pack_bsr(w, (4, 1))
    xt = rng.standard_normal((36, 90)).astype(np.float32)
    bounds = dispatch.row_bounds(mat.indptr, 4)
    assert len(bounds) > 2  # several block-row parts
    indptr, indices, data, nkb = block_rows(mat, kblk)
    data = data.reshape(-1)
    pfk = kblk if nkb > 1 else 0
    with _numba.slp_enabled():  # as the wrappers compile them: numba caches the first build
        for width in (16, 8):
            outs = []
            tiles = dispatch.BSR4_TILES[width]
            for kernel, b in ((tiles.parallel, bounds), (tiles.serial, bounds[[0, -1]])):
                out = np.zeros((48, 90), dtype=np.float32)
                ntile = 90 // width
                kernel(indptr, indices, data, xt.reshape(-1), 90, 90, out.reshape(-1),
                       0, ntile, b, 4, nkb, pfk)  # fmt: skip
                outs.append(out)
            np.testing.assert_array_equal(outs[0], outs[1])
            done = 90 // width * width
            np.testing.assert_allclose(outs[0][:, :done], (w @ xt)[:, :done], atol=1e-4)
            assert not outs[0][:, done:].any()  # columns past the tiles are left alone
        v = np.zeros(48, np.float32), np.zeros(48, np.float32)
        flat = mat.data.reshape(-1)
        dispatch.BSR4_SPMV.parallel(mat.indptr, mat.indices, flat, xt[:, 0].copy(), v[0])
        dispatch.BSR4_SPMV.serial(mat.indptr, mat.indices, flat, xt[:, 0].copy(), v[1])
        plain = [np.zeros((48, 5), np.float32) for _ in range(2)]
        x5 = np.ascontiguousarray(xt[:, :5])
        _numba.bsr_spmm(mat.indptr, mat.indices, mat.data, x5, plain[0])
        _numba.bsr_spmm_1(mat.indptr, mat.indices, mat.data, x5, plain[1])
    np.testing.assert_array_equal(v[0], v[1])
    np.testing.assert_allclose(v[0], w @ xt[:, 0], atol=1e-4)
    np.testing.assert_array_equal(plain[0], plain[1])
    np.testing.assert_allclose(plain[0], w @ x5, atol=1e-4)


def test_bsr4_k_blocked_competes_and_matches(rng, monkeypatch):
    monkeypatch.setattr(layouts, "KBLOCK", 16)  # K = 60: the K-blocked tiles compete too
    offered = []

    def pick(options):
        offered.append(sorted(options))
        for fn in options.values():
            fn()
        return "bsr4_kb"

    monkeypatch.setattr(dispatch, "choose", pick)
    w = block_weight(rng, 20, 60, 0.3)
    mat = pack_bsr(w, (4, 1))
    for batch in (70, 200):  # more than 64 columns: the next block's rows are prefetched
        x = rng.standard_normal((batch, 60)).astype(np.float32)
        for _ in range(2):  # measured once, then the recorded choice
            np.testing.assert_allclose(bsr_matmul(mat, x), _dense(w, x), rtol=1e-5, atol=1e-4)
    assert offered == [["bsr4", "bsr4_kb"]] * 2
    assert set(dispatch.kernel_choices(mat).values()) == {"bsr4_kb"}


def test_bsr4_with_several_threads_also_times_one_thread(rng, monkeypatch):
    # This suite's pool has one thread, so two are simulated: the choice must offer the
    # serial twin beside the pool, and the recorded pick must then compute the product.
    monkeypatch.setattr(dispatch, "get_threads", lambda: 1 if threads.in_serial() else 2)
    seen: list[list[str]] = []

    def pick(options):
        seen.append(sorted(options))
        return "bsr4" + dispatch.SERIAL

    monkeypatch.setattr(dispatch, "choose", pick)
    w = block_weight(rng, 32, 20, 0.5)
    mat = pack_bsr(w, (4, 1))
    x = rng.standard_normal((70, 20)).astype(np.float32)
    for xb in (x, x[:1]):
        bsr_matmul(mat, xb)  # first call per shape: the (spied) measurement picks
        np.testing.assert_allclose(bsr_matmul(mat, xb), _dense(w, xb), rtol=1e-5, atol=1e-4)
    assert seen == [["bsr4", "bsr4" + dispatch.SERIAL]] * 2
    assert set(dispatch.kernel_choices(mat)) == {("bt", 70, 2), ("b", 1, 2)}


def test_other_block_shapes_keep_the_plain_loop(rng):
    w = rng.standard_normal((8, 12)).astype(np.float32)
    w[:, 4:8] = 0
    for block in ((1, 4), (4, 4), (2, 2)):
        mat = pack_bsr(w, block)
        for batch in (1, 70):
            x = rng.standard_normal((batch, 12)).astype(np.float32)
            np.testing.assert_allclose(bsr_matmul(mat, x), _dense(w, x), rtol=1e-5, atol=1e-5)


def test_the_wrong_matrix_kind_is_named():
    w = np.eye(8, dtype=np.float32)
    x = np.ones((2, 8), np.float32)
    with pytest.raises(
        TypeError, match=r"mat: expected a BSRMatrix \(from pack_bsr\), got CSRMatrix"
    ):
        bsr_matmul(csr.pack_csr(w), x)
    with pytest.raises(TypeError, match=r"mat: expected a CSRMatrix .* goes to bsr_matmul"):
        csr.csr_matmul(pack_bsr(w, (4, 1)), x)
    with pytest.raises(TypeError, match="mat: expected a CSRMatrix"):
        csr.csr_matmul_t(pack_bsr(w, (4, 1)), x.T)
