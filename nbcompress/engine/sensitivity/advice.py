"""A suggestion from a sweep's curves, checked by measurement against uniform and global L1.

The curves predict an allocation's metric by summing single-layer drops; layers compound
when pruned together, so the curves' favourite can lose to pruning every layer alike. When
the sweep's evaluation is at hand (``evaluate`` given, or the one the sweep used, still
alive; or the proxy's input), :func:`suggest` therefore measures the curve suggestion, the
ratios uniform L1 and global L1 give at the same sparsity (three evaluations, the model
rolled back after each), and keeps the best measured, saying which won and by how much.
``refine=N`` goes on from there with a measured local search
(:func:`~nbcompress.engine.sensitivity.refine.refine`).

:class:`~nbcompress.engine.sensitivity.result.SensitivityResult` calls this module; this
module only reads the result it is given, so it never imports the result's module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from torch import nn

from nbcompress.engine.core.history import history_token
from nbcompress.engine.core.layers import output_layers
from nbcompress.engine.core.report import fmt_count
from nbcompress.engine.sensitivity.allocate import choose
from nbcompress.engine.sensitivity.groupcheck import check_groups, measured_removal
from nbcompress.engine.sensitivity.refine import Refinement, check_budget
from nbcompress.engine.sensitivity.refine import refine as refine_allocation
from nbcompress.engine.sensitivity.refit import (
    MAX_REFIT_FLOPS,
    Refit,
    refit_candidates,
    refit_cost,
)
from nbcompress.engine.sensitivity.registry import latest, remember, remembered
from nbcompress.engine.sensitivity.remote import refuse_remote
from nbcompress.engine.sensitivity.setting import proxy_metric
from nbcompress.engine.sensitivity.suggestion import Suggestion

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = ["objective_weights", "suggest"]


def objective_weights(result: SensitivityResult, objective: str) -> dict[str, int]:
    """Layer → what one unit of its ratio removes: parameters or (estimated) MACs."""
    if objective == "params":
        return {n: result.sizes[n] for n in result.layers}
    if objective == "macs":
        missing = [n for n in result.layers if result.macs.get(n) is None]
        if missing:
            raise ValueError(
                f"objective: MACs are unknown for {', '.join(missing)}; rerun the sweep "
                "with example_inputs (--input) or use objective='params'."
            )
        return {n: int(result.macs[n]) for n in result.layers}
    raise ValueError(f"objective: {objective!r} is unknown; choose 'params' or 'macs'.")


def suggest(
    result: SensitivityResult,
    target: tuple[float | None, float | None],
    objective: str,
    *,
    check: bool | None = None,
    reconstruct: bool | None = None,
    model: nn.Module | None = None,
    executor: Executor | str | None = None,
    **refinement: Any,
) -> Suggestion:
    """Per-layer ratios for a budget from a sweep's curves (``SensitivityResult.suggest``).

    Args:
        result: The sweep.
        target: ``(target_sparsity, max_drop)``, exactly one of them given: remove at least
            that fraction of the analysed weights (MACs), or as much as possible within
            that predicted drop.
        objective: ``"params"`` or ``"macs"``.
        check: Measure the suggestion against uniform and global L1 at the same sparsity
            and keep the best. ``None``: whenever something can measure (see the module).
        reconstruct: Also measure each checked candidate with its kept weights re-fitted
            by least squares on the batches the sweep's evaluation fed the model
            (:mod:`~nbcompress.engine.sensitivity.refit`), keeping a re-fitted one if it
            measures better. ``None``: when those batches are known and the re-fit is
            cheap; ``False``: never.
        model: Measure on this model (e.g. the explorer's) instead of the swept one.
        executor: Measure the check and the refinement on this executor's workers
            (:func:`~.refine.refine`; the same result). Re-fitted candidates are measured here.
        **refinement: ``evaluate`` (``evaluate(model) -> float``) and ``refine`` (number of
            evaluations of a measured refinement after the check), as
            ``SensitivityResult.suggest`` takes them, including the deprecated
            ``refine=evaluate`` and ``budget=N``.

    Returns:
        The suggestion, remembered as the model's latest when the result has a live model.
    """
    target_sparsity, max_drop = target
    evaluate, refine = _renamed(**refinement)
    weights = objective_weights(result, objective)
    swept = model is None or model is result.model
    model = result.model if model is None else model
    notes = _scope_notes(result, weights, model)
    if swept and model is not None and result.history_token not in (None, history_token(model)):
        notes.append(
            "The model changed since the sweep (a step was recorded or undone): predictions "
            "are the swept model's; the check measured the model as it is now."
        )
    evaluate, refine = _measuring(
        result, model, target_sparsity, objective, evaluate, refine, check, notes
    )
    ratios = choose(
        result.drop_curves(), weights, target_sparsity=target_sparsity, max_drop=max_drop
    )
    refinement = refit = groups = None
    better = False
    if refine is not None and result.remove:
        refuse_remote(executor, None, "the check of a group sweep's suggestion")
        groups = check_groups(result, model, evaluate, ratios, refine)
        ratios, notes[:0] = groups.ratios, groups.notes
    elif refine is not None:
        refinement = _refined(result, model, evaluate, (target_sparsity, refine), ratios, executor)
        ratios = refinement.ratios
        notes[:0] = [_verdict(refinement), *refinement.notes]
        notes[1:1] = [n for n in [_pruned_as(result)] if n]
        refit = _refitted(result, model, evaluate, refinement, reconstruct, notes)
        better = refit is not None and _better(result, refit.measured, refinement.measured)
        ratios = refit.ratios if better else ratios
    target = f"sparsity {target_sparsity:.0%}" if max_drop is None else f"max drop {max_drop:g}"
    if objective == "macs" and max_drop is None:
        target = f"MAC reduction {target_sparsity:.0%}"
    made = Suggestion(
        ratios=ratios, predicted=result.predict(ratios), sparsity=result.sparsity_of(ratios),
        removed=int(round(sum(r * weights[n] for n, r in ratios.items()))),
        objective=objective, target=target, metric=result.metric, baseline=result.baseline,
        granularity=result.granularity, proxy=result.proxy,
        measured=refit.measured if better else refinement.measured if refinement else None,
        refinement=refinement, higher_is_better=result.higher_is_better, notes=notes,
        reconstruct=better or result.reconstruct, method=result.method,
        calibration=result.calibration if better or _pruning(result) else None,
        chosen=_chosen(refinement, refit if better else None),
        evaluations=sum(r.evaluations for r in (refinement, refit, groups) if r is not None),
        seconds=sum(r.seconds for r in (refinement, refit, groups) if r is not None),
        remove=result.remove,
    )  # fmt: skip
    if groups is not None:
        made.measured, made.chosen = groups.measured, groups.chosen
    # Cheap, but not free: not while a slider or target box moves (check=False).
    real = measured_removal(result, model, ratios) if result.remove and check is not False else None
    if real is not None and objective == "params":
        made.removed = real[0]  # what the model loses, not the groups' estimated share
        notes.append(real[1])
    if model is not None:
        remember(model, suggestion=made)
    return made


def _refitted(
    result: SensitivityResult,
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    ref: Refinement,
    reconstruct: bool | None,
    notes: list[str],
) -> Refit | None:
    """The best re-fitted candidate measured (``None`` when re-fits are not tried)."""
    if reconstruct is False or result.reconstruct:
        return None  # a sweep that re-fitted every point: its candidates are re-fitted already
    calibration = result.calibration
    candidates = dict(ref.candidates)
    if len(ref.steps) > len(ref.candidates):
        candidates["refined"] = ref.ratios
    why = (
        "no inputs recorded from the evaluation" if calibration is None
        else "channel granularity removes whole rows" if result.granularity == "channel"
        else None
    )  # fmt: skip
    cost = max(refit_cost(model, c) for c in candidates.values())
    if why is None and reconstruct is None and cost > MAX_REFIT_FLOPS:
        why = f"the solves would take ~{cost:.1e} multiply-adds; reconstruct=True forces it"
    if why is not None:
        if reconstruct:
            raise ValueError(f"reconstruct: cannot re-fit here ({why}).")
        return None
    refit = refit_candidates(
        model, evaluate, candidates, granularity=result.granularity, calibration=calibration,
        higher_is_better=result.higher_is_better, method=result.method,
    )  # fmt: skip
    shown = ", ".join(f"{k} {v:.4g}" for k, v in refit.all.items())
    sign = 1.0 if result.higher_is_better else -1.0
    better = _better(result, refit.measured, ref.measured)
    notes.insert(
        1,
        f"Re-fitted by least squares on the evaluation's inputs: {shown} → "
        + (f"{refit.name}, re-fitted ({sign * (refit.measured - ref.measured):+.4g})."
           if better else f"not better than {ref.start} as it is; not re-fitted."),
    )  # fmt: skip
    return refit


def _pruning(result: SensitivityResult) -> dict[str, Any]:
    """How the check prunes its candidates: the way the sweep pruned each point."""
    if result.method == "l1" and not result.reconstruct:
        return {}
    if result.calibration is None:
        how = result.method + (" + reconstruct" if result.reconstruct else "")
        raise ValueError(
            f"method: the sweep pruned with {how}, which needs its calibration inputs, and this "
            "result has none (a saved result keeps none): re-run the sweep, or check=False."
        )
    return dict(
        method=result.method, example_inputs=result.calibration, reconstruct=result.reconstruct
    )


def _better(result: SensitivityResult, value: float, than: float) -> bool:
    return value > than if result.higher_is_better else value < than


def _chosen(ref: Refinement | None, refit: Refit | None) -> str:
    """What the suggestion's ratios are, as its report names them."""
    if refit is not None:
        return f"{refit.name}, re-fitted"
    if ref is None:
        return "curve suggestion"
    return f"refined from {ref.start}" if len(ref.steps) > len(ref.candidates) else ref.start


def _scope_notes(
    result: SensitivityResult, weights: dict[str, int], model: nn.Module | None
) -> list[str]:
    """What the target is a share of: the analysed layers, and the output layer if not."""
    what = "weights" if weights == {n: result.sizes[n] for n in result.layers} else "MACs"
    line = (
        f"The target is a share of the {len(result.layers)} analysed layer(s) "
        f"({fmt_count(sum(weights.values()))} {what})"
    )
    if result.remove:
        # A layer between two groups counts in both (outputs and inputs): the shares add up
        # to less than what the model loses, since removing both shrinks it twice.
        line = (
            f"The target is a share of what the {len(result.layers)} swept group(s) take "
            f"({fmt_count(sum(weights.values()))} {what}, est.; a layer counts in the group of "
            "its outputs and in that of its inputs, so the model loses more than this share: "
            "%prune's report measures it)"
        )
    if model is not None:
        heads = output_layers(model)
        left = [n for n in heads.names if n not in result.layers]
        if left:
            guess = " (guessed from registration order)" if heads.guessed else ""
            line += f"; output layer {', '.join(left)}{guess} is left alone"
    return [line + "."]


def _measuring(
    result: SensitivityResult,
    model: nn.Module | None,
    target_sparsity: float | None,
    objective: str,
    evaluate: Any,
    refine: int | None,
    check: bool | None,
    notes: list[str],
) -> tuple[Any, int | None]:
    """The function to measure with and the refinement budget (``None``: no measuring)."""
    if check is not None and not isinstance(check, bool):
        raise TypeError(f"check: expected True, False or None, got {check!r}.")
    if check is False:
        if refine is not None:
            raise ValueError("check: refine=N measures; drop check=False or refine.")
        return None, None
    asked = check is True or refine is not None or evaluate is not None
    if evaluate is None:
        evaluate = _sweep_evaluate(result) if model is result.model else None
    usable = target_sparsity is not None and objective == "params" and model is not None
    if asked:
        _check_refine(model, target_sparsity, objective, evaluate, refine)
        return evaluate, (0 if refine is None else refine)
    if evaluate is None or not usable:
        if model is not None:
            why = (
                "a max_drop budget" if target_sparsity is None
                else "a MAC target" if objective != "params"
                else "no evaluation at hand: pass evaluate=fn"
            )  # fmt: skip
            against = "uniform removal" if result.remove else "uniform and global L1"
            notes.append(f"Not checked against {against} ({why}).")
        return None, None
    return evaluate, 0


def _sweep_evaluate(result: SensitivityResult) -> Callable[[nn.Module], float] | None:
    """The sweep's own measure, if it is still alive and this is the model's latest sweep."""
    model = result.model
    if model is None or latest(model) is not result:
        return None
    evaluate, inputs = remembered(model)
    if result.proxy:
        return proxy_metric(model, inputs) if inputs is not None else None
    return evaluate


def _verdict(ref: Refinement) -> str:
    """The check's line: each candidate's measured metric, the winner and its margin."""
    sign = 1.0 if ref.higher_is_better else -1.0
    measured = {
        s["step"].removeprefix("candidate: "): s["measured"]
        for s in ref.steps
        if s["step"].startswith("candidate: ") and s["measured"] is not None
    }
    shown = ", ".join(f"{k} {v:.4g}" for k, v in measured.items())
    line = f"Measured {ref.metric} at the same sparsity: {shown} → {ref.start}"
    base = {k: v for k, v in measured.items() if k in ("uniform L1", "global L1")}
    if base:
        best = max(base.values(), key=lambda v: sign * v)
        than = "the better of uniform and global L1" if len(base) == 2 else next(iter(base))
        line += f" ({sign * (ref.measured - best):+.4g} over {than})"
    if len(ref.steps) > len(measured):
        line += f"; refined to {ref.measured:.4g}"
    return line + "."


def _pruned_as(result: SensitivityResult) -> str:
    """For a wanda / re-fitted sweep: how every candidate was pruned, said once."""
    if result.method == "l1" and not result.reconstruct:
        return ""
    how = result.method + (" + reconstruct" if result.reconstruct else "")
    return (
        f"Every candidate was pruned with {how}, as the sweep was ('uniform L1' and 'global "
        "L1' name their per-layer ratios)."
    )


def _renamed(evaluate: Any, refine: Any, budget: Any) -> tuple[Any, int | None]:
    """Accept the old spelling ``refine=evaluate, budget=N`` for one release, with a warning."""
    if callable(refine):
        warnings.warn(
            "suggest(refine=evaluate) is deprecated: pass the function as evaluate=... and "
            "the number of evaluations as refine=N, e.g. suggest(0.8, evaluate=fn, refine=100).",
            DeprecationWarning,
            stacklevel=4,
        )
        if evaluate is not None:
            raise ValueError("refine: give the function as evaluate= only, not also as refine=.")
        return refine, (100 if budget is None else check_budget(budget, "budget"))
    if budget is not None:
        warnings.warn(
            "suggest(budget=N) is deprecated: the number of evaluations is refine=N, e.g. "
            "suggest(0.8, evaluate=fn, refine=100).",
            DeprecationWarning,
            stacklevel=4,
        )
        if refine is None:
            return evaluate, check_budget(budget, "budget")
    return evaluate, (None if refine is None else check_budget(refine, "refine"))


def _check_refine(
    model: Any, target_sparsity: Any, objective: str, evaluate: Any, refine: int | None
) -> None:
    what = "refine" if refine else "check"
    if target_sparsity is None or objective != "params":
        raise ValueError(
            f"{what}: {what}s a target_sparsity suggestion over parameters; give "
            f"target_sparsity=... with objective='params', or leave {what} out."
        )
    if evaluate is None:
        raise ValueError(f"{what}: measures real allocations; pass evaluate=fn (--eval fn).")
    if model is None:
        raise ValueError(
            f"{what}: this result is not attached to a live model (loaded from JSON, or the "
            "model is gone); attach it with remember(model, result) first."
        )


def _refined(
    result: SensitivityResult,
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    target: tuple[float, int],
    ratios: dict[str, float],
    executor: Any,
) -> Refinement:
    """The curve suggestion measured (and refined) on the swept model (left unchanged)."""
    return refine_allocation(
        model, evaluate, target[0], candidates={"curve suggestion": ratios}, budget=target[1],
        executor=executor,
        layers=list(result.layers), types={type(model.get_submodule(n)) for n in result.layers},
        granularity=result.granularity, higher_is_better=result.higher_is_better,
        metric=result.metric, predict=result.predict, **_pruning(result),
    )  # fmt: skip
