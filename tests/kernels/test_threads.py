"""Sparse modules called from several Python threads at once, with default thread settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.platform == "win32", reason="signals: the abort is a POSIX SIGABRT")
def test_four_threads_share_sparse_modules_without_abort_or_wrong_output():
    # The suite's own process has one numba thread (conftest), where the pool is never
    # entered: the concurrent calls run in a process with the default settings (one
    # numba and torch thread per core), as in a user's notebook.
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.concurrent_calls"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]  # -6: SIGABRT (numba's workqueue)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["raised"] == []
    if (os.cpu_count() or 1) > 1:
        assert outcome["threads"] > 1  # the pool was really in play
    # Against the same modules on one thread: kernels may sum in another order (and the
    # int8 ones compute the same dequantized product), nothing more.
    assert max(outcome["errors"].values()) < 1e-5, outcome["errors"]
