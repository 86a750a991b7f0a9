"""One sparse format on every chosen layer, raced end to end against the per-layer choice.

Timing is faked (a virtual clock per path or variant name, :func:`_fake_timer`); the
outputs, the modules installed and the records are real.
"""

from __future__ import annotations

import pytest
import torch

import nbcompress as nc
from nbcompress.engine.quantize import ort_int8
from nbcompress.engine.speedup import uniform
from nbcompress.engine.speedup.analysis import SparsifyOptions
from nbcompress.engine.speedup.sparsify import analyse
from nbcompress.kernels import tuning
from nbcompress.kernels.modules import SparseLinear
from tests.engine.speedup.test_speedup import _fake_timer, _pruned_mlp
from tests.engine.speedup.test_speedup_int8_race import LINEARS, _ffn, _no_ort, _paths
from tests.helpers import needs_ort

pytestmark = [
    pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel"),
    pytest.mark.filterwarnings("ignore:.*torch.ao.quantization is deprecated"),
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions"),
]

#: Per layer torch's int8 twin wins its own race; in the model, sparse int8 on every
#: layer (its activations folded in) beats that mix.
MIX = {"dense": 1.0, "csr": 0.4, "csr_int8": 0.3, "torch_int8": 0.2, "compressed": 0.3,
       uniform.PER_LAYER: 1.0, uniform.name_of("csr_int8"): 0.5,
       uniform.name_of("csr"): 0.8}  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("NBCOMPRESS_ORT_FUSE", "0")  # no ORT graph race on the real clock
    _no_ort(monkeypatch)


def test_one_format_faster_end_to_end_replaces_the_per_layer_mix(monkeypatch):
    _fake_timer(monkeypatch, MIX)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    ref = model(x).detach()
    report = nc.speedup(model, x, apply=True, allow_int8=True)
    assert _paths(model) == dict.fromkeys(LINEARS, "csr_int8")
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in LINEARS)
    assert all(row["chosen"].startswith("sparse int8") for row in report.rows)
    step = nc.history(model)[-1]
    for reason in step.info["reasons"].values():
        assert "csr_int8 on every chosen layer: 2.00× faster end to end" in reason
        assert "its own race chose torch_int8" in reason
    with torch.no_grad():
        out = model(x)
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-5
    assert step.info["chosen"] == dict.fromkeys(LINEARS, "csr_int8")


def test_the_per_layer_choice_stays_unless_one_format_is_faster(monkeypatch):
    ties = {uniform.name_of("csr_int8"): 1.0, uniform.name_of("csr"): 1.0}
    _fake_timer(monkeypatch, {**MIX, **ties})
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.speedup(model, x, apply=True, allow_int8=True)
    # torch's dynamic int8 Linear, as each layer's own race chose
    assert _paths(model) == dict.fromkeys(LINEARS, "Linear")
    assert nc.history(model)[-1].info["chosen"] == dict.fromkeys(LINEARS, "torch_int8")


def test_offers_only_formats_accurate_timed_and_allowed_on_every_chosen_layer(monkeypatch):
    _fake_timer(monkeypatch, {**MIX, uniform.PER_LAYER: 0.1})  # the mix stays
    model, x = _pruned_mlp(), torch.randn(4, 32)
    opts = SparsifyOptions(allow_int8=True, remeasure=True)
    analysis = analyse(model, x, opts)
    # Fastest summed first, at most TRIED (csr_int8_dynamic, 1 s a call, left out).
    assert uniform.offers(analysis, opts) == ["csr_int8", "csr"]
    analysis.layers[0].errors["csr_int8"] = 1.0  # outside its tolerance on one layer
    assert uniform.offers(analysis, opts) == ["csr", "csr_int8_dynamic"]
    assert uniform.offers(analysis, SparsifyOptions(allow_int8=False)) == ["csr"]
    for res in analysis.chosen.values():  # the choice is csr already: nothing to race
        res.chosen = "csr"
    assert uniform.offers(analysis, opts) == []


def test_the_adopted_format_is_recorded_and_the_next_run_builds_it_without_racing(
    monkeypatch, tmp_path
):
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    monkeypatch.setattr(tuning, "machine_busy", lambda: False)
    try:
        _fake_timer(monkeypatch, MIX)
        model, x = _pruned_mlp(), torch.randn(4, 32)
        nc.sparsify_(model, x, allow_int8=True)
        assert _paths(model) == dict.fromkeys(LINEARS, "csr_int8")
        again = _pruned_mlp()
        analysis = analyse(again, x, allow_int8=True, time_whole=False)
        assert all(r.recorded is not None for r in analysis.chosen.values())
        assert {r.chosen for r in analysis.chosen.values()} == {"csr_int8"}
        assert uniform.offers(analysis, SparsifyOptions(allow_int8=True)) == []
    finally:
        tuning.configure()


@needs_ort
@pytest.mark.parametrize("fuse", ["1", "0"])
def test_a_run_on_ort_int8_is_left_to_the_install_graph_race(monkeypatch, fuse):
    monkeypatch.setattr(ort_int8, "ort_problem", lambda: None)  # undo _quiet's
    monkeypatch.setenv("NBCOMPRESS_ORT_FUSE", fuse)
    _fake_timer(monkeypatch, {**MIX, "ort_int8": 0.1})  # ONNX Runtime wins every layer
    model, x = _ffn(), torch.randn(4, 32)
    analysis = analyse(model, x, allow_int8=True, remeasure=True, time_whole=False)
    paths = {r.chosen for r in analysis.chosen.values()}
    reasons = [r.reason for r in analysis.chosen.values()]
    if fuse == "1":  # the graph may win at install: the layers keep ORT for that race
        assert paths == {"ort_int8"} and all(uniform.GRAPH_LEFT in r for r in reasons)
    else:  # no graph: one sparse format on every layer races (and wins here)
        assert paths == {"csr_int8"} and not any(uniform.GRAPH_LEFT in r for r in reasons)


def test_no_format_is_offered_where_a_layer_was_checked_on_other_inputs(monkeypatch):
    # Only each layer's own choice was timed against dense on the other shapes.
    _fake_timer(monkeypatch, MIX)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    opts = SparsifyOptions(allow_int8=True, remeasure=True)
    analysis = analyse(model, x, opts, other_inputs=[torch.randn(64, 32)])
    assert all(r.others for r in analysis.chosen.values())
    assert uniform.offers(analysis, opts) == []
    assert {r.chosen for r in analysis.chosen.values()} == {"torch_int8"}
