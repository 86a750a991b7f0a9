"""Small shared test utilities (models and bit-exact state comparison)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nbcompress.engine.quantize import ort_int8

#: Skips a test that needs onnxruntime (extra ``ort``) where it is not installed.
needs_ort = pytest.mark.skipif(
    ort_int8.ort_problem() is not None, reason=str(ort_int8.ort_problem())
)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Deep copy of the state dict, for bit-exact comparisons."""
    return copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view so that -0.0/NaN are compared exactly."""
    if t.is_floating_point():
        return t.contiguous().view(
            {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        )
    return t


def assert_same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Assert the model's state dict equals ``saved`` bit for bit, keys included."""
    state = model.state_dict()
    assert list(state) == list(saved)
    for key, value in saved.items():
        assert state[key].shape == value.shape, key
        assert torch.equal(bits(state[key]), bits(value)), key


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4)
    )


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )


def zero_fraction(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


def assert_refused(shell: Any, magic: str, line: str, match: str, model: str = "model") -> None:
    """``%magic line`` raises one UsageError line matching ``match``; the model is untouched."""
    import pytest
    from IPython.core.error import UsageError

    before = snapshot(shell.user_ns[model])
    with pytest.raises(UsageError, match=match) as info:
        shell.run_line_magic(magic, line)
    assert "\n" not in str(info.value)
    assert_same_state(shell.user_ns[model], before)


def concurrent_calls(call: Callable[[], Any], calls: int, threads: int = 4) -> list[Any]:
    """``call()`` ``calls`` times on each of ``threads`` Python threads started together."""
    start = threading.Barrier(threads)

    def work(_: int) -> list[Any]:
        start.wait()
        with torch.no_grad():
            return [call() for _ in range(calls)]

    with ThreadPoolExecutor(threads) as pool:
        return [y for ys in pool.map(work, range(threads)) for y in ys]


#: The checkout's root: the child processes' working directory and first import path.
ROOT = Path(__file__).resolve().parents[1]


def child_env(drop: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment without ``drop``, with ``extra``, the checkout first to import."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_child(
    args: Sequence[str], env: dict[str, str], timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python *args`` in the checkout; fails the test (with its stderr's tail) unless it exits 0.

    A return code of -6 is SIGABRT (e.g. numba's workqueue entered from two threads).
    """
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def child_json(args: Sequence[str], env: dict[str, str], timeout: int = 600) -> Any:
    """:func:`run_child`'s last line of output, parsed as JSON."""
    return json.loads(run_child(args, env, timeout).stdout.strip().splitlines()[-1])


def fixed_race(seconds: Callable[[str], float]) -> Callable[..., Any]:
    """A stand-in for :func:`nbcompress.timing.race`: each candidate takes ``seconds(name)``.

    Nothing runs; every round gives the same ratios to the first candidate (the incumbent).
    """
    from nbcompress.timing import Race, Timing

    def fake(fns: dict[str, Any], **_: Any) -> Race:
        names = tuple(fns)
        times = {n: Timing(seconds(n), seconds(n), seconds(n), 3) for n in names}
        base = seconds(names[0])
        return Race(names, times, {n: (seconds(n) / base,) * 3 for n in names})

    return fake
