"""Kernel tests measure their own choices: no tuning record unless a test sets one up, and
each new shape raced on first use (``tuning.eager``), not predicted as at forward time."""

from __future__ import annotations

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
