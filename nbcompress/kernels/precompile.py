"""Compile (or load from numba's disk cache) the common sparse kernels ahead of use.

:func:`warmup` runs every product on small synthetic weights with every kernel option
forced once (``dispatch.warming``: nothing is measured or recorded), on one thread and
on all of numba's threads, so both the serial and the parallel builds of each common
signature are ready: CSR fp32 and int8 and 4 × 1 blocks with 16-bit column indices, batch
1, panels, tiles, K-blocked tiles, the leftover columns, C- and F-ordered inputs, and
the convolutions (unfolded, direct, channel-blocked, 1 × 1).

In the background (``background=True``) it runs in a daemon thread that takes each
kernel's first call through the same per-signature lock as the user's calls, so a
foreground call waits at most for the one kernel being compiled, never races it. It
collects quietly (no output from another cell's thread), stops between kernels when the
interpreter exits, and a failure there only ends the warm-up.
"""

from __future__ import annotations

import atexit
import threading
import time
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from torch import nn

from nbcompress.kernels import dispatch, notices
from nbcompress.kernels.bsr import bsr_matmul
from nbcompress.kernels.csr import csr_matmul, csr_matmul_t
from nbcompress.kernels.formats import pack_bsr, pack_csr
from nbcompress.kernels.modules import SparseConv2d
from nbcompress.kernels.threads import using

__all__ = ["WarmUp", "warmup"]

#: Batches that reach every CSR kernel: the SpMV, panels of 16 and 8 plus leftover
#: columns, and 64-column tiles plus a panel tail.
_BATCHES = (1, 31, 78)
#: Input features above one K-block (``layouts.KBLOCK``), so the blocked kernels run too.
_IN, _OUT = 300, 64


@dataclass
class WarmUp:
    """The outcome of :func:`warmup` (for a background one, once ``done`` is set).

    Attributes:
        seconds: Wall-clock time of the warm-up.
        kernels: Kernel signatures first run by it (0: all were ready already).
        compiled: Of those, how many numba compiled rather than loaded from its disk cache.
        error: What stopped it, if anything.
        done: Set when it has finished (at once for a foreground one).
    """

    seconds: float = 0.0
    kernels: int = 0
    compiled: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the warm-up has finished; ``False`` if ``timeout`` passed first."""
        return self.done.wait(timeout)

    def line(self) -> str:
        """One line for the command line: the time and what it did."""
        if self.error:
            return f"nbcompress: warm-up stopped: {self.error}"
        what = f"{self.compiled} compiled, {self.kernels - self.compiled} loaded"
        return f"nbcompress: sparse kernels ready in {self.seconds:.1f} s ({what})"


_STOP = threading.Event()
_BACKGROUND: dict[str, tuple[threading.Thread, WarmUp]] = {}
_START = threading.Lock()


def warmup(background: bool = False, *, quiet: bool = False) -> WarmUp:
    """Compile or load the common sparse kernels now, so that first calls are fast.

    Args:
        background: Run in a daemon thread and return at once (one per process; a second
            call returns the running one), silently. Otherwise run here.
        quiet: In the foreground, do not print the one-line notice of
            :mod:`~nbcompress.kernels.notices` (the command line prints its own).

    Returns:
        The outcome; for a background warm-up, filled in when ``done`` is set.
    """
    if not background:
        result = WarmUp()
        with notices.CompileNotice(quiet=quiet):
            _run(result)
        return result
    with _START:
        running = _BACKGROUND.get("warmup")
        if running is not None:
            return running[1]
        result = WarmUp()
        thread = threading.Thread(
            target=_run, args=(result, True), name="nbcompress-warmup", daemon=True
        )
        _BACKGROUND["warmup"] = (thread, result)
        thread.start()
    return result


def _run(result: WarmUp, quiet: bool = False) -> None:
    start = time.perf_counter()
    try:
        with notices.CompileNotice(quiet=True), torch.no_grad(), dispatch.warming():
            try:
                for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
                    with using(threads):
                        for step in _steps():
                            if _STOP.is_set():
                                return
                            step()
            finally:
                got = notices.session()
                result.kernels, result.compiled = got.kernels, got.compiled
    except Exception as err:  # noqa: BLE001 - a warm-up failure must never reach the user's call
        result.error = f"{type(err).__name__}: {err}"
        if not quiet:
            raise
    finally:
        result.seconds = time.perf_counter() - start
        result.done.set()


def _steps() -> list:
    """One call per product and layout, on small seeded weights (about 90% zeros)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((_OUT, _IN)).astype(np.float32)
    w *= rng.random(w.shape) < 0.1
    blocks = np.repeat(rng.random((_OUT // 4, 1, _IN)) < 0.1, 4, axis=1).reshape(_OUT, _IN)
    mats = [pack_csr(w), pack_csr(w, int8=True)]
    bsr = pack_bsr(w * blocks, (4, 1))
    steps = []
    for b in _BATCHES:
        x = rng.standard_normal((b, _IN)).astype(np.float32)
        xf = np.asfortranarray(x)  # a sparse layer's output feeds the next one F-ordered
        for mat in mats:
            steps += [lambda m=mat, x=x: csr_matmul(m, x), lambda m=mat, x=xf: csr_matmul(m, x)]
            if b > 1:
                steps.append(lambda m=mat, x=x: csr_matmul_t(m, np.ascontiguousarray(x.T)))
        steps += [lambda x=x: bsr_matmul(bsr, x), lambda x=xf: bsr_matmul(bsr, x)]
    return steps + _conv_steps()


def _conv_steps() -> list:
    steps = []
    x = torch.randn(1, 32, 10, 10, generator=torch.Generator().manual_seed(0))
    for kernel, stride, fmt in ((3, 1, "csr"), (3, 2, "csr"), (1, 1, "csr"), (3, 1, "bsr")):
        conv = nn.Conv2d(32, 16, kernel, stride=stride, padding=kernel // 2)
        with torch.no_grad():
            conv.weight.mul_(torch.rand(conv.weight.shape).lt(0.1).float())
        sparse = SparseConv2d.from_dense(conv, format=fmt)
        steps.append(lambda m=sparse: m(x))
    return steps


def _stop_at_exit() -> None:
    # A daemon thread compiling while the interpreter tears down can crash it: ask the
    # warm-up to stop between kernels and give the current one time to finish.
    _STOP.set()
    running = _BACKGROUND.get("warmup")
    if running is not None and running[0].is_alive():
        running[0].join(timeout=60)


atexit.register(_stop_at_exit)
