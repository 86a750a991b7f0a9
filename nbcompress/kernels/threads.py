"""Thread count and threading layer of the numba kernels, kept in step with torch.

Two OpenMP runtimes (torch's bundled libgomp and the one numba's ``omp`` layer loads)
that both spin while waiting made the kernels 13–50× slower here. So, unless the user
chose otherwise, importing :mod:`nbcompress.kernels`:

* asks for numba's ``workqueue`` layer (plain worker threads that sleep, never spin)
  when no layer was chosen through ``NUMBA_THREADING_LAYER`` or ``numba.config``;
* sets ``OMP_WAIT_POLICY=PASSIVE`` only if the variable is unset (it only affects
  OpenMP runtimes that are not loaded yet).

The number of threads follows ``torch.get_num_threads()`` at every call unless fixed
with :func:`set_threads`. With one thread the kernels' serial twins run and no pool is
involved. With more, the tile, panel and SpMV kernels run on torch's own OpenMP threads
where torch uses GNU OpenMP (``_gomp.py``: no second pool, no wake-up per layer); the
other kernels, and every kernel elsewhere, on numba's pool.

Concurrent callers. The ``workqueue`` pool aborts the whole process (SIGABRT) when two
Python threads launch work on it at once. So the pool has one entry,
:data:`POOL`: a caller that finds it busy runs the serial twin of its kernel
on its own thread instead of waiting (the registry in ``dispatch.py`` has a serial twin
for every parallel kernel). Any number of Python threads may then call the sparse
modules at once, whatever the threading layer; with two cores, four Python threads
already keep both busy without the pool. :func:`serial` is per Python thread, so one
thread's measurement of the serial twins never changes another's thread count.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import numba
import torch

__all__ = [
    "POOL",
    "configure_threading",
    "get_threads",
    "in_serial",
    "serial",
    "set_threads",
    "using",
]

_STATE: dict[str, int | None] = {"threads": None}


class _PerThread(threading.local):
    # Per Python thread: depth of serial() blocks being run. A class attribute, so that a
    # thread that never entered one reads 0 without a failed lookup (~1 µs per call).
    depth = 0
    threads = 0  # fixed for this Python thread by using() (0: not fixed)


_LOCAL = _PerThread()
#: Held while a kernel runs on numba's pool; taken without waiting (``POOL.acquire(False)``):
#: a caller that finds it held runs the serial twin (see "Concurrent callers" above).
POOL = threading.Lock()


def configure_threading() -> None:
    """Pick a non-spinning threading layer and wait policy, respecting user choices."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    chosen = os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER
    if chosen in (None, "", "default"):
        numba.config.THREADING_LAYER = "workqueue"


def set_threads(n: int | None) -> None:
    """Fix the number of threads the sparse kernels use (``None``: follow torch).

    Args:
        n: Threads, at least 1; capped at numba's pool size (``NUMBA_NUM_THREADS``).
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n: expected a positive integer or None, got {n!r}.")
    _STATE["threads"] = n


class _Serial:
    # A plain context manager, not contextlib's: a recorded serial-twin choice enters one
    # per layer call, and the generator-based one cost ~2 µs of each.
    def __enter__(self) -> None:
        _LOCAL.depth += 1

    def __exit__(self, *exc: object) -> None:
        _LOCAL.depth -= 1


_SERIAL = _Serial()


def serial() -> contextlib.AbstractContextManager[None]:
    """Run the kernels this Python thread calls inside on one thread, then restore.

    Used by the measured kernel choice: at batch 1 waking a second worker cost more than
    it saved here (a 3072×768 SpMV at 90% took 159 µs on one thread, 349 µs on two).
    Other Python threads are not affected.
    """
    return _SERIAL


@contextlib.contextmanager
def using(n: int) -> Iterator[None]:
    """Run the kernels this Python thread calls inside on ``n`` threads, then restore.

    Like :func:`set_threads` but for one Python thread only (the background warm-up
    builds the parallel kernels without changing what the user's threads run on).
    """
    old = _LOCAL.threads
    _LOCAL.threads = max(1, int(n))
    try:
        yield
    finally:
        _LOCAL.threads = old


def in_serial() -> bool:
    """Whether this Python thread is inside a :func:`serial` block."""
    return bool(_LOCAL.depth)


def get_threads() -> int:
    """Number of threads the next kernel call will use."""
    if _LOCAL.depth:
        return 1
    wanted = _LOCAL.threads or _STATE["threads"] or torch.get_num_threads()
    return max(1, min(int(wanted), numba.config.NUMBA_NUM_THREADS))
