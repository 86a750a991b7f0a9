"""The one measured-choice rule: race() on a fake clock, so decisions are tested without time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from nbcompress.timing import Race, balanced_orders, race


class FakeClock:
    """A clock that advances only when a candidate runs, by that candidate's cost."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def candidate(self, name: str, costs: list[float] | float):
        """A callable costing ``costs`` seconds (one value per call; the last one repeats)."""
        seq = costs if isinstance(costs, list) else [costs]
        count = [0]

        def run() -> None:
            self.now += seq[min(count[0], len(seq) - 1)]
            count[0] += 1
            self.calls.append(name)

        return run


def _race(costs: dict[str, list[float] | float], rounds: int = 6, warmup: int = 0) -> Race:
    clock = FakeClock()
    fns = {name: clock.candidate(name, c) for name, c in costs.items()}
    return race(fns, rounds=rounds, warmup=warmup, clock=clock)


def test_times_and_paired_ratios_come_from_the_clock():
    result = _race({"dense": 2.0, "sparse": 1.0})
    assert result.incumbent == "dense"
    assert result.times["dense"].median == 2.0 and result.times["sparse"].median == 1.0
    assert result.ratios["sparse"] == (0.5,) * 6 and result.ratio("dense") == 1.0
    assert result.fastest() == "sparse"


def test_the_incumbent_keeps_its_place_unless_beaten_by_the_margin():
    assert _race({"a": 1.0, "b": 0.97}).winner(0.05) == "a"  # 3% is inside the margin
    assert _race({"a": 1.0, "b": 0.90}).winner(0.05) == "b"
    assert _race({"a": 1.0, "b": 1.0}).fastest() == "a"  # a tie goes to the incumbent


def test_every_candidate_starts_a_round_in_turn():
    clock = FakeClock()
    fns = {n: clock.candidate(n, 1.0) for n in "abc"}
    race(fns, rounds=3, warmup=0, clock=clock)
    assert clock.calls == list("abc" + "bca" + "cab")


def test_warmup_calls_are_not_timed():
    # The first call of each candidate is slow (a compile); warm-up absorbs it.
    result = _race({"a": [100.0, 1.0], "b": [100.0, 2.0]}, rounds=4, warmup=1)
    assert result.times["a"].p90 == 1.0 and result.times["b"].p90 == 2.0


def test_paired_ratios_survive_a_machine_that_slows_down_mid_race():
    # Both candidates get 3x slower for half the rounds (another process took a core): the
    # raw medians mix fast and slow rounds, the per-round ratios stay exact.
    result = _race({"dense": [1.0] * 4 + [3.0], "sparse": [0.8] * 4 + [2.4]}, rounds=8)
    assert result.ratio("sparse") == pytest.approx(0.8)
    assert result.speedup_quantile("sparse", 0.25) == pytest.approx(1.25)


def test_speedup_quantile_reflects_rounds_lost():
    # Faster in two rounds of four: its lower quartile speed-up is below 1.
    result = _race({"dense": 1.0, "sparse": [0.5, 0.5, 1.5]}, rounds=4)
    assert result.speedup_quantile("sparse", 0.25) < 1 < result.speedup_quantile("sparse", 0.75)


def test_min_sample_batches_fast_calls():
    clock = FakeClock()
    fns = {"tiny": clock.candidate("tiny", 1e-6)}
    result = race(fns, rounds=2, warmup=0, min_sample=1e-4, clock=clock)
    assert result.times["tiny"].median == pytest.approx(1e-6)
    assert len(clock.calls) > 100  # 100 calls a sample, plus the one that sized it


def test_no_candidates_is_a_clear_error():
    with pytest.raises(ValueError, match="candidates"):
        race({})


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_balanced_orders_balance_positions_and_predecessors(n: int) -> None:
    rows = balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    positions = Counter((row.index(c), c) for row in rows for c in range(n))
    follows = Counter((row[i], row[i + 1]) for row in rows for i in range(n - 1))
    assert len(positions) == n * n and len(set(positions.values())) == 1
    assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1


def test_race_does_not_always_run_the_same_candidate_after_the_incumbent() -> None:
    # A clock that charges the call right after the incumbent: with plain rotation one
    # candidate always paid it and lost; balanced orders share it out.
    seen: list[str] = []
    clock_state = {"t": 0.0}

    def clock() -> float:
        return clock_state["t"]

    def call(name: str) -> Callable[[], None]:
        def run() -> None:
            cost = 2.0 if seen and seen[-1] == "float" else 1.0
            seen.append(name)
            clock_state["t"] += cost

        return run

    result = race({n: call(n) for n in ("float", "a", "b")}, rounds=12, warmup=0, clock=clock)
    assert result.times["a"].median == result.times["b"].median
