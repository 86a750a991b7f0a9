"""Keeping the model as it was around the user's ``evaluate``, and checking that it is.

An ``evaluate`` may fine-tune briefly before it measures (one optimizer step, then the
metric). Sensitivity procedures promise the model back bit-exactly, so each parameter such
a step is about to change is saved first, lazily and once per call: a hook runs after a
gradient is accumulated into the parameter (before any update can use it) and a global
optimizer-step pre-hook covers optimizer steps on gradients set otherwise. After the call
the saved values are put back. Only the parameters ``evaluate`` trains are copied, so a
benign ``evaluate`` costs no memory. Any other change of a parameter (an in-place write
without a gradient) shows in the tensor's version counter; it cannot be undone, so it is
refused with one line naming ``evaluate``.

:class:`Fingerprint` is the cheap check behind every "the model is restored" claim: an
integer checksum of each tensor's bits, taken before and compared after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nbcompress.engine.core.history import Transaction, trial
from nbcompress.engine.core.interrupts import deferred_interrupts
from nbcompress.engine.core.snapshot import SavedTensor, checksum, restore_all

__all__ = [
    "EvaluateChangedModel",
    "EvaluationError",
    "Fingerprint",
    "LayerTrial",
    "ModelNotRestored",
    "Restored",
    "checksum",
    "layer_trial",
    "restoring",
    "shown",
    "verified",
]


def _signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, checksum(t)


class Fingerprint:
    """Checksums of named tensors, to verify later that none of them changed.

    Args:
        named: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``.
    """

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.signatures = {n: _signature(t) for n, t in named}

    @classmethod
    def of(cls, model: nn.Module) -> Fingerprint:
        """Every parameter and buffer of ``model``, by qualified name."""
        return cls([*model.named_parameters(), *model.named_buffers()])

    def changed(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Names whose tensor now differs (or that appeared or disappeared).

        Args:
            named: The same ``(name, tensor)`` pairs, as they are now.
        """
        now = dict(named)
        names = list(self.signatures) + [n for n in now if n not in self.signatures]
        return [
            n
            for n in names
            if n not in now or n not in self.signatures or _signature(now[n]) != self.signatures[n]
        ]

    def changed_in(self, model: nn.Module) -> list[str]:
        """:meth:`changed` over every parameter and buffer of ``model``."""
        return self.changed([*model.named_parameters(), *model.named_buffers()])


class EvaluationError(RuntimeError, ValueError):
    """``evaluate`` raised during a sweep; the model is restored and ``result`` is partial.

    Also a ``ValueError``, so that the magics report it as a one-line usage error naming
    ``--eval``.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class EvaluateChangedModel(EvaluationError):
    """``evaluate`` changed parameters in a way that could not be saved first.

    Its message names them and says they keep the change (nothing claims "restored").
    """


class ModelNotRestored(RuntimeError):
    """The model differs from before a procedure that promised it back (checksums differ).

    Attributes:
        names: The parameters and buffers that differ.
        result: The (partial) result measured before, if any.
    """

    def __init__(self, message: str, names: list[str], result: object = None) -> None:
        super().__init__(message)
        self.names, self.result = names, result


def shown(names: list[str], limit: int = 5) -> str:
    """``a, b, c, … (12 in all)``: a list of names for a one-line message."""
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass
class Restored:
    """What :func:`restoring` put back after one call: the parameters evaluate trained."""

    names: list[str] = field(default_factory=list)


def _stamp(p: torch.Tensor) -> tuple:
    try:
        return p.data_ptr(), p._version
    except RuntimeError:  # inference tensors keep no version counter
        return p.data_ptr(), None


@contextlib.contextmanager
def restoring(model: nn.Module, who: str) -> Iterator[Restored]:
    """Run a call of ``evaluate`` that may train; put every parameter it changes back.

    Args:
        model: The model ``evaluate`` receives.
        who: How to name the function in errors, e.g. ``"evaluate: accuracy(model)"``.

    Yields:
        A record; after the block its ``names`` are the parameters that were restored.

    Raises:
        EvaluateChangedModel: A parameter changed without a gradient step (so nothing
            could save it first); every parameter that was saved is restored.
    """
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    stamps = {n: _stamp(p) for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    saved: dict[str, SavedTensor] = {}

    def save(p: torch.Tensor) -> None:
        name = names.get(id(p))
        if name is not None and name not in saved:
            saved[name] = SavedTensor(tensor=p, full=p.detach().clone())

    def before_step(optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                save(p)

    handles = [
        p.register_post_accumulate_grad_hook(save) for p in params.values() if p.requires_grad
    ]
    handles.append(register_optimizer_step_pre_hook(before_step))
    record = Restored()
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        changed = [n for n, p in params.items() if _stamp(p) != stamps[n]]
        # Deferred and retried as every rollback is: a Ctrl-C here must not leave the
        # fine-tuned values in the user's model.
        with deferred_interrupts(), torch.no_grad():
            interrupted = restore_all(saved.values())
            for n, p in params.items():
                if p.grad is not grads[n]:
                    p.grad = grads[n]
        record.names = sorted(saved)
        if interrupted is not None:
            raise interrupted
    unsaved = [n for n in changed if n not in saved]
    if unsaved:
        raise EvaluateChangedModel(
            f"{who} changed the model's parameters ({shown(unsaved)}) without a gradient step, so "
            "they could not be saved first and keep that change; evaluate must not change "
            "the model (fine-tuning through backward() and an optimizer is undone for you)."
        )


def _own(layers: dict[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """Each layer's own parameters and buffers, by qualified name."""
    out = []
    for name, layer in layers.items():
        # Recursive: a MultiheadAttention's out_proj is edited with the layer.
        tensors = [*layer.named_parameters(), *layer.named_buffers()]
        out += [(f"{name}.{n}" if name else n, t) for n, t in tensors]
    return out


