"""What a sensitivity procedure measures, and on which layers.

The pieces every procedure of the subsystem shares (the sweep, the measured refinement,
applying a suggestion, staged pruning): calling the user's ``evaluate`` with one clear error,
the data-free proxy metric (defined in :mod:`.proxy`), evaluating inside a trial that
restores the model bit-exactly, the layer selection, the option checks and progress lines.
Of the subsystem, only :mod:`.guard` and :mod:`.proxy` are imported here.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.cluster import progress_line
from nbcompress.engine.core.history import trial
from nbcompress.engine.core.layers import prunable_weights, select_layers
from nbcompress.engine.core.validation import as_inputs, eval_mode
from nbcompress.engine.prune.masks import GRANULARITIES, layer_units, zero_units
from nbcompress.engine.prune.prune import DEFAULT_TYPES
from nbcompress.engine.prune.targets import collect, not_pruned, split_multi
from nbcompress.engine.sensitivity.guard import EvaluateChangedModel, EvaluationError, restoring
from nbcompress.engine.sensitivity.proxy import Proxy

__all__ = [
    "EvaluationError",
    "Proxy",
    "call_evaluate",
    "check_sweep_options",
    "coverage_note",
    "eta_status",
    "layer_size",
    "layer_sparsity",
    "measurer",
    "measuring",
    "metric_name",
    "fmt_value",
    "progress_line",
    "select_sweep_layers",
    "spent",
    "weight_sparsity",
]


def _as_number(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"evaluate: {name} returned {type(value).__name__} {value!r}; it must return one "
            "number (e.g. accuracy as a float), higher is better unless higher_is_better=False "
            "(--lower-is-better)."
        )
    return float(value)


def call_evaluate(
    evaluate: Callable[[nn.Module], Any],
    model: nn.Module,
    where: str,
    trained: set[str] | None = None,
) -> float:
    """Run ``evaluate(model)``; one clear error naming the function if it raises or is no number.

    Parameters ``evaluate`` changes through gradient steps (a brief fine-tuning before it
    measures) are put back right after the call (:func:`.guard.restoring`), so the model
    is the same before and after; other changes are refused.

    Args:
        evaluate: The user's ``evaluate(model) -> float``.
        model: The model to pass.
        where: What the model is at this call, for error messages.
        trained: If given, the names of the parameters that were restored are added.
    """
    name = getattr(evaluate, "__name__", type(evaluate).__name__)
    try:
        with restoring(model, f"evaluate: {name}(model) ({where})") as restored:
            value = evaluate(model)
    except EvaluateChangedModel:
        raise
    except Exception as err:
        raise EvaluationError(
            f"evaluate: {name}(model) raised {type(err).__name__}: {err} ({where}). The model "
            "is restored; fix the function passed as evaluate (--eval) and rerun."
        ) from err
    if trained is not None:
        trained.update(restored.names)
    return _as_number(value, name)


def measurer(
    model: nn.Module, evaluate: Any, example_inputs: Any, *, proxy: bool = False
) -> Callable[[], float] | None:
    """A zero-argument function that measures ``model`` at the time it is called.

    Args:
        model: The model to measure.
        evaluate: ``evaluate(model) -> float``; used unless ``proxy``.
        example_inputs: Input of the data-free proxy (with ``proxy=True``); the proxy's
            reference output is the model's output now, when the measurer is made.
        proxy: Measure the proxy on ``example_inputs`` instead of calling ``evaluate``.

    Returns:
        The function, or ``None`` when there is nothing to measure with.
    """
    if evaluate is not None and not proxy:
        return lambda: call_evaluate(evaluate, model, "after applying the suggestion")
    if proxy and example_inputs is not None:
        metric = Proxy(model, as_inputs(example_inputs))
        return lambda: metric(model)
    return None


def check_sweep_options(
    evaluate: Any, example_inputs: Any, max_layers: Any, early_stop: Any, granularity: str
) -> None:
    """Raise one clear error on a bad evaluate, input, max_layers, early_stop, granularity."""
    if evaluate is not None and not callable(evaluate):
        raise TypeError(
            f"evaluate: expected a function evaluate(model) -> float, got "
            f"{type(evaluate).__name__} {evaluate!r}; in a notebook --eval names it."
        )
    if evaluate is None and example_inputs is None:
        raise ValueError(
            "evaluate: give an evaluation function (evaluate=fn, --eval fn; higher is better) "
            "or an example input (example_inputs=x, --input x) for the data-free proxy."
        )
    if max_layers is not None and (
        isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1
    ):
        raise ValueError(f"max_layers: expected a positive integer, got {max_layers!r}.")
    if early_stop is not None and (
        isinstance(early_stop, bool) or not isinstance(early_stop, numbers.Real) or early_stop < 0
    ):
        raise ValueError(
            f"early_stop: expected a non-negative drop such as 0.1, got {early_stop!r}."
        )
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: {granularity!r} is unknown; choose one of {GRANULARITIES}.")


def select_sweep_layers(
    model: nn.Module,
    layers: Any,
    types: Any,
    max_layers: int | None,
    granularity: str = "element",
    *,
    include_output: bool = False,
) -> tuple[dict[str, nn.Module], list[str]]:
    """The layers a sweep analyses, and notes on those left out.

    The same layers ``prune_`` prunes by default (:data:`~nbcompress.engine.prune.prune.
    DEFAULT_TYPES`: Linear, Conv, ConvTranspose, the projections of MultiheadAttention and
    the gate matrices of LSTM/GRU/RNN), and like ``prune_`` it leaves the model's output
    layer alone unless ``include_output`` (or the layer is named literally): a suggestion
    then never prunes a layer ``%prune`` would not. Attention and recurrent layers have
    no output channels: under ``granularity="channel"`` they are refused when asked for
    by type, else left out with a note, exactly as ``prune_`` does.
    """
    if layers is not None and not isinstance(layers, str) and len(layers) == 0:
        raise ValueError("layers: an empty list selects nothing; pass None to analyse every layer.")
    wanted = DEFAULT_TYPES if types is None else types
    selected, excluded = select_layers(model, layers, wanted, include_output=include_output)
    selected, skipped = split_multi(
        selected, keep_masks=False, granularity=granularity, explicit=types is not None
    )
    notes = []
    if max_layers is not None and len(selected) > max_layers:
        largest = sorted(selected, key=lambda n: -layer_size(selected[n]))
        keep = set(largest[:max_layers])
        notes.append(
            f"max_layers={max_layers}: analysed the {max_layers} largest of {len(selected)} "
            "layers; the others are left out of predictions and suggestions."
        )
        selected = {n: m for n, m in selected.items() if n in keep}
    if excluded:
        notes.append(
            f"Output layer {excluded} left alone, as prune_ does: pass include_output=True "
            "(--include-output) to analyse it."
        )
    notes.append(coverage_note(model, selected, skipped))
    return selected, [n for n in notes if n]


def coverage_note(model: nn.Module, selected: dict[str, nn.Module], skipped: dict[str, str]) -> str:
    """The share of ``model``'s parameters a procedure over ``selected`` leaves alone, and why.

    Prune's own line (:func:`~nbcompress.engine.prune.targets.not_pruned`), worded for an
    analysis: ``"12% of parameters not analysed: embeddings (opt-in…) 11%, biases/norms 1%"``;
    empty when every parameter is covered.
    """
    line, _ = not_pruned(model, collect(model, dict.fromkeys(selected, 0.5)), None, skipped)
    return line.replace("not pruned", "not analysed") + ("." if line else "")


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` in eval mode inside a trial that also restores every buffer.

    Buffers (e.g. BatchNorm statistics) are saved too, in case ``evaluate`` updates them.
    """
    with eval_mode(model), trial(model) as guard:
        for buf in model.buffers():
            guard.save_tensor(buf)
        yield


