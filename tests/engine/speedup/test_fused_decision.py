"""The race of a run as installed against its ONNX Runtime graph (``fused.graph_wins``).

On a virtual clock: each test gives the graph's time per timed round (the run takes 1.0),
and :func:`~nbcompress.timing.race` runs unchanged on that clock.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nbcompress.engine.quantize.choice import clearly_faster
from nbcompress.engine.speedup.fused import GRAPH, LONGER, MARGIN, graph_wins
from nbcompress.timing import race

ROUNDS = 9


class Clock:
    """A fake ``timing.race``: the graph's ``i``-th timed call takes ``graph(i)``, the run 1.0."""

    def __init__(self, graph: Callable[[int], float]) -> None:
        self.graph, self.now, self.calls, self.races = graph, 0.0, 0, []

    def __call__(self, fns, *, rounds, **_):
        self.races.append(rounds)

        def run() -> None:
            self.now += 1.0

        def graph() -> None:
            self.now += self.graph(self.calls)
            self.calls += 1

        assert list(fns) == ["layers", GRAPH]  # the incumbent first
        fns = {"layers": run, GRAPH: graph}
        return race(fns, rounds=rounds, warmup=0, clock=lambda: self.now)


def _decide(graph: Callable[[int], float]) -> tuple[float | None, list[int]]:
    clock = Clock(graph)
    won = graph_wins({"layers": lambda: None, GRAPH: lambda: None}, ROUNDS, timer=clock)
    return (None if won is None else round(1 / won.ratio(GRAPH), 3)), clock.races


def test_a_graph_a_tenth_faster_every_round_wins_at_once():
    # 2 threads, batch 8, ffn90b4: %quantize's 15% rule turned such a graph down.
    gain, races = _decide(lambda i: 0.9)
    assert gain == pytest.approx(1 / 0.9, abs=1e-3) and races == [ROUNDS]
    timed = Clock(lambda i: 0.9)({"layers": None, GRAPH: None}, rounds=ROUNDS)
    assert not clearly_faster(timed, GRAPH)  # the rule this one replaces


@pytest.mark.parametrize("graph", [1.0, 1.3])
def test_a_graph_no_faster_loses_without_a_second_race(graph):
    # 1 thread, batch 8: the graph is 1.2–1.5× slower than the run on sparse int8.
    assert _decide(lambda i: graph) == (None, [ROUNDS])


def test_a_gain_under_the_margin_races_again_and_loses():
    assert _decide(lambda i: 1 - MARGIN / 2) == (None, [ROUNDS, LONGER * ROUNDS])


def test_a_median_win_in_fewer_than_three_rounds_of_four_races_again():
    # First race: slower in 3 rounds of 9 (a quarter and more); the longer one decides.
    first = [1.2 if i % 3 == 0 else 0.8 for i in range(ROUNDS)]
    gain, races = _decide(lambda i: first[i] if i < ROUNDS else 0.8)
    assert races == [ROUNDS, LONGER * ROUNDS] and gain == pytest.approx(1.25, abs=1e-3)
    gain, _ = _decide(lambda i: first[i % ROUNDS])  # as unsure over the longer race: loses
    assert gain is None
