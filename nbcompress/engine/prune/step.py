"""One prune step: masks chosen target by target and applied in one transaction.

Activation-aware steps get their input statistics here: Wanda without reconstruction reads
statistics collected once on the model before the step; with ``reconstruct`` each layer,
in forward order, is measured on the model whose earlier layers are already pruned and
re-fitted (so errors do not compound), then masked and re-fitted itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import Transaction, transaction
from nbcompress.engine.prune.apply import apply_mask, is_masked, set_parametrized, zero_channel_bias
from nbcompress.engine.prune.calibrate import (
    SUPPORTED,
    ActivationStats,
    LayerStats,
    calibration_inputs,
    collect_stats,
    forward_order,
)
from nbcompress.engine.prune.masks import (
    CRITERIA,
    from_output_major,
    global_counts,
    mask_of,
    output_major,
    score_source,
    units,
)
from nbcompress.engine.prune.reconstruct import reconstruct_rows
from nbcompress.engine.prune.targets import Target, not_pruned
from nbcompress.engine.prune.wanda import wanda_mask

__all__ = ["METHODS", "Calibration", "Plan", "calibration", "run_step"]

#: Importance criteria: the data-free ones of ``masks.CRITERIA`` and activation-aware Wanda.
METHODS = (*CRITERIA, "wanda")


@dataclass(frozen=True)
class Plan:
    """How a prune step chooses and applies its masks."""

    method: str
    scope: str
    granularity: str
    keep_masks: bool
    min_density: float
    seed: int
    reconstruct: bool = False


@dataclass
class Calibration:
    """Where a step's input statistics come from, and what it could not use them for.

    Attributes:
        batches: Calibration batches (needed for ``reconstruct``), or ``None``.
        stats: Statistics collected before the step (Wanda without reconstruction).
        notes: Further notes for the step's detail.
        fallback: Target → why Wanda scored it by L1.
        kept_as_masked: Target → why ``reconstruct`` left it as masked.
    """

    batches: list[tuple] | None = None
    stats: ActivationStats | None = None
    notes: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    kept_as_masked: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """One note per kind of fallback, naming the layers."""
        notes = list(self.notes)
        for what, found in (
            ("wanda: scored by L1 instead", self.fallback),
            ("reconstruct: not re-fitted", self.kept_as_masked),
        ):
            by_why: dict[str, list[str]] = {}
            for name, why in found.items():
                by_why.setdefault(why, []).append(name)
            for why, names in by_why.items():
                shown = ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")
                notes.append(f"{what} for {shown}: {why}")
        return notes


def _unscorable(target: Target) -> str | None:
    """Why the inputs of ``target`` cannot be measured (None if they can)."""
    if not isinstance(target.module, SUPPORTED):
        return (
            f"the inputs of {type(target.module).__name__} layers are not measured (Linear, "
            "Conv1d and Conv2d only)"
        )
    return None


def _masks(
    targets: list[Target], plan: Plan, stats_of: Callable[[Target], LayerStats | None]
) -> Iterator[tuple[Target, torch.Tensor, LayerStats | None]]:
    """Each target's keep-mask in its own layout and its statistics, one at a time.

    ``stats_of`` is asked for a target's statistics just before its mask is made, after the
    previous targets were applied (sequential calibration). Bounded memory: one mask at a
    time.
    """
    gen = torch.Generator().manual_seed(plan.seed)
    g = plan.granularity
    views: dict[str, torch.Tensor] = {}
    method = "l1" if plan.method == "wanda" else plan.method
    if plan.scope == "global":
        # Pooled ranking reads every weight; layer scope makes each view when it needs it
        # (a ConvTranspose's output-major view is a copy).
        views = {t.name: output_major(t.weight().detach(), t.module) for t in targets}
        sources = {n: score_source(w, method, g, gen) for n, w in views.items()}
        amount = targets[0].amount
        counts = global_counts(views, sources, amount, granularity=g, min_density=plan.min_density)
    for t in targets:
        w = views.pop(t.name, None)
        if w is None:
            w = output_major(t.weight().detach(), t.module)
        stats = stats_of(t)
        if plan.method == "wanda" and stats is not None:
            mask = wanda_mask(w, t.amount, stats, g)
        elif plan.scope == "global":
            mask = mask_of(w, counts[t.name], sources.pop(t.name), g)
        else:
            mask = mask_of(w, round(t.amount * units(w, g)), score_source(w, method, g, gen), g)
        yield t, from_output_major(mask, t.weight(), t.module), stats


def _apply(tx: Transaction, target: Target, mask: torch.Tensor, plan: Plan) -> None:
    for i, use in enumerate(target.uses):
        # A shared tensor is zeroed once; every user gets the mask when kept.
        if i == 0 and target.parametrized:
            set_parametrized(tx, use.owner, use.leaf, mask, use.layer)
        elif i == 0 or plan.keep_masks:
            extra = {} if use.leaf == "weight" else {"name": use.leaf}
            apply_mask(tx, use.owner, mask, keep_masks=plan.keep_masks, **extra)
        if plan.granularity == "channel":
            zero_channel_bias(tx, use.owner, mask)


@torch.no_grad()
def _refit(target: Target, before: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> None:
    """Write the least-squares re-fit of ``target``'s kept weights (saved by the mask)."""
    rows = before.shape[0]
    new = reconstruct_rows(before.reshape(rows, -1), mask.reshape(rows, -1), stats.gram)
    module = target.first.owner
    if is_masked(module):
        orig = module.weight_orig
        orig.copy_(new.reshape(orig.shape).to(orig.dtype))
        module.weight = orig * module.weight_mask
    else:
        w = target.weight()
        w.copy_(new.reshape(w.shape).to(w.dtype))


