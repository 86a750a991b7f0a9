"""Sparse modules called from several Python threads at once, with default thread settings."""

from __future__ import annotations

import os
import sys
import threading

import numba
import numpy as np
import pytest

from nbcompress.kernels import conv, dispatch, threads
from tests.helpers import child_env, child_json


@pytest.mark.skipif(sys.platform == "win32", reason="signals: the abort is a POSIX SIGABRT")
def test_four_threads_share_sparse_modules_without_abort_or_wrong_output():
    # The suite's own process has one numba thread (conftest), where the pool is never
    # entered: the concurrent calls run in a process with the default settings (one
    # numba and torch thread per core), as in a user's notebook.
    unset = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")  # conftest's
    outcome = child_json(["-m", "tests.kernels.concurrent_calls"], child_env(unset))
    assert outcome["raised"] == []
    if (os.cpu_count() or 1) > 1:
        assert outcome["threads"] > 1  # the pool was really in play
    # Against the same modules on one thread: kernels may sum in another order (and the
    # int8 ones compute the same dequantized product), nothing more.
    assert max(outcome["errors"].values()) < 1e-5, outcome["errors"]


def _spy_kernel() -> tuple[dispatch.Kernel, list[str]]:
    ran: list[str] = []
    kernel = dispatch.Kernel("spy", lambda: ran.append("pool"), lambda: ran.append("serial"))
    return kernel, ran


def test_a_busy_pool_runs_the_serial_twin_instead_of_waiting(monkeypatch):
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)  # the suite's pool has one
    kernel, ran = _spy_kernel()
    kernel.run((), n=2)
    with threads.POOL:  # another Python thread's kernel is on the pool
        kernel.run((), n=2)
    kernel.run((), n=2)
    kernel.run((), n=1)
    assert ran == ["pool", "serial", "pool", "serial"]
    assert not threads.POOL.locked()


def test_the_pool_is_released_when_a_kernel_raises(monkeypatch):
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    kernel = dispatch.Kernel("raises", lambda: 1 / 0, lambda: None)
    with pytest.raises(ZeroDivisionError):
        kernel.run((), n=2)
    assert not threads.POOL.locked()


def test_serial_applies_to_its_own_python_thread_only(monkeypatch):
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 2)  # no kernel runs here
    monkeypatch.setitem(threads._STATE, "threads", 2)
    inside, seen = threading.Event(), []

    def other() -> None:
        inside.wait()
        seen.append(threads.get_threads())

    worker = threading.Thread(target=other)
    worker.start()
    with threads.serial():
        inside.set()
        worker.join()
        assert threads.get_threads() == 1 and threads.in_serial()
    assert seen == [2]  # a measurement's serial twins elsewhere left this thread alone
    assert threads.get_threads() == 2 and not threads.in_serial()


def test_scratch_buffers_are_per_layout_per_thread_and_bounded():
    a = conv.shared_scratch("image", 64, (1, 2, 30))
    a[:] = 1  # a stale image
    b = conv.shared_scratch("image", 64, (1, 6, 14))  # same length, another layout
    assert b is not a and not b.any()
    assert conv.shared_scratch("image", 64, (1, 2, 30)) is a
    other: list[np.ndarray] = []
    worker = threading.Thread(
        target=lambda: other.append(conv.shared_scratch("image", 64, (1, 2, 30)))
    )
    worker.start()
    worker.join()
    assert other[0] is not a and not other[0].any()  # a thread of its own, its own buffers
    for i in range(2 * conv.SHARED_KEEP):
        conv.shared_scratch("image", 64, (i,))
    keys = [k for k in conv.shared_scratch_keys() if k[0] == "image"]
    assert len(keys) == conv.SHARED_KEEP  # the most recently used
    assert keys[-1] == ("image", 64, (2 * conv.SHARED_KEEP - 1,))
