"""Test-wide settings: single-threaded, seeded, headless plotting."""

from __future__ import annotations

import os

# Set before torch/numba are imported anywhere: repeatable single-thread runs, and no
# spinning OpenMP workers fighting over the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")
# Kernel choices are raced in every test (and never written to ~/.cache/nbcompress); the
# tuning record's own tests switch it on with a temporary directory.
os.environ.setdefault("NBCOMPRESS_TUNING", "off")
# No background kernel warm-up at %load_ext in tests (one test turns it on): it would
# compete for the two cores with the tests themselves.
os.environ.setdefault("NBCOMPRESS_WARMUP", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shell():
    """A real IPython InteractiveShell with nbcompress loaded and a clean namespace."""
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "nbcompress")
    saved = dict(ip.user_ns)
    yield ip
    ip.user_ns.clear()
    ip.user_ns.update(saved)
