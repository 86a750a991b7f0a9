"""Warm-up: every common kernel ready ahead of use, in the foreground or in the background."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbcompress.kernels import dispatch, precompile, registry, tuning, warmup
from tests.helpers import child_env

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    # The environment's default thread settings (conftest's are for this process), so
    # that the parallel builds and numba's pool are in play, as in a user's notebook.
    return child_env(("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"))


def test_warmup_runs_every_registered_kernel_and_records_no_choice(tmp_path, monkeypatch, capsys):
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    monkeypatch.setattr(registry, "_COMPILED", set())  # every signature a first call again
    before = dispatch.tuning_stats()
    result = warmup(quiet=True)
    assert result.error is None and result.done.is_set()
    assert result.kernels == len(registry._COMPILED)
    ran = {key[0] for key in registry._COMPILED}
    assert ran == set(dispatch.KERNELS)  # the suite's one thread: the serial builds
    assert dispatch.tuning_stats() == before  # nothing raced, nothing reused
    assert not list(tmp_path.iterdir())  # nothing recorded for the toy weights
    assert capsys.readouterr() == ("", "")


def test_a_second_background_warmup_is_the_running_one():
    first = warmup(background=True)
    assert warmup(background=True) is first
    assert first.wait(timeout=600) and first.error is None


@pytest.mark.skipif(sys.platform == "win32", reason="signals: the abort is a POSIX SIGABRT")
def test_background_warmup_while_four_threads_call_a_sparse_layer():
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.warmup_while_calling"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]  # -6: SIGABRT (numba's workqueue)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["raised"] == [] and outcome["calls"] == 4 * 30
    assert outcome["max_error"] < 1e-5
    assert outcome["warmup"] == {**outcome["warmup"], "finished": True, "error": None}
    # Only the calls' own one-line notices, never the background thread's.
    line = re.compile(r"^nbcompress: (compiling|loading) sparse kernels[^/]*\(\d+ kernels?\)$")
    assert all(line.match(text) for text in outcome["printed"]), outcome["printed"]
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr


def test_exit_during_a_background_warmup_is_clean():
    code = "from nbcompress.kernels import warmup; warmup(background=True); print('bye')"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "bye" and done.stderr == ""


def test_the_command_line_prints_one_line_with_the_time():
    done = subprocess.run(
        [sys.executable, "-m", "nbcompress", "warmup"], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(
        r"nbcompress: sparse kernels ready in \d+\.\d s \(\d+ compiled, \d+ loaded\)\n",
        done.stdout,
    )


def test_a_failing_background_warmup_only_ends_itself(monkeypatch):
    monkeypatch.setattr(precompile, "_steps", lambda: [lambda: 1 / 0])
    monkeypatch.setattr(precompile, "_BACKGROUND", {})
    result = warmup(background=True)
    assert result.wait(timeout=60)
    assert result.error == "ZeroDivisionError: division by zero"
    with pytest.raises(ZeroDivisionError):
        warmup()  # in the foreground the error is the caller's
