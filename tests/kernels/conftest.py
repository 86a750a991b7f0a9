"""Kernel tests measure their own choices: no tuning record unless a test sets one up, and
each new shape raced on first use (``tuning.eager``), not predicted as at forward time.
The thread tests' fixtures (requested by name) are shared here too."""

from __future__ import annotations

import numba
import pytest

from nbcompress.kernels import tuning


@pytest.fixture(autouse=True)
def _no_tuning_record():
    # A record shared between tests would let one test's measured choice (same weight
    # shape and bucket) stand in for another's race; tests of the record configure it.
    tuning.configure(enabled=False)
    with tuning.eager():  # the forward-time predictions are tested with eager(False)
        yield
    tuning.configure(enabled=False)


@pytest.fixture
def threads_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift the session's cap of the kernels' threads (``NUMBA_NUM_THREADS=1``, tests/conftest).

    The tests then ask for more with ``threads.using`` (the int8 kernels never use numba's
    pool).
    """
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 4)


@pytest.fixture(params=["torch", "pool"])
def openmp(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each parallel run on torch's OpenMP team, then on ``_pool.py``'s workers."""
    monkeypatch.setenv("NBCOMPRESS_OPENMP", request.param)
    return request.param
