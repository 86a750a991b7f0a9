from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import nbcompress as nc
from nbcompress.engine.quantize import ort_int8
from nbcompress.engine.speedup import sparsify as sp
from nbcompress.kernels.modules import SparseConv2d, SparseLinear
from nbcompress.timing import Race, Timing, race
from tests.helpers import assert_same_state, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


def _pruned_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU())
    model.add_module("head", nn.Linear(48, 5))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                w = m.weight
                w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0
    return model


def _fake_timer(monkeypatch, seconds: dict[str, float] | Callable[[str, int], float]) -> None:
    """Replace wall-clock timing by fixed per-path times (tests never depend on speed).

    The real :func:`race` runs on a virtual clock: a candidate's ``i``-th timed call takes
    ``seconds[name]`` (or ``seconds(name, i)``) and runs nothing.
    """

    def fake_race(candidates, *, rounds, **_):
        now, calls = [0.0], Counter()

        def tick(name):
            def call():
                i, calls[name] = calls[name], calls[name] + 1
                now[0] += seconds(name, i) if callable(seconds) else seconds.get(name, 1.0)

            return call

        fns = {name: tick(name) for name in candidates}
        return race(fns, rounds=rounds, warmup=0, clock=lambda: now[0])

    monkeypatch.setattr(sp, "race", fake_race)
    monkeypatch.setattr(sp, "measure", lambda fn, **_: Timing(0.01, 0.01, 0.01, 3))


@pytest.fixture(autouse=True)
def _no_run_fusion(monkeypatch):
    # Fusing int8 runs into one ORT graph races on the real clock (test_speedup_int8_race
    # fakes that one): off in this module, or timing would decide its tests.
    monkeypatch.setenv("NBCOMPRESS_ORT_FUSE", "0")


FAST = {"dense": 1.0, "csr": 0.2, "csr_int8": 0.1, "bsr": 0.5, "torch_int8": 0.3,
        "compressed": 0.3}  # fmt: skip
SLOW = {"dense": 1.0, "csr": 2.0, "csr_int8": 2.0, "bsr": 2.0, "compressed": 1.0}


def test_sparsify_replaces_faster_layers_and_undo_restores_bit_exactly(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    before, ref = snapshot(model), model(x).detach()
    assert nc.sparsify_(model, x) is model
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2)) and isinstance(
        model.head, SparseLinear
    )
    assert {model[0].format, model.head.format} == {"csr"}  # int8 only when allowed
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    step = nc.history(model)[-1]
    assert step.name == "sparsify" and step.info["chosen"]["0"] == "csr"
    assert "faster than dense" in step.info["reasons"]["0"]
    nc.undo_(model)
    assert all(type(model[i]) is nn.Linear for i in (0, 2))
    assert_same_state(model, before)


