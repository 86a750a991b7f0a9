"""Holding the pool awake never leaves its workers unable to park."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from nbcompress.kernels import _pool
with _pool.held_awake():
    assert _pool.ready(2)  # the pool starts inside the block
with _pool.held_awake():
    with _pool.held_awake():  # nested
        pass
print(int(_pool._STATE["slots"][:, 5].min()), int(_pool._STATE["slots"][:, 5].max()))
"""


def test_a_pool_started_inside_the_block_is_left_free_to_park():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["0", "0"], out.stderr[-2000:]
