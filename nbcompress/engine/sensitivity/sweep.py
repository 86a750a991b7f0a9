"""L1 sensitivity sweep: how much the metric drops when one layer alone is pruned.

For each selected layer and ratio the layer is pruned inside a :func:`~nbcompress.trial`
(always rolled back), the model is evaluated, and the curve point is recorded. The model is
bit-exactly unchanged afterwards, also when ``evaluate`` raises or the user interrupts. The
result predicts the metric of per-layer ratios and suggests ratios for a budget
(:mod:`nbcompress.engine.sensitivity.allocate`); the latest result and suggestion of each
model are kept in a weak-keyed registry so that ``%prune model --suggested`` and the
explorer find them.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.core.costs import macs
from nbcompress.engine.core.history import trial
from nbcompress.engine.core.layers import select_layers
from nbcompress.engine.core.summary import capture_calls
from nbcompress.engine.core.validation import (
    as_inputs,
    check_amount,
    check_module,
    eval_mode,
    primary_output,
    run_forward,
)
from nbcompress.engine.prune.masks import GRANULARITIES, zero_units
from nbcompress.engine.prune.prune import prune_
from nbcompress.engine.sensitivity.allocate import ApplyReport, Suggestion, apply_suggestion_
from nbcompress.engine.sensitivity.result import (
    SensitivityResult,
    latest,
    latest_suggestion,
    remember,
)

__all__ = [
    "ApplyReport",
    "EvaluationError",
    "SensitivityResult",
    "Suggestion",
    "apply_suggestion_",
    "latest",
    "latest_suggestion",
    "measurer",
    "measuring",
    "remember",
    "sensitivity",
]


# --- the sweep -------------------------------------------------------------------------------


class EvaluationError(RuntimeError, ValueError):
    """``evaluate`` raised during a sweep; the model is restored and ``result`` is partial.

    Also a ``ValueError``, so that the magics report it as a one-line usage error naming
    ``--eval``.
    """

    def __init__(self, message: str, result: SensitivityResult | None = None) -> None:
        super().__init__(message)
        self.result = result


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


def call_evaluate(evaluate: Callable[[nn.Module], Any], model: nn.Module, where: str) -> float:
    """Run ``evaluate(model)``; one clear error naming the function if it raises or is no number."""
    name = getattr(evaluate, "__name__", type(evaluate).__name__)
    try:
        value = evaluate(model)
    except Exception as err:
        raise EvaluationError(
            f"evaluate: {name}(model) raised {type(err).__name__}: {err} ({where}). The model "
            "is restored; fix the function passed as evaluate (--eval) and rerun."
        ) from err
    return _as_number(value, name)


class Proxy:
    """Data-free metric: fidelity of the (pruned) model's output to the dense output."""

    def __init__(self, model: nn.Module, inputs: tuple) -> None:
        self.inputs = inputs
        with eval_mode(model):
            ref = primary_output(run_forward(model, inputs))
        if ref is None or not ref.is_floating_point():
            raise TypeError(
                "evaluate: without an evaluation function the proxy compares floating-point "
                "outputs, but the model returned none; pass evaluate=fn (--eval fn)."
            )
        # Two-dimensional outputs with several columns are read as classifier logits.
        self.kl = ref.dim() == 2 and ref.shape[1] > 1
        self.ref = ref.detach().float()
        self.name = "output agreement exp(-KL)" if self.kl else "output cosine similarity"

    def __call__(self, model: nn.Module) -> float:
        out = primary_output(run_forward(model, self.inputs)).detach().float()
        if self.kl:
            kl = F.kl_div(
                F.log_softmax(out, 1),
                F.log_softmax(self.ref, 1),
                log_target=True,
                reduction="none",
            ).sum(1)
            return float(torch.exp(-kl).mean())
        rows = len(out) if out.dim() > 1 else 1
        sim = F.cosine_similarity(out.reshape(rows, -1), self.ref.reshape(rows, -1), dim=1)
        return float(sim.mean())


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


