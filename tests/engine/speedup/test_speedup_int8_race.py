"""Prune + int8: the race takes the dense int8 twins (torch's, ORT's) beside the sparse formats.

Timing is faked (:func:`_fake_timer`: a virtual clock per path); outputs, installs and
undo are real.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.quantize import ort_chain, ort_int8
from nbcompress.engine.quantize.ort_chain import FusedForward
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear
from nbcompress.engine.speedup import candidates, fused, recorded
from nbcompress.engine.speedup.analysis import SparsifyOptions, rtol
from nbcompress.engine.speedup.explain import FUSED_TIMING, label
from nbcompress.kernels import modules as kernel_modules
from nbcompress.kernels import tuning
from nbcompress.kernels.modules import SparseLinear
from nbcompress.timing import race
from tests.engine.speedup.test_speedup import _fake_timer, _pruned_mlp
from tests.helpers import assert_same_state, needs_ort, snapshot

pytestmark = [
    pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel"),
    pytest.mark.filterwarnings("ignore:.*torch.ao.quantization is deprecated"),
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions"),
]
#: ONNX Runtime's twin fastest of all, torch's second, then the sparse paths.
ORT_FASTEST = {"dense": 1.0, "csr": 0.4, "csr_int8": 0.3, "bsr": 0.5, "torch_int8": 0.2,
               "ort_int8": 0.1, "compressed": 0.3}  # fmt: skip
LINEARS = ["0", "2", "head"]


def _no_ort(monkeypatch) -> None:
    monkeypatch.setattr(ort_int8, "ort_problem", lambda: "onnxruntime is not installed (test)")


def _paths(model: nn.Module) -> dict[str, str]:
    def path(m: nn.Module) -> str:
        if isinstance(m, SparseLinear):
            return m.format
        return {OrtInt8Linear: "ort_int8", nn.Linear: "dense"}.get(type(m), type(m).__name__)

    return {n: path(model.get_submodule(n)) for n in LINEARS}


def _within_tolerance(model: nn.Module, ref: torch.Tensor, x: torch.Tensor) -> None:
    with torch.no_grad():
        out = model(x)
    assert (out - ref).abs().max() <= rtol("ort_int8") * ref.abs().max() + 1e-5


def test_without_allow_int8_no_int8_path_is_chosen_even_when_fastest(monkeypatch):
    _fake_timer(monkeypatch, ORT_FASTEST)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    report = nc.speedup(model, x, apply=True)
    assert _paths(model) == dict.fromkeys(LINEARS, "csr")  # the fastest float32 path
    fastest = "ONNX Runtime int8" if ort_int8.ort_problem() is None else "torch int8"
    notes = [n for n in report.notes if n.startswith(f"{fastest} was fastest but not allowed")]
    assert len(notes) == 1 and "--int8" in notes[0]


@pytest.fixture(autouse=True)
def _no_run_fusion(monkeypatch):
    # Fusion races on the real clock unless a test fakes it (_graph_race, which unsets this).
    monkeypatch.setenv(ort_chain.ENV_FUSE, "0")


@needs_ort
def test_the_ort_twin_is_chosen_where_fastest_installed_within_tolerance_and_undone(
    monkeypatch,
):
    monkeypatch.setenv(ort_chain.ENV_FUSE, "0")  # one layer at a time here; fusion below
    _fake_timer(monkeypatch, ORT_FASTEST)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    before, ref = snapshot(model), model(x).detach()
    report = nc.speedup(model, x, apply=True, allow_int8=True)
    assert _paths(model) == dict.fromkeys(LINEARS, "ort_int8")
    assert [r["path"] for r in report.rows] == ["ONNX Runtime int8"] * 3
    assert report.rows[0]["chosen"] == "ONNX Runtime int8: 10.00× vs dense"
    assert nc.history(model)[-1].info["chosen"] == dict.fromkeys(LINEARS, "ort_int8")
    # The verdict and the history step say what runs, not "3 layers on sparse kernels".
    assert report.outcome.startswith("Applied: 3 layers on ONNX Runtime int8: ")
    assert nc.history(model)[-1].detail.startswith("3 layers on ONNX Runtime int8 (")
    _within_tolerance(model, ref, x)
    nc.undo_(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in LINEARS)
    assert_same_state(model, before)


def test_torch_s_twin_is_chosen_where_it_is_the_fastest_path(monkeypatch):
    _fake_timer(monkeypatch, {**ORT_FASTEST, "ort_int8": 0.5})
    model, x = _pruned_mlp(), torch.randn(4, 32)
    before, ref = snapshot(model), model(x).detach()
    nc.sparsify_(model, x, allow_int8=True)
    assert all(isinstance(model.get_submodule(n), torch.ao.nn.quantized.dynamic.Linear)
               for n in LINEARS)  # fmt: skip
    assert nc.history(model)[-1].detail.startswith("3 layers on torch int8 (")
    _within_tolerance(model, ref, x)
    nc.undo_(model)
    assert_same_state(model, before)


def test_a_twin_outside_its_tolerance_is_not_chosen(monkeypatch):
    _fake_timer(monkeypatch, ORT_FASTEST)
    real = candidates.build_twin

    def noisy(path, module, seen):
        built = real(path, module, seen)
        return None if built is None else _Plus(built)

    monkeypatch.setattr(candidates, "build_twin", noisy)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    report = nc.speedup(model, x, apply=True, allow_int8=True)
    assert _paths(model) == dict.fromkeys(LINEARS, "csr_int8")  # the fastest accurate one
    assert any(n.startswith("int8 rejected, output outside tolerance") for n in report.notes)


class _Plus(nn.Module):
    """A twin whose output is off by far more than its tolerance."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.inner(x) + 1.0


