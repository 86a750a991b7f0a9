"""A small training loop for the notebook: progress bar, pruning schedule, L1, Ctrl-C safe.

:func:`finetune` is the loop people write by hand after pruning (forward, loss, backward,
optimizer step), plus what a notebook wants: a progress bar (:class:`~nbcompress.progress.Progress`:
a live bar in a notebook, lines on stdout elsewhere) with the loss, the sparsity, the
validation metric and the ETA; a live loss/sparsity plot in Jupyter; a pruner stepped after
each optimizer step; an L1 term; and Ctrl-C that stops cleanly at the last finished step.
Per step it adds no host synchronisation: the loss is read back only when the bar updates.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.core.interrupts import deferred_interrupts
from nbcompress.engine.core.validation import check_module, eval_mode, positive_int, primary_output
from nbcompress.engine.schedule.finetune_checks import (
    batch_error,
    data_error,
    metric_value,
    warn_unmasked_zeros,
    zero_fraction,
)
from nbcompress.engine.schedule.finetune_result import FinetuneResult
from nbcompress.engine.schedule.regularize import L1Penalty
from nbcompress.engine.schedule.stepguard import StepGuard
from nbcompress.engine.schedule.trainingdata import Batches, batches, check_val
from nbcompress.progress import Progress, in_notebook

__all__ = ["FinetuneResult", "finetune"]

#: Seconds between progress updates (each reads the loss back once, a host sync).
UPDATE_INTERVAL = 0.2

#: The fix for a first batch the default cross-entropy cannot take.
DEFAULT_LOSS_HINT = " (y int64 class indices for the default cross-entropy)"


def pruner_sparsity(pruner: Any) -> float | None:
    """The pruner's current sparsity (``pruner.sparsity``, a number or a method), if any."""
    value = getattr(pruner, "sparsity", None)
    value = value() if callable(value) else value
    return float(value) if isinstance(value, numbers.Real) else None


def progress_bar(total: int | None, enabled: bool) -> Progress | None:
    """The run's progress (a live bar in a notebook, stdout lines elsewhere), or ``None``."""
    return Progress(total, "finetune", "step") if enabled else None


def postfix_text(shown: dict[str, str]) -> str:
    """``{"loss": "0.1", "sparsity": "50.0%"}`` → ``"loss=0.1, sparsity=50.0%"``."""
    return ", ".join(f"{k}={v}" for k, v in shown.items())


#: Whether this runs in a Jupyter kernel (kept here: ``%finetune`` imports it from this module).
in_kernel = in_notebook


def _callbacks(callback: Any, plot: bool | None) -> list[Callable[[FinetuneResult], None]]:
    found = [] if callback is None else [callback]
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected f(result) -> None, got {type(callback).__name__}.")
    if plot or (plot is None and in_kernel()):
        # Drawn by the notebook layer, imported only when a plot is wanted.
        from nbcompress.notebook.display.training import LiveTrainingPlot

        found.append(LiveTrainingPlot())
    return found


