"""sparsify_ reuses its measured decisions from the tuning record: no race, outputs checked."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import nbcompress as nc
from nbcompress.engine.speedup import recorded
from nbcompress.engine.speedup import sparsify as sp
from nbcompress.kernels import tuning
from nbcompress.kernels.modules import SparseLinear
from tests.engine.speedup.test_speedup import FAST, SLOW, _fake_timer, _pruned_mlp
from tests.helpers import child_env, child_json

pytestmark = [
    pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel"),
    pytest.mark.filterwarnings("ignore:sparsify_. no layer measured faster"),
]
LAYERS = ["0", "2", "head"]


@pytest.fixture
def record(tmp_path):
    """The tuning record on, in a temporary directory, for a pretend CPU."""
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    yield tuning.active()
    tuning.configure()  # back to the environment's setting (off in tests)


@pytest.fixture
def races(monkeypatch):
    """Fixed per-path times (``FAST`` unless a test changes ``times``); every race logged."""
    times = dict(FAST)
    _fake_timer(monkeypatch, lambda name, i: times.get(name, 1.0))
    fake, seen = sp.race, []

    def logged(candidates, **kw):
        seen.append(list(candidates))
        return fake(candidates, **kw)

    monkeypatch.setattr(sp, "race", logged)
    return type("Races", (), {"seen": seen, "times": times})


def _layer_races(seen: list[list[str]]) -> int:
    return sum("compressed" not in names for names in seen)


def _formats(model) -> dict[str, str]:
    return {n: getattr(model.get_submodule(n), "format", "dense") for n in LAYERS}


def test_a_second_sparsify_reuses_every_decision_and_still_checks_outputs(
    record, races, monkeypatch
):
    first, x = _pruned_mlp(), torch.randn(4, 32)
    second, ref = copy.deepcopy(first), first(x).detach()
    nc.sparsify_(first, x)
    # 3 layers, then the variant with its ReLU applied by the kernels, then end to end.
    assert _layer_races(races.seen) == 3 and len(races.seen) == 5
    checked = []
    compare = sp.compare_outputs

    def spy(ref, out, arg="model"):
        checked.append(arg)
        return compare(ref, out, arg=arg)

    monkeypatch.setattr(sp, "compare_outputs", spy)
    races.seen.clear()
    nc.sparsify_(second, x)
    assert races.seen == []  # no layer raced, nor the whole model
    assert _formats(second) == _formats(first) == dict.fromkeys(LAYERS, "csr")
    assert [a for a in checked if a.startswith("layers[")] == [f"layers[{n!r}]" for n in LAYERS]
    assert checked.count("model") >= 1  # the whole model's output, compared end to end
    with torch.no_grad():
        torch.testing.assert_close(second(x), ref, rtol=1e-4, atol=1e-4)
    step = nc.history(second)[-1]
    assert "recorded earlier on this CPU" in step.info["reasons"]["0"]
    assert "5.00×" in step.info["reasons"]["0"]  # the gain measured when it was recorded


def test_a_changed_pattern_or_shape_bucket_is_measured_again(record, races):
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.sparsify_(copy.deepcopy(model), x)
    races.seen.clear()
    sparser = copy.deepcopy(model)
    with torch.no_grad():  # layer 0 from 90% to ~97% zeros: another density bucket
        w = sparser[0].weight
        w[w.abs() < w.abs().flatten().kthvalue(int(0.97 * w.numel())).values] = 0
    nc.sparsify_(sparser, x)
    assert _layer_races(races.seen) == 1 and len(races.seen) == 3  # layer 0, variant, whole
    races.seen.clear()
    nc.sparsify_(copy.deepcopy(model), torch.randn(5, 32))  # 5 rows: bucket 8, not 4
    assert _layer_races(races.seen) == 3
    races.seen.clear()
    nc.sparsify_(copy.deepcopy(model), torch.randn(3, 32))  # 3 rows: bucket 4 again
    assert races.seen == []


def test_with_the_record_off_every_sparsify_races_as_before(races):
    assert tuning.active() is None  # tests run with NBCOMPRESS_TUNING=off
    model, x = _pruned_mlp(), torch.randn(4, 32)
    for _ in range(2):
        races.seen.clear()
        nc.sparsify_(copy.deepcopy(model), x)
        assert _layer_races(races.seen) == 3 and len(races.seen) == 5


def test_remeasure_races_again_and_replaces_the_record(record, races):
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.sparsify_(copy.deepcopy(model), x)
    races.seen.clear()
    races.times.update(SLOW)
    again = nc.sparsify_(copy.deepcopy(model), x, remeasure=True)
    assert _layer_races(races.seen) == 3
    assert all(type(again.get_submodule(n)) is torch.nn.Linear for n in LAYERS)
    races.seen.clear()
    later = nc.sparsify_(copy.deepcopy(model), x)  # follows the new measurement, unraced
    assert races.seen == [] and all(type(later.get_submodule(n)) is torch.nn.Linear for n in LAYERS)


def test_a_recorded_choice_whose_output_check_fails_is_refused_and_measured_again(
    record, races, monkeypatch
):
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.sparsify_(copy.deepcopy(model), x)
    key = recorded.layer_key(model[0], (4, 32), sp.SparsifyOptions())
    assert tuning.lookup(recorded.LAYER, key).choice == "csr"
    compare = sp.compare_outputs

    def broken(ref, out, arg="model"):
        diff = compare(ref, out, arg=arg)  # layer 0's sparse output now "wrong" by 1.0
        return dataclasses.replace(diff, max_abs=1.0) if arg == "layers['0']" else diff

    monkeypatch.setattr(sp, "compare_outputs", broken)
    races.seen.clear()
    again = nc.sparsify_(copy.deepcopy(model), x)
    assert _layer_races(races.seen) == 1  # layer 0 only: the others reused
    assert type(again[0]) is torch.nn.Linear and isinstance(again.head, SparseLinear)
    why = nc.history(again)[-1].info["reasons"]["0"]
    assert "outside tolerance" in why and "recorded csr refused (build or output check)" in why
    assert tuning.lookup(recorded.LAYER, key).choice == "dense"  # the record corrected


def test_speedup_measures_and_the_next_sparsify_follows_its_figures(record, races):
    model, x = _pruned_mlp(), torch.randn(4, 32)
    races.times.update(SLOW)
    nc.sparsify_(copy.deepcopy(model), x)  # recorded: dense everywhere
    races.seen.clear()
    races.times.update(FAST)
    report = nc.speedup(copy.deepcopy(model), x, progress=False)
    assert _layer_races(races.seen) == 3  # the measuring verb measures
    assert report.speedup == pytest.approx(1 / FAST["compressed"])
    races.seen.clear()
    races.times.update(SLOW)  # a near tie would now flip: the record keeps what was shown
    after = nc.sparsify_(copy.deepcopy(model), x)
    assert races.seen == [] and _formats(after) == dict.fromkeys(LAYERS, "csr")


def test_a_report_of_recorded_decisions_says_they_were_not_timed_now(record, races):
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.sparsify_(copy.deepcopy(model), x)
    races.seen.clear()
    report = nc.speedup(copy.deepcopy(model), x, progress=False, remeasure=False)
    assert races.seen == []
    text = str(report)
    assert "sparse fp32: 5.00× vs dense (recorded)" in text
    assert "not timed in this run" in text and "recorded earlier on this CPU" in text
    assert all(r["recorded"] and r["dense fp32"] is None for r in report.rows)
    assert report.speedup is None  # no end-to-end figure is shown as if measured now
    assert "3 layer(s) recorded earlier, not timed now" in report.plot().axes[0].get_title()


def test_analyse_still_times_the_whole_model_for_callers_that_need_the_figure(record, races):
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.sparsify_(copy.deepcopy(model), x)
    races.seen.clear()
    analysis = sp.analyse(copy.deepcopy(model), x)  # e.g. the search's latency objective
    assert races.seen == [["dense", "compressed"]]  # layers reused, the whole model timed
    assert analysis.compressed.median == pytest.approx(FAST["compressed"])


_CHILD = """
import json, sys, torch
from collections import Counter
from torch import nn
import nbcompress as nc
from nbcompress.engine.speedup import sparsify as sp
from nbcompress.timing import Timing, race
from nbcompress.kernels import tuning