def _check_ratios_arg(ratios: Any) -> list[float]:
    if ratios is None:
        return [round(0.1 * i, 10) for i in range(1, 10)]
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
        raise TypeError(
            f"ratios: expected a non-empty list of fractions in (0, 1) such as [0.1, 0.5, 0.9], "
            f"got {ratios!r}."
        )
    checked = [check_amount(r, f"ratios[{i}]", allow_zero=False) for i, r in enumerate(ratios)]
    return sorted(set(checked))


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
    model: nn.Module, layers: Any, types: Any, max_layers: int | None
) -> tuple[dict[str, nn.Module], list[str]]:
    """The weighted layers a sweep analyses (output layer included), and notes on those left out."""
    if layers is not None and not isinstance(layers, str) and len(layers) == 0:
        raise ValueError("layers: an empty list selects nothing; pass None to analyse every layer.")
    # Unlike pruning, the sweep analyses the output layer too: its curve is what tells
    # whether it can be pruned at all.
    selected, _ = select_layers(model, layers, types, include_output=True)
    no_weight = [
        n for n, m in selected.items() if not isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    if no_weight:
        raise ValueError(
            f"types: no single `weight` to prune by L1 in {', '.join(no_weight)} (e.g. "
            "MultiheadAttention, LSTM); select Linear, Conv or Embedding layers instead."
        )
    notes = []
    if max_layers is not None and len(selected) > max_layers:
        keep = set(sorted(selected, key=lambda n: -selected[n].weight.numel())[:max_layers])
        notes.append(
            f"max_layers={max_layers}: analysed the {max_layers} largest of {len(selected)} "
            "layers; the others are left out of predictions and suggestions."
        )
        selected = {n: m for n, m in selected.items() if n in keep}
    return selected, notes


def _layer_macs(model, selected, inputs) -> dict[str, int | None]:
    if inputs is None:
        return dict.fromkeys(selected)
    with eval_mode(model):
        calls = capture_calls(model, selected, inputs)
    return {
        n: (macs(selected[n], calls[n][0], calls[n][2]) if n in calls else None) for n in selected
    }


class _Progress:
    """Plain-text progress on stderr: one line per finished layer."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.done = enabled, total, 0

    def step(self, result: SensitivityResult, layer: str, finished: bool) -> None:
        self.done += 1
        if self.enabled and finished:
            values = " ".join(_fmt_metric(v) for v in result.curves[layer])
            print(
                f"sensitivity [{self.done}/{self.total}, {result.seconds:.1f} s] {layer}: {values}",
                file=sys.stderr,
                flush=True,
            )


def _fmt_metric(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float] | None = None,
    *,
    ratios: Sequence[float] | None = None,
    layers: str | Sequence[str] | None = None,
    types: Iterable[str | type] | str | type | None = None,
    granularity: str = "element",
    example_inputs: Any = None,
    higher_is_better: bool = True,
    metric: str | None = None,
    max_layers: int | None = None,
    early_stop: float | None = None,
    progress: bool = True,
    callback: Callable[[SensitivityResult, str, float], None] | None = None,
) -> SensitivityResult:
    """Prune each layer alone by L1 at each ratio, evaluate, and restore it bit-exactly.

    The model is evaluated in eval mode (each module's flag is restored afterwards) and is
    bit-exactly unchanged when the sweep ends, fails or is interrupted (Ctrl-C returns the
    partial result with ``complete=False``).

    Args:
        model: The model to analyse (not changed).
        evaluate: ``evaluate(model) -> float``; higher is better unless
            ``higher_is_better=False``. ``None``: a data-free proxy on ``example_inputs``
            (agreement of the pruned with the dense output), labelled as a proxy.
        ratios: Fractions to prune, each in (0, 1); default 0.1, 0.2, …, 0.9.
        layers: Glob pattern(s) of layers to analyse; default every Linear/Conv layer,
            the output layer included.
        types: Layer types to analyse (names or classes).
        granularity: ``"element"`` (unstructured), ``"block"`` (4×1 blocks, see
            :func:`~nbcompress.prune_`) or ``"channel"`` (whole output channels).
        example_inputs: Input for the proxy and for MAC estimates.
        higher_is_better: ``False`` for losses, perplexity, RMSE.
        metric: Name of the metric (default: the function's name).
        max_layers: Analyse only this many layers, the largest first.
        early_stop: Stop a layer's sweep once its metric fell by more than this.
        progress: Print plain-text progress to stderr.
        callback: ``callback(result_so_far, layer, ratio)`` after each evaluation.

    Returns:
        The result, also remembered as the model's latest (see :func:`latest`).

    Raises:
        TypeError: ``evaluate`` is not callable or returns something other than a number.
        ValueError: Ratios outside (0, 1), an empty layer selection, or a bad option.
        EvaluationError: ``evaluate`` raised; the partial result is on ``err.result``.
    """
    check_module(model)
    ratio_list = _check_ratios_arg(ratios)
    check_sweep_options(evaluate, example_inputs, max_layers, early_stop, granularity)
    selected, notes = select_sweep_layers(model, layers, types, max_layers)
    inputs = as_inputs(example_inputs) if example_inputs is not None else None
    with measuring(model):
        proxy = Proxy(model, inputs) if evaluate is None else None
        start = time.perf_counter()
        where = "on the unpruned model"
        baseline = proxy(model) if proxy else call_evaluate(evaluate, model, where)
        if not math.isfinite(baseline):
            raise ValueError(
                f"evaluate: returned {baseline} on the unpruned model; need a finite number."
            )
        result = SensitivityResult(
            layers=list(selected), ratios=ratio_list, baseline=baseline,
            curves={n: [None] * len(ratio_list) for n in selected},
            sizes={n: m.weight.numel() for n, m in selected.items()},
            macs=_layer_macs(model, selected, inputs),
            metric=metric or (proxy.name if proxy else metric_name(evaluate)),
            higher_is_better=bool(higher_is_better), proxy=proxy is not None,
            granularity=granularity, evaluations=1, seconds=0.0, complete=False, notes=notes,
            start={n: weight_sparsity(m.weight, granularity) for n, m in selected.items()},
        )  # fmt: skip
        remember(model, result, evaluate=evaluate, example_inputs=example_inputs)
        run = _Run(model, selected, result, proxy or evaluate, early_stop, callback, start)
        run.sweep(_Progress(progress, len(selected) * len(ratio_list)))
    return result


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
    """Fraction of zero weights (or of all-zero 4×1 blocks, or output channels)."""
    zero = zero_units(weight, granularity)
    return float(zero.float().mean()) if zero.numel() else 0.0


def metric_name(fn: Any) -> str:
    """Name of the metric an evaluation function computes (its ``__name__``)."""
    name = getattr(fn, "__name__", type(fn).__name__)
    return "metric" if name == "<lambda>" else name


@dataclass
class _Run:
    """State of one sweep: what to evaluate and where results go."""

    model: nn.Module
    selected: dict[str, nn.Module]
    result: SensitivityResult
    evaluate: Callable[[nn.Module], Any]
    early_stop: float | None
    callback: Callable[[SensitivityResult, str, float], None] | None
    start: float

    def evaluate_at(self, name: str, ratio: float) -> float:
        """Metric with only ``name`` pruned at ``ratio``; the layer is restored on exit."""
        with trial(self.model):
            prune_(
                self.model,
                {name: ratio},
                layers=[name],
                types=type(self.selected[name]),
                include_output=True,
                granularity=self.result.granularity,
            )
            where = f"with layer {name} pruned at {ratio:g}"
            if isinstance(self.evaluate, Proxy):
                return self.evaluate(self.model)
            return call_evaluate(self.evaluate, self.model, where)

    def sweep(self, progress: _Progress) -> None:
        """Evaluate every layer × ratio; on error or Ctrl-C keep what was measured."""
        res = self.result
        try:
            for name in res.layers:
                self._layer(name, progress)
            res.complete = True
        except KeyboardInterrupt:
            res.notes.append(
                f"Interrupted after {res.evaluations} evaluations: partial result, "
                "unevaluated points are None; the model is restored."
            )
        except (EvaluationError, TypeError) as err:
            res.notes.append(f"Stopped by an error: {err}")
            err.result = res  # partial results stay usable
            raise
        finally:
            res.seconds = time.perf_counter() - self.start

    def _layer(self, name: str, progress: _Progress) -> None:
        res = self.result
        sign = 1.0 if res.higher_is_better else -1.0
        for i, ratio in enumerate(res.ratios):
            if ratio <= res.start.get(name, 0.0) + 1e-9:
                # Already that sparse: pruning would change nothing, so nothing to evaluate.
                value = res.baseline
            else:
                value = self.evaluate_at(name, ratio)
                res.evaluations += 1
            res.curves[name][i] = value
            res.seconds = time.perf_counter() - self.start
            stop = self.early_stop is not None and sign * (res.baseline - value) > self.early_stop
            last = stop or i == len(res.ratios) - 1
            progress.step(res, name, last)
            if self.callback is not None:
                self.callback(res, name, ratio)
            if stop:
                res.notes.append(
                    f"{name}: early stop after ratio {ratio:g} (drop above {self.early_stop:g})."
                )
                break
