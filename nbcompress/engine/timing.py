"""Honest wall-clock measurement: warm-up, repeats, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "format_seconds", "measure", "measure_interleaved", "summarise"]


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated calls, in seconds.

    Attributes:
        median: Median time of one call.
        p10: 10th percentile (fast end of the spread).
        p90: 90th percentile (slow end of the spread).
        repeats: Number of timed calls.
    """

    median: float
    p10: float
    p90: float
    repeats: int

    @property
    def ms(self) -> float:
        """Median in milliseconds."""
        return self.median * 1e3

    def __str__(self) -> str:
        spread = f"{format_seconds(self.p10)}–{format_seconds(self.p90)}"
        return f"{format_seconds(self.median)} (p10–p90 {spread}, n={self.repeats})"


def format_seconds(seconds: float) -> str:
    """Format a duration with a unit that keeps three significant digits."""
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def summarise(samples: list[float]) -> Timing:
    """Median and p10/p90 spread of per-call times (seconds)."""
    ordered = sorted(samples)
    n = len(ordered)
    return Timing(
        median=statistics.median(ordered),
        p10=ordered[int(0.1 * (n - 1))],
        p90=ordered[int(round(0.9 * (n - 1)))],
        repeats=n,
    )


def _calls_per_sample(fn: Callable[[], object], budget: float) -> int:
    # Very fast calls are batched so that timer resolution and call overhead do not dominate.
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(1000, int(budget / max(once, 1e-9))))


@torch.inference_mode()
def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeats: int = 15,
    min_sample: float = 2e-4,
) -> Timing:
    """Time ``fn()`` with warm-up calls and repeated samples; report the median.

    Args:
        fn: A zero-argument callable, e.g. ``lambda: model(x)``.
        warmup: Untimed calls first (JIT compilation, allocator, caches).
        repeats: Timed samples.
        min_sample: Each sample runs ``fn`` enough times to last about this long;
            the per-call time is reported.

    Returns:
        The per-call timing.
    """
    for _ in range(warmup):
        fn()
    inner = _calls_per_sample(fn, min_sample)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return summarise(samples)


@torch.inference_mode()
def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 3,
    repeats: int = 15,
    min_sample: float = 2e-4,
) -> dict[str, Timing]:
    """Time several callables side by side, interleaving their samples.

    Interleaving makes ratios between the candidates robust to the machine getting
    slower or faster during the run (another process taking a core, frequency scaling).

    Args:
        fns: Name to zero-argument callable.
        warmup: Untimed calls of each callable first.
        repeats: Timed samples of each callable; the order rotates every round.
        min_sample: Each sample lasts about this long (see :func:`measure`).

    Returns:
        Name to per-call timing.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {name: _calls_per_sample(fn, min_sample) for name, fn in fns.items()}
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    # Each round starts with a different candidate: whoever runs right after another finds
    # its weights evicted from cache (~40% on a 100 µs layer here), so every candidate gets
    # the same mix of positions (exactly, when repeats is a multiple of the candidates).
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: summarise(s) for name, s in samples.items()}
