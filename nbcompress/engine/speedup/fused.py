"""Runs of Linears inside an ``nn.Sequential`` on one ONNX Runtime int8 graph, at install.

``sparsify_``/``speedup`` choose each layer's path on its own input, in isolation. Layer by
layer, ONNX Runtime's dense int8 pays for every return to torch between two layers (four
BERT-FFN Linears: 1,274 µs one by one, 751 µs as one graph here, see
:mod:`nbcompress.engine.quantize.ort_chain`), so a run chosen per layer (sparse or ORT) may
lose to the same run as one graph. After the per-layer choice is installed, every run of
≥ 2 Linears (activations between) whose ONNX Runtime twin was allowed (``allow_int8``)
and within its output tolerance is handed to ``%quantize``'s own
:func:`~nbcompress.engine.quantize.ort_chain.fuse_chains`: it races the run as installed
against the graph on the run's real input and fuses only where the graph is clearly faster
and no less accurate (``NBCOMPRESS_ORT_FUSE=0`` switches it off), inside the same history
transaction, so one ``undo_`` removes it with the rest.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nbcompress.engine.core.validation import as_inputs
from nbcompress.engine.speedup.analysis import Analysis, LayerResult, rtol

__all__ = ["PATH", "REPEATS", "fusable", "fuse_runs"]

#: The per-layer path a fused run's layers take (its module is ``OrtInt8Linear``).
PATH = "ort_int8"
#: Timed rounds of the race of a run as installed against its graph.
REPEATS = 9


def fusable(res: LayerResult) -> bool:
    """Whether ``res``'s layer may join an ORT int8 graph: the twin allowed and accurate."""
    return type(res.module) is nn.Linear and PATH in res.accurate


def fuse_runs(model: nn.Module, tx: Any, analysis: Analysis, inputs: Any) -> list[str]:
    """Fuse the runs of fusable layers where the graph races faster; one note per run fused.

    Every fused layer's result in ``analysis`` then says ``ort_int8`` (its module the
    graph's step, installed in ``model``), with the run's measured gain in its reason.

    Args:
        model: The model, inside transaction ``tx`` with the per-layer choices installed.
        tx: The history transaction of the install.
        analysis: The per-layer results (which layers may take ONNX Runtime int8).
        inputs: The example inputs the analysis ran on; ``None``: nothing is fused.
    """
    found = {r.name: r for r in analysis.layers if fusable(r)}
    if inputs is None or len(found) < 2:
        return []
    from nbcompress.engine.quantize.config import DynamicInt8Config
    from nbcompress.engine.quantize.modes import Job
    from nbcompress.engine.quantize.ort_chain import fuse_chains

    job = Job(
        model=model,
        config=DynamicInt8Config(tolerance=rtol(PATH)),
        family="onnxruntime",
        selected={n: r.module for n, r in found.items()},
        inputs=as_inputs(inputs),
        calibrate=None,
        only_faster=True,
        repeats=REPEATS,
        rows=[{"layer": n, "backend": "onnxruntime-int8"} for n in found],
        new={n: model.get_submodule(n) for n in found},
    )
    fuse_chains(job, tx)
    notes = []
    for row in job.rows:
        note = row.get("note")
        if note is None:
            continue
        res = found[row["layer"]]
        res.chosen, res.dropped = PATH, False
        res.candidates = {PATH: job.new[res.name]}
        res.reason, res.fused = f"{res.reason}; {note}", note
        if note not in notes:
            notes.append(note)
    return notes
