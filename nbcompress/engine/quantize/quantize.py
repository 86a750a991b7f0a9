"""Quantize a model in place (int8 dynamic / weight-only / static, fp16, bf16), measured.

One verb, :func:`quantize_`, over backends that come and go (torch.ao, torchao, numba
kernels, nbcompress's own modules). For every layer each installed backend builds a
candidate from the layer (never editing it); candidates are checked against the float layer on
the layer's real input and timed side by side; the fastest correct one is swapped in
inside a :func:`~nbcompress.engine.core.history.transaction`, so ``undo_`` restores the float
model bit-exactly and any failure rolls back. Modes are frozen configs dispatched by
type through :data:`HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import history, transaction
from nbcompress.engine.core.layers import select_layers, weighted_layers
from nbcompress.engine.core.memory import twin
from nbcompress.engine.core.validation import (
    as_inputs,
    call_model,
    check_module,
    eval_mode,
    run_forward,
)
from nbcompress.engine.quantize.backends import BACKENDS, FAMILIES, quiet
from nbcompress.engine.quantize.config import (
    MODES,
    DynamicInt8Config,
    HalfConfig,
    QuantConfig,
    StaticInt8Config,
    WeightInt8Config,
    resolve_mode,
)
from nbcompress.engine.quantize.coverage import Coverage, param_owners
from nbcompress.engine.quantize.measure import check_batch, output_error
from nbcompress.engine.quantize.modes import DEFAULT_TYPES, HANDLERS, Job
from nbcompress.engine.quantize.report import QuantizeReport, serialized_size
from nbcompress.engine.quantize.static import calibration_batches
from nbcompress.kernels.notices import COMPILE_NOTICE
from nbcompress.timing import race

__all__ = [
    "HANDLERS",
    "MODES",
    "DynamicInt8Config",
    "HalfConfig",
    "QuantizeReport",
    "StaticInt8Config",
    "WeightInt8Config",
    "quantize_",
    "quantize_report",
]


def _select(model: nn.Module, layers: Any, types: Any) -> dict[str, nn.Module]:
    wanted = DEFAULT_TYPES if types is None else types
    try:
        selected, _ = select_layers(model, layers, wanted, include_output=True)
    except ValueError as err:
        done = [n for n, m in model.named_modules() if _is_quantized(m)]
        if str(err).startswith("types: the model has no layer") and done:
            raise ValueError(
                f"model: already quantized ({len(done)} quantized module(s), e.g. {done[0]!r}); "
                "undo first (undo_(model) / %undo model) to quantize it differently."
            ) from None
        if str(err).startswith("types: the model has no layer") and types is None:
            raise ValueError(
                f"model: no quantizable layer ({', '.join(t.__name__ for t in DEFAULT_TYPES)}) "
                f"in this {type(model).__name__}; nothing to quantize."
            ) from None
        raise
    if "" in selected:
        raise ValueError(
            "model: the model is a single layer; wrap it (nn.Sequential(layer)) so that the "
            "layer can be swapped in place."
        )
    # A float layer inside a quantized module (HalfCompute's fp16 `inner`, a static
    # region's copy) is not the user's float layer: quantizing it again breaks the model.
    done = [n for n, m in model.named_modules() if n and _is_quantized(m)]
    inside = [s for s in selected if any(s.startswith(d + ".") for d in done)]
    if inside and len(inside) == len(selected):
        raise ValueError(
            f"model: already quantized ({inside[0]!r} is inside the quantized module "
            f"{next(d for d in done if inside[0].startswith(d + '.'))!r}); undo first "
            "(undo_(model) / %undo model) to quantize it differently."
        )
    return {n: m for n, m in selected.items() if n not in inside}


def _is_quantized(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__module__.startswith(("torch.ao.nn.quantized", "torchao")) or kind.__module__ in (
        "nbcompress.engine.quantize.modules",
        "nbcompress.engine.quantize.embedding_int8",
        "nbcompress.engine.quantize.static",
        "nbcompress.kernels.modules",
    )


def _check_family(backend: str) -> str:
    names = {b.name for b in BACKENDS}
    if backend == "auto" or backend in FAMILIES or backend in names:
        return backend
    raise ValueError(
        f"backend: unknown backend {backend!r}; use 'auto' (fastest measured here), one of "
        f"{', '.join(FAMILIES)}, or one of {', '.join(sorted(names))}."
    )


def _metric(evaluate: Callable[[nn.Module], float] | None, model: nn.Module) -> float | None:
    if evaluate is None:
        return None
    if not callable(evaluate):
        raise TypeError(
            f"evaluate: expected a function model -> float, got {type(evaluate).__name__}."
        )
    try:
        return float(evaluate(model))
    except Exception as err:  # noqa: BLE001 - the user's function
        raise ValueError(
            f"evaluate: the eval function raised {type(err).__name__}: {err}. It must take the "
            "model and return a number (e.g. test accuracy)."
        ) from err


def _finish(job: Job, report: QuantizeReport, ref: Any, float_copy: nn.Module | None) -> None:
    """Measure the quantized model: output difference and interleaved latency."""
    model, inputs = job.model, job.inputs
    if inputs is None:
        report.notes.append("No example input given: latency and output difference not measured.")
        return
    with quiet(job.warnings):
        error = output_error(ref, run_forward(model, inputs))
        report.max_diff, report.mean_diff, report.cosine = (
            error.max_diff,
            error.mean_diff,
            error.cosine,
        )
        with torch.inference_mode():
            timed = race(
                {
                    "float": lambda: call_model(float_copy, inputs),
                    "quantized": lambda: call_model(model, inputs),
                },
                rounds=job.repeats,
                warmup=3,
                min_sample=2e-4,
            )
    report.latency_before, report.latency_after = timed.times["float"], timed.times["quantized"]
    if report.speedup is not None and report.speedup < 1:
        report.notes.append(
            "The quantized model measured SLOWER than float on this input: small layers pay "
            "more for (de)quantizing than they save; only_faster=True (--only-faster) keeps "
            "such layers in float."
        )


def _kept_float_note(model: nn.Module, selected: dict[str, nn.Module]) -> str | None:
    other = [m for n, m in weighted_layers(model).items() if n not in selected]
    if not other:
        return None
    kinds: dict[str, int] = {}
    for m in other:
        kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    listing = ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items()))
    return f"Not selected, kept float: {listing}."


@COMPILE_NOTICE  # one line about kernel compilation for the whole call
def quantize_(
    model: nn.Module,
    mode: str | QuantConfig = "dynamic",
    *,
    layers: str | list[str] | None = None,
    types: Any = None,
    calibrate: Any = None,
    example_inputs: Any = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    backend: str = "auto",
    only_faster: bool = False,
    repeats: int = 10,
) -> nn.Module:
    """Quantize ``model`` in place, undoably, with the best measured backend per layer.

    Per layer, every installed backend builds a candidate from the layer; candidates whose
    output (every floating tensor of it) on the layer's real input is off by more than the
    mode's tolerance, that do not survive a pickle round trip (dump, load, call), or that
    would break a parent's fused fast path (``nn.TransformerEncoderLayer``) are rejected,
    with the reason; of the rest, those at most 1.5× slower than the
    fastest compete on accuracy, then speed, then size
    (:func:`~nbcompress.engine.quantize.choice.accurate_among_fast`). The
    figures (sizes, latency, metric, output difference, backend per layer, layers
    kept float and why) are in :func:`quantize_report` afterwards.

    Args:
        model: The float model (edited in place).
        mode: ``"dynamic"``, ``"weight"``, ``"static"``, ``"fp16"``, ``"bf16"`` or a config.
        layers: Glob pattern(s) on layer names; ``None`` = all.
        types: Layer types (names or classes); ``None`` = Linear, Conv, ConvTranspose,
            LSTM, GRU, MultiheadAttention (which every mode leaves float, saying why),
            Embedding and EmbeddingBag (int8 rows in the int8 modes, row-pruned ones too).
        calibrate: Static mode: a tensor of inputs, a DataLoader or an iterable of batches
            (tensors, mappings of tensors such as a tokenizer's output, or ``(x, y)``).
        example_inputs: A real batch; layers' backends are chosen by timing on it.
        evaluate: ``evaluate(model) -> float`` (e.g. accuracy), run before and after.
        backend: ``"auto"`` (measure), a family (``torch``, ``torchao``, ``numba``,
            ``nbcompress``) or a backend name such as ``"torch.ao[fbgemm]"``.
        only_faster: Keep in float every layer no quantized backend runs faster.
        repeats: Timed samples per measurement.

    Returns:
        The model.

    Raises:
        ValueError: Unknown mode or backend, static mode without (or with wrongly shaped
            or empty) calibration data, a pattern matching no layer, no quantizable layer,
            layers already quantized (e.g. inside an fp16 ``HalfCompute``), an empty
            example batch, an output with no floating tensor to compare. The model is
            left untouched.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    job = _plan(model, mode, layers, types, calibrate, example_inputs, backend, only_faster)
    job.repeats = _check_repeats(repeats)
    _run(job, evaluate)
    return model


def _check_repeats(repeats: Any) -> int:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive integer such as 10, got {repeats!r}.")
    return repeats


def _plan(
    model: nn.Module,
    mode: str | QuantConfig,
    layers: Any,
    types: Any,
    calibrate: Any,
    example_inputs: Any,
    backend: str,
    only_faster: bool,
) -> Job:
    """Check every argument before anything is touched; return the job to run."""
    check_module(model)
    config = resolve_mode(mode)
    if type(config) not in HANDLERS:
        raise ValueError(f"mode: no handler registered for {type(config).__name__}.")
    family = _check_family(backend)
    selected = _select(model, layers, types)
    inputs = None if example_inputs is None else as_inputs(example_inputs)
    if isinstance(config, StaticInt8Config):
        # Materialised once: a generator could not be iterated a second time.
        calibrate = calibration_batches(calibrate, config.max_batches)
        with eval_mode(model):
            run_forward(model, calibrate[0], arg="calibrate")
        inputs = calibrate[0] if inputs is None else inputs
    return Job(model, config, family, selected, inputs, calibrate, only_faster, repeats=10)


def _run(job: Job, evaluate: Callable[[nn.Module], float] | None) -> QuantizeReport:
    """Measure the float model, quantize inside a transaction, measure again."""
    model, inputs, config = job.model, job.inputs, job.config
    report = QuantizeReport(mode=config.label)
    with eval_mode(model):
        ref = check_batch(run_forward(model, inputs)) if inputs is not None else None
        report.metric_before = _metric(evaluate, model)
        report.size_before = serialized_size(model)
        # The float model to time against end to end: a twin sharing every tensor (the
        # swaps below edit the model's parents, not the twin's; no tensor is edited in
        # place), so it costs module objects only, not a second copy of the weights.
        float_copy = twin(model) if inputs is not None else None
    kept_note = _kept_float_note(model, job.selected)
    owners = param_owners(model)
    with transaction(model, "quantize", config.label) as tx:
        # Snapshot every module a swap may edit while the user's training flags are still
        # set: a snapshot taken in eval mode would restore training=False on undo/rollback.
        _save_parents(tx, model, job.selected)
        with eval_mode(model):
            _quantize(job, tx, report, ref, float_copy, evaluate)
        for name, module in job.new.items():
            module.train(job.selected[name].training)  # the float layer's flag, restored
    coverage = Coverage.of(owners, job.rows, job.absorbed)
    report.float_share = coverage.float_share
    report.notes = job.notes + report.notes + ([kept_note] if kept_note else [])
    report.notes += [coverage.note()] if coverage.note() else []
    if job.warnings:
        top = sorted(job.warnings, key=job.warnings.get, reverse=True)[:2]
        report.notes.append(
            f"Backend warnings, summarised ({sum(job.warnings.values())} in all, "
            f"{len(job.warnings)} distinct): " + " | ".join(top)
        )
    return report


def _save_parents(tx: Any, model: nn.Module, selected: dict[str, nn.Module]) -> None:
    """Snapshot the parents of the selected layers (where every swap happens)."""
    for name in selected:
        tx.save(model.get_submodule(name.rpartition(".")[0]))


def _quantize(
    job: Job,
    tx: Any,
    report: QuantizeReport,
    ref: Any,
    float_copy: nn.Module | None,
    evaluate: Callable[[nn.Module], float] | None,
) -> None:
    """The transaction's body, in eval mode: swap, check, measure (any failure rolls back)."""
    model, config = job.model, job.config
    job.reference = ref
    HANDLERS[type(config)](job, tx)
    report.rows = job.rows
    if not report.quantized:
        raise ValueError(
            "model: no selected layer could be quantized in mode "
            f"{config.label!r}: " + "; ".join(sorted(set(report.skipped.values())))
        )
    report.size_after = serialized_size(model)
    done = set(report.quantized)
    report.layers_before = serialized_size({n: job.selected[n] for n in done})
    report.layers_after = serialized_size({n: job.new[n] for n in done})
    _finish(job, report, ref, float_copy)
    if job.only_faster and report.speedup is not None and report.speedup < 1:
        # Per-layer wins do not always add up (and noise can fake one on tiny layers);
        # the promise is about the whole model, so it must measure faster as a whole.
        raise ValueError(
            f"model: with only_faster, the quantized model measured slower end to end "
            f"({report.latency_after} vs float {report.latency_before}); rolled back, "
            "the model is unchanged."
        )
    report.metric_after = _metric(evaluate, model)
    tx.step.detail = f"{config.label}: {len(done)} layer(s)"
    tx.info["report"] = report


def quantize_report(model: nn.Module) -> QuantizeReport:
    """Return the report of the latest ``quantize_`` step still recorded for ``model``.

    Args:
        model: A model quantized by :func:`quantize_`.

    Returns:
        The report (sizes, latency, metric, output difference, per-layer backends).

    Raises:
        ValueError: The model has no recorded quantize step.
    """
    for step in reversed(history(model)):
        if step.name == "quantize" and "report" in step.info:
            return step.info["report"]
    raise ValueError("model: no quantize step is recorded for this model; run quantize_ first.")
