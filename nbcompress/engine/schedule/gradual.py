"""Gradual pruning inside any PyTorch training loop (Zhu & Gupta, 2017; TF-MOT's semantics).

``GradualPruner`` keeps ``torch.nn.utils.prune`` masks on the chosen layers (the kept-mask
machinery of ``prune_(keep_masks=True)``), so pruned weights stay zero, get zero gradients,
and optimizer state (momentum, Adam moments) cannot revive them: the forward pass always uses
``weight_orig * weight_mask``. At every update step of the schedule, importance is recomputed
on the current masked weights and the masks tighten to the scheduled sparsity (already
pruned weights are zero, so they score lowest and stay pruned).

The whole run is one undoable step, recorded by :meth:`GradualPruner.finish`: the state of
every parameter and buffer at the first update is kept, and ``finish`` makes the masks
permanent and records the step, so ``undo_(model)`` returns the model bit-exactly to how it
was at the first update (dense, and without the training done since — as ``undo_`` of
``prune_(keep_masks=True)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import Change, Transaction, on_change, transaction
from nbcompress.engine.core.interrupts import deferred_interrupts
from nbcompress.engine.core.validation import check_module
from nbcompress.engine.prune.apply import apply_mask, is_masked
from nbcompress.engine.prune.masks import from_output_major, global_masks, layer_mask, output_major
from nbcompress.engine.prune.targets import Target, check_min_density, collect
from nbcompress.engine.schedule.options import (
    check_options,
    check_schedule,
    current_weight,
    layer_shares,
)

__all__ = ["GradualPruner"]


def _child(model: nn.Module, name: str) -> nn.Module | None:
    """``model.get_submodule(name)``, or ``None`` if gone (a fast lookup, no checks)."""
    module: nn.Module | None = model
    for part in name.split(".") if name else ():
        module = module._modules.get(part) if module is not None else None
    return module


class GradualPruner:
    """Prune a model gradually while it trains: call :meth:`step` after each optimizer step.

    Example::

        pruner = GradualPruner(model, PolynomialDecay(0.5, 0.9, begin_step=0, end_step=1000))
        with pruner:
            for x, y in batches:
                loss_fn(model(x), y).backward()
                opt.step(); opt.zero_grad()
                pruner.step()
        undo_(model)  # back to the dense model as it was at the first update

    Steps are counted like TF-MOT's ``UpdatePruningStep``: the masks for schedule step ``t``
    are computed after ``t`` optimizer steps (at construction for ``t = 0``, if it is an
    update step), so the final sparsity is in place after ``end_step`` calls of :meth:`step`.

    Undo: :meth:`finish` records the run as one step, ``"gradual-prune"``. ``undo_(model)``
    then restores every parameter and buffer (of all layers, not only the pruned ones) to its
    value at the first mask update, bit-exactly, and the layers to plain, unmasked modules:
    the training done during the run is undone with the pruning, as for
    ``prune_(keep_masks=True)``. Training after :meth:`finish` changes the recorded weights,
    so undo then refuses without ``force=True``. Until :meth:`finish` nothing is recorded:
    the model carries kept masks (``weight_orig`` / ``weight_mask``), and any other
    compression step (or undo) on it in the meantime stops the pruner.

    Args:
        model: The model (edited in place; masks are kept until :meth:`finish`).
        schedule: A :class:`~nbcompress.engine.schedule.schedules.PolynomialDecay` or
            :class:`~nbcompress.engine.schedule.schedules.ConstantSparsity`.
        method: Importance: ``"l1"`` (|w| of the masked weight) or ``"random"``.
        scope: ``"layer"`` (each layer reaches the scheduled sparsity) or ``"global"``
            (weights ranked across layers, each keeping at least ``min_density``).
        granularity: ``"element"``, ``"block"`` (4 × 1) or ``"channel"`` (whole output
            channels, whose biases are masked too).
        layers: Glob pattern(s) of the layers to prune (default: Linear and Conv layers).
        ratios: Per-layer targets instead of ``layers``: a dict layer → final sparsity, or a
            sensitivity ``Suggestion`` (its ``.ratios``); each layer's sparsity at a step is
            its target × scheduled / final.
        include_output: Also prune the output layer (left alone by default).
        min_density: Global scope only: fraction of weights every layer keeps.
        seed: Seed of the random criterion.

    Raises:
        TypeError: ``model`` is not a module or ``schedule`` not a schedule.
        ValueError: An unknown option, a schedule whose sparsity falls, bad ratios, or
            ratios with global scope (one line naming the argument; model untouched).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Any,
        *,
        method: str = "l1",
        scope: str = "layer",
        granularity: str = "element",
        layers: str | Sequence[str] | None = None,
        ratios: Mapping[str, float] | Any = None,
        include_output: bool = False,
        min_density: float = 0.05,
        seed: int = 0,
    ) -> None:
        check_module(model)
        final = check_schedule(schedule)
        check_options(method, scope, granularity)
        if scope == "global" and ratios is not None:
            raise ValueError("scope: per-layer ratios need scope='layer'.")
        self.model, self.schedule = model, schedule
        self.method, self.scope, self.granularity = method, scope, granularity
        self.min_density = check_min_density(min_density)
        if scope == "global" and final > 1 - self.min_density:
            raise ValueError(
                f"min_density: every layer keeps {self.min_density} of its weights with "
                f"scope='global', so the final sparsity {final} cannot be reached; lower "
                f"min_density below {1 - final:.3g} or the final sparsity."
            )
        shares, skipped = layer_shares(model, final, ratios, layers, include_output)
        #: Layer → why it is not pruned (attention / recurrent layers read their weights
        #: directly, so a kept mask would not apply to them).
        self.skipped: dict[str, str] = skipped
        self._targets: list[Target] = collect(model, shares)
        bad = [t.name for t in self._targets if t.parametrized]
        if bad:
            raise ValueError(
                f"layers: the weight of {', '.join(bad[:3])} is parametrized "
                "(torch.nn.utils.parametrize) and cannot keep a mask; leave it out or remove "
                "the parametrization first."
            )
        self._layers = {
            u.layer: model.get_submodule(u.layer) for t in self._targets for u in t.uses
        }
        self._gen = torch.Generator().manual_seed(seed)
        # Told of any step recorded on or undone from the model (no per-step cost).
        self._changed: str | None = None
        self._subscription = on_change(model, self._heard)
        self._tx: Transaction | None = None
        self._dtypes: dict[int, torch.dtype] = {}
        self._done = False
        self._target = 0.0
        #: Number of optimizer steps counted so far (calls of :meth:`step`).
        self.step_count = 0
        #: ``(step, measured sparsity)`` after every mask update, for plots.
        self.history: list[tuple[int, float]] = []
        due, sparsity = schedule(0)
        if due:
            self._update(sparsity)

    # -- what the training loop calls -------------------------------------------------------

    def step(self) -> None:
        """Count one optimizer step; update the masks when the schedule says so.

        Raises:
            ValueError: The pruner was finished, or the model was changed outside it
                (layers removed or replaced, quantized, masks removed, another
                compression step recorded or undone); one line naming the fix.
        """
        self._check_model()
        self.step_count += 1
        due, sparsity = self.schedule(self.step_count)
        if due:
            self._update(sparsity)

    @property
    def sparsity(self) -> float:
        """Measured fraction of zero weights over the pruned layers' weights, now."""
        zeros = total = 0
        for t in self._targets:
            w = current_weight(t.first.owner, t.first.leaf)
            zeros += int(torch.count_nonzero(w == 0))
            total += w.numel()
        return zeros / max(total, 1)

    @property
    def target(self) -> float:
        """Sparsity the schedule set at the last update (0 before the first)."""
        return self._target

    def finish(self) -> nn.Module:
        """Make the masks permanent and record the whole run as one undoable step.

        Called by ``with GradualPruner(...)`` on exit. A second call does nothing. If no
        update happened yet, nothing was changed and no step is recorded.

        Returns:
            The model: plain ``weight`` parameters again (the same objects, so an optimizer
            still holds them), pruned weights zero, no hooks. Without masks, training after
            this can make pruned weights non-zero again.
        """
        if self._done:
            return self.model
        self._check_model()
        self._done = True
        if self._tx is None:
            return self.model
        owners = {id(u.owner): u.owner for t in self._targets for u in t.uses}
        detail = (
            f"to {self._target:.0%} {self.method} {self.granularity} ({self.scope} scope) over "
            f"{self.step_count} steps, {len(self.history)} updates, on {len(self._layers)} "
            "layer(s)"
        )
        if self.skipped:
            detail += f"; left out (they read their weights directly): {', '.join(self.skipped)}"
        # Ctrl-C waits: between the rollback and the recording the model is the old one.
        with deferred_interrupts():
            final = self._final_values(owners.values())
            self._subscription.remove()  # the step recorded here is the pruner's own
            # Back to the model at the first update (module dicts and values), then record
            # the step from there to the trained, pruned values: undo returns exactly there.
            self._tx.rollback()
            with transaction(self.model, "gradual-prune", detail) as tx:
                for tensor in [*self.model.parameters(), *self.model.buffers()]:
                    tx.save_tensor(tensor)
                for owner in owners.values():
                    tx.save(owner)
                with torch.no_grad():
                    for tensor, value in final:
                        tensor.copy_(value)
                tx.info.update(
                    schedule=self.schedule, history=list(self.history), sparsity=self.sparsity
                )
        self._tx = None
        return self.model

    def abort(self) -> nn.Module:
        """Put the model back as it was before the first update and stop; nothing is recorded.

        For a run that failed before it trained (a refused argument, an error in the first
        batch): the masks come off and every parameter and buffer returns, bit-exactly, to
        its value at the first update. A finished or already aborted pruner is left alone.

        Returns:
            The model.
        """
        if self._done:
            return self.model
        self._done = True
        with deferred_interrupts():
            self._subscription.remove()
            if self._tx is not None:
                self._tx.rollback()
        self._tx = None
        return self.model

    def __enter__(self) -> GradualPruner:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
            return
        # Keep what training reached, recorded; the training error is the one to report.
        with contextlib.suppress(Exception):
            self.finish()

    def __repr__(self) -> str:
        return (
            f"GradualPruner(step={self.step_count}, sparsity={self.sparsity:.3f}, "
            f"target={self._target:.3f}, layers={len(self._layers)}, schedule={self.schedule!r})"
        )

    # -- internals --------------------------------------------------------------------------

    def _update(self, sparsity: float) -> None:
        """Recompute importance on the current weights and tighten every mask."""
        masks = self._masks(sparsity)  # all chosen before anything changes
        if self._tx is None:
            self._start()
        tx = self._tx
        with deferred_interrupts():  # every mask at the new sparsity, or none (Ctrl-C waits)
            for t in self._targets:
                mask = from_output_major(masks[t.name], t.weight(), t.module)
                for use in t.uses:
                    apply_mask(tx, use.owner, mask, keep_masks=True, name=use.leaf)
                    if self.granularity == "channel":
                        self._mask_bias(tx, use.owner, masks[t.name])
        sizes = {t.name: t.weight().numel() for t in self._targets}
        total = max(sum(sizes.values()), 1)
        self._target = (
            sparsity
            if self.scope == "global"
            else sum(sizes[t.name] * t.amount * sparsity for t in self._targets) / total
        )
        self.history.append((self.step_count, self.sparsity))

    def _masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Each target's keep-mask (output-major) at ``sparsity``, from the masked weights."""
        views = {
            t.name: output_major(current_weight(t.first.owner, t.first.leaf), t.module)
            for t in self._targets
        }
        if self.scope == "global":
            return global_masks(
                views,
                sparsity,
                method=self.method,
                granularity=self.granularity,
                min_density=self.min_density,
                gen=self._gen,
            )
        return {
            t.name: layer_mask(
                views[t.name],
                t.amount * sparsity,
                method=self.method,
                granularity=self.granularity,
                gen=self._gen,
            )
            for t in self._targets
        }

    def _start(self) -> None:
        """Keep every parameter and buffer as it is before the first update (for undo)."""
        self._tx = Transaction(self.model, "gradual-prune", "")
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            self._tx.save_tensor(tensor, pin=True)
        for t in self._targets:
            for use in t.uses:
                self._tx.save(use.owner)
                self._dtypes[id(use.owner)] = getattr(use.owner, use.leaf).dtype

    def _heard(self, change: Change) -> None:
        self._changed = change.kind

    @staticmethod
    def _mask_bias(tx: Transaction, owner: nn.Module, unit_mask: torch.Tensor) -> None:
        """Mask the bias of every output channel removed entirely (it must output nothing)."""
        bias = getattr(owner, "bias", None)
        if isinstance(bias, torch.Tensor):
            alive = unit_mask.reshape(bias.shape[0], -1).any(1)
            apply_mask(tx, owner, alive, keep_masks=True, name="bias")

    def _final_values(self, owners: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every tensor's value to keep: masked weights as computed, the rest as they are."""
        values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for owner in owners:
            for leaf in ("weight", "bias"):
                if is_masked(owner, leaf):
                    orig = getattr(owner, leaf + "_orig")
                    values[id(orig)] = (orig, current_weight(owner, leaf).clone())
        masks = {
            id(b) for o in owners for n, b in o.named_buffers(recurse=False) if n.endswith("_mask")
        }
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if id(tensor) not in values and id(tensor) not in masks:
                values[id(tensor)] = (tensor, tensor.detach().clone())
        return list(values.values())

    def _check_model(self) -> None:
        """Refuse to go on when the model was changed outside the pruner."""
        fix = (
            "this pruner cannot go on: start a new GradualPruner on the model as it is now "
            "(masks it left stay until remove_masks_(model))."
        )
        if self._done:
            raise ValueError(
                "pruner: finish() was called already; start a new GradualPruner to prune more."
            )
        if self._changed is not None:
            raise ValueError(
                "model: a compression step was recorded or undone on it since the "
                f"GradualPruner started (e.g. quantize_, remove_, undo_); {fix}"
            )
        for name, module in self._layers.items():
            if _child(self.model, name) is not module:
                raise ValueError(
                    f"model: layer {name!r} was removed or replaced since the GradualPruner "
                    f"started (e.g. quantized or removed); {fix}"
                )
        if self._tx is None:
            return
        for t in self._targets:
            for use in t.uses:
                # The dicts directly: called after every optimizer step, kept cheap.
                orig = use.owner._parameters.get(use.leaf + "_orig")
                if orig is None or use.leaf + "_mask" not in use.owner._buffers:
                    raise ValueError(
                        f"model: the pruning mask of layer {use.layer!r} was removed outside "
                        "the pruner (remove_masks_ or torch.nn.utils.prune.remove); start a "
                        "new GradualPruner on the model as it is now."
                    )
                if orig.dtype != self._dtypes[id(use.owner)]:
                    raise ValueError(
                        f"model: the weight of layer {use.layer!r} changed dtype (e.g. .half()) "
                        "since the GradualPruner started; keep the dtype while pruning "
                        "(use autocast for mixed precision)."
                    )