class _Sequential:
    """Statistics of one layer at a time, measured on the model as the step leaves it."""

    def __init__(self, model: nn.Module, targets: list[Target], calib: Calibration) -> None:
        self.model, self.calib = model, calib
        modules = {t.first.layer: t.module for t in targets}
        order, self.calls = forward_order(model, calib.batches[0], modules)
        rank = {n: i for i, n in enumerate(order)}
        self.targets = sorted(targets, key=lambda t: rank[t.first.layer])

    def why_not(self, t: Target) -> str | None:
        if (why := _unscorable(t)) is not None:
            return why
        if self.calls[t.first.layer] == 0:
            return "not called by the model on the calibration inputs"
        if len(t.uses) > 1 or t.parametrized:
            return "shared or parametrized weight"
        return None

    def stats(self, t: Target) -> LayerStats | None:
        if self.why_not(t) is not None:
            return None
        layer = t.first.layer
        once = self.calls[layer] == 1
        found = collect_stats(
            self.model, self.calib.batches, {layer: t.module}, gram=True, stop_early=once
        )
        return found.layers.get(layer)


def _run_sequential(
    tx: Transaction, model: nn.Module, targets: list[Target], plan: Plan, calib: Calibration
) -> None:
    seq = _Sequential(model, targets, calib)

    def stats_of(t: Target) -> LayerStats | None:
        found = seq.stats(t)
        if found is None:
            why = seq.why_not(t) or "no input statistics"
            calib.kept_as_masked[t.name] = why
            if plan.method == "wanda":
                calib.fallback[t.name] = why
        return found

    for t, mask, stats in _masks(seq.targets, plan, stats_of):
        before = t.weight().detach().clone() if stats is not None else None
        _apply(tx, t, mask, plan)
        if stats is not None and plan.granularity == "channel":
            calib.kept_as_masked[t.name] = (
                "with channel granularity the pruned rows are zero and the kept rows keep "
                "all their inputs, so there is nothing to re-fit"
            )
        elif stats is not None:
            _refit(t, before, mask, stats)
        del mask, before


def run_step(
    model: nn.Module,
    targets: list[Target],
    plan: Plan,
    what: str,
    info: dict[str, Any],
    calib: Calibration | None = None,
) -> None:
    """Apply every target's mask in one transaction, recording ``info`` and the coverage."""
    calib = calib or Calibration()
    untouched, shares = not_pruned(model, targets, info["excluded_output"], info["skipped"])
    layers = {u.layer for t in targets for u in t.uses}
    detail = f"{what} on {len(layers)} layer(s)"
    if info["excluded_output"]:
        detail += f"; output layer {info['excluded_output']} left alone"
    if untouched:
        detail += f"; {untouched}"
    with transaction(model, "prune", detail) as tx:
        if plan.keep_masks:
            # Fine-tuning follows and changes every parameter: keep full copies so that
            # undo returns to the model as it was before this step, not a mix.
            for tensor in [*model.parameters(), *model.buffers()]:
                tx.save_tensor(tensor, pin=True)
        if plan.reconstruct:
            _run_sequential(tx, model, targets, plan, calib)
        else:
            wanda = plan.method == "wanda"
            for target, mask, _ in _masks(
                targets, plan, lambda t: _prior_stats(t, calib) if wanda else None
            ):
                _apply(tx, target, mask, plan)
                del mask
        notes = calib.summary()
        if notes:
            tx.step.detail += "; " + "; ".join(notes)
        tx.info.update(info, **asdict(plan), notes=notes, not_pruned=shares)


def _prior_stats(t: Target, calib: Calibration) -> LayerStats | None:
    """Statistics collected before the step (Wanda without reconstruction)."""
    found = calib.stats.layers.get(t.first.layer) if calib.stats is not None else None
    if found is None or _unscorable(t) is not None:
        why = _unscorable(t) or "not called by the model on the calibration inputs"
        calib.fallback[t.name] = why
        return None
    return found


def calibration(
    model: nn.Module, targets: list[Target], plan: Plan, example_inputs: Any
) -> Calibration | None:
    """The calibration a step needs: none (data-free), statistics, or batches to re-fit on.

    Wanda without reconstruction measures every target once, here, on the model as it is.

    Raises:
        ValueError: Calibration inputs are missing, or the model fails on them (one line
            naming ``example_inputs`` and the fix); the model is untouched.
        TypeError: ``example_inputs`` is neither inputs nor an iterable of them.
    """
    if plan.method != "wanda" and not plan.reconstruct:
        return None
    who = "reconstruct=True" if plan.reconstruct else "method='wanda'"
    if example_inputs is None:
        raise ValueError(
            f"example_inputs: {who} needs calibration inputs: pass example_inputs=x (--input "
            "x in a notebook), a list of batches or a DataLoader, e.g. a few hundred "
            "training examples."
        )
    if isinstance(example_inputs, ActivationStats):
        if plan.reconstruct:
            raise ValueError(
                "example_inputs: reconstruct=True re-measures each layer after the earlier "
                "ones are pruned, so it needs the calibration inputs themselves, not "
                "ActivationStats; pass the inputs."
            )
        return Calibration(stats=example_inputs)
    batches = calibration_inputs(example_inputs)
    if plan.reconstruct:
        return Calibration(batches=batches)
    modules = {t.first.layer: t.module for t in targets}
    return Calibration(stats=collect_stats(model, batches, modules))
