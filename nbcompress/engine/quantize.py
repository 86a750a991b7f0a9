"""Quantize a model in place (int8 dynamic / weight-only / static, fp16, bf16), measured.

One verb, :func:`quantize_`, over backends that come and go (torch.ao, torchao, numba
kernels, nbcompress's own modules). For every layer each installed backend builds a
candidate from a copy of the layer; candidates are checked against the float layer on
the layer's real input and timed side by side; the fastest correct one is swapped in
inside a :func:`~nbcompress.engine.history.transaction`, so ``undo_`` restores the float
model bit-exactly and any failure rolls back. Modes are frozen configs dispatched by
type through :data:`HANDLERS`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine._validate import as_inputs, check_module, run_forward
from nbcompress.engine.history import history, transaction
from nbcompress.engine.layers import PRUNABLE_TYPES, select_layers, weighted_layers
from nbcompress.engine.quant_backends import BACKENDS, FAMILIES, backends_for, quiet
from nbcompress.engine.quant_config import (
    MODES,
    DynamicInt8Config,
    HalfConfig,
    QuantConfig,
    StaticInt8Config,
    WeightInt8Config,
    resolve_mode,
)
from nbcompress.engine.quant_report import QuantizeReport, serialized_size, sparsity
from nbcompress.engine.quant_static import calibration_batches, quantize_static
from nbcompress.engine.timing import measure_interleaved

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

#: Layer types considered when ``types`` is not given (those a mode cannot handle are
#: listed in the report with the reason, never dropped silently).
DEFAULT_TYPES = (*PRUNABLE_TYPES, nn.LSTM, nn.GRU, nn.MultiheadAttention)


@dataclass
class _Job:
    """Everything one ``quantize_`` call needs, passed to the mode handler."""

    model: nn.Module
    config: QuantConfig
    family: str
    selected: dict[str, nn.Module]
    inputs: tuple | None
    calibrate: Any
    only_faster: bool
    repeats: int
    warnings: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    new: dict[str, nn.Module] = field(default_factory=dict)


Handler = Callable[[_Job, Any], None]
#: Mode config type → function doing the edits (inside the transaction).
HANDLERS: dict[type, Handler] = {}


def register_mode(config_type: type) -> Callable[[Handler], Handler]:
    """Register the handler of a mode config type (torchao-style dispatch by type)."""

    def deco(fn: Handler) -> Handler:
        HANDLERS[config_type] = fn
        return fn

    return deco


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Measurement and calibration run in eval mode; each module's own flag is restored.
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was in flags:
            m.training = was


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def _row(name: str, layer: nn.Module, config: QuantConfig) -> dict[str, Any]:
    return {
        "layer": name,
        "type": type(layer).__name__,
        "quantized as": "— (kept float)",
        "backend": None,
        "bits": None,
        "sparsity": sparsity(layer),
        "bytes before": serialized_size(layer),
        "bytes after": None,
        "smaller": None,
        "time float": None,
        "time quantized": None,
        "note": "",
    }


def _fill(row: dict[str, Any], new: nn.Module, config: QuantConfig, backend: str) -> None:
    after = serialized_size(new)
    row.update(
        {
            "quantized as": config.label,
            "backend": backend,
            "bits": config.bits,
            "sparsity": sparsity(new) if sparsity(new) is not None else row["sparsity"],
            "bytes after": after,
            "smaller": row["bytes before"] / after if after else None,
        }
    )


def _capture(model: nn.Module, layers: dict[str, nn.Module], inputs: tuple) -> dict[str, tuple]:
    """Each layer's positional inputs during one float forward pass."""
    seen: dict[str, tuple] = {}

    def hook(name: str) -> Callable[..., None]:
        # A forward hook that returns a value replaces the output: return nothing.
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            seen.setdefault(name, args)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        run_forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _rel_error(ref: Any, out: Any) -> float:
    a, b = _first_tensor(ref).float(), _first_tensor(out).float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def _candidates(job: _Job, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    built, why = {}, {}
    for b in backends_for(job.config, job.family):
        reason = b.available() or b.supports(job.config, layer)
        if reason is None:
            try:
                with quiet(job.warnings):
                    built[b.name] = b.build(job.config, layer)
            except Exception as err:  # noqa: BLE001 - a backend failing is a finding, not fatal
                reason = f"failed ({type(err).__name__}: {str(err)[:80]})"
        if reason is not None:
            why[b.name] = reason
    return built, why


def _choose(job: _Job, name: str, layer: nn.Module, args: tuple | None, cache: dict) -> Any:
    """Return ``(backend name, module, timings or None, note)`` or ``(None, None, None, why)``."""
    built, why = _candidates(job, layer)
    if args is not None:
        with torch.no_grad(), quiet(job.warnings):
            ref = layer(*args)
            for bname in list(built):
                err = _rel_error(ref, built[bname](*args))
                if not err <= job.config.tolerance:
                    why[bname] = f"output error {err:.1%} > tolerance {job.config.tolerance:.0%}"
                    del built[bname]
    if not built:
        return None, None, None, "; ".join(sorted(set(why.values()))) or "no backend"
    if args is None:
        first = next(iter(built))
        return first, built[first], None, "backend not measured (no example input)"
    key = (type(layer), tuple(p.shape for p in layer.parameters()), tuple(built))
    key += tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
    if key not in cache:
        fns = {"float": lambda: layer(*args)}
        fns.update({b: (lambda m=m: m(*args)) for b, m in built.items()})
        with quiet(job.warnings):
            cache[key] = measure_interleaved(fns, warmup=2, repeats=job.repeats)
    times = cache[key]
    best = min(built, key=lambda b: times[b].median)
    note = "" if len(built) == 1 else f"fastest of {len(built)}"
    return best, built[best], times, note


@register_mode(DynamicInt8Config)
@register_mode(WeightInt8Config)
@register_mode(HalfConfig)
def _per_layer(job: _Job, tx: Any) -> None:
    """Quantize layer by layer, picking the fastest correct backend for each."""
    captured = _capture(job.model, job.selected, job.inputs) if job.inputs else {}
    cache: dict = {}
    for name, layer in job.selected.items():
        row = _row(name, layer, job.config)
        job.rows.append(row)
        args = captured.get(name)
        if job.inputs is not None and args is None:
            row["note"] = "not run by the example input; quantized unmeasured"
        best, new, times, note = _choose(job, name, layer, args, cache)
        if best is None:
            row["note"] = note
            continue
        if times is not None:
            row["time float"], row["time quantized"] = times["float"], times[best]
            if job.only_faster and times[best].median >= times["float"].median:
                row["note"] = f"kept float: {best} measured slower than float here"
                continue
        tx.replace(name, new)
        job.new[name] = new
        _fill(row, new, job.config, best)
        row["note"] = row["note"] or note


@register_mode(StaticInt8Config)
def _static(job: _Job, tx: Any) -> None:
    """Static int8: fuse, wrap runs in Quant/DeQuant stubs, calibrate, convert."""
    config = job.config
    batches = job.calibrate  # already materialised and checked by _quantize
    usable, skipped = {}, {}
    for name, layer in job.selected.items():
        if type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
            usable[name] = layer
        else:
            skipped[name] = (
                f"static int8 handles Conv1d/2d/3d and Linear, not {type(layer).__name__}"
            )
    if not usable:
        raise ValueError("model: " + "; ".join(sorted(set(skipped.values()))))
    rows = {n: _row(n, m, config) for n, m in job.selected.items()}
    regions, new = quantize_static(job.model, tx, usable, batches, config, job.warnings)
    for region in regions:
        for name, fused in region.fused.items():
            rows[name]["note"] = "fused with " + ", ".join(fused)
    for name, module in new.items():
        _fill(rows[name], module, config, f"torch.ao[{config.engine}]")
    job.new.update(new)
    for name, reason in skipped.items():
        rows[name]["note"] = reason
    job.rows.extend(rows.values())
    job.notes.append(
        f"{len(regions)} quantized region(s); activations stay int8 inside a region, "
        "with one quantize at its entry and one dequantize at its exit."
    )


def _select(model: nn.Module, config: QuantConfig, layers: Any, types: Any) -> dict:
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
    return selected


def _is_quantized(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__module__.startswith(("torch.ao.nn.quantized", "torchao")) or kind.__module__ in (
        "nbcompress.engine.quant_modules",
        "nbcompress.engine.quant_static",
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


def _finish(job: _Job, report: QuantizeReport, ref: Any, float_copy: nn.Module | None) -> None:
    """Measure the quantized model: output difference and interleaved latency."""
    model, inputs = job.model, job.inputs
    if inputs is None:
        report.notes.append("No example input given: latency and output difference not measured.")
        return
    with quiet(job.warnings):
        out = _first_tensor(run_forward(model, inputs)).float()
        ref = _first_tensor(ref).float()
        diff = (out - ref).abs()
        report.max_diff, report.mean_diff = float(diff.max()), float(diff.mean())
        flat_o, flat_r = out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1)
        report.cosine = float(torch.nn.functional.cosine_similarity(flat_o, flat_r).mean())
        times = measure_interleaved(
            {"float": lambda: float_copy(*inputs), "quantized": lambda: model(*inputs)},
            repeats=job.repeats,
        )
    report.latency_before, report.latency_after = times["float"], times["quantized"]
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
    """Quantize ``model`` in place, undoably, with the fastest correct backend per layer.

    The figures (sizes, latency, metric, output difference, backend per layer, layers
    kept float and why) are in :func:`quantize_report` afterwards.

    Args:
        model: The float model (edited in place).
        mode: ``"dynamic"``, ``"weight"``, ``"static"``, ``"fp16"``, ``"bf16"`` or a config.
        layers: Glob pattern(s) on layer names; ``None`` = all.
        types: Layer types (names or classes); ``None`` = Linear, Conv, LSTM, GRU.
        calibrate: Static mode: a tensor of inputs, a DataLoader or an iterable of batches.
        example_inputs: A real batch; layers' backends are chosen by timing on it.
        evaluate: ``evaluate(model) -> float`` (e.g. accuracy), run before and after.
        backend: ``"auto"`` (measure), a family (``torch``, ``torchao``, ``numba``,
            ``nbcompress``) or a backend name such as ``"torch.ao[fbgemm]"``.
        only_faster: Keep in float every layer no quantized backend runs faster.
        repeats: Timed samples per measurement.

    Returns:
        The model.

    Raises:
        ValueError: Unknown mode or backend, static mode without (or with wrongly shaped)
            calibration data, a pattern matching no layer, no quantizable layer. The model
            is left untouched.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    _quantize(
        model,
        mode,
        layers,
        types,
        calibrate,
        example_inputs,
        evaluate,
        backend,
        only_faster,
        repeats,
    )
    return model


def _quantize(
    model, mode, layers, types, calibrate, example_inputs, evaluate, backend, only_faster, repeats
):  # noqa: ANN001, ANN202
    check_module(model)
    config = resolve_mode(mode)
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise ValueError(f"mode: no handler registered for {type(config).__name__}.")
    family = _check_family(backend)
    selected = _select(model, config, layers, types)
    inputs = None if example_inputs is None else as_inputs(example_inputs)
    if isinstance(config, StaticInt8Config):
        # Materialised once: a generator could not be iterated a second time.
        calibrate = calibration_batches(calibrate, config.max_batches)
        with _eval_mode(model):
            run_forward(model, calibrate[0], arg="calibrate")
        inputs = calibrate[0] if inputs is None else inputs
    job = _Job(model, config, family, selected, inputs, calibrate, only_faster, repeats)
    report = QuantizeReport(mode=config.label)
    with _eval_mode(model):
        ref = run_forward(model, inputs) if inputs is not None else None
        report.metric_before = _metric(evaluate, model)
        report.size_before = serialized_size(model)
        float_copy = copy.deepcopy(model) if inputs is not None else None
    # The transaction is entered outside eval mode so that undo restores the user's flags.
    with transaction(model, "quantize", config.label) as tx, _eval_mode(model):
        handler(job, tx)
        report.rows = job.rows
        if not report.quantized:
            raise ValueError(
                "model: no selected layer could be quantized in mode "
                f"{config.label!r}: " + "; ".join(sorted(set(report.skipped.values())))
            )
        report.size_after = serialized_size(model)
        done = set(report.quantized)
        report.layers_before = serialized_size({n: m for n, m in selected.items() if n in done})
        report.layers_after = serialized_size({n: m for n, m in job.new.items() if n in done})
        _finish(job, report, ref, float_copy)
        report.metric_after = _metric(evaluate, model)
        tx.step.detail = f"{config.label}: {len(report.quantized)} layer(s)"
        tx.info["report"] = report
    report.notes = job.notes + report.notes
    note = _kept_float_note(model, selected)
    if note:
        report.notes.append(note)
    if job.warnings:
        top = sorted(job.warnings, key=job.warnings.get, reverse=True)[:2]
        report.notes.append(
            f"Backend warnings, summarised ({sum(job.warnings.values())} in all, "
            f"{len(job.warnings)} distinct): " + " | ".join(top)
        )
    return report


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
