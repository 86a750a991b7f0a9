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
involved. The ``workqueue`` layer must not be entered by two Python threads at once;
set ``NUMBA_THREADING_LAYER=omp`` (with ``OMP_WAIT_POLICY=PASSIVE``) before importing
if several threads call multi-threaded sparse layers concurrently.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numba
import torch

__all__ = ["configure_threading", "get_threads", "serial", "set_threads"]

_STATE: dict[str, int | None] = {"threads": None, "serial": 0}


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


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Run the kernels called inside on one thread (their serial twins), then restore.

    Used by the measured kernel choice: at batch 1 waking a second worker cost more than
    it saved here (a 3072×768 SpMV at 90% took 159 µs on one thread, 349 µs on two).
    """
    _STATE["serial"] = (_STATE["serial"] or 0) + 1
    try:
        yield
    finally:
        _STATE["serial"] = (_STATE["serial"] or 1) - 1


def get_threads() -> int:
    """Number of threads the next kernel call will use."""
    if _STATE["serial"]:
        return 1
    wanted = _STATE["threads"] or torch.get_num_threads()
    return max(1, min(int(wanted), numba.config.NUMBA_NUM_THREADS))
