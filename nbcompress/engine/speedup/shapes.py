"""The shapes a layer is decided at: the example batch, and the other batches the user will run.

A text model runs batches of many lengths, and a sparse layer's gain over dense changes
with the rows it multiplies (on MiniLM's 384 × 1536 at 90%: 1.4–1.7× at 100–300 rows,
0.9–1.0× at 1500–3000 here). ``sparsify_`` decides each layer on its example input; with
``other_inputs`` it also times the chosen sparse module against dense on the layer's input
from each other batch (one per new shape bucket) and keeps the layer dense if it is slower
there: a layer is never swapped in where it would slow down the shapes the user runs.
Those calls also settle the kernel choices of those buckets ahead of time
(:func:`nbcompress.kernels.tuning.eager`), so the first pass at those shapes runs tuned.

Layers far below the sparsity where the sparse kernels can break even are not timed at
all (:func:`too_dense`): racing a dense MiniLM's 37 layers at batch 64 took 204 s for
decisions that could only be "dense".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.outputs import compare_outputs
from nbcompress.engine.core.summary import capture_calls
from nbcompress.engine.core.validation import as_inputs
from nbcompress.engine.speedup.analysis import LayerResult, SparsifyOptions, tolerance
from nbcompress.kernels.tuning import shape_bucket
from nbcompress.timing import Race

__all__ = [
    "MIN_SPARSITY",
    "SKIP_SPARSITY",
    "check_others",
    "confirm",
    "other_calls",
    "too_dense",
    "zeros",
]

#: Below this sparsity CSR (4-byte value + 2-byte index per nonzero) moves at least as
#: many bytes as the dense weight, so it cannot win; such layers are not even proposed.
MIN_SPARSITY = 1 / 3
#: Layers with fewer zeros than this are kept dense without being timed. The sparse
#: kernels' time grows with the nonzeros; at 90% sparsity they ran 1.1–2.1× faster than
#: dense on MiniLM's layers here (32–3000 rows), so at 45% (5.5 times the nonzeros) the
#: best of them would need a 2.6× better kernel than measured to break even.
SKIP_SPARSITY = 0.45

Call = tuple[tuple, dict, Any]


def zeros(module: nn.Module) -> float:
    """Fraction of exactly-zero weights (0 for a layer without a single weight tensor)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.numel():
        return 0.0
    return float(weight.detach().eq(0).sum()) / weight.numel()


def too_dense(sparsity: float) -> str | None:
    """Why a layer this sparse is kept dense without timing, or ``None`` to time it."""
    if sparsity < MIN_SPARSITY:
        return f"only {sparsity:.0%} sparse: CSR moves more bytes than dense; kept dense, not timed"
    if sparsity < SKIP_SPARSITY:
        return (
            f"only {sparsity:.0%} sparse: far below where the sparse kernels break even "
            f"(they need ≳{SKIP_SPARSITY:.0%} zeros); kept dense, not timed"
        )
    return None


def check_others(other_inputs: Any) -> list[tuple]:
    """``other_inputs`` as a list of normalised inputs; a clear error naming the argument."""
    if other_inputs is None:
        return []
    if isinstance(other_inputs, (torch.Tensor, dict)) or not isinstance(other_inputs, Sequence):
        raise TypeError(
            "other_inputs: expected a list of example inputs (each a tensor, tuple or dict "
            f"like example_inputs), got {type(other_inputs).__name__}; wrap one input in a list."
        )
    return [as_inputs(x, f"other_inputs[{i}]") for i, x in enumerate(other_inputs)]


def other_calls(
    model: nn.Module, layers: dict[str, nn.Module], others: list[tuple], first: dict[str, Call]
) -> dict[str, list[Call]]:
    """Each layer's calls from the other inputs, one per shape bucket not seen before.

    Args:
        model: The model (run once per other input, without gradients).
        layers: Qualified name → the layers to capture.
        others: Normalised other inputs (:func:`check_others`).
        first: Each layer's call from the example input (its bucket is not repeated).
    """
    found: dict[str, list[Call]] = {n: [] for n in layers}
    seen = {n: {_bucket(c)} for n, c in first.items() if _bucket(c) is not None}
    for inputs in others:
        for name, call in capture_calls(model, layers, inputs).items():
            bucket = _bucket(call)
            if bucket is not None and bucket not in seen.setdefault(name, set()):
                seen[name].add(bucket)
                found[name].append(call)
    return found


def _bucket(call: Call) -> tuple | None:
    args = call[0]
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    return shape_bucket(("in", *args[0].shape))


def confirm(
    res: LayerResult,
    calls: list[Call],
    opts: SparsifyOptions,
    race: Callable[[dict[str, Callable[[], object]], int], Race],
) -> None:
    """Keep ``res``'s sparse choice only if it is not slower than dense on every other call.

    Each call's output is checked against dense too. The speed-ups are kept in
    ``res.others`` (input shape → dense time / sparse time).

    Args:
        res: The layer's result, decided on the example input.
        calls: The layer's calls from the other inputs (:func:`other_calls`).
        opts: The options (``repeats`` timed rounds per race).
        race: Races ``{"dense": ..., format: ...}`` (dense the incumbent).
    """
    if res.chosen == "dense" or not calls:
        return
    fmt, cand, module = res.chosen, res.candidates[res.chosen], res.module
    for args, kwargs, output in calls:
        x = args[0]
        with torch.no_grad():
            diff = compare_outputs(output, cand(x), arg=f"layers[{res.name!r}]")
        shape = tuple(x.shape)
        if diff.max_abs > tolerance(fmt, diff.peak):
            _keep_dense(res, f"{fmt} output outside tolerance on input {shape}")
            return
        timed = race(
            {
                "dense": lambda args=args, kwargs=kwargs: module(*args, **kwargs),
                fmt: lambda x=x: cand(x),
            },
            opts.repeats,
        )
        res.others[shape] = speed = 1 / timed.ratio(fmt)
        if speed < 1:
            _keep_dense(res, f"{fmt} {speed:.2f}× (slower than dense) on input {shape}")
            return
    res.reason += "; not slower on " + ", ".join(f"{s} ({v:.2f}×)" for s, v in res.others.items())


def _keep_dense(res: LayerResult, why: str) -> None:
    res.reason = f"{res.reason}; kept dense: {why}"
    res.chosen = "dense"