tuning.configure(enabled=True, cache_dir=sys.argv[1], cpu="test-cpu")
# A choice recorded while the load exceeds the CPU count is raced again once it is quiet:
# the load must not decide whether the second process races.
tuning.machine_busy = lambda: False
torch.manual_seed(0)
seen, now, calls = [], [0.0], Counter()
FAST = {"dense": 1.0, "csr": 0.8, "compressed": 0.5}

def fake(candidates, *, rounds, **_):
    seen.append(list(candidates))
    def tick(name):
        def call():
            now[0] += FAST.get(name, 1.0)
        return call
    return race({n: tick(n) for n in candidates}, rounds=rounds, warmup=0, clock=lambda: now[0])

sp.race = fake
sp.measure = lambda fn, **_: Timing(0.01, 0.01, 0.01, 3)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
with torch.no_grad():
    for m in model:
        if isinstance(m, nn.Linear):
            m.weight.mul_(torch.rand_like(m.weight) > 0.9)
x = torch.randn(4, 32)
ref = model(x)
nc.sparsify_(model, x)
err = float((model(x) - ref).abs().max())
print(json.dumps({"races": len(seen), "err": err,
                  "formats": [getattr(m, "format", "dense") for m in model]}))
"""


def _child(cache: Path) -> dict:
    return child_json(["-c", _CHILD, str(cache)], child_env(NBCOMPRESS_TUNING="on"))


def test_a_new_process_reuses_the_decisions_without_racing(tmp_path):
    first, second = _child(tmp_path), _child(tmp_path)
    # 2 layers, the variant with the ReLU applied by the kernels, end to end; then none.
    assert first["races"] == 4 and second["races"] == 0
    assert second["formats"] == first["formats"] == ["csr", "dense", "csr"]
    assert second["err"] < 1e-4
    entries = json.loads(next(tmp_path.glob("tuning-*.json")).read_text())["entries"]
    assert sum(k.startswith(recorded.LAYER + "|") for k in entries) == 2
    assert sum(k.startswith(recorded.MODEL + "|") for k in entries) == 1
