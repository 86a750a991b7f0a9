"""Mode handlers of ``quantize_``: per-layer backend choice by measurement, and static int8.

Each mode config type maps to a handler in :data:`HANDLERS` (dispatch by type, as torchao
does). The per-layer handler builds every installed backend's candidate from the
layer (never editing it), checks it against the float layer on the layer's real input, times the
accurate ones side by side and swaps in the winner through the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.layers import PRUNABLE_TYPES, output_layer, weighted_layers
from nbcompress.engine.core.memory import release_freed_memory
from nbcompress.engine.core.summary import capture_calls  # each layer's (args, kwargs, output)
from nbcompress.engine.quantize.backends import backends_for, quiet
from nbcompress.engine.quantize.budget import keep_within_budget
from nbcompress.engine.quantize.checks import (
    candidate_problem,
    dense_args,
    probe_args,
    round_trip_problem,
)
from nbcompress.engine.quantize.choice import accurate_among_fast, clearly_faster
from nbcompress.engine.quantize.config import (
    DynamicInt8Config,
    HalfConfig,
    QuantConfig,
    StaticInt8Config,
    WeightInt8Config,
)
from nbcompress.engine.quantize.measure import rel_errors
from nbcompress.engine.quantize.modules import Int8DynamicLinear
from nbcompress.engine.quantize.ort_chain import fuse_chains
from nbcompress.engine.quantize.ort_fuse import fuse_blocks
from nbcompress.engine.quantize.report import fill_row, new_row, serialized_size
from nbcompress.engine.quantize.static import quantize_static
from nbcompress.timing import Race, race

__all__ = ["DEFAULT_TYPES", "HANDLERS", "Job", "register_mode", "rel_errors"]

#: Layer types considered when ``types`` is not given (those a mode cannot handle are
#: listed in the report with the reason, never dropped silently).
DEFAULT_TYPES = (
    *PRUNABLE_TYPES,
    nn.LSTM,
    nn.GRU,
    nn.MultiheadAttention,
    nn.Embedding,
    nn.EmbeddingBag,
)


@dataclass
class Job:
    """Everything one ``quantize_`` call needs, passed to the mode handler.

    Built and checked by ``quantize_`` before anything is touched; a handler (see
    :func:`register_mode`) reads the arguments and appends its per-layer ``rows``,
    ``notes`` and the ``new`` modules it swapped in.
    """

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
    #: The float model's output on ``inputs`` (the accuracy budget compares against it).
    reference: Any = None
    #: Layer name → its chosen module's rms relative error on the layer's real input.
    errors: dict[str, float] = field(default_factory=dict)
    #: Names of modules folded into a quantized layer (BatchNorm fused into its Conv).
    absorbed: set[str] = field(default_factory=set)


Handler = Callable[[Job, Any], None]
#: Mode config type → function doing the edits (inside the transaction).
HANDLERS: dict[type, Handler] = {}


def register_mode(config_type: type) -> Callable[[Handler], Handler]:
    """Register the handler of a mode config type (torchao-style dispatch by type)."""

    def deco(fn: Handler) -> Handler:
        HANDLERS[config_type] = fn
        return fn

    return deco


def _candidates(
    job: Job, name: str, layer: nn.Module, args: tuple | None
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    built, why = {}, {}
    probe = args if args is not None else probe_args(layer)
    for b in backends_for(job.config, job.family):
        reason = b.available() or b.supports(job.config, layer)
        if reason is None:
            try:
                with quiet(job.warnings):
                    module = b.build(job.config, layer)
                    # A compressed model must stay picklable / torch.save-able and keep
                    # its parents working (see nbcompress.engine.quantize.checks).
                    problem = candidate_problem(job.model, name, module, probe)
                release_freed_memory()  # the round trip's bytes and loaded copy
                if problem is None:
                    built[b.name] = module
                else:
                    reason = f"rejected: {problem}"
            except Exception as err:  # noqa: BLE001 - a backend failing is a finding, not fatal
                reason = f"failed ({type(err).__name__}: {str(err)[:80]})"
        if reason is not None:
            why[b.name] = reason
    return built, why


_FINDINGS = ("failed", "output error", "rejected")


def _why(why: dict[str, str], layer: nn.Module) -> str:
    """One readable reason a layer stays float: failures first, then the first 'cannot'.

    A 'cannot' that names the layer's type ("... not MultiheadAttention") is preferred to
    one about another backend's scope.
    """
    failed = [f"{b}: {r}" for b, r in why.items() if r.startswith(_FINDINGS)]
    cannot = [r for r in why.values() if not r.startswith(_FINDINGS)]
    kind = type(layer).__name__
    cannot.sort(key=lambda r: not (r.startswith(kind) or f"not {kind}" in r))
    return "; ".join(failed + cannot[:1]) or "no backend for this mode"


def _check(job: Job, layer: nn.Module, args: tuple, built: dict, why: dict) -> dict[str, float]:
    """Drop the candidates off by more than the tolerance on ``args``; return rms errors."""
    errors: dict[str, float] = {}
    with torch.no_grad(), quiet(job.warnings):
        ref = layer(*args)
        for bname in list(built):
            try:
                peak, errors[bname] = rel_errors(ref, built[bname](*args))
            except (RuntimeError, ValueError, TypeError) as err:
                why[bname] = f"failed ({type(err).__name__}: {str(err)[:80]})"
                del built[bname]
                continue
            if not peak <= job.config.tolerance:
                why[bname] = f"output error {peak:.1%} > tolerance {job.config.tolerance:.0%}"
                del built[bname]
    return errors


@torch.inference_mode()
def _race(job: Job, layer: nn.Module, args: tuple, built: dict[str, nn.Module]) -> Race:
    """Time the float layer (the incumbent, first) against the candidates, interleaved."""
    fns = {"float": lambda: layer(*args)}
    fns.update({b: (lambda m=m: m(*args)) for b, m in built.items()})
    with quiet(job.warnings):
        # A candidate may make its own kernel choice on its first call (the numba sparse
        # int8 modules race their kernels per shape): the warm-up call makes it, before
        # any round is timed. The race rotates the order: no candidate always follows float.
        rounds = max(job.repeats, 3 * len(fns))
        return race(fns, rounds=rounds, warmup=1, min_sample=2e-4)


def _choose(job: Job, name: str, layer: nn.Module, args: tuple | None, cache: dict) -> Any:
    """Return ``(backend name, module, race or None, note)`` or ``(None, None, None, why)``."""
    built, why = _candidates(job, name, layer, args)
    errors = _check(job, layer, args, built, why) if args is not None else {}
    if not built:
        return None, None, None, _why(why, layer)
    if args is None:
        first = next(iter(built))
        return first, built[first], None, "backend not measured (no example input)"
    key = (type(layer), tuple(p.shape for p in layer.parameters()), tuple(built))
    key += tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
    if key not in cache:
        cache[key] = _race(job, layer, args, built)
    sizes = {b: serialized_size(m) for b, m in built.items()}
    best = accurate_among_fast(cache[key], errors, sizes)
    note = "" if len(built) == 1 else f"best of {len(built)} measured"
    job.errors[name] = errors[best]
    return best, built[best], cache[key], note


@register_mode(DynamicInt8Config)
@register_mode(WeightInt8Config)
@register_mode(HalfConfig)
def _per_layer(job: Job, tx: Any) -> None:
    """Quantize layer by layer, picking the fastest correct backend for each."""
    calls = capture_calls(job.model, job.selected, job.inputs) if job.inputs else {}
    captured = {name: dense_args(call[0]) for name, call in calls.items()}  # positional
    cache: dict = {}
    for name, layer in job.selected.items():
        row = new_row(name, layer)
        job.rows.append(row)
        args = captured.get(name)
        if job.inputs is not None and args is None:
            row["note"] = "not run by the example input; quantized unmeasured"
        best, new, timed, note = _choose(job, name, layer, args, cache)
        release_freed_memory()  # the losing candidates of this layer: not the next one's peak
        if best is None:
            row["note"] = note
            continue
        if timed is not None:
            row["time float"], row["time quantized"] = timed.times["float"], timed.times[best]
            if job.only_faster and not clearly_faster(timed, best):
                row["note"] = f"kept float: {best} not clearly faster than float here"
                continue
        tx.replace(name, new)
        job.new[name] = new
        fill_row(row, new, job.config, best)
        row["note"] = row["note"] or note
    keep_within_budget(job, tx)
    fuse_chains(job, tx)  # runs of int8 Linears in an nn.Sequential as one ORT graph
    fuse_blocks(job, tx)  # whole submodules (transformer blocks) as one ORT graph


def _output_linear(model: nn.Module, usable: dict[str, nn.Module]) -> tuple | None:
    """Remove the model's final Linear from ``usable`` and return ``(name, layer)``."""
    name = output_layer(model, weighted_layers(model))
    if name in usable and type(usable[name]) is nn.Linear and len(usable) > 1:
        return name, usable.pop(name)
    return None


