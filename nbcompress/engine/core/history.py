"""Reversible, all-or-nothing model edits: transactions, history, undo.

Every in-place verb of nbcompress edits the model inside :func:`transaction`. The
transaction snapshots what it is about to change (a module's attribute dicts, its
parameter and buffer values), so that

* an exception or Ctrl-C part-way rolls the model back bit-exactly, and
* on success the snapshot becomes one :class:`Step` of the model's history, which
  :func:`undo_` replays backwards.

Only tensors that really changed are kept, as a sparse diff when that is smaller than a
full copy; modules swapped out are kept by reference. Histories live outside the model
(a weak-keyed registry), so the model stays an ordinary ``nn.Module``.

Listeners registered with :func:`on_change` (see :mod:`nbcompress.engine.core.listeners`)
are called after every step recorded or undone, so that a display of the model stays true
when it is changed elsewhere; :func:`history_token` tells whether the steps in place are
still those seen earlier.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.interrupts import deferred_interrupts
from nbcompress.engine.core.listeners import Change, Subscription, notify, on_change
from nbcompress.engine.core.report import fmt_bytes
from nbcompress.engine.core.snapshot import ModuleState, SavedTensor, held_bytes, tensors_in
from nbcompress.engine.core.steps import History, Step
from nbcompress.engine.core.validation import check_module

__all__ = [
    "Change",
    "History",
    "Step",
    "Subscription",
    "Transaction",
    "history",
    "history_token",
    "on_change",
    "set_history_limit",
    "steps_since",
    "transaction",
    "trial",
    "undo_",
]

_LIMIT = {"bytes": 4 * 2**30}


_HISTORIES: weakref.WeakKeyDictionary[nn.Module, History] = weakref.WeakKeyDictionary()
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[Transaction]] = weakref.WeakKeyDictionary()


class Transaction:
    """Records what an operation changes so that it can be rolled back or undone.

    Obtain one from :func:`transaction` or :func:`trial`; call :meth:`save` before
    editing a module in place and :meth:`replace` to swap a submodule.
    """

    def __init__(self, model: nn.Module, name: str, detail: str) -> None:
        self.model = model
        self.step = Step(name=name, detail=detail)
        self._seen_modules: set[int] = set()
        self._seen_tensors: set[int] = set()

    @property
    def info(self) -> dict[str, Any]:
        """Free-form details stored with the step."""
        return self.step.info

    def save(self, module: nn.Module, *, recurse: bool = False) -> None:
        """Snapshot ``module`` (and with ``recurse`` its submodules) before editing it."""
        for mod in module.modules() if recurse else (module,):
            if id(mod) in self._seen_modules:
                continue
            self._seen_modules.add(id(mod))
            state = ModuleState(mod)
            self.step._modules.append(state)
            for t in state.tensors():
                self.save_tensor(t)

    def save_tensor(self, tensor: torch.Tensor, *, pin: bool = False) -> None:
        """Snapshot the value of one tensor object before editing it in place.

        Args:
            tensor: The tensor (parameter or buffer) about to change.
            pin: Keep a full copy even if the value ends up unchanged, so that undo
                restores it after later training (used when masks are kept for fine-tuning).
        """
        if id(tensor) in self._seen_tensors:
            if pin:
                for saved in self.step._tensors:
                    if saved.tensor is tensor:
                        saved.pin = True
            return
        self._seen_tensors.add(id(tensor))
        with torch.no_grad():
            full = tensor.detach().clone()
        self.step._tensors.append(SavedTensor(tensor=tensor, full=full, pin=pin))

    def replace(self, name: str, new: nn.Module) -> nn.Module:
        """Swap the submodule at qualified ``name`` for ``new``; return the old one."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        old = parent.get_submodule(child)
        self.save(parent)
        setattr(parent, child, new)
        return old

    def rollback(self) -> None:
        """Put everything saved so far back, bit-exactly; Ctrl-C waits until it is done."""
        with deferred_interrupts():
            interrupted = self.step._rollback()
        if interrupted is not None:
            raise interrupted

    def _finish(self) -> Step:
        """Keep only what changed, as diffs where smaller, and count what the step holds."""
        step = self.step
        step._tensors = [s for s in step._tensors if s.compress()]
        modules = list(self.model.modules())
        live_modules = {id(m) for m in modules}
        live = tensors_in(vars(m).values() for m in modules)
        # What the step keeps alive besides its own copies: old modules (torch.ao packed
        # parameters included), old masks and computed weights, tensors swapped out.
        kept = itertools.chain(
            (s.tensor for s in step._tensors),
            *(state.referenced(live_modules) for state in step._modules),
        )
        step.nbytes = sum(s.nbytes for s in step._tensors) + held_bytes(kept, live)
        return step


