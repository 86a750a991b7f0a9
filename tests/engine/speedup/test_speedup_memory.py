"""Issue 11 (F11): sparsify_ holds one layer's candidates at a time and copies no weight.

Peak memory itself is measured by ``benchmarks/bench_memory.py`` (RSS is no test
material); these tests pin the structure that keeps it low, deterministically.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.memory import release_freed_memory, twin
from nbcompress.engine.speedup import candidates as cands
from nbcompress.kernels.modules import SparseLinear
from tests.engine.quantize.test_quantize_memory import most_alive_from_another, weight_copies
from tests.engine.speedup.test_speedup import FAST, _fake_timer, _pruned_mlp

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


class _Spy:
    """Stands in for a sparse module class: records each module built, and from what."""

    def __init__(self, cls: type, built: list, alive_at_build: list) -> None:
        self.cls, self.built, self.alive_at_build = cls, built, alive_at_build

    def from_dense(self, module: nn.Module, **kwargs):
        self.alive_at_build.append(most_alive_from_another(self.built, module))
        made = self.cls.from_dense(module, **kwargs)
        self.built.append((module, weakref.ref(made)))
        return made


def test_sparsify_keeps_at_most_the_chosen_candidate_of_each_layer_measured_before(monkeypatch):
    _fake_timer(monkeypatch, FAST)  # every layer's sparse candidates win: each keeps one
    built: list = []
    alive_at_build: list[int] = []
    monkeypatch.setattr(
        cands, "BUILDERS", {t: _Spy(c, built, alive_at_build) for t, c in cands.BUILDERS.items()}
    )
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.sparsify_(model, x)
    assert all(isinstance(m, SparseLinear) for m in (model[0], model[2], model.head))
    # Two formats (csr, csr_int8) were built per layer; while the next layer's were built,
    # each earlier layer held one at most (its winner), never all of its formats.
    assert len(built) >= 6 and max(alive_at_build) == 1


def test_sparsify_and_speedup_copy_no_weight(monkeypatch):
    _fake_timer(monkeypatch, FAST)
    copied = weight_copies(monkeypatch)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    nc.speedup(model, x)
    nc.sparsify_(model, x)
    # The end-to-end twin, torch.ao's int8 candidate and the break-even probes share the
    # layers' tensors (or get a broadcast zero) instead of deep-copying the weights.
    assert copied == []


def test_a_twin_shares_every_tensor_and_its_swaps_leave_the_original_alone():
    model = _pruned_mlp()
    double = twin(model, {"head": nn.Identity()})
    assert isinstance(model.head, nn.Linear) and isinstance(double.head, nn.Identity)
    assert double[0] is not model[0] and double[0].weight is model[0].weight
    double[0].weight = nn.Parameter(torch.zeros(64, 32))
    assert model[0].weight.count_nonzero() > 0
    assert isinstance(release_freed_memory(), bool)
