"""A layer kept dense is raced again on the column-major input the sparse layers before it leave."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbcompress as nc
from nbcompress.engine.speedup import relayout
from nbcompress.engine.speedup import sparsify as sp
from nbcompress.engine.speedup.analysis import Analysis, LayerResult, SparsifyOptions
from nbcompress.kernels.modules import SparseLinear
from tests.engine.speedup.test_speedup import FAST, _fake_timer

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


class _Ffn(nn.Module):
    """Linear, a functional GELU (no module to fold), Linear: the second reads the first."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 128), nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _pruned() -> _Ffn:
    torch.manual_seed(0)
    model = _Ffn().eval()
    nc.prune_(model, 0.9, include_output=True)
    return model


X = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))


def test_only_a_batch_stored_column_major_is_tagged():
    a = torch.randn(8, 16)
    assert relayout.tag(a.mT.contiguous().mT) == (relayout.COLUMN_MAJOR,)
    # A sparse Linear's (B, T, out) output: the (B·T × out) transpose, viewed in 3-D.
    assert relayout.column_major(torch.randn(16, 2 * 4).mT.reshape(2, 4, 16))
    for x in (a, a[:1].mT.contiguous().mT, a[:, ::2], torch.randn(2, 3, 4), "x"):
        assert relayout.tag(x) == () and not relayout.column_major(x)


def test_the_layer_after_a_chosen_one_is_measured_again_on_the_input_it_gets():
    model = _pruned()
    up = SparseLinear.from_dense(model.up)
    first = Analysis(
        [
            LayerResult("up", model.up, chosen="csr", candidates={"csr": up}, key=("u",)),
            LayerResult("down", model.down, reason="dense is as fast or faster", key=("d",)),
        ]
    )
    seen = []

    def measure(name, module, calls, opts, warnings):
        ((args, _, output),) = calls
        seen.append((name, args[0]))
        with torch.no_grad():  # the output recorded is the dense layer's on that input
            assert torch.equal(output, module(args[0]))
        return LayerResult(name, module, chosen="csr", reason="csr measured faster")

    opts = SparsifyOptions.of(None)
    assert relayout.remeasure(model, (X,), first, measure, opts) == ["down"]
    ((name, x),) = seen
    assert name == "down" and relayout.column_major(x)  # the sparse up's output, via gelu
    with torch.no_grad():
        torch.testing.assert_close(x, F.gelu(model.up(X)), rtol=1e-5, atol=1e-5)
    assert first.layers[1].chosen == "csr" and "as the sparse layers before it" in (
        first.layers[1].reason
    )
    assert first.layers[0].chosen == "csr"  # a chosen layer is not measured again
    # Nothing chosen, or every timed layer chosen: nothing to measure again.
    none = Analysis([LayerResult("down", model.down, key=("d",))])
    assert relayout.remeasure(model, (X,), none, measure, opts) == [] and len(seen) == 1


def test_analyse_measures_again_unless_other_input_shapes_were_given(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    calls = []
    monkeypatch.setattr(relayout, "remeasure", lambda *a: calls.append(a) or [])
    sp.analyse(_pruned(), X)
    assert len(calls) == 1 and calls[0][3] is sp._measure_layer
    sp.analyse(_pruned(), X, other_inputs=[torch.randn(4, 32)])
    assert len(calls) == 1