class _Run:
    """The state of one run: the step, the buffers of the last finished step, the bar."""

    def __init__(self, model: nn.Module, result: FinetuneResult, pruner: Any) -> None:
        self.model, self.result, self.pruner = model, result, pruner
        self.buffers = [b for b in model.buffers() if b is not None and not b.requires_grad]
        # Running statistics of the last finished step: a step cut short (an error, Ctrl-C
        # in the forward) must not leave its batch in BatchNorm's statistics.
        self.saved = [b.detach().clone() for b in self.buffers]
        self.bar: Progress | None = None
        # Without a pruner the bar shows the measured sparsity (at the start, each epoch).
        self.measured: float | None = None
        self.guard = StepGuard()
        self.callbacks: list[Callable[[FinetuneResult], None]] = []
        # The epoch's losses stay on the device until read: no sync per step.
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.shown, self.last = 0, time.perf_counter()

    def finished_step(self, optimizer: Any) -> None:
        """The optimizer and pruner steps, which Ctrl-C may not cut in half.

        The step counts as finished once ``optimizer.step()`` returned: an error in
        ``pruner.step()`` then leaves the weights, the BatchNorm statistics and
        ``result.steps`` of that same step, not the weights of one and the rest of the last.
        """
        with self.guard.step():
            optimizer.step()
            for kept, buf in zip(self.saved, self.buffers):  # buffers need no grad
                kept.copy_(buf)
            self.result.steps += 1
            if self.pruner is not None:
                self.pruner.step()

    def restore_buffers(self) -> None:
        """Put back the buffers as after the last finished step."""
        with torch.no_grad():
            for kept, buf in zip(self.saved, self.buffers, strict=True):
                buf.copy_(kept)

    def postfix(self, loss: float, metric: float | None, sparsity: float | None) -> dict[str, str]:
        """The bar's postfix: loss, sparsity (→ the pruner's target) and metric, if known."""
        shown = {"loss": f"{loss:.4f}"}
        sparsity = self.measured if sparsity is None else sparsity
        if sparsity is not None:
            target = getattr(self.pruner, "target", None)
            aim = f"→{target:.0%}" if isinstance(target, numbers.Real) else ""
            shown["sparsity"] = f"{sparsity:.1%}{aim}"
        if metric is not None:
            shown[self.result.metric_name] = f"{metric:.4f}"
        return shown

    def progress(self, loss: torch.Tensor, rows: int, metric: float | None) -> None:
        """Keep a step's loss; every ``UPDATE_INTERVAL`` seconds update the bar with them."""
        self.losses.append(loss)
        self.sizes.append(rows)
        if time.perf_counter() - self.last >= UPDATE_INTERVAL:
            self.update(metric)

    def update(self, metric: float | None) -> None:
        """Update the bar, the curve and the callbacks now (one host sync)."""
        steps = len(self.losses) - self.shown
        if not steps:
            return
        mean = float(torch.stack(self.losses[self.shown :]).mean())
        sparsity = pruner_sparsity(self.pruner) if self.pruner is not None else None
        self.result.curve.append((self.result.steps, mean, sparsity))
        if self.bar is not None:
            self.bar.update(steps, note=postfix_text(self.postfix(mean, metric, sparsity)))
        self.shown, self.last = len(self.losses), time.perf_counter()
        for callback in self.callbacks:
            callback(self.result)


def _epoch(run: _Run, data: Iterator[Any], step_fn: Callable, optimizer: Any) -> float:
    """One pass over the data; returns the mean loss per row."""
    run.losses, run.sizes, run.shown = [], [], 0
    metric = run.result.metric[-1] if run.result.metric else None
    for batch in data:
        x, y = batch[0], batch[1]
        loss = step_fn(x, y, run.result.steps)
        run.finished_step(optimizer)
        run.progress(loss, len(y), metric)
    run.update(metric)
    if not run.losses:
        raise ValueError("train: the data gave no batch; pass a non-empty DataLoader.")
    sizes = torch.tensor(run.sizes, dtype=run.losses[0].dtype)
    return float(torch.stack(run.losses).to(sizes.device) @ sizes) / sum(run.sizes)


def _first_loss(model: nn.Module, loss_fn: Callable, x: Any, y: Any, hint: str) -> torch.Tensor:
    """The first batch's loss; an error in the forward or the loss names ``train`` and the fix.

    Only the first batch: before any optimizer step a failure is about the data's shape or
    dtype and the model is still untouched (its BatchNorm statistics are put back).
    """
    try:
        return loss_fn(model(x), y)
    except Exception as err:
        if not data_error(err):
            raise
        raise batch_error("train", x, y, err, hint) from err


def _step_function(model, loss_fn, optimizer, penalty, hint: str) -> Callable:
    """Forward, loss (+ L1), backward: everything of a step before the optimizer's."""

    def step(x: Any, y: Any, index: int) -> torch.Tensor:
        loss = loss_fn(model(x), y) if index else _first_loss(model, loss_fn, x, y, hint)
        total = loss + penalty(index) if penalty is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        return loss.detach()

    return step


def _default_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(primary_output(out), y)


