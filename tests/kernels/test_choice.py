"""The measured kernel choice: serial twins compete when more than one thread is set.

The test process has one numba thread (conftest), so "two threads" is simulated: the
choice code sees 2, and the kernels themselves run on one (the parallel kernels' own
correctness is tested directly in test_csr/test_spmv/test_tiles).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from nbcompress.kernels import csr_matmul, dispatch, pack_csr, set_threads, threads
from nbcompress.kernels.threads import get_threads, serial
from tests.kernels.reference import sparse_weight


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(dispatch, "get_threads", lambda: 1 if threads.in_serial() else 2)


@pytest.fixture
def spy(monkeypatch):
    """Record the options each measurement is offered and the threads each kernel ran on."""
    seen: dict[str, list] = {"offered": [], "threads": []}
    real_run = dispatch.Kernel.run

    def run(kernel, args, dtypes=(), n=None):
        seen["threads"].append(n or dispatch.get_threads())
        with serial():  # the process has one numba thread
            real_run(kernel, args, dtypes)

    def pick(options):
        seen["offered"].append(list(options))
        for fn in options.values():
            fn()
        return seen["pick"] if seen.get("pick") in options else next(iter(options))

    monkeypatch.setattr(dispatch.Kernel, "run", run)
    monkeypatch.setattr(dispatch, "choose", pick)
    return seen


def test_serial_resets_after_an_error_and_nests(monkeypatch):
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 2)  # no kernel runs here
    monkeypatch.setitem(threads._STATE, "threads", 2)
    with pytest.raises(RuntimeError), serial():
        with serial():
            assert get_threads() == 1
        assert get_threads() == 1
        raise RuntimeError
    assert get_threads() == 2


@pytest.mark.parametrize(
    ("batch", "offered"),
    [
        (1, ["spmv", "spmv8", "spmv ×1", "spmv8 ×1"]),
        (8, ["panels", "panels ×1"]),
        (64, ["panels", "tiles", "kblocks", "panels ×1", "tiles ×1", "kblocks ×1"]),
    ],
)
def test_two_threads_offer_every_kernel_on_one_thread_too(rng, spy, two_threads, batch, offered):
    w = sparse_weight(rng, 40, 300, 0.2)
    mat = pack_csr(w)
    x = rng.standard_normal((batch, 300)).astype(np.float32)
    spy["pick"] = offered[-1]
    y = csr_matmul(mat, x)
    assert spy["offered"] == [offered]
    assert dispatch.kernel_choices(mat) == {("v" if batch == 1 else "x", batch, 2): offered[-1]}
    # Later calls replay the recorded serial choice: every kernel runs on one thread.
    spy["threads"].clear()
    y2 = csr_matmul(mat, x)
    assert spy["threads"] and set(spy["threads"]) == {1}
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(y2, y)


def test_a_parallel_choice_runs_on_the_pool(rng, spy, two_threads):
    mat = pack_csr(sparse_weight(rng, 40, 30, 0.2))
    x = rng.standard_normal((8, 30)).astype(np.float32)
    spy["pick"] = "panels"
    csr_matmul(mat, x)
    spy["threads"].clear()
    csr_matmul(mat, x)
    assert set(spy["threads"]) == {2}


def test_one_thread_offers_no_twins_and_skips_measuring_a_single_kernel(rng, spy):
    set_threads(1)
    try:
        mat = pack_csr(sparse_weight(rng, 40, 30, 0.2))
        csr_matmul(mat, rng.standard_normal((1, 30)).astype(np.float32))
        csr_matmul(mat, rng.standard_normal((8, 30)).astype(np.float32))
    finally:
        set_threads(None)
    assert spy["offered"] == [["spmv", "spmv8"]]  # batch 8: one kernel, nothing to time
    assert dispatch.kernel_choices(mat) == {("v", 1, 1): "spmv", ("x", 8, 1): "panels"}


@pytest.mark.parametrize("count", [1, 2, 3, 4, 6])
def test_the_choice_times_every_option_alike(count):
    calls: list[str] = []
    names = [f"k{i}" for i in range(count)]
    options = {name: (lambda name=name: calls.append(name)) for name in names}
    assert dispatch.choose(options) in names
    assert all(calls.count(name) == 8 for name in names)  # warm-up + seven timed rounds
