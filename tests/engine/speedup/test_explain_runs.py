"""The verdict and the history step say what the chosen layers run on (``explain.runs_on``)."""

from __future__ import annotations

import pytest
from torch import nn

from nbcompress.engine.core.history import Transaction
from nbcompress.engine.speedup.analysis import Analysis, LayerResult
from nbcompress.engine.speedup.explain import FUSED_TIMING, restate, runs_on

VERDICT = "4 layers on sparse kernels: 5.17× faster end to end"


def _layer(name: str, chosen: str, fused: str = "") -> LayerResult:
    res = LayerResult(name, nn.Linear(2, 2), chosen=chosen, fused=fused)
    if chosen != "dense":
        res.candidates = {chosen: nn.Identity()}  # the module that would be installed
    return res


@pytest.mark.parametrize(
    ("paths", "said"),
    [
        (["bsr_int8", "csr", "csr_int8_dynamic"], "3 layers on sparse kernels"),
        (["csr"], "1 layer on sparse kernels"),
        (["ort_int8", "bsr_int8", "csr", "dense", "bsr"],
         "3 layers on sparse kernels, 1 on ONNX Runtime int8"),
        (["torch_int8", "ort_int8", "torch_int8"],
         "2 layers on torch int8, 1 on ONNX Runtime int8"),
        (["dense"], "no layer swapped"),
    ],
)  # fmt: skip
def test_each_path_is_counted_where_it_runs(paths, said):
    assert runs_on([_layer(str(i), p) for i, p in enumerate(paths)]) == said


def test_fused_layers_are_counted_by_graph():
    one = [_layer(n, "ort_int8", fused="run a") for n in "abc"]
    assert runs_on(one) == "3 layers in one ONNX Runtime int8 graph"
    two = [*one, _layer("d", "ort_int8", "run b"), _layer("e", "ort_int8", "run b")]
    mixed = [_layer("s", "bsr_int8"), *two]
    assert runs_on(mixed) == "1 layer on sparse kernels, 5 in 2 ONNX Runtime int8 graphs"


def test_restate_rewrites_the_verdict_and_the_history_step_once():
    layers = [_layer("a", "bsr_int8"), _layer("b", "ort_int8"), _layer("c", "ort_int8")]
    analysis = Analysis(layers, verdict=VERDICT)
    tx = Transaction(nn.Linear(2, 2), "sparsify", "4 layer(s) on sparse kernels (…)")
    restate(analysis, tx)
    assert (
        analysis.verdict
        == "1 layer on sparse kernels, 2 on ONNX Runtime int8: 5.17× faster end to end"
    )
    assert (
        tx.step.detail
        == "1 layer on sparse kernels, 2 on ONNX Runtime int8 (5.17× faster end to end)"
    )
    for res in layers[1:]:
        res.fused = "one ORT graph b…c"
    restate(analysis, tx)
    restate(analysis)  # again (speedup after install_): said once
    head = "1 layer on sparse kernels, 2 in one ONNX Runtime int8 graph"
    assert analysis.verdict == f"{head}: 5.17× faster end to end{FUSED_TIMING}"
    assert tx.step.detail == f"{head} (5.17× faster end to end{FUSED_TIMING})"  # fmt: skip


@pytest.mark.parametrize(
    "verdict",
    [
        "no layer measured faster on the sparse kernels; model left dense",
        "not faster end to end (0.98×): 1.2e-3; model left dense",
    ],
)
def test_a_model_left_dense_keeps_its_verdict(verdict):
    analysis = Analysis([_layer("a", "dense")], verdict=verdict)
    restate(analysis)
    assert analysis.verdict == verdict
    kept = Analysis([_layer("a", "csr")], verdict=verdict)  # chosen, then dropped later
    restate(kept)
    assert kept.verdict == verdict