def _check_parts(model, optimizer, loss, pruner, l1, lr) -> tuple[Any, Callable, Any]:
    if optimizer is None:
        if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: {lr!r} is not a number > 0; pass a learning rate, e.g. 1e-3.")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: no parameter requires grad; unfreeze the layers to train.")
        optimizer = torch.optim.Adam(params, lr=lr)
    elif not all(callable(getattr(optimizer, a, None)) for a in ("step", "zero_grad")):
        raise TypeError(
            f"optimizer: expected a torch.optim optimizer, got {type(optimizer).__name__}."
        )
    if loss is not None and not callable(loss):
        raise TypeError(f"loss: expected f(output, y) -> tensor, got {type(loss).__name__}.")
    if pruner is not None and not callable(getattr(pruner, "step", None)):
        raise TypeError(
            f"pruner: expected an object with a .step() method (a GradualPruner), got "
            f"{type(pruner).__name__}."
        )
    return optimizer, loss or _default_loss, _penalty(model, l1)


def _penalty(model: nn.Module, l1: Any) -> L1Penalty | None:
    """The L1 term: none, a weight or schedule over the default layers, or a given penalty."""
    if isinstance(l1, L1Penalty):
        # Checked here, since an L1Penalty is itself callable and would pass for a schedule.
        ours = {id(m) for m in model.modules()}
        if not all(id(m) in ours for m in l1.modules):
            raise ValueError(
                "l1: this L1Penalty was built for another model; build it on the model being "
                "trained, e.g. l1=L1Penalty(model, 1e-4, group=True)."
            )
        return l1
    return None if l1 == 0 and not callable(l1) else L1Penalty(model, l1, arg="l1")