@dataclass
class LayerTrial:
    """What a :func:`layer_trial` restores: its transaction, and weights saved more cheaply.

    Attributes:
        tx: The trial's transaction (full copies of what ``nbcompress`` verbs save in it).
        saved: Further snapshots with an idempotent ``restore()`` (e.g. only the entries a
            trial zeroed, :class:`~nbcompress.engine.sensitivity.entries.PrunedEntries`),
            restored before the transaction.
    """

    tx: Transaction
    saved: list[Any] = field(default_factory=list)

    def restore_saved(self) -> None:
        """Restore :attr:`saved` (newest first); Ctrl-C waits until every one is back."""
        with deferred_interrupts():
            interrupted = restore_all(reversed(self.saved))
        if interrupted is not None:
            raise interrupted

    def rollback(self) -> None:
        """Restore everything: :attr:`saved`, then the transaction (both idempotent)."""
        try:
            self.restore_saved()
        finally:
            self.tx.rollback()


def _settle(fingerprint: Fingerprint, now: Callable[[], list], state: LayerTrial | None) -> None:
    """Check the restore; if a rollback was cut short (Ctrl-C), finish it; else refuse."""
    for _ in range(3):
        changed = fingerprint.changed(now())
        if not changed or state is None:
            break
        with contextlib.suppress(KeyboardInterrupt):
            state.rollback()  # idempotent: puts the same saved values back
    else:
        changed = fingerprint.changed(now())
    if changed:
        raise ModelNotRestored(
            f"the model could not be restored: {shown(changed)} differ from before the trial; "
            "reload those weights (e.g. from a checkpoint).",
            changed,
        )


@contextlib.contextmanager
def layer_trial(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[LayerTrial]:
    """A trial of edits to ``layers`` whose restore is verified by checksum on exit.

    If the rollback was interrupted (Ctrl-C inside it), it is completed; the layers are
    never left edited while a caller goes on to say the model is restored.

    Args:
        model: The model the trial is on.
        layers: Qualified name → layer about to be edited.

    Yields:
        The trial: edits by ``nbcompress`` verbs join its transaction; snapshots added to
        its ``saved`` are restored too.
    """
    before = Fingerprint(_own(layers))
    state = None
    try:
        with trial(model) as tx:
            state = LayerTrial(tx)
            try:
                yield state
            finally:
                state.restore_saved()
    finally:
        _settle(before, lambda: _own(layers), state)


@dataclass
class _Check:
    result: object = None


@contextlib.contextmanager
def verified(model: nn.Module, fingerprint: Fingerprint, what: str) -> Iterator[_Check]:
    """On exit, check ``model`` against ``fingerprint``; refuse to pass if it differs.

    Args:
        model: The model a procedure promised to leave unchanged.
        fingerprint: Its fingerprint before the procedure.
        what: The procedure, for the message (e.g. ``"sensitivity"``).

    Yields:
        A holder: set its ``result`` to attach the (partial) result to the error.
    """
    check = _Check()
    try:
        yield check
    except EvaluateChangedModel:
        raise  # it already names what keeps evaluate's change
    except BaseException:
        _unchanged(model, fingerprint, what, check)
        raise
    _unchanged(model, fingerprint, what, check)


def _unchanged(model: nn.Module, fingerprint: Fingerprint, what: str, check: _Check) -> None:
    changed = fingerprint.changed_in(model)
    if changed:
        raise ModelNotRestored(
            f"{what}: the model differs from before in {shown(changed)}; it could not be "
            "restored bit-exactly (evaluate changed it without a gradient step, or "
            "restoring was interrupted). Reload those weights.",
            changed,
            check.result,
        )
