"""Honest wall-clock measurement, and the one rule for "time the candidates, keep the fastest".

The base of every layer: the kernels (their per-shape kernel choice), the engine
(``sparsify_``, ``quantize_``, before/after comparisons) and the benchmarks time through
:func:`measure` and :func:`race`. It imports nothing from nbcompress, so that the kernels
can use it without importing the engine.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Race",
    "Timing",
    "format_seconds",
    "measure",
    "measure_interleaved",
    "race",
    "summarise",
]

Clock = Callable[[], float]


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


def _calls_per_sample(fn: Callable[[], object], budget: float, clock: Clock) -> int:
    # Very fast calls are batched so that timer resolution and call overhead do not dominate.
    start = clock()
    fn()
    once = clock() - start
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
    inner = _calls_per_sample(fn, min_sample, time.perf_counter)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return summarise(samples)


@dataclass(frozen=True)
class Race:
    """Candidates timed against each other in interleaved rounds.

    The first candidate is the incumbent (the baseline, e.g. the dense layer or the default
    kernel). Every round times each candidate once, back to back, so per-round ratios
    compare samples taken under the same machine load: they hold up when another process
    takes a core mid-measurement, where the minimum of raw times picked the slower kernel
    for 3 of 16 shapes in one run here.

    Attributes:
        names: Candidate names in the order given; ``names[0]`` is the incumbent.
        times: Name → per-call timing over the rounds.
        ratios: Name → per-round time relative to the incumbent's time in that round.
    """

    names: tuple[str, ...]
    times: dict[str, Timing]
    ratios: dict[str, tuple[float, ...]]

    @property
    def incumbent(self) -> str:
        """The baseline every ratio is relative to."""
        return self.names[0]

    def ratio(self, name: str) -> float:
        """Median per-round time of ``name`` relative to the incumbent (< 1 = faster)."""
        return statistics.median(self.ratios[name])

    def speedup_quantile(self, name: str, q: float) -> float:
        """The ``q`` quantile of the per-round speed-up of ``name`` over the incumbent.

        With ``q = 0.25`` a value above 1 means ``name`` was faster in at least three
        rounds out of four.
        """
        gains = sorted(1 / max(r, 1e-300) for r in self.ratios[name])
        return gains[int(q * len(gains))]

    def fastest(self) -> str:
        """The candidate with the lowest median paired ratio (the incumbent on ties)."""
        return min(self.names, key=lambda n: (self.ratio(n), n != self.incumbent))

    def winner(self, margin: float) -> str:
        """The fastest candidate if it beats the incumbent by ``margin``, else the incumbent.

        Args:
            margin: Required relative gain, e.g. 0.05: at most 0.95 of the incumbent's time.
        """
        best = self.fastest()
        return best if self.ratio(best) < 1 - margin else self.incumbent


def race(
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int = 15,
    warmup: int = 1,
    min_sample: float = 0.0,
    clock: Clock = time.perf_counter,
) -> Race:
    """Time ``candidates`` side by side in interleaved rounds; the first is the incumbent.

    Rounds follow a Williams design (:func:`balanced_orders`): each candidate runs in
    every position equally often *and* right after every other candidate equally often.
    Whoever runs right after another finds its data evicted from cache (~40% on a 100 µs
    layer here); with plain rotation the same candidate always ran right after the
    incumbent and paid for it (a 1.6× false loss of an int8 layer at batch 1).

    Args:
        candidates: Name → zero-argument callable; insertion order names the incumbent.
        rounds: Timed rounds (each candidate one sample per round).
        warmup: Untimed calls of each candidate first (JIT compilation, caches).
        min_sample: Each sample runs a candidate enough times to last about this long and
            reports the per-call time (0: one call per sample, for calls far above the
            timer's resolution or with side effects that must not repeat).
        clock: Seconds as a float; injectable so that decisions can be tested without
            wall-clock time.

    Returns:
        The timings and per-round ratios.
    """
    names = tuple(candidates)
    if not names:
        raise ValueError("candidates: expected at least one callable to time.")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    inner = {n: _calls_per_sample(fn, min_sample, clock) if min_sample else 1
             for n, fn in candidates.items()}  # fmt: skip
    samples: dict[str, list[float]] = {n: [] for n in names}
    orders = balanced_orders(len(names))
    for i in range(rounds):
        for name in (names[j] for j in orders[i % len(orders)]):
            fn = candidates[name]
            start = clock()
            for _ in range(inner[name]):
                fn()
            samples[name].append((clock() - start) / inner[name])
    base = samples[names[0]]
    ratios = {
        n: tuple(t / max(b, 1e-300) for t, b in zip(s, base, strict=True))
        for n, s in samples.items()
    }
    return Race(names, {n: summarise(s) for n, s in samples.items()}, ratios)


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` candidates where each follows each other equally often (Williams).

    A Latin square (every candidate once in every position) whose rows also balance
    first-order carry-over: ``n`` rows for even ``n``, ``2n`` (the rows and their
    mirrors) for odd ``n``. The rows are chained so that the carry-over from one round's
    last candidate to the next round's first stays as balanced as the rows allow (the
    order of the rows is found by search).
    """
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    rows += [row[::-1] for row in rows] if n % 2 else []
    return _chained(tuple(tuple(row) for row in rows))


@functools.lru_cache(maxsize=16)
def _chained(rows: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    # The order of the rows that spreads the round-to-round carry-over (last candidate of
    # one round → first of the next, cyclically) most evenly over the pairs; searched
    # exhaustively up to 8 rows (3 or 4 candidates: 6! / 3! orders), else left as built.
    if not 2 < len(rows) <= 8:
        return [list(row) for row in rows]

    def spread(order: tuple[tuple[int, ...], ...]) -> tuple[int, int]:
        pairs = Counter((a[-1], b[0]) for a, b in zip(order, order[1:] + order[:1]))
        counts = [
            pairs.get((a, b), 0) for a in range(len(rows[0])) for b in range(len(rows[0])) if a != b
        ]
        return max(counts) - min(counts), sum(v for (a, b), v in pairs.items() if a == b)

    best = min((rows[:1] + rest for rest in itertools.permutations(rows[1:])), key=spread)
    return [list(row) for row in best]


@torch.inference_mode()
def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 3,
    repeats: int = 15,
    min_sample: float = 2e-4,
) -> dict[str, Timing]:
    """Time several callables side by side: :func:`race`'s timings, under inference mode.

    Args:
        fns: Name to zero-argument callable.
        warmup: Untimed calls of each callable first.
        repeats: Timed samples of each callable; the order rotates every round.
        min_sample: Each sample lasts about this long (see :func:`measure`).

    Returns:
        Name to per-call timing.
    """
    return race(fns, rounds=repeats, warmup=warmup, min_sample=min_sample).times
