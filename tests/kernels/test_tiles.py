"""The 64-column tile kernel (``tile64``) and the measured choice between it and the panels."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from nbcompress.kernels import (
    _generated_kernels,
    _numba,
    csr,
    csr_matmul,
    csr_matmul_t,
    dispatch,
    layouts,
    pack_csr,
)
from nbcompress.kernels._epilogue import NO_BIAS
from nbcompress.kernels.layouts import block_rows
from nbcompress.kernels.modules import SparseConv2d
from tests.kernels.reference import csr_product, sparse_weight


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _tiles(mat, xt: np.ndarray, kblk: int | None = None) -> np.ndarray:
    out = np.full((mat.shape[0], xt.shape[1]), np.nan, dtype=np.float32)
    csr.run_tiles(mat, np.ascontiguousarray(xt), out, kblk)
    return out


def _reference(mat, xt: np.ndarray) -> np.ndarray:
    return csr_product(mat.indptr, mat.indices, mat.data, mat.scale, xt.T).T


# Columns: one tile (64); two tiles + 2 leftover (130, via csr_cols); three tiles + one
# 8-panel (200); tiles + a 16-panel + 8-panel + 3 leftover (91).
@pytest.mark.parametrize("n", [64, 91, 130, 200])
@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("int8", [False, True])
def test_tiles_match_reference_and_dense(rng, n, density, int8):
    w = sparse_weight(rng, 37, 50, density)
    xt = rng.standard_normal((50, n)).astype(np.float32)
    mat = pack_csr(w, int8=int8)
    y = _tiles(mat, xt)
    np.testing.assert_allclose(y, _reference(mat, xt), rtol=1e-5, atol=1e-4)
    if not int8:
        np.testing.assert_allclose(y, (torch.from_numpy(w) @ torch.from_numpy(xt)).numpy(),
                                   rtol=1e-5, atol=1e-4)  # fmt: skip


# Blocks of 7 input rows over 50: seven full blocks and a stub of one row.
@pytest.mark.parametrize("kblk", [7, 16, 49, 50, 1000])
@pytest.mark.parametrize("int8", [False, True])
def test_k_blocked_tiles_match_reference(rng, kblk, int8):
    w = sparse_weight(rng, 37, 50, 0.3)
    w[:, 14:21] = 0  # a block with no nonzeros at all
    xt = rng.standard_normal((50, 91)).astype(np.float32)
    mat = pack_csr(w, int8=int8)
    np.testing.assert_allclose(_tiles(mat, xt, kblk), _reference(mat, xt), rtol=1e-5, atol=1e-4)


def test_blocked_copy_is_the_same_matrix_grouped_by_block(rng):
    mat = pack_csr(sparse_weight(rng, 9, 20, 0.5))
    indptr, indices, data, nkb = block_rows(mat, 8)
    assert nkb == 3 and indptr.shape == (3 * 9 + 1,) and indptr[-1] == mat.nnz
    for kb in range(nkb):
        for i in range(9):
            seg = slice(indptr[kb * 9 + i], indptr[kb * 9 + i + 1])
            row = slice(mat.indptr[i], mat.indptr[i + 1])
            in_block = (mat.indices[row] // 8) == kb
            np.testing.assert_array_equal(indices[seg], mat.indices[row][in_block])
            np.testing.assert_array_equal(data[seg], mat.data[row][in_block])
    assert block_rows(mat, 8)[0] is indptr  # built once per weight and block size
    assert block_rows(mat, 20)[0] is mat.indptr  # one block: the matrix itself


def test_tiles_edge_shapes(rng):
    xt1 = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(_tiles(pack_csr(np.array([[3.0]], np.float32)), xt1), 3.0 * xt1)
    zeros = pack_csr(np.zeros((6, 9), np.float32))
    assert zeros.nnz == 0
    y = _tiles(zeros, rng.standard_normal((9, 70)).astype(np.float32))
    assert y.shape == (6, 70) and not y.any()  # every row written, none left NaN
    assert _tiles(pack_csr(np.zeros((0, 9), np.float32)), np.ones((9, 64), np.float32)).size == 0


def test_tiles_with_in_features_above_65535(rng):
    w = sparse_weight(rng, 5, 70000, 0.001)
    xt = rng.standard_normal((70000, 64)).astype(np.float32)
    mat = pack_csr(w)
    assert mat.indices.dtype == np.uint32
    np.testing.assert_allclose(_tiles(mat, xt), _reference(mat, xt), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_tiles(mat, xt, 30000), _reference(mat, xt), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kblk", [30, 8])
def test_parallel_tile_kernel_matches_serial_with_balanced_blocks(rng, kblk):
    w = sparse_weight(rng, 45, 30, 0.3)
    w[:10] = rng.standard_normal((10, 30))  # dense rows: blocks by nonzeros, not by rows
    mat = pack_csr(w)
    xt = rng.standard_normal((30, 128)).astype(np.float32)
    bounds = dispatch.row_bounds(mat.indptr, 4)
    assert bounds[0] == 0 and bounds[-1] == 45 and np.all(np.diff(bounds) > 0)
    per_block = np.diff(mat.indptr[bounds])
    assert per_block.max() <= mat.nnz / 4 + np.diff(mat.indptr).max()
    assert np.diff(bounds)[0] < 45 / 4  # the dense rows make the first block short
    outs = []
    indptr, indices, data, nkb = block_rows(mat, kblk)
    args = (indptr, indices, data, mat.scale, xt.reshape(-1), 128, 128)
    with _numba.slp_enabled():  # as the wrappers compile them: numba caches the first build
        tile64 = dispatch.TILE64
        assert (tile64.parallel, tile64.serial) == (
            _generated_kernels.tile64,
            _generated_kernels.tile64_1,
        )
        for kernel, b in ((tile64.parallel, bounds), (tile64.serial, bounds[[0, -1]])):
            out = np.zeros((45, 128), dtype=np.float32)
            kernel(*args, out.reshape(-1), 0, 2, b, nkb, kblk if nkb > 1 else 0, NO_BIAS, 0)
            outs.append(out)
    np.testing.assert_allclose(outs[0], w @ xt, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_public_products_choose_once_and_stay_correct(rng, monkeypatch):
    monkeypatch.setattr(layouts, "KBLOCK", 16)  # K = 60: the K-blocked tiles compete too
    w = sparse_weight(rng, 40, 60, 0.2)
    mat = pack_csr(w)
    big = rng.standard_normal((60, 150)).astype(np.float32)
    x = big.T[::2]  # (75, 60), not contiguous: the tiles transpose it themselves
    assert not x.flags.c_contiguous and not x.flags.f_contiguous
    want = _reference(mat, np.ascontiguousarray(x.T)).T
    for _ in range(2):  # first call measures both kernels, the second reuses the choice
        np.testing.assert_allclose(csr_matmul(mat, x), want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(csr_matmul_t(mat, big), _reference(mat, big), atol=1e-4)
    choices = dispatch.kernel_choices(mat)
    assert set(choices) == {("x", 75, 1), ("t", 150, 1)}
    assert set(choices.values()) <= {"panels", "tiles", "kblocks"}
    assert dispatch.kernel_choices(pack_csr(w)) == {}  # per weight, not global


def test_a_recorded_choice_is_the_only_kernel_run(rng):
    mat = pack_csr(sparse_weight(rng, 8, 8, 0.5))
    calls: list[str] = []
    options = {"panels": lambda: calls.append("panels"), "tiles": lambda: calls.append("tiles")}
    dispatch.fastest(mat, ("t", 64), options)
    chosen = dispatch.kernel_choices(mat)[("t", 64, 1)]
    # Warm-up + seven timed rounds each, then the chosen one again: the options share one
    # output, and the choosing call must return what later calls return.
    assert calls.count("panels") + calls.count("tiles") == 17 and calls.count(chosen) == 9
    assert calls[-1] == chosen
    calls.clear()
    dispatch.fastest(mat, ("t", 64), options)
    assert calls == [chosen]


@pytest.mark.parametrize("slow", ["panels", "tiles"])
def test_the_clearly_faster_option_is_chosen(rng, slow):
    mat = pack_csr(sparse_weight(rng, 8, 8, 0.5))
    nap = lambda: time.sleep(0.002)  # noqa: E731 - ~1000× a no-op, far beyond any noise
    dispatch.fastest(mat, ("x", 64), {"panels": lambda: None, "tiles": lambda: None} | {slow: nap})
    assert dispatch.kernel_choices(mat) == {("x", 64, 1): "tiles" if slow == "panels" else "panels"}


@pytest.mark.parametrize("choice", ["panels", "tiles", "kblocks"])
def test_sparse_conv_matches_dense_with_each_kernel(rng, choice, monkeypatch):
    monkeypatch.setattr(layouts, "KBLOCK", 16)  # K = 54 input rows: four blocks
    conv = nn.Conv2d(6, 10, 3, stride=1, padding=1, dilation=1, bias=True)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.7] = 0
    x = torch.randn(2, 6, 9, 9)  # 81 output columns: one tile + a 16-panel + leftovers
    sparse = SparseConv2d(conv)
    dispatch.set_choices(sparse.matrix(), {("conv", 2, 6, 9, 9, 1): choice})
    with torch.no_grad():
        want = conv(x)
        got = sparse(x)
    assert dispatch.kernel_choices(sparse.matrix()) == {("conv", 2, 6, 9, 9, 1): choice}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 768), (70, 200), (1, 1), (9, 0)])
def test_transpose_matches_numpy(rng, shape):
    big = rng.standard_normal((shape[1], 2 * shape[0])).astype(np.float32)
    x = big.T[::2]  # strided, neither C- nor F-contiguous
    xt = np.full((shape[1], shape[0]), np.nan, dtype=np.float32)
    _numba.transpose(x, xt)
    np.testing.assert_array_equal(xt, x.T)
