"""Issue 11 (F11): quantize_ copies no float weight and holds one layer's candidates at a time.

Peak memory itself is measured by ``benchmarks/bench_memory.py`` (RSS is no test
material); these tests pin the structure that keeps it low, deterministically.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.quantize import backends
from nbcompress.engine.quantize.report import serialized_size
from tests.helpers import assert_same_state, mlp, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def weight_copies(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the parameters deep-copied from now on (the list fills as they are)."""
    copied: list[tuple[int, ...]] = []
    real = nn.Parameter.__deepcopy__

    def counting(self, memo):
        copied.append(tuple(self.shape))
        return real(self, memo)

    monkeypatch.setattr(nn.Parameter, "__deepcopy__", counting)
    return copied


def most_alive_from_another(built: list, source: object) -> int:
    """Of the ``(source, weakref)`` pairs in ``built``, most still alive from one other source."""
    gc.collect()  # what is still referenced, not what waits for the cycle collector
    alive: dict[int, int] = {}
    for other, ref in built:
        if other is not source and ref() is not None:
            alive[id(other)] = alive.get(id(other), 0) + 1
    return max(alive.values(), default=0)


def _inputs(mode: str, x: torch.Tensor) -> dict:
    return {"example_inputs": x, "calibrate": x if mode == "static" else None}


@pytest.mark.parametrize("mode", ["dynamic", "weight", "static"])
def test_quantize_deep_copies_no_float_weight_and_undo_stays_exact(mode, monkeypatch):
    copied = weight_copies(monkeypatch)
    torch.manual_seed(0)
    model, x = mlp().eval(), torch.randn(8, 16)
    before = snapshot(model)
    nc.quantize_(model, mode, repeats=3, **_inputs(mode, x))
    # The float model timed end to end, the torch.ao candidates and the static regions
    # are twins sharing the float tensors: nothing of the weights' size is copied.
    assert copied == []
    nc.undo_(model)
    assert_same_state(model, before)  # the twins never wrote into the shared tensors


def test_quantize_keeps_at_most_the_chosen_candidate_of_each_layer_measured_before(
    monkeypatch,
):
    built: list = []
    alive_at_build: list[int] = []

    def spy(build):
        def wrapped(config, layer):
            alive_at_build.append(most_alive_from_another(built, layer))
            made = build(config, layer)
            built.append((layer, weakref.ref(made)))
            return made

        return wrapped

    spied = [dataclasses.replace(b, build=spy(b.build)) for b in backends.BACKENDS]
    monkeypatch.setattr(backends, "BACKENDS", spied)
    torch.manual_seed(0)
    model, x = mlp().eval(), torch.randn(8, 16)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3)
    per_layer = len(built) / 3
    assert per_layer >= 2  # several backends competed for each layer
    assert max(alive_at_build) <= 1  # earlier layers: their installed winner only


def test_serialized_size_counts_the_bytes_torch_save_writes():
    import io

    torch.manual_seed(0)
    model = mlp()
    quantized = nc.quantize_(mlp().eval(), "dynamic")
    for module in (model, quantized, {"a": model, "b": quantized}):
        buf = io.BytesIO()
        state = (
            {k: m.state_dict() for k, m in module.items()}
            if isinstance(module, dict)
            else module.state_dict()
        )
        torch.save(state, buf)
        assert serialized_size(module) == buf.tell()