def finetune(
    model: nn.Module,
    train: Any,
    epochs: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    pruner: Any = None,
    l1: float | Callable[[int], float] | L1Penalty = 0.0,
    val: Any = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    finish: bool = False,
    plot: bool | None = None,
    callback: Callable[[FinetuneResult], None] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place for a few epochs, with a progress bar; Ctrl-C stops cleanly.

    Each step runs forward, ``loss`` (+ the L1 term), backward, the optimizer step, then
    ``pruner.step()``. After each epoch ``val`` is evaluated in eval mode. Ctrl-C keeps the
    model as after the last finished optimizer (and pruner) step, never half-way through
    one (BatchNorm statistics included), prints one line and returns the history so far;
    any other error leaves it at that step too and is raised. A step counts as finished
    once ``optimizer.step()`` returned: an error in ``pruner.step()`` leaves the model (and
    ``steps``) as after that optimizer step. Every module's training flag is restored at
    the end.

    Args:
        model: The model, trained in place.
        train: ``(x, y)`` tensors (shuffled each epoch with ``seed``, in ``batch_size``
            batches) or a ``DataLoader`` (any re-iterable) of ``(x, y)`` batches, used as is.
        epochs: Passes over ``train``.
        optimizer: Default ``Adam(lr)`` over the parameters that require grad (``lr`` is
            ignored when an optimizer is given).
        loss: ``f(output, y) -> tensor``; default cross-entropy on the (first) output.
        pruner: Any object with ``.step()`` (e.g. a ``GradualPruner``), called after each
            optimizer step; its ``sparsity`` (a number or a method) and ``target`` are shown
            in the bar if it has them.
        l1: Weight of :func:`~nbcompress.engine.schedule.regularize.l1_penalty` added to
            the loss (0 = off), or a schedule ``f(step) -> float``, or an
            :class:`~nbcompress.engine.schedule.regularize.L1Penalty` of this model (group
            lasso, chosen layers), evaluated at each optimizer step.
        val: A metric ``f(model) -> float`` or ``(x, y)`` tensors (top-1 accuracy).
        lr: Learning rate of the default optimizer.
        batch_size: Rows per batch of ``(x, y)`` tensors.
        seed: Seed of the shuffling of ``(x, y)`` tensors.
        progress: Show progress with loss, sparsity, metric and ETA (a live bar in Jupyter,
            a line every few seconds on stdout elsewhere, then the total time);
            the sparsity is the pruner's (→ its target), without one the measured fraction
            of zero weights at the start and after each epoch.
        finish: Call ``pruner.finish()`` once all epochs ran (not after Ctrl-C): only when
            asked, since finishing usually makes the pruner's masks final.
        plot: A live loss/sparsity plot; ``None`` = only when running in a Jupyter kernel.
        callback: Called with the :class:`FinetuneResult` so far at each progress update.

    Returns:
        A :class:`FinetuneResult`: per-epoch loss, metric, sparsity and seconds.

    Raises:
        ValueError / TypeError: A bad argument (one line naming it), before any step; a
            first batch of ``train`` (or of ``val`` tensors) the model or the loss fails on
            (one line with its shapes, raised from the original error); a ``val`` metric
            that returns no number.

    Warns:
        UserWarning: Without a pruner, when over 10% of the prunable weights are zero
            without a kept mask (a one-shot prune that training would undo).
    """
    check_module(model)
    epochs = positive_int(epochs, "epochs", "epochs=3")
    batch_size = positive_int(batch_size, "batch_size", "batch_size=64")
    optimizer, loss_fn, penalty = _check_parts(model, optimizer, loss, pruner, l1, lr)
    metric_fn, metric_name = check_val(val)
    epoch_batches, per_epoch = batches(train, batch_size, seed)
    sparsity = warn_unmasked_zeros(model, stacklevel=2) if pruner is None else None
    run = _Run(model, FinetuneResult(epochs=epochs, metric_name=metric_name), pruner)
    run.callbacks = _callbacks(callback, plot)
    hint = "" if loss is not None else DEFAULT_LOSS_HINT
    step_fn = _step_function(model, loss_fn, optimizer, penalty, hint)
    run.measured = sparsity if progress else None
    run.bar = progress_bar(per_epoch * epochs if per_epoch else None, progress)
    _train(run, epoch_batches, step_fn, optimizer, metric_fn, finish)
    return run.result


def _train(
    run: _Run, epoch_batches: Batches, step_fn: Callable, optimizer: Any, metric_fn, finish: bool
) -> None:
    """The epochs and ``pruner.finish()``: Ctrl-C stops, any other error is raised."""
    result, pruner = run.result, run.pruner
    flags = {m: m.training for m in run.model.modules()}
    try:
        with run.guard:
            _epochs(run, epoch_batches, step_fn, optimizer, metric_fn)
        if finish and pruner is not None and callable(getattr(pruner, "finish", None)):
            with deferred_interrupts():
                pruner.finish()
    except KeyboardInterrupt:
        run.restore_buffers()
        result.interrupted = True
        # What the user asked for (Ctrl-C), so normal output: the last progress line.
        print(
            f"Interrupted: the model is as after optimizer step {result.steps} "
            f"({len(result.loss)} of {result.epochs} epochs finished); the history so far is "
            "returned.",
            flush=True,
        )
    except BaseException:
        run.restore_buffers()
        raise
    finally:
        for m, flag in flags.items():
            m.training = flag
        if run.bar is not None:
            run.bar.close()


def _epochs(
    run: _Run, epoch_batches: Batches, step_fn: Callable, optimizer: Any, metric_fn
) -> None:
    result = run.result
    for _ in range(result.epochs):
        run.model.train()
        start = time.perf_counter()
        mean = _epoch(run, epoch_batches(), step_fn, optimizer)
        seconds = time.perf_counter() - start
        metric = None
        if metric_fn is not None:
            with eval_mode(run.model):
                metric = metric_value(metric_fn(run.model))
        result.loss.append(mean)
        result.metric.append(metric)
        result.sparsity.append(zero_fraction(run.model))
        result.seconds.append(seconds)
        if run.bar is not None:
            run.measured = result.sparsity[-1]
            sparsity = pruner_sparsity(run.pruner) if run.pruner is not None else None
            run.bar.note = postfix_text(run.postfix(mean, metric, sparsity))
        for callback in run.callbacks:
            callback(result)