def weight_sparsity(weight: torch.Tensor, granularity: str) -> float:
    """Fraction of zero weights (or of all-zero 4×1 blocks, or output channels along dim 0)."""
    zero = zero_units(weight, granularity)
    return int(torch.count_nonzero(zero)) / zero.numel() if zero.numel() else 0.0


def layer_sparsity(module: nn.Module, granularity: str) -> float:
    """Fraction of a layer's removable units that are zero, over all its weight matrices.

    As ``prune_`` counts them (:func:`~nbcompress.engine.prune.masks.layer_units`): a
    MultiheadAttention's projections, an LSTM's gate matrices, a ConvTranspose's output
    channels (dim 1 of its weight).
    """
    if granularity == "element":
        # Zeros counted without a boolean copy of each weight (layer_units makes one).
        weights = [w.detach() for w in prunable_weights(module).values()]
        total = sum(w.numel() for w in weights)
        zero = total - sum(int(torch.count_nonzero(w)) for w in weights)
    else:
        zero, total, _ = layer_units(module, granularity)
    return zero / total if total else 0.0


def layer_size(module: nn.Module) -> int:
    """Weights in a layer's prunable weight matrices (what its sparsity is a share of)."""
    return sum(w.numel() for w in prunable_weights(module).values())


def metric_name(fn: Any) -> str:
    """Name of the metric an evaluation function computes (its ``__name__``)."""
    name = getattr(fn, "__name__", type(fn).__name__)
    return "metric" if name == "<lambda>" else name


def spent(evaluations: int, seconds: float) -> str:
    """What a procedure cost, as its reports say it: ``"12 evaluations in 3.4 s"``."""
    return f"{evaluations} evaluations in {seconds:.1f} s"


def fmt_value(value: float | None) -> str:
    """A metric value in progress lines and tables; ``—`` where nothing was measured."""
    return "—" if value is None else f"{value:.4g}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def eta_status(done: int, total: int, elapsed: float, measured: int | None = None) -> str:
    """``"24/252 evaluations, 10 s elapsed, ETA 1 min 35 s"``: where a procedure stands.

    Args:
        done: Points done (evaluated or filled without evaluating).
        total: Points in all.
        elapsed: Seconds since the procedure started.
        measured: Points actually evaluated (default ``done``); the ETA is their mean
            time times the points left, and ``ETA —`` until one was measured.
    """
    measured = done if measured is None else measured
    left = max(0, total - done)
    eta = "—" if measured <= 0 else _duration(elapsed / measured * left)
    return f"{done}/{total} evaluations, {_duration(elapsed)} elapsed, ETA {eta}"