def test_without_onnxruntime_its_twin_is_skipped_and_said_once(monkeypatch):
    _no_ort(monkeypatch)
    _fake_timer(monkeypatch, ORT_FASTEST)
    model, x = _pruned_mlp(), torch.randn(4, 32)
    report = nc.speedup(model, x, apply=True, allow_int8=True)
    quantized = torch.ao.nn.quantized.dynamic.Linear  # torch's twin: the next fastest
    assert all(isinstance(model.get_submodule(n), quantized) for n in LINEARS)
    assert "ONNX Runtime int8" not in report.paths
    said = [n for n in report.notes if n.startswith(candidates.ORT_SKIPPED)]
    assert said == [f"{candidates.ORT_SKIPPED}: onnxruntime is not installed (test)"]
    assert "ort_int8" not in candidates.choosable(SparsifyOptions(allow_int8=True))


def _ffn() -> nn.Sequential:
    """Linear, GELU, Linear, ReLU, Linear: one fusable run, 90% zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)
    ).eval()
    nc.prune_(model, 0.9, include_output=True)
    return model


def _graph_race(monkeypatch, graph: float) -> list[str]:
    """``ort_chain``'s race on a virtual clock: the graph takes ``graph``, the run 1.0."""
    raced: list[str] = []

    def fake(candidates, *, rounds, **_):
        now, calls = [0.0], Counter()
        raced.extend(candidates)

        def tick(name):
            def call():
                calls[name] += 1
                now[0] += graph if name == "graph" else 1.0

            return call

        return race({n: tick(n) for n in candidates}, rounds=rounds, warmup=0, clock=lambda: now[0])

    monkeypatch.setattr(ort_chain, "race", fake)
    monkeypatch.setattr(fused, "race", fake)  # graph_wins's, where fuse_chains takes it
    return raced


@needs_ort
@pytest.mark.parametrize("graph", [0.5, 1.0])
def test_a_run_allowed_ort_int8_becomes_one_graph_only_where_it_races_faster(monkeypatch, graph):
    monkeypatch.delenv(ort_chain.ENV_FUSE, raising=False)
    # Sparse int8 wins every layer on its own; the run may still go faster as one graph.
    _fake_timer(monkeypatch, {**ORT_FASTEST, "ort_int8": 0.35, "torch_int8": 0.5})
    raced = _graph_race(monkeypatch, graph)
    model, x = _ffn(), torch.randn(4, 32)
    before, ref = snapshot(model), model(x).detach()
    report = nc.speedup(model, x, apply=True, allow_int8=True)
    assert raced == ["layers", "graph"]
    fused = isinstance(model.__dict__.get("forward"), FusedForward)
    assert fused is (graph < 1.0)
    linears = [type(model[i]) for i in (0, 2, 4)]
    if fused:
        assert linears == [OrtInt8Linear] * 3
        assert all(r["chosen"].startswith("ONNX Runtime int8, one graph") for r in report.rows)
        assert any(n.startswith("fused at install") for n in report.notes)
        assert nc.history(model)[-1].info["chosen"] == dict.fromkeys(["0", "2", "4"], "ort_int8")
        said = "3 layers in one ONNX Runtime int8 graph"
        assert report.outcome.startswith(f"Applied: {said}: ")
        assert report.outcome.endswith(f"{FUSED_TIMING}.")  # timed per layer, before fusing
        assert nc.history(model)[-1].detail.startswith(f"{said} (")
    else:
        assert linears == [SparseLinear] * 3
        assert report.outcome.startswith("Applied: 3 layers on sparse kernels: ")
    _within_tolerance(model, ref, x)
    nc.undo_(model)
    assert (
        "forward" not in model.__dict__ and [type(model[i]) for i in (0, 2, 4)] == [nn.Linear] * 3
    )
    assert_same_state(model, before)


@needs_ort
def test_without_allow_int8_no_run_is_fused(monkeypatch):
    _fake_timer(monkeypatch, ORT_FASTEST)
    raced = _graph_race(monkeypatch, 0.1)
    model = _ffn()
    nc.speedup(model, torch.randn(4, 32), apply=True)
    assert raced == [] and "forward" not in model.__dict__


@needs_ort
def test_sparsify_installs_the_ort_twin_where_it_is_fastest(monkeypatch):
    monkeypatch.setenv(ort_chain.ENV_FUSE, "0")
    _fake_timer(monkeypatch, ORT_FASTEST)
    model, x = _ffn(), torch.randn(4, 32)
    ref = model(x).detach()
    nc.sparsify_(model, x, allow_int8=True)
    assert [type(model[i]) for i in (0, 2, 4)] == [OrtInt8Linear] * 3
    _within_tolerance(model, ref, x)


