"""Layers raced again on the input layout they get once the chosen layers are installed.

A sparse Linear returns a batch as the transpose of an (out × N) buffer (its kernels store a
row's batch columns together), and torch's elementwise modules keep those strides, so the
next Linear reads a column-major input in the sparsified model, where the analysis captured
a row-major one from the dense model. The kernels' cost depends on it: in MiniLM at 2
threads (1280-token batches), ``output.dense`` (1536 → 384) took 7.9 ms on the row-major
input, 3.7 ms on the column-major one (the transposing copy is serial), and dense 5.4 ms:
raced on the captured input it stayed dense, the six FFN layers chosen were not a clear win
end to end (1.04×) and the model was left dense; all twelve FFN Linears sparse ran 1.19×.

So after the first pass, the model runs once more with the chosen layers swapped in (a
twin: the model is untouched), and each layer kept dense whose input there is column-major
is measured again on that input (a decision of its own in the tuning record: the layout is
part of its key, :func:`tag`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.memory import twin
from nbcompress.engine.core.summary import capture_calls
from nbcompress.engine.speedup.analysis import Analysis, LayerResult, SparsifyOptions

__all__ = ["COLUMN_MAJOR", "column_major", "remeasure", "tag"]

#: The record key's mark of a decision made on a column-major input.
COLUMN_MAJOR = "column-major"


def column_major(x: Any) -> bool:
    """Whether ``x``'s rows are stored column-major (the transpose of a C array).

    Rows are all dims but the last, as a Linear flattens them (≥ 2 rows, ≥ 2 features). A
    sparse Linear's (B, T, out) output is such a view (strides (T, 1, B·T)).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[-1] < 2 or x.numel() < 2:
        return False
    rows = x.reshape(-1, x.shape[-1])  # a copy where no view exists: then row-major
    return rows.shape[0] > 1 and rows.mT.is_contiguous()


def tag(x: Any) -> tuple[str, ...]:
    """What the input's layout adds to a layer's record key (nothing for row-major)."""
    return (COLUMN_MAJOR,) if column_major(x) else ()


def remeasure(
    model: nn.Module,
    inputs: tuple,
    analysis: Analysis,
    measure: Callable[..., LayerResult],
    opts: SparsifyOptions,
) -> list[str]:
    """Measure again the dense-kept layers whose input is column-major in the sparsified model.

    Args:
        model: The dense model (in eval mode, as measured).
        inputs: The example inputs, as ``as_inputs`` returns them.
        analysis: The first pass; a re-measured layer's result replaces its own in place.
        measure: ``measure(name, module, calls, opts, warnings)``: one layer measured on
            ``calls`` (its ``(args, kwargs, output)``), as the first pass measured it.
        opts: The options of the first pass.

    Returns:
        The names of the layers measured again.
    """
    chosen = analysis.chosen
    # Decided (timed, or reused from the record) and kept dense; one skipped stays skipped.
    kept = {r.name: i for i, r in enumerate(analysis.layers) if r.key is not None}
    kept = {n: i for n, i in kept.items() if n not in chosen}
    if not chosen or not kept:
        return []
    double = twin(model, {n: r.replacement for n, r in chosen.items()})
    with torch.no_grad():
        calls = capture_calls(double, {n: double.get_submodule(n) for n in kept}, inputs)
    again = []
    for name, i in kept.items():
        call = calls.get(name)
        if call is None or not call[0] or not column_major(call[0][0]):
            continue
        old = analysis.layers[i]
        new = measure(name, old.module, [call], opts, analysis.warnings)
        new.reason += "; measured on its input as the sparse layers before it leave it"
        analysis.layers[i] = new
        again.append(name)
    return again
