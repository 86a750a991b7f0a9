"""The per-layer race of ``sparsify_``/``speedup``: each candidate timed warm, as inside a model.

Why. A layer's candidates are raced in interleaved rounds (:func:`nbcompress.timing.race`),
so each sample starts right after another candidate: a dense layer streaming its 9 MB
weight, or ONNX Runtime's or torch's int8 twin, evicted the candidate's code and data from
the caches, and the worker pool of the parallel kernels parked meanwhile. On BERT-FFN ×2
with 4×1 blocks at 90% (768 × 3072, batch 1, 2 threads here) the first call of the
block-sparse int8 layer after such a candidate took 150–210 µs, the next ones 39 µs; a
serial kernel paid less of that (no pool to wake), and each sample lasted one call (its
length was set from a cold call too). Every candidate's time was thus its own warm time
plus 40–150 µs of noise: the race picked CSR int8 and fp32 CSR (raced 145–186 µs) over
block-sparse int8 (raced 151–227 µs, 39 µs warm), and the installed model ran 2× slower
than the same stack on block-sparse int8. Inside a model call the layers run back to back
on the kernels (the pool awake, the code warm), so that cold start is not what a layer
costs there.

How. :func:`layer_race` primes every sample: one untimed call of the candidate right before
its timed calls (the clock stops for it), so a sample times the candidate warm. Everything
else is :func:`nbcompress.timing.race` (interleaved Williams rounds, paired ratios): the
ratios still compare samples taken under the same load. What a layer's cache footprint
costs among its neighbours, and folding an activation into it, the whole-model race of
:mod:`.variants` measures, end to end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from nbcompress.timing import Clock, Race, race

__all__ = ["MIN_SAMPLE", "Primed", "layer_race"]

#: Each timed sample repeats a candidate for at least this long (seconds), so that timer
#: resolution and call overhead do not decide for small layers.
MIN_SAMPLE = 2e-4


class Primed:
    """A clock, and wrappers that call a candidate once untimed at the start of each sample.

    A sample of :func:`~nbcompress.timing.race` reads the clock, calls the candidate, reads
    the clock. The wrapper's first call after a clock reading first calls the candidate
    once more, and the clock leaves that call's time out.

    Args:
        clock: The clock underneath (seconds as a float; injectable for tests).
    """

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self._base = clock
        self._paused = 0.0  # untimed seconds so far, left out of every later reading
        self._fresh = True  # the next candidate call starts a sample

    def clock(self) -> float:
        """The base clock minus the priming calls' time so far."""
        self._fresh = True
        return self._base() - self._paused

    def wrap(self, fn: Callable[[], object]) -> Callable[[], object]:
        """``fn``, primed with one untimed call at the start of each sample."""

        def primed() -> object:
            if self._fresh:
                self._fresh = False
                start = self._base()
                fn()
                self._paused += self._base() - start
            return fn()

        return primed


def layer_race(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    runner: Callable[..., Race] = race,
    *,
    clock: Clock = time.perf_counter,
) -> Race:
    """Race ``candidates`` (the incumbent first) in ``repeats`` rounds, each sample warm.

    Args:
        candidates: Name → zero-argument call; the first is the incumbent (dense).
        repeats: Timed rounds.
        runner: Runs the race, with :func:`nbcompress.timing.race`'s arguments (the
            caller's own, so that a test's fake of it applies).
        clock: Seconds as a float (injectable, for tests without wall-clock time).

    Returns:
        The race ``runner`` returns.
    """
    primed = Primed(clock)
    fns = {name: primed.wrap(fn) for name, fn in candidates.items()}
    with torch.inference_mode():
        return runner(fns, rounds=repeats, warmup=3, min_sample=MIN_SAMPLE, clock=primed.clock)