def _enforce_limit(hist: History) -> None:
    dropped = 0
    while len(hist) > 1 and hist.nbytes > _LIMIT["bytes"]:
        hist.pop(0)
        dropped += 1
    limit = fmt_bytes(_LIMIT["bytes"])
    if dropped:
        warnings.warn(
            f"nbcompress history exceeded {limit}: dropped the {dropped} "
            "oldest step(s); undo can no longer go back to the original model. "
            "Raise the limit with nbcompress.set_history_limit(max_bytes).",
            stacklevel=3,
        )
    if hist and hist[-1].nbytes > _LIMIT["bytes"]:
        # Dropping the only step would make the edit just done impossible to undo.
        warnings.warn(
            f"nbcompress step '{hist[-1].name}' alone holds {fmt_bytes(hist[-1].nbytes)} for "
            f"undo, more than the history limit of {limit}; it is kept so that it can be "
            "undone (undo_(model) frees it). Raise the limit with "
            "nbcompress.set_history_limit(max_bytes).",
            stacklevel=3,
        )


def set_history_limit(max_bytes: int) -> None:
    """Bound the memory one model's history may hold for undo (oldest steps dropped).

    The limit applies to each history on its own: the steps recorded on one model object
    (a sub-module passed to a verb has a history of its own). When a new step takes a
    history over the limit, its oldest steps are dropped with a warning; a single step
    larger than the limit is kept (so that it can be undone), with a warning.

    Args:
        max_bytes: Limit per history, in bytes (a positive integer).
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(
            f"max_bytes: expected a positive number of bytes such as 2 * 2**30 (2 GiB), "
            f"got {max_bytes!r}."
        )
    _LIMIT["bytes"] = max_bytes


@contextlib.contextmanager
def transaction(model: nn.Module, name: str, detail: str = "") -> Iterator[Transaction]:
    """Run an in-place edit of ``model`` all-or-nothing and record it for undo.

    On any exception (including ``KeyboardInterrupt``) everything saved through the
    transaction is restored bit-exactly and the exception propagates; recording the step
    runs inside that guard too. Ctrl-C waits while the step is recorded or rolled back, so
    the model is either as it was with no new step, or changed with exactly one. On success
    one :class:`Step` is appended to ``history(model)``. Nested transactions on the same
    model fold into the outermost one.

    Args:
        model: The model being edited (the history is kept for this object).
        name: Operation name shown in the history.
        detail: One line describing the edit (may be updated via ``tx.step.detail``).

    Yields:
        The transaction; call ``tx.save(module)`` before editing ``module``.
    """
    check_module(model)
    stack = _ACTIVE.setdefault(model, [])
    if stack:
        # Inner edits join the outer transaction: the outer one rolls back or records.
        yield stack[-1]
        return
    tx = Transaction(model, name, detail)
    stack.append(tx)
    recorded = False
    try:
        yield tx
        with deferred_interrupts():
            step = tx._finish()
            if step._tensors or step._modules:
                hist = _HISTORIES.setdefault(model, History())
                hist.append(step)
                recorded = True  # from here on the edit stands: never roll it back
                _enforce_limit(hist)
    except BaseException:
        # Deferred from the first statement: a Ctrl-C landing before rollback() entered its
        # own deferral would skip the rollback and leave the edit with no step.
        with deferred_interrupts():
            if not recorded:
                tx.rollback()
        raise
    finally:
        stack.pop()
    if recorded:
        notify(model, "recorded", (step,))


@contextlib.contextmanager
def trial(model: nn.Module) -> Iterator[Transaction]:
    """Edit ``model`` temporarily: everything saved is rolled back on exit, always.

    Used by sensitivity sweeps and "evaluate without keeping" buttons. Edits made by
    nbcompress verbs inside the block join this trial and are rolled back too. Ctrl-C
    waits until the rollback is complete.

    Args:
        model: The model to edit temporarily.

    Yields:
        The transaction; call ``tx.save(module)`` before editing ``module``.
    """
    check_module(model)
    stack = _ACTIVE.setdefault(model, [])
    tx = Transaction(model, "trial", "")
    stack.append(tx)
    try:
        yield tx
    finally:
        with deferred_interrupts():  # as in transaction(): no Ctrl-C before the rollback
            stack.pop()
            tx.rollback()


def _histories(model: nn.Module) -> list[tuple[str, History]]:
    """The non-empty histories of ``model`` and its sub-modules, with qualified names."""
    return [(n, h) for n, m in model.named_modules() if (h := _HISTORIES.get(m))]


def history(model: nn.Module) -> History:
    """Return the recorded compression steps of ``model`` and its sub-modules, oldest first.

    Steps recorded on a sub-module (e.g. ``prune_(model.encoder, 0.5)``) are listed too, in
    the order they were made; ``History.where`` (and the ``module`` column) names it.

    Args:
        model: A model edited by nbcompress verbs.

    Returns:
        The steps (a copy; editing it does not change the record).
    """
    check_module(model)
    where = {id(s): n for n, h in _histories(model) for s in h}
    steps = [s for _, h in _histories(model) for s in h]
    return History(sorted(steps, key=lambda s: s._order), {k: v for k, v in where.items() if v})


def history_token(model: nn.Module) -> tuple[int, ...]:
    """Identify the steps in place on ``model`` and its sub-modules, to compare later.

    Two tokens are equal exactly when the same recorded steps are in place: a step undone
    and a new one recorded give a different token, a step recorded and then undone gives
    the same one. Steps recorded on a module that contains ``model`` are not seen (follow
    those with :func:`on_change`).

    Args:
        model: A model (possibly never edited: its token is ``()``).

    Returns:
        An opaque, hashable token.
    """
    check_module(model)
    return tuple(sorted(s._order for _, h in _histories(model) for s in h))


def steps_since(model: nn.Module, token: tuple[int, ...]) -> list[Step]:
    """The steps in place on ``model`` now that were not when ``token`` was taken.

    Args:
        model: The model.
        token: An earlier :func:`history_token` of ``model`` (or a union of several).

    Returns:
        The new steps, oldest first (steps of the token since undone are not listed:
        compare ``history_token(model)`` with ``token`` for those).
    """
    seen = set(token)
    return [s for s in history(model) if s._order not in seen]


def _undo_last(model: nn.Module, force: bool, undone: list[Step]) -> None:
    """Undo the most recent step recorded on ``model`` or its sub-modules; add it to ``undone``."""
    _, hist = max(_histories(model), key=lambda nh: nh[1][-1]._order)
    step = hist[-1]
    # Checked step by step: a later step's rollback restores what it overwrote.
    reason = step._change_since(model)
    if reason and not force:
        later = f" ({len(undone)} later step(s) were undone)" if undone else ""
        raise ValueError(
            f"model: a weight was changed after step '{step.name}' — {reason} — so undo "
            "cannot restore it bit-exactly. Pass force=True (%undo --force) to restore the "
            f"saved entries anyway{later}."
        )
    with deferred_interrupts():  # the step is undone and dropped together, or not at all
        interrupted = step._rollback()
        hist.pop()
        undone.append(step)  # before a deferred Ctrl-C is raised: the step is undone
    if interrupted is not None:
        raise interrupted


def undo_(model: nn.Module, *, all: bool = False, force: bool = False) -> nn.Module:  # noqa: A002
    """Revert the last compression step of ``model`` (or all of them) bit-exactly.

    Steps recorded on sub-modules count as the model's own: the most recent step recorded
    on ``model`` or any sub-module is undone first. Each step is undone completely or not
    at all, also under Ctrl-C.

    Args:
        model: The model to restore in place.
        all: Revert every recorded step, back to the model nbcompress first saw.
        force: Undo even when a saved weight was changed after the step (e.g. by
            fine-tuning without kept masks, or ``.half()``); only the saved entries are
            restored.

    Returns:
        The model.

    Raises:
        ValueError: Nothing to undo, or the model changed since in a way undo cannot
            reverse exactly (and ``force`` is not set).
    """
    check_module(model)
    found = _histories(model)
    if not found:
        raise ValueError(
            "model: nothing to undo — no nbcompress step is recorded for this object or its "
            "sub-modules. Undo works on the same object that was compressed (not a copy)."
        )
    count = sum(len(h) for _, h in found) if all else 1
    undone: list[Step] = []
    try:
        with torch.no_grad():
            for _ in range(count):
                _undo_last(model, force, undone)
    finally:
        # Steps undone before a refusal or a Ctrl-C stay undone: the listeners hear of them.
        if undone:
            notify(model, "undone", tuple(undone))
    return model
