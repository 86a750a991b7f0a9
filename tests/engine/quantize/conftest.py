"""Fixtures shared by the quantize tests (requested by name or with ``usefixtures``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the test (ORT sessions and kernel choices per thread count)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
