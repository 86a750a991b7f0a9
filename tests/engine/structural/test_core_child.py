"""The bounded child process: results, one-line errors, timeouts, memory runaways, Ctrl-C."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from nbcompress.engine.structural.child import run_bounded


def _add(a, b):
    return a + b


def _fail():
    raise RuntimeError("unsupported construct: channel shuffle\nsecond line")


def _sleep():
    time.sleep(60)


def _hog():
    chunks = []
    while True:
        chunks.append(bytearray(16 << 20))  # touched: resident, not just reserved


def _torch_work(x):
    return (x @ x).sum().item()


def test_result_comes_back_from_the_child():
    assert run_bounded(_add, 2, 3) == 5


def test_child_uses_the_parents_objects_after_torch_used_threads():
    x = torch.randn(64, 64)
    x @ x  # the parent's thread pool exists: the child must still not hang
    assert run_bounded(_torch_work, x, timeout=30) == pytest.approx(float((x @ x).sum()))


def test_an_exception_comes_back_as_one_line_with_the_fix():
    with pytest.raises(ValueError) as info:
        run_bounded(_fail)
    text = str(info.value)
    assert "\n" not in text and "RuntimeError: unsupported construct" in text
    assert "layers=" in text and "ignore=" in text


def test_a_child_that_runs_too_long_is_stopped():
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"did not finish within 0.5 s.*timeout="):
        run_bounded(_sleep, timeout=0.5)
    assert time.monotonic() - start < 30
    assert not multiprocessing.active_children()


def test_a_memory_runaway_is_killed_and_the_parent_survives():
    with pytest.raises(ValueError, match=r"more than .* of extra memory.*memory="):
        run_bounded(_hog, memory=200 << 20, timeout=60)
    assert not multiprocessing.active_children()
    assert run_bounded(_add, 1, 1) == 2  # the parent still works


def test_ctrl_c_kills_the_child_and_is_reraised():
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_bounded(_sleep, timeout=30)
    finally:
        timer.cancel()
    assert not multiprocessing.active_children()
