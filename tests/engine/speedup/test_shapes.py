"""sparsify_ decides at the shapes the user runs, and does not time layers that cannot win."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.speedup import shapes
from nbcompress.engine.speedup import sparsify as sp
from nbcompress.kernels import dispatch, tuning
from nbcompress.kernels.modules import SparseLinear
from nbcompress.timing import Timing, race

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


def _pruned(sizes: list[int], amounts: list[float]) -> nn.Sequential:
    layers = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)]
    with torch.no_grad():
        for lin, amount in zip(layers, amounts, strict=True):
            w = lin.weight
            if amount:
                w[w.abs() <= w.abs().flatten().kthvalue(int(amount * w.numel())).values] = 0
    return nn.Sequential(*layers)


def _virtual_race(monkeypatch, seconds):
    """Races on a virtual clock: ``seconds(name, rows)`` per call, rows of the layer's input."""
    raced: list[tuple[str, ...]] = []
    rows = {"n": 0}
    original = SparseLinear.forward

    def spy(self, x):
        rows["n"] = x.reshape(-1, x.shape[-1]).shape[0]
        return original(self, x)

    monkeypatch.setattr(SparseLinear, "forward", spy)

    def fake_race(candidates, *, rounds, **_):
        raced.append(tuple(candidates))
        for fn in candidates.values():
            fn()  # the real call (its rows noted by the spy), then virtual time
        now, calls = [0.0], Counter()

        def tick(name):
            def call():
                calls[name] += 1
                now[0] += seconds(name, rows["n"])

            return call

        return race({n: tick(n) for n in candidates}, rounds=rounds, warmup=0, clock=lambda: now[0])

    monkeypatch.setattr(sp, "race", fake_race)
    monkeypatch.setattr(sp, "measure", lambda fn, **_: Timing(0.01, 0.01, 0.01, 3))
    return raced


def test_layers_far_below_break_even_are_neither_built_nor_timed(monkeypatch):
    raced = _virtual_race(monkeypatch, lambda name, n: 1.0 if name == "dense" else 0.2)
    built = []
    original = SparseLinear.from_dense.__func__

    def counting(cls, module, **kw):
        built.append(module.in_features)
        return original(cls, module, **kw)

    monkeypatch.setattr(SparseLinear, "from_dense", classmethod(counting))
    model = _pruned([32, 48, 40, 8], [0.0, 0.4, 0.9])  # dense, 40%, 90%
    a = sp.analyse(model, torch.randn(8, 32), time_whole=False)
    reasons = [r.reason for r in a.layers]
    assert "CSR moves more bytes than dense; kept dense, not timed" in reasons[0]
    assert "far below where the sparse kernels break even" in reasons[1]
    assert not a.layers[0].times and not a.layers[1].times
    assert set(built) == {40}  # only the 90% layer was packed (and raced)
    assert a.layers[2].chosen == "csr"
    # speedup, the measuring verb, still times every layer it reports.
    report = nc.speedup(model, torch.randn(8, 32))
    assert all(r["dense fp32"] is not None for r in report.rows)
    assert len(raced) > 2


def test_a_layer_slower_than_dense_on_another_input_shape_stays_dense(monkeypatch):
    # The sparse layer wins at 8 rows and loses at 512: never slower where the user runs it.
    def seconds(name: str, n: int) -> float:
        if name in ("dense", "compressed"):
            return 1.0 if name == "dense" else 0.5
        return 0.3 if n <= 64 else 1.5

    _virtual_race(monkeypatch, seconds)
    model = _pruned([32, 16], [0.9])
    a = sp.analyse(model, torch.randn(8, 32), time_whole=False, allow_bsr=False)
    assert a.layers[0].chosen == "csr"  # the example batch alone says sparse
    b = sp.analyse(
        model, torch.randn(8, 32), time_whole=False, allow_bsr=False,
        other_inputs=[torch.randn(6, 32), torch.randn(512, 32)],
    )  # fmt: skip
    layer = b.layers[0]
    assert layer.chosen == "dense" and "slower than dense) on input (512, 32)" in layer.reason
    assert list(layer.others) == [(512, 32)]  # 6 rows: the example's bucket, not again
    before = [p.clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="no layer measured faster"):
        nc.sparsify_(model, torch.randn(8, 32), other_inputs=[torch.randn(512, 32)])
    assert type(model[0]) is nn.Linear
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_a_layer_faster_on_every_input_is_swapped_and_says_where(monkeypatch):
    _virtual_race(monkeypatch, lambda name, n: 1.0 if name == "dense" else 0.4)
    model = _pruned([32, 16], [0.9])
    a = sp.analyse(
        model, torch.randn(8, 32), time_whole=False, allow_bsr=False,
        other_inputs=[torch.randn(300, 32)],
    )  # fmt: skip
    layer = a.layers[0]
    assert layer.chosen == "csr" and layer.others[(300, 32)] == pytest.approx(2.5)
    assert "not slower on (300, 32) (2.50×)" in layer.reason


def test_kernel_choices_are_made_at_the_shapes_sparsify_is_shown(monkeypatch):
    raced: list = []
    original = dispatch.choose

    def counting(options):
        raced.append(tuple(options))
        return original(options)

    monkeypatch.setattr(dispatch, "choose", counting)
    model = _pruned([64, 64], [0.9])
    with tuning.eager(False):  # as in a notebook: not inside the kernel tests' eager mode
        sp.analyse(model, torch.randn(70, 64), other_inputs=[torch.randn(300, 64)])
    # The example's and the other input's buckets were raced during the analysis.
    assert len(raced) >= 2


@pytest.mark.parametrize("bad", [torch.randn(4, 32), {"x": torch.randn(4, 32)}, 3])
def test_other_inputs_must_be_a_list_of_inputs(bad):
    with pytest.raises(TypeError, match="other_inputs: expected a list of example inputs"):
        nc.sparsify_(_pruned([32, 16], [0.9]), torch.randn(8, 32), other_inputs=bad)


def test_shape_rules():
    assert shapes.too_dense(0.9) is None and shapes.too_dense(shapes.SKIP_SPARSITY) is None
    assert "not timed" in shapes.too_dense(0.2) and "not timed" in shapes.too_dense(0.4)
