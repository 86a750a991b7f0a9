"""Which torch int8 engine the demo packs its static int8 model for, measured at both batches.

torch packs static int8 weights for one engine. On x86 the ``x86`` engine (oneDNN for
these convolutions, here) was several times faster than ``fbgemm`` at batch 64, but paid a fixed
cost per call that made one 28×28 image slower than the float model; ``fbgemm`` ran one
image at about the float speed. Neither is right everywhere, so the demo quantizes with
each, times each against the dense model at every batch it reports (interleaved rounds;
with one torch thread on that thread's CPU time, which other processes do not inflate),
undoes the others and keeps an engine that is not slower than dense at any of those
batches (within :data:`NOISE`), the fastest at the serving batch among them; if none is,
the fastest at the serving batch, and the final line says batch 1 is slower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nbcompress.demo.final import NOISE, race_pair
from nbcompress.engine.core.history import undo_
from nbcompress.engine.quantize.config import StaticInt8Config

__all__ = ["NOISE", "EngineTrial", "choose_engine", "pick", "tradeoff"]


@dataclass(frozen=True)
class EngineTrial:
    """One engine's measured speed-up over dense at each batch size (``batch → ratio``)."""

    engine: str
    speedup: dict[int, float]

    def not_slower(self) -> bool:
        """At least as fast as dense, within :data:`NOISE`, at every batch timed."""
        return all(g >= 1 - NOISE for g in self.speedup.values())

    def describe(self) -> str:
        """``"x86: 7.86× at batch 64, 0.71× at batch 1"``."""
        parts = ", ".join(f"{g:.2f}× at batch {b}" for b, g in self.speedup.items())
        return f"{self.engine}: {parts}"


def pick(trials: Sequence[EngineTrial], batch: int) -> EngineTrial:
    """The engine not slower at any batch, fastest at ``batch``; else just the fastest there."""
    fair = [t for t in trials if t.not_slower()]
    return max(fair or trials, key=lambda t: t.speedup[batch])


def tradeoff(trials: Sequence[EngineTrial], chosen: EngineTrial, batch: int) -> str | None:
    """What keeping ``chosen`` cost at the serving ``batch``, in words (``None``: nothing)."""
    faster = [t for t in trials if t.speedup[batch] > chosen.speedup[batch]]
    if not faster:
        return None
    best = max(faster, key=lambda t: t.speedup[batch])
    worst = min(best.speedup, key=best.speedup.get)
    return (
        f"The {best.engine} int8 engine measured {best.speedup[batch]:.2f}× at batch {batch} "
        f"but {best.speedup[worst]:.2f}× at batch {worst}; {chosen.engine} was kept because "
        "it is not slower than dense at any batch."
    )


def choose_engine(
    model: nn.Module,
    dense: nn.Module,
    quantize: Callable[[StaticInt8Config], None],
    inputs: dict[int, object],
    engines: Sequence[str],
    rounds: int,
    say: Callable[[str], None],
) -> tuple[EngineTrial, list[EngineTrial]]:
    """Quantize ``model`` for each engine, time it, and leave it quantized for the best.

    Args:
        model: The float model; quantized in place by ``quantize(config)`` (undoable).
        dense: The reference the speed-ups are measured against.
        quantize: Quantizes ``model`` with the given config (one history step).
        inputs: Batch size → input batch; the first is the serving batch.
        engines: torch quantized engines to try, in order.
        rounds: Interleaved timed rounds per batch.
        say: Where each trial's line goes.

    Returns:
        The chosen trial and every trial; ``model`` is quantized for the chosen engine.
    """
    # A decision, not a figure shown as latency: with one torch thread the work runs on
    # this thread, and its CPU time stays steady when other processes take the cores.
    single = torch.get_num_threads() == 1
    clock = time.thread_time if single else time.perf_counter
    basis = "this thread's CPU time (steady under load)" if single else "wall-clock time"
    say(f"each engine timed against dense on {basis}, interleaved rounds")
    trials = []
    for k, engine in enumerate(engines):
        if k:
            undo_(model)  # back to float: each engine quantizes the same weights
        quantize(StaticInt8Config(engine=engine))
        speedup = {}
        for batch, x in inputs.items():
            # The median of per-round ratios: both models timed under the same load.
            speedup[batch] = 1 / race_pair(dense, model, x, rounds, clock).ratio("compressed")
        trials.append(EngineTrial(engine, speedup))
        say("timed " + trials[-1].describe())
    best = pick(trials, next(iter(inputs)))  # the first batch is the serving batch
    if best is not trials[-1]:
        undo_(model)
        quantize(StaticInt8Config(engine=best.engine))
    serving = next(iter(inputs))
    why = (
        f"not slower than dense at any batch, fastest at batch {serving} among those"
        if best.not_slower()
        else f"fastest at batch {serving}; every engine was slower than dense at some batch"
    )
    say(f"→ {best.engine}: {why}")
    return best, trials
