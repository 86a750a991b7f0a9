"""Sparse int8 kernels on several threads (``_int8_tasks.py``): the same bits as one thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from nbcompress.kernels import _gomp, _int8_tasks, cpu, dispatch, tuning
from nbcompress.kernels import int8 as int8_mod
from nbcompress.kernels._epilogue import ACTIVATIONS
from nbcompress.kernels._int8_kernels import quantize_into
from nbcompress.kernels.cpu import forced_int8_cpu
from nbcompress.kernels.formats import pack_bsr, pack_csr
from nbcompress.kernels.int8 import LANES, int8_matmul, sliced
from nbcompress.kernels.modules import SparseLinear
from nbcompress.kernels.threads import using

HAS_VNNI = {"avx512_vnni", "avx512bw", "avx512vl"} <= cpu._cpu_flags()
PATHS = ["portable", pytest.param("vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="no VNNI"))]
needs_gomp = pytest.mark.skipif(not _gomp.available(), reason="torch does not run on GNU OpenMP")


def _mat(fmt: str, m: int, k: int, seed: int = 0, density: float = 0.15):
    rng = np.random.default_rng(seed)
    blk = 4 if fmt == "bsr_int8" else 1
    keep = rng.random((m // blk, k)) < density
    keep[::5] = False  # empty rows (blocks)
    keep[: m // blk // 3, ::2] = False  # shorter rows up front: the parts differ in rows
    w = rng.standard_normal((m, k)).astype(np.float32) * np.repeat(keep, blk, axis=0)
    return pack_bsr(w, (4, 1), int8=True) if blk == 4 else pack_csr(w, int8=True)


def _inputs(n: int, k: int, m: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * 2).astype(np.float32)
    return x, rng.standard_normal(m).astype(np.float32)


def _one_thread(mat, x, bias, path=None) -> np.ndarray:
    with using(1):
        return int8_matmul(mat, x, bias, path)


@pytest.fixture(autouse=True)
def _threads_allowed(threads_allowed) -> None:
    """Every test here may ask for more than the session's one thread."""


@needs_gomp
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
@pytest.mark.parametrize("n", [1, 2, 8, 17, 64])
def test_two_threads_return_the_bits_of_one(openmp, fmt, path, n):
    mat = _mat(fmt, 200, 300)
    x, bias = _inputs(n, 300, 200)
    ref = _one_thread(mat, x, bias, path)
    lay = sliced(mat, 2)
    got = np.full((200, n), np.nan, dtype=np.float32)  # a task that never ran shows
    with using(2):
        if n == 1:
            int8_mod._on_threads((lay, x[0].copy(), False, bias, got[:, 0], None, 0), 2)
        else:
            int8_mod._on_threads((lay, x, False, bias, got, path, 0), 2)
    assert np.array_equal(got.T, ref)
    # The previous layer's output (transposed) is quantized in place: the same bits.
    with using(2):
        assert np.array_equal(int8_matmul(mat, np.asfortranarray(x), bias, path), ref)
    # Through the public product, on the parallel choice and on the race's.
    dispatch.set_choices(mat, {("i8", n, 2): "sliced"})
    with using(2):
        assert np.array_equal(int8_matmul(mat, x, bias, path), ref)
    dispatch.set_choices(mat, {})
    with using(2), tuning.eager():
        assert np.array_equal(int8_matmul(mat, x, bias, path), ref)  # raced on first use
    assert dispatch.kernel_choices(mat)[("i8", n, 2)] in ("sliced", "sliced" + dispatch.SERIAL)


@needs_gomp
@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
def test_three_threads_on_two_cores_run_every_task_once(openmp, fmt):
    mat = _mat(fmt, 136, 70, seed=3)
    x, bias = _inputs(9, 70, 136)
    ref = _one_thread(mat, x, bias, "portable")
    got = np.full((136, 9), np.nan, dtype=np.float32)
    with using(3):
        int8_mod._on_threads((sliced(mat, 3), x, False, bias, got, "portable", 0), 3)
    assert np.array_equal(got.T, ref)


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
def test_without_a_pool_two_threads_run_serially_with_the_same_bits(monkeypatch, fmt, vnni):
    # NBCOMPRESS_OPENMP=0 (or no GNU OpenMP): _gomp.available() is False.
    mat = _mat(fmt, 120, 90, seed=2)
    x, bias = _inputs(17, 90, 120)
    with forced_int8_cpu(vnni):
        ref = _one_thread(mat, x, bias)
        monkeypatch.setattr(_gomp, "available", lambda: False)
        with using(2):
            assert np.array_equal(int8_matmul(mat, x, bias), ref)
            assert np.array_equal(int8_matmul(mat, x[:1], bias), _one_thread(mat, x[:1], bias))
    assert ("i8", 17, 2) not in dispatch.kernel_choices(mat)  # nothing to choose