@pytest.fixture
def record(tmp_path):
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    yield tuning.active()
    tuning.configure()


@needs_ort
def test_a_recorded_ort_choice_is_reused_without_racing_and_refused_once_ort_is_gone(
    record, monkeypatch
):
    monkeypatch.setenv(ort_chain.ENV_FUSE, "0")
    _fake_timer(monkeypatch, ORT_FASTEST)
    first, x = _pruned_mlp(), torch.randn(4, 32)
    second, third = copy.deepcopy(first), copy.deepcopy(first)
    nc.sparsify_(first, x, allow_int8=True)
    assert _paths(first) == dict.fromkeys(LINEARS, "ort_int8")

    def no_race(*args, **kwargs):
        raise AssertionError("raced although the decision is recorded")

    with monkeypatch.context() as m:
        m.setattr("nbcompress.engine.speedup.sparsify.race", no_race)
        nc.sparsify_(second, x, allow_int8=True)
    assert _paths(second) == dict.fromkeys(LINEARS, "ort_int8")
    # Without ONNX Runtime the key differs (its paths): measured again, never reused.
    _no_ort(monkeypatch)
    nc.sparsify_(third, x, allow_int8=True)
    assert "ort_int8" not in _paths(third).values()


def test_the_record_key_names_the_paths_the_choice_could_take(monkeypatch):
    layer, opts = nn.Linear(8, 8), SparsifyOptions(allow_int8=True)
    with_int8 = recorded.layer_key(layer, (2, 8), opts)
    without = recorded.layer_key(layer, (2, 8), SparsifyOptions())
    assert with_int8 != without
    monkeypatch.setattr(kernel_modules, "FORMATS", (*kernel_modules.FORMATS, "bsr_int8"))
    assert recorded.layer_key(layer, (2, 8), opts) != with_int8  # a new int8 format re-races
    assert recorded.layer_key(layer, (2, 8), SparsifyOptions()) == without  # not a float one


def test_a_newly_registered_sparse_format_joins_the_race(monkeypatch):
    base = tuple(f for f in kernel_modules.FORMATS if f != "bsr_int8")
    monkeypatch.setattr(kernel_modules, "FORMATS", (*base, "bsr_int8"))  # registered last
    blocks = nn.Linear(16, 8)
    with torch.no_grad():
        blocks.weight[4:] = 0  # one full 4-row block kept: block formats fit
    assert candidates.formats_of(blocks, allow_bsr=True) == [*base, "bsr_int8"]
    flat = [f for f in base if not f.startswith("bsr")]
    assert candidates.formats_of(blocks, allow_bsr=False) == flat
    # Without allow_int8 (and not asked for figures) no int8 path is even built.
    assert candidates.paths_of(blocks, SparsifyOptions()) == ["csr", "bsr"]
    # A layer too dense to be chosen: no sparse int8 figure is built, even for the report.
    dense = nn.Linear(16, 8)
    report_paths = candidates.paths_of(dense, SparsifyOptions(remeasure=True))
    assert report_paths == ["csr", "bsr", "torch_int8", "ort_int8"]
    paths = candidates.paths_of(blocks, SparsifyOptions(allow_int8=True))
    assert paths[-2:] == ["torch_int8", "ort_int8"]
    assert rtol("bsr_int8") == rtol("csr_int8") and rtol("bsr") == rtol("csr")
    assert label("bsr_int8") == "block-sparse int8" and label("ort_int8") == "ONNX Runtime int8"
    assert not SparsifyOptions().allows("bsr_int8") and SparsifyOptions().allows("bsr")


@needs_ort
@pytest.mark.parametrize("graph", [0.5, 1.0])
def test_inside_a_run_ort_int8_is_one_graph_or_not_at_all(monkeypatch, graph):
    monkeypatch.delenv(ort_chain.ENV_FUSE, raising=False)
    # ORT wins every layer's own race; sparse int8 is the fastest other path.
    _fake_timer(monkeypatch, {**ORT_FASTEST, "torch_int8": 0.5})
    raced = _graph_race(monkeypatch, graph)
    model, x = _ffn(), torch.randn(4, 32)
    before, ref = snapshot(model), model(x).detach()
    report = nc.speedup(model, x, apply=True, allow_int8=True)
    assert raced == ["layers", "graph"]
    if graph < 1.0:
        assert [type(model[i]) for i in (0, 2, 4)] == [OrtInt8Linear] * 3
    else:  # the graph lost to the run on sparse int8: no layer on ORT between them
        assert [model[i].format for i in (0, 2, 4)] == ["csr_int8"] * 3
        assert all("only as one graph with its run" in r["why"] for r in report.rows)
        assert nc.history(model)[-1].info["chosen"] == dict.fromkeys(["0", "2", "4"], "csr_int8")
    _within_tolerance(model, ref, x)
    nc.undo_(model)
    assert_same_state(model, before)