def test_int8_is_chosen_only_when_allowed(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.sparsify_(model, x, allow_int8=True)
    assert model[0].format == "csr_int8"


def test_nothing_faster_leaves_the_model_alone_and_says_so(monkeypatch):
    _fake_timer(monkeypatch, SLOW)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    before = snapshot(model)
    with pytest.warns(UserWarning, match="no layer measured faster"):
        nc.sparsify_(model, x)
    assert_same_state(model, before)
    assert len(nc.history(model)) == 0


def test_dense_layers_are_never_proposed_even_if_timing_says_so(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model, x = nn.Sequential(nn.Linear(32, 16)), torch.randn(4, 32)
    report = nc.speedup(model, x)
    assert report.rows[0]["path"] == "dense fp32"
    assert report.rows[0]["chosen"] == "dense: only 0% zeros"  # the table says why
    assert "moves more bytes than dense" in report.rows[0]["why"]


def test_a_noisy_win_is_not_a_win(monkeypatch):
    # Sparse wins the median (0.4 vs 1.0) but loses two interleaved rounds out of five.
    rounds = [0.4, 0.4, 0.4, 1.5, 1.5]
    _fake_timer(monkeypatch, lambda name, i: 1.0 if name == "dense" else rounds[i % 5])
    report = nc.speedup(_pruned_mlp(), torch.randn(4, 32), repeats=5)
    assert report.rows[0]["sparse fp32"] == pytest.approx(0.4)
    assert all(r["path"] == "dense fp32" for r in report.rows)
    assert report.rows[0]["chosen"].startswith("dense: sparse ")
    assert report.rows[0]["chosen"].endswith("×, not in 3 of 4 rounds")


def test_not_faster_end_to_end_keeps_dense(monkeypatch):
    _fake_timer(monkeypatch, {**FAST, "compressed": 1.2})
    model, x = _pruned_mlp(), torch.randn(4, 32)
    with pytest.warns(UserWarning, match="not faster end to end"):
        report = nc.speedup(model, x, apply=True)
    assert "not faster end to end" in report.verdict and not report.applied
    assert all(type(m) is not SparseLinear for m in model)
    assert all(r["path"] == "dense fp32" for r in report.rows)
    assert report.rows[0]["chosen"] == "dense: model not faster end to end"


def test_failure_while_installing_rolls_back(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    before = snapshot(model)
    calls = []

    def flaky(tx, name, module):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("injected")
        tx.replace(name, module)

    monkeypatch.setattr(sp.bnfold, "install", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        nc.sparsify_(model, x)
    assert all(type(model[i]) is nn.Linear for i in (0, 2)) and type(model.head) is nn.Linear
    assert_same_state(model, before)
    assert len(nc.history(model)) == 0


def test_failure_while_building_leaves_model_untouched(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    before = snapshot(model)
    original = SparseLinear.from_dense.__func__
    count = []

    def failing(cls, module, **kw):
        count.append(1)
        if len(count) == 4:  # second layer (three formats are built per layer)
            raise RuntimeError("injected")
        return original(cls, module, **kw)

    monkeypatch.setattr(SparseLinear, "from_dense", classmethod(failing))
    with pytest.raises(RuntimeError, match="injected"):
        nc.sparsify_(model, x)
    assert_same_state(model, before)
    assert all(type(m) is not SparseLinear for m in model)


def test_conv_model_and_refused_layers(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
    )
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight[conv.weight.abs() < conv.weight.abs().median()] = 0
    x = torch.randn(2, 3, 10, 10)
    ref = model(x).detach()
    report = nc.speedup(model, x, apply=True)
    assert isinstance(model[0], SparseConv2d) and type(model[2]) is nn.Conv2d
    assert "zero padding" in report.rows[1]["why"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_grouped_and_depthwise_convs_are_sparsified(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)
    )
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight[conv.weight.abs() < conv.weight.abs().median()] = 0
    x = torch.randn(2, 8, 10, 10)
    ref = model(x).detach()
    nc.speedup(model, x, apply=True)
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], SparseConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_report_contents_with_real_timing():
    model, x = _pruned_mlp(), torch.randn(4, 32)
    before = snapshot(model)
    report = nc.speedup(model, x, repeats=3)
    assert_same_state(model, before)  # measuring never changes the model
    assert [r["layer"] for r in report.rows] == ["0", "2", "head"]
    row = report.rows[0]
    for key in ("dense fp32", "sparse fp32", "sparse int8", "torch int8"):
        assert row[key] is not None and row[key] > 0, key
    assert 0.0 <= row["break-even (est.)"] <= 1.0
    assert row["max |Δ|"] <= row["tolerance"]
    assert report.outputs_match and report.dense.repeats == 3  # one sample per round
    text, html = str(report), report._repr_html_()
    assert "end to end" in text and "tolerance" in text and "<table>" in html
    fig = report.plot()
    assert len(fig.axes[0].patches) >= 3 * len(report.rows)


def test_clear_win_needs_the_median_gain_and_three_rounds_of_four():
    def race_of(*ratios):
        timings = {n: Timing(1.0, 1.0, 1.0, len(ratios)) for n in ("dense", "csr")}
        return Race(("dense", "csr"), timings, {"dense": (1.0,) * len(ratios), "csr": ratios})

    assert sp.clear_win(race_of(0.5, 0.5, 0.5, 0.5), "csr", 0.05)
    assert not sp.clear_win(race_of(0.97, 0.97, 0.97, 0.97), "csr", 0.05)  # gain < 5%
    assert not sp.clear_win(race_of(0.5, 0.5, 0.5, 1.5, 1.5), "csr", 0.05)  # 2 rounds of 5 lost
    assert sp.clear_win(race_of(0.5, 0.5, 0.5, 1.5), "csr", 0.05)  # 3 rounds of 4 won


def test_plot_draws_a_fresh_figure_or_into_a_given_axes(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    report = nc.speedup(_pruned_mlp(), torch.randn(4, 32))
    bars = len(report.paths) * len(report.rows)  # no 4-row blocks here: no block-sparse bars
    twins = ["torch int8"] + (["ONNX Runtime int8"] if ort_int8.ort_problem() is None else [])
    sparse = ["sparse fp32", "sparse int8", "sparse int8, int8 inputs"]
    assert report.paths == ["dense fp32", *sparse, *twins]
    fig = report.plot()
    assert type(fig) is Figure and len(fig.axes[0].patches) == bars
    ax = Figure().add_subplot()
    assert report.plot(ax=ax) is ax.figure and len(ax.patches) == bars


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, x: nc.sparsify_("model", x), TypeError, "model: expected a torch.nn.Module"),
        (lambda m, x: nc.sparsify_(m, None), ValueError, "example_inputs: an example input"),
        (lambda m, x: nc.sparsify_(m, torch.randn(4, 7)), ValueError, "example_inputs: the mod"),
        (lambda m, x: nc.speedup(m, x, layers="nope*"), ValueError, "layers: pattern 'nope"),
        (lambda m, x: nc.speedup(m, x, repeats=1), ValueError, "repeats:"),
        (lambda m, x: nc.speedup(nn.Sequential(nn.ReLU()), x), ValueError, "types:"),
        (lambda m, x: nc.sparsify_(m, x, repeat=3), TypeError, "repeat: not an option"),
    ],
)
def test_bad_input_gets_one_clear_message(call, error, match):
    with pytest.raises(error, match=match):
        call(_pruned_mlp(), torch.randn(4, 32))
