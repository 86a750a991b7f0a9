"""A fused activation in the sparse int8 kernels (``int8.py``'s last pass, ``act``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nbcompress.kernels import _gomp, dispatch
from nbcompress.kernels import int8 as int8_mod
from nbcompress.kernels._epilogue import ACTIVATIONS
from nbcompress.kernels.cpu import forced_int8_cpu, sparse_int8_path
from nbcompress.kernels.formats import pack_bsr, pack_csr
from nbcompress.kernels.int8 import int8_matmul, sliced
from nbcompress.kernels.threads import using

ACTS = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh")}
# As tests/kernels/test_epilogue.py: our polynomial GELU and torch's float32 one are each
# ~1.2e-6 from the exact GELU; a wrong coefficient or a missing bias shifts far more.
ATOL = 1e-5
needs_gomp = pytest.mark.skipif(not _gomp.available(), reason="torch does not run on GNU OpenMP")


def _mat(fmt: str, m: int = 200, k: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    blk = 4 if fmt == "bsr_int8" else 1
    keep = rng.random((m // blk, k)) < 0.15
    keep[::5] = False  # empty rows (blocks): their outputs are act(bias)
    w = rng.standard_normal((m, k)).astype(np.float32) * np.repeat(keep, blk, axis=0)
    return pack_bsr(w, (4, 1), int8=True) if blk == 4 else pack_csr(w, int8=True)


def _inputs(n: int, bias: bool, seed: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 300)).astype(np.float32)  # outputs spread over ±10: clamps too
    return x, (rng.standard_normal(200).astype(np.float32) * 2 if bias else None)


@pytest.fixture(autouse=True)
def _threads_allowed(threads_allowed) -> None:
    """Every test here may ask for more than the session's one thread."""


@needs_gomp
@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
@pytest.mark.parametrize("n", [1, 2, 8, 17, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh"])
def test_the_fused_activation_is_the_activation_of_the_plain_product(
    openmp, name, bias, n, fmt, vnni
):
    mat = _mat(fmt)
    x, b = _inputs(n, bias)
    act = ACTIVATIONS[name]
    with forced_int8_cpu(vnni), using(1):
        path = sparse_int8_path()
        plain = int8_matmul(mat, x, b)
        one = int8_matmul(mat, x, b, act=act)
    expected = ACTS[name](torch.from_numpy(np.ascontiguousarray(plain)))
    fused = torch.from_numpy(np.ascontiguousarray(one))
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=ATOL)
    assert np.abs(plain).max() > 4  # the values reach the polynomials' clamps
    # Two threads: every task on the pool, then through the public product: the same bits.
    bias_array = int8_mod.sliced(mat, 1).zeros if b is None else b
    got = np.full((200, n), np.nan, dtype=np.float32)  # a task that never ran shows
    with using(2):
        lay = sliced(mat, 2)
        if n == 1:
            int8_mod._on_threads((lay, x[0].copy(), False, bias_array, got[:, 0], None, act), 2)
        else:
            int8_mod._on_threads((lay, x, False, bias_array, got, path, act), 2)
        assert np.array_equal(got.T, one)
        dispatch.set_choices(mat, {("i8", n, 2): "sliced"})
        with forced_int8_cpu(vnni):
            assert np.array_equal(int8_matmul(mat, x, b, act=act), one)
            # The previous layer's output (transposed), as in a model: the same bits.
            assert np.array_equal(int8_matmul(mat, np.asfortranarray(x), b, act=act), one)


@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
def test_no_activation_leaves_the_product_unchanged(fmt):
    mat = _mat(fmt, seed=2)
    x, b = _inputs(9, True, seed=3)
    with using(1):
        assert np.array_equal(int8_matmul(mat, x, b, act=0), int8_matmul(mat, x, b))
        relu = int8_matmul(mat, x, b, act=ACTIVATIONS["relu"])
    assert np.array_equal(relu, np.maximum(int8_matmul(mat, x, b), 0))  # exact for ReLU
    assert (relu == 0).any() and (relu > 0).any()
