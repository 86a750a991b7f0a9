"""The explorer's Check and Evaluate buttons and how its Evaluate and Apply prune.

Typing a target re-runs the curves' suggestion only (no evaluation). Check is the explicit,
measured action: the suggestion for the sparsity target is measured against uniform and
global L1 at the same sparsity (and re-fitted candidates where cheap, see
:mod:`nbcompress.engine.sensitivity.refit`), the best measured goes onto the sliders, and
the status line says which won and by how much. For a group sweep (``remove=True``) the
check is against uniform removal, and Evaluate and Apply remove channels physically
(:func:`apply_setting`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nbcompress.engine.core.history import trial
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.sensitivity.evaluate import EvaluationError
from nbcompress.engine.sensitivity.groupcheck import group_inputs
from nbcompress.engine.sensitivity.removal import remove_groups

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult
    from nbcompress.notebook.widgets._explorer import SensitivityExplorer

__all__ = ["apply_setting", "evaluate_setting", "prune_options", "run_check"]


def prune_options(result: SensitivityResult, refit: bool) -> dict[str, Any]:
    """Keyword arguments of ``prune_ratios_`` for a setting of this sweep.

    The sweep's granularity and method; its calibration batches when the method needs
    them (wanda) or the weights are re-fitted (a re-fitted candidate won Check, or every
    point of the sweep was re-fitted).
    """
    options: dict[str, Any] = {"granularity": result.granularity}
    if result.method != "l1":
        options.update(method=result.method, example_inputs=result.calibration)
    if refit or result.reconstruct:
        options.update(reconstruct=True, example_inputs=result.calibration)
    return options


def apply_setting(explorer: SensitivityExplorer, ratios: dict[str, float]) -> None:
    """Prune the explorer's model with ``ratios`` as the sweep pruned, in place.

    A group sweep's setting removes the channels physically (``remove_``, one undoable
    step, traced on the explorer's example input or the sweep's); any other is pruned with
    ``prune_ratios_`` at the sweep's granularity and method.
    """
    result, model = explorer.result, explorer.model
    if result.remove:
        x = group_inputs(model, explorer.example_inputs)
        kept = {n: r for n, r in ratios.items() if r > 0}
        if not kept:
            raise ValueError("ratios: every ratio is 0, so there is nothing to remove.")
        remove_groups(model, kept, x, result.method)
    else:
        prune_ratios_(model, ratios, **prune_options(result, explorer._refit))


def run_check(explorer: SensitivityExplorer) -> bool:
    """Measure the target's suggestion against uniform and global L1; show the best measured.

    Returns:
        Whether a re-fitted candidate won (Apply then re-fits too).
    """
    if explorer.target_kind.value != "sparsity":
        explorer.status.value = "Check measures a sparsity target: switch the target to sparsity"
        return False
    value = float(explorer.target_value.value)
    against = "uniform removal" if explorer.result.remove else "uniform and global L1"
    with explorer._busy(f"checking sparsity {value:g} against {against}…"):
        try:
            suggestion = explorer.result.suggest(
                value, objective=explorer.objective, evaluate=explorer.evaluate, check=True,
                model=explorer.model,
            )  # fmt: skip
        except (ValueError, TypeError, EvaluationError) as err:
            explorer.status.value = f"not checked: {err}"
            return False
    explorer.set_ratios(suggestion.ratios)
    # The winner first (it may be a re-fitted candidate, which Apply then re-fits too).
    lines = suggestion.notes[: 3 if suggestion.reconstruct else 1]
    measured = explorer.text.value(suggestion.measured)
    explorer.status.value = f"{suggestion.chosen}: measured {measured}. " + " ".join(lines)
    return suggestion.reconstruct


def evaluate_setting(explorer: SensitivityExplorer) -> float | None:
    """Measure the real metric of the explorer's setting on its model, left unchanged.

    Returns:
        The measured value, or ``None`` if there is no evaluate function or it failed
        (the reason is written to the explorer's status).
    """
    if explorer.evaluate is None:
        explorer.status.value = "no evaluate function: pass evaluate=… to measure the real metric"
        return None
    explorer._show_model()  # the warning below must reflect the model as it is
    ratios = explorer.ratios
    predicted = explorer.result.predict(explorer.effective(ratios))
    with explorer._busy("evaluating…"):
        try:
            with trial(explorer.model):
                if any(r > 0 for r in ratios.values()):
                    apply_setting(explorer, ratios)
                value = float(explorer.evaluate(explorer.model))
        except Exception as err:  # noqa: BLE001 - the user's function; report, don't raise
            explorer.status.value = (
                f"evaluate failed ({type(err).__name__}: {err}); model left unchanged"
            )
            return None
    explorer.measured = value
    # The prediction is the swept model's; say so when the model has changed since.
    swept = " for the swept model" if explorer.check.reason(explorer._sparsity) else ""
    text = explorer.text
    explorer.status.value = (
        f"measured {explorer.result.metric} {text.value(value)} at this setting (predicted "
        f"{text.value(predicted)}{swept}); model left unchanged"
    )
    return value
