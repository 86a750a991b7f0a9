"""Latencies of a summary: the whole model, and each layer without timing any twice.

A large model (a ViT-B/16 takes about a second per forward on two cores) is timed in a
few whole-model runs with hooks around every layer: each run yields the model's latency and
every layer's time inside it, so the cost is a handful of forwards instead of a few dozen
per layer. Layers too fast for a hook's overhead to be negligible, and every layer of a
small model, are timed alone with :func:`~nbcompress.timing.measure` (cheap for them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.validation import call_model
from nbcompress.timing import Timing, measure, summarise

__all__ = ["IN_PLACE", "MODEL_BUDGET", "SLOW_MODEL", "time_rows"]

#: Seconds per forward above which layers are timed inside whole-model runs (hooks then
#: cost well under 1% of a run).
SLOW_MODEL = 0.1
#: Layers at least this slow inside a run keep that time; faster ones are timed alone.
IN_PLACE = 1e-3
#: Seconds of whole-model runs a summary spends on a slow model (at least 3 runs).
MODEL_BUDGET = 2.0
_MIN_RUNS = 3


def time_rows(
    model: nn.Module,
    inputs: tuple,
    layers: dict[str, nn.Module],
    calls: dict[str, tuple],
    repeats: int,
) -> tuple[Timing, dict[str, float]]:
    """Time the whole model, and each layer in ``layers`` that the forward called.

    Args:
        model: The model, in eval mode, under ``torch.no_grad``.
        inputs: Inputs as :func:`~nbcompress.engine.core.validation.as_inputs` returns them.
        layers: Name → layer to time (layers that contain other timed layers left out: their
            time would count those twice).
        calls: Name → the layer's recorded ``(args, kwargs, output)`` (``capture_calls``).
        repeats: Timed repeats, at most (a slow model gets fewer, within a time budget).

    Returns:
        The whole model's timing, and name → median seconds of one call of each layer.
    """
    run = lambda: call_model(model, inputs)  # noqa: E731 - one name for the uses below
    called = {n: m for n, m in layers.items() if n in calls}

    def runs(first: float) -> int:
        # A fast model needs no more hooked runs: it and its layers are timed alone below.
        return 1 if first < SLOW_MODEL else max(_MIN_RUNS, min(repeats, int(MODEL_BUDGET / first)))

    whole, in_place = _hooked_runs(run, called, runs)
    if whole.repeats == 1:
        whole, in_place = measure(run, warmup=0, repeats=max(repeats, 5)), {}
    times = {}
    for name, layer in called.items():
        if name in in_place:
            times[name] = in_place[name]
        else:
            times[name] = _alone(layer, calls[name], repeats)
    return whole, times


def _alone(layer: nn.Module, call: tuple, repeats: int) -> float:
    args, kwargs, _ = call
    return measure(lambda: layer(*args, **kwargs), warmup=1, repeats=repeats).median


def _time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def _hooked_runs(
    run: Callable[[], Any], layers: dict[str, nn.Module], runs: Callable[[float], int]
) -> tuple[Timing, dict[str, float]]:
    """Whole-model timings, and the median time of each layer slow enough to time in place.

    The first run (warm after the capturing one) decides how many runs follow:
    ``runs(seconds of the first)``. A layer's sample is its first call in each run; it is
    kept when even its fastest sample took :data:`IN_PLACE` (hook overhead negligible).
    """
    started: dict[str, float] = {}
    samples: dict[str, list[float]] = {name: [] for name in layers}

    def before(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            started.setdefault(name, time.perf_counter())

        return hook

    def after(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if len(samples[name]) < len(totals) + 1 and name in started:
                samples[name].append(time.perf_counter() - started[name])

        return hook

    handles = [m.register_forward_pre_hook(before(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(after(n)) for n, m in layers.items()]
    totals: list[float] = []
    try:
        while not totals or len(totals) < runs(totals[0]):
            started.clear()
            totals.append(_time_once(run))
    finally:
        for h in handles:
            h.remove()
    slow = {n: s for n, s in samples.items() if len(s) == len(totals) and min(s) >= IN_PLACE}
    return summarise(totals), {n: summarise(s).median for n, s in slow.items()}