def _check_regions_round_trip(job: Job, regions: list) -> None:
    """Pickle, load and call every static region on its real input; refuse if one fails."""
    calls = capture_calls(job.model, {r.names[0]: r.module for r in regions}, job.inputs)
    for region in regions:
        args = calls[region.names[0]][0] if region.names[0] in calls else None
        problem = round_trip_problem(region.module, args)
        release_freed_memory()  # the region's pickled bytes and loaded copy
        if problem is not None:
            raise ValueError(
                f"model: the static int8 region at {region.names[0]!r} {problem}; rolled "
                "back, the model is unchanged."
            )


@register_mode(StaticInt8Config)
def _static(job: Job, tx: Any) -> None:
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
    rows = {n: new_row(n, m) for n, m in job.selected.items()}
    logits = _output_linear(job.model, usable)
    regions, new = quantize_static(job.model, tx, usable, batches, config, job.warnings)
    _check_regions_round_trip(job, regions)
    if logits is not None:
        # Static int8 would round the logits to 8 bits too (-0.67 points on the digits
        # CNN); the output layer gets int8 weights with float output instead.
        module = Int8DynamicLinear(logits[1])
        tx.replace(logits[0], module)
        new[logits[0]] = module
        rows[logits[0]]["note"] = "output layer: int8 weights, float output (dynamic)"
    for region in regions:
        for name, fused in region.fused.items():
            rows[name]["note"] = "fused with " + ", ".join(fused)
            job.absorbed.update(fused)
    for name, module in new.items():
        dynamic = isinstance(module, Int8DynamicLinear)
        fill_row(
            rows[name],
            module,
            config,
            "nbcompress-int8" if dynamic else f"torch.ao[{config.engine}]",
        )
    job.new.update(new)
    for name, reason in skipped.items():
        rows[name]["note"] = reason
    job.rows.extend(rows.values())
    job.notes.append(
        f"{len(regions)} quantized region(s); activations stay int8 inside a region, "
        "with one quantize at its entry and one dequantize at its exit."
    )
