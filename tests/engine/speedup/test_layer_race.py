"""The per-layer race times each candidate warm (:mod:`nbcompress.engine.speedup.racing`).

On a virtual clock: a candidate's first call after another candidate's pays a cold start
(caches evicted, the worker pool parked), as measured at 2 threads here; the race must
rank the candidates by what they cost warm, as inside a model call.
"""

from __future__ import annotations

import pytest
import torch

import nbcompress as nc
from nbcompress.engine.speedup.racing import MIN_SAMPLE, Primed, layer_race
from nbcompress.timing import race

#: Seconds per warm call, and what the first call after another candidate adds: the
#: pooled kernel is fastest warm but wakes its pool cold; the serial one pays little.
WARM = {"dense": 3e-4, "pooled": 4e-5, "serial": 6e-5}
COLD = {"dense": 1e-4, "pooled": 2e-4, "serial": 3e-5}


def _virtual() -> tuple[dict, list[float], list[str]]:
    now, calls = [0.0], []

    def make(name: str):
        def call() -> None:
            now[0] += WARM[name] + (COLD[name] if not calls or calls[-1] != name else 0.0)
            calls.append(name)

        return call

    return {n: make(n) for n in WARM}, now, calls


def test_the_plain_race_ranks_by_cold_starts_and_picks_the_serial_kernel():
    # What sparsify_'s race did before: the pooled kernel lost on its cold start.
    fns, now, _ = _virtual()
    result = race(fns, rounds=7, warmup=3, min_sample=0.0, clock=lambda: now[0])
    assert result.ratio("serial") < result.ratio("pooled")


def test_layer_race_ranks_by_warm_time_and_picks_the_pooled_kernel():
    fns, now, calls = _virtual()
    result = layer_race(fns, 7, clock=lambda: now[0])
    assert result.fastest() == "pooled"
    for name, seconds in WARM.items():  # the cold start is left out of every sample
        assert result.times[name].median == pytest.approx(seconds)
    assert calls.count("pooled") > 7  # every sample primed, and repeated to MIN_SAMPLE


def test_primed_clock_leaves_out_exactly_the_priming_call():
    now = [0.0]
    primed = Primed(lambda: now[0])

    def work() -> None:
        now[0] += 1.0

    fn = primed.wrap(work)
    start = primed.clock()
    fn()  # primes (1 s untimed), then runs (1 s)
    fn()  # same sample: no priming
    assert primed.clock() - start == pytest.approx(2.0)
    assert now[0] == pytest.approx(3.0)


def test_layer_race_runs_the_callers_race_with_the_primed_clock():
    seen = {}

    def runner(candidates, **kwargs):
        seen.update(kwargs, names=list(candidates))
        return race(candidates, **kwargs)

    layer_race({"dense": lambda: None, "csr": lambda: None}, 3, runner)
    assert seen["names"] == ["dense", "csr"] and seen["rounds"] == 3
    assert seen["min_sample"] == MIN_SAMPLE and callable(seen["clock"])


def test_sparsify_races_every_layer_warm_through_layer_race(monkeypatch):
    from nbcompress.engine.speedup import racing
    from tests.engine.speedup.test_speedup import FAST, _fake_timer, _pruned_mlp

    _fake_timer(monkeypatch, FAST)
    real, seen = racing.layer_race, []

    def counting(candidates, repeats, runner=race, **kw):
        seen.append(list(candidates))
        return real(candidates, repeats, runner, **kw)

    monkeypatch.setattr(racing, "layer_race", counting)
    model = _pruned_mlp()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model)
    nc.sparsify_(model, torch.randn(4, 32))
    per_layer = [names for names in seen if names[0] == "dense" and "compressed" not in names]
    assert len(per_layer) == linears and all(len(n) > 1 for n in per_layer)