@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_each_part_holds_a_range_of_rows_sorted_by_length(fmt, parts):
    mat = _mat(fmt, 400, 64, seed=4)
    lay = sliced(mat, parts)
    assert sliced(mat, parts) is lay
    blocks = _gomp.BLOCKS_PER_PART
    assert lay.bounds.shape == (parts * blocks + 1,) and lay.bounds[0] == 0
    assert np.all(np.diff(lay.bounds) >= 0) and lay.bounds[-1] == lay.sptr.shape[0] - 1
    count = np.diff(mat.indptr)
    seen = []
    for q in range(parts):
        lanes = lay.perm[lay.bounds[q * blocks] * LANES : lay.bounds[(q + 1) * blocks] * LANES]
        rows = lanes[lanes >= 0]
        if rows.size:
            # A contiguous range (starting at a multiple of 16), longest rows first.
            assert sorted(rows) == list(range(rows.min(), rows.max() + 1))
            assert rows.min() % LANES == 0
            assert list(count[rows]) == sorted(count[rows], reverse=True)
        seen += rows.tolist()
    assert sorted(seen) == list(range(mat.indptr.shape[0] - 1))


def _layer(fmt: str) -> SparseLinear:
    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    with torch.no_grad():
        keep = torch.rand(48, 256) < 0.1
        blocks = fmt == "bsr_int8"  # 4 × 1 blocks, else element-wise
        lin.weight.mul_(keep.repeat_interleave(4, dim=0) if blocks else keep.repeat(4, 1))
    return SparseLinear.from_dense(lin.eval(), format=fmt)


@pytest.mark.parametrize("fmt", ["csr_int8_dynamic", "bsr_int8"])
def test_python_threads_may_call_one_layer_at_once(fmt):
    # Four Python threads on one layer at 2 threads each: one launches on the pool at a
    # time, the others run serially (threads.POOL); every result is the one-thread one.
    layer = _layer(fmt)
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(n, 256, generator=gen) for n in (1, 3, 8, 17, 64) * 4]
    with torch.no_grad(), using(1):
        refs = [layer(x) for x in inputs]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad(), using(2):
                for _ in range(10):
                    for j in range(i, len(inputs), 4):
                        assert torch.equal(layer(inputs[j]), refs[j])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("n", [2, 8, 13, 64])
def test_a_transposed_batch_is_quantized_to_the_same_bytes(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 37)) * 3).astype(np.float32)
    x[0] = 0  # a zero row: scale 1, zero point 0
    x[1] = np.abs(x[1])  # no negative values: zero point 0
    nchunk = (n + 7) // 8
    row, col = (np.zeros(nchunk * 37 + nchunk * 8, np.uint64) for _ in range(2))
    quantize_into(x, False, row)
    quantize_into(np.ascontiguousarray(x.T), True, col)
    assert np.array_equal(row, col)


@needs_gomp
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
@pytest.mark.parametrize(("kdim", "rows"), [(100, 128), (300, 128), (300, 8)])
def test_the_previous_layers_output_quantized_on_the_threads_gives_the_bits_of_one(
    openmp, monkeypatch, fmt, path, kdim, rows
):
    # A (K × N) input (the previous layer's output transposed), N a multiple of 8, is
    # quantized inside the region in pieces of `rows` input rows: 1, 2 and 16 pieces.
    monkeypatch.setattr(_int8_tasks, "PIECE_ROWS", rows)
    mat = _mat(fmt, 200, kdim, seed=kdim)
    gelu = ACTIVATIONS["gelu"]
    for n in (8, 64):
        x, bias = _inputs(n, kdim, 200, seed=n)
        x[:, :7] = 0  # rows of zeros at the start of the first piece
        with using(1):
            ref = int8_matmul(mat, x, bias, path, act=gelu)
        xt = np.ascontiguousarray(x.T)
        for threads in (2, 3):  # 3 on 2 cores: a worker may come late or not at all
            got = np.full((200, n), np.nan, dtype=np.float32)
            with using(threads):
                args = (sliced(mat, threads), xt, True, bias, got, path, gelu)
                int8_mod._on_threads(args, threads)
            assert np.array_equal(got.T, ref)
        dispatch.set_choices(mat, {("i8", n, 2): "sliced"})
        with using(2):  # through the public product, twice (the prepared launch again)
            for _ in range(2):
                assert np.array_equal(int8_matmul(mat, xt.T, bias, path, act=gelu), ref)


@needs_gomp
@pytest.mark.parametrize("n", [1, 8])
def test_a_layer_called_with_new_views_of_its_bias_prepares_one_launch(n):
    # A module passes a new numpy view of its bias on every call: the prepared launches
    # are kept per bias memory, not per view (else one more per call, never freed).
    mat = _mat("bsr_int8", 64, 96)
    x, bias = _inputs(n, 96, 64)
    held = torch.from_numpy(bias)
    dispatch.set_choices(mat, {("i8", n, 2): "sliced"})
    with using(2):
        results = [int8_matmul(mat, x, held.numpy()) for _ in range(3)]
    assert all(np.array_equal(r, results[0]) for r in results)
    assert len(sliced(mat, 2).__dict__["_jobs"]) == 1
