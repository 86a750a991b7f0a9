"""Compile notices: one short line per user call on stdout, never a warning on stderr."""

from __future__ import annotations

import re
import threading
import time
import warnings

import numpy as np
import torch
from torch import nn

from nbcompress.kernels import dispatch, notices, registry
from nbcompress.kernels.modules import SparseLinear

LINE = re.compile(
    r"^nbcompress: (compiling sparse kernels, once per install|loading sparse kernels from "
    r"numba's cache, once per session): \d+\.\d s \(\d+ kernels?\)$"
)


def _slow_kernel(name: str, seconds: float) -> dispatch.Kernel:
    # A "kernel" whose first call (the one _invoke times) is slow, as a compilation.
    def run(*_: object) -> None:
        time.sleep(seconds)

    return dispatch.Kernel(name, run, run)


def test_nested_calls_print_one_line_at_the_outermost_exit(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all any more
        with notices.COMPILE_NOTICE:
            _slow_kernel("slow_a", 0.3).run((), ("f",), 1)
            with notices.COMPILE_NOTICE:
                _slow_kernel("slow_b", 0.3).run((), ("f",), 1)
            assert capsys.readouterr().out == ""  # the inner exit says nothing
        out, err = capsys.readouterr()
    assert err == ""
    assert len(out.splitlines()) == 1 and LINE.match(out.strip()), out
    assert "(2 kernels)" in out and "/" not in out  # no paths, no source lines


def test_a_second_call_of_a_signature_is_not_counted(capsys):
    kernel = _slow_kernel("slow_once", 0.6)
    with notices.COMPILE_NOTICE:
        kernel.run((), ("f",), 1)
    assert "(1 kernel)" in capsys.readouterr().out
    start = time.perf_counter()
    with notices.COMPILE_NOTICE:
        kernel.run((), ("f",), 1)  # the sleep still runs: it is no longer a first call
    assert time.perf_counter() - start >= 0.6
    assert capsys.readouterr().out == ""


def test_fast_loads_print_nothing(capsys):
    with notices.COMPILE_NOTICE:
        for i in range(3):
            _slow_kernel(f"quick_{i}", 0.01).run((), ("f",), 1)
    assert capsys.readouterr() == ("", "")


def test_a_quiet_session_collects_without_printing(capsys):
    with notices.CompileNotice(quiet=True), notices.COMPILE_NOTICE:
        _slow_kernel("slow_quiet", 0.6).run((), ("f",), 1)
        assert notices.session().kernels == 1
    assert capsys.readouterr() == ("", "")


def test_another_threads_compilation_is_not_reported_here(capsys):
    def other() -> None:
        with notices.CompileNotice(quiet=True):
            _slow_kernel("slow_other", 0.6).run((), ("f",), 1)

    with notices.COMPILE_NOTICE:
        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
        assert notices.session().kernels == 0
    assert capsys.readouterr() == ("", "")


def test_waiting_for_another_threads_compilation_counts_as_loading(capsys):
    started = threading.Event()
    holder = threading.Thread(target=_hold_lock, args=(started,))
    holder.start()
    started.wait()
    # The first call of a signature waits for the lock another thread's compilation holds.
    with notices.COMPILE_NOTICE:
        _slow_kernel("quick_after_wait", 0.0).run((), ("f",), 1)
    holder.join()
    out = capsys.readouterr().out
    assert out.startswith("nbcompress: loading sparse kernels") and "(1 kernel)" in out


def _hold_lock(started: threading.Event) -> None:
    with registry._FIRST_CALL:
        started.set()
        time.sleep(0.8)


def test_a_sparse_layer_called_directly_gets_its_own_session(capsys, monkeypatch):
    lin = nn.Linear(30, 20)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.2)
    sparse = SparseLinear.from_dense(lin)
    seen: list[int] = []
    real = notices.record

    def spy(seconds: float, compiled: bool) -> None:
        seen.append(notices.depth())
        real(seconds, compiled)

    monkeypatch.setattr(notices, "record", spy)
    monkeypatch.setattr(registry, "_COMPILED", set())  # every signature is a first call
    x = torch.randn(3, 30)
    with torch.no_grad():
        got, want = sparse(x), lin(x)
    assert seen and set(seen) == {1}  # counted in the layer's own session
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
