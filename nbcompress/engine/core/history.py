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
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.report import fmt_bytes, html_table
from nbcompress.engine.core.snapshot import ModuleState, SavedTensor, nbytes
from nbcompress.engine.core.validation import check_module

__all__ = [
    "History",
    "Step",
    "Transaction",
    "history",
    "set_history_limit",
    "transaction",
    "trial",
    "undo_",
]

_LIMIT = {"bytes": 4 * 2**30}


@dataclass
class Step:
    """One recorded, undoable operation.

    Attributes:
        name: The verb, e.g. ``"prune"``.
        detail: One line describing what was done.
        info: Free-form details (per-layer amounts, chosen kernels, ...).
        nbytes: Memory the step holds to make undo possible.
        created: Wall-clock time of the step.
    """

    name: str
    detail: str
    info: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    created: float = field(default_factory=time.time)
    _modules: list[ModuleState] = field(default_factory=list, repr=False)
    _tensors: list[SavedTensor] = field(default_factory=list, repr=False)

    def _rollback(self) -> None:
        for state in reversed(self._modules):
            state.restore()
        for saved in reversed(self._tensors):
            saved.restore()


class History(list):
    """The steps recorded for one model, oldest first (a plain list of :class:`Step`)."""

    @property
    def nbytes(self) -> int:
        """Memory held by all steps, in bytes."""
        return sum(s.nbytes for s in self)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per step."""
        return [
            {"step": i + 1, "operation": s.name, "detail": s.detail, "undo_bytes": s.nbytes}
            for i, s in enumerate(self)
        ]

    def __str__(self) -> str:
        if not self:
            return "No compression steps recorded (the model is as nbcompress found it)."
        lines = [f"{r['step']:>3}. {r['operation']:<10} {r['detail']}" for r in self.rows]
        lines.append(f"undo memory: {fmt_bytes(self.nbytes)}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return html_table(
            self.rows,
            {"step": None, "operation": None, "detail": None, "undo_bytes": fmt_bytes},
            caption=f"History — undo memory {fmt_bytes(self.nbytes)}",
        )


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
        """Put everything saved so far back, bit-exactly."""
        self.step._rollback()

    def _finish(self) -> Step:
        step = self.step
        step._tensors = [s for s in step._tensors if s.compress()]
        live = {id(t) for t in self.model.state_dict(keep_vars=True).values()}
        held = {
            id(t): t
            for state in step._modules
            for m in state.held_modules()
            if m is not None
            for t in m.state_dict(keep_vars=True).values()
        }
        step.nbytes = sum(s.nbytes for s in step._tensors) + sum(
            nbytes(t) for i, t in held.items() if i not in live
        )
        return step


def _enforce_limit(hist: History) -> None:
    dropped = 0
    while len(hist) > 1 and hist.nbytes > _LIMIT["bytes"]:
        hist.pop(0)
        dropped += 1
    if dropped:
        warnings.warn(
            f"nbcompress history exceeded {fmt_bytes(_LIMIT['bytes'])}: dropped the {dropped} "
            "oldest step(s); undo can no longer go back to the original model. "
            "Raise the limit with nbcompress.set_history_limit(max_bytes).",
            stacklevel=3,
        )


def set_history_limit(max_bytes: int) -> None:
    """Bound the memory all histories together may hold for undo (oldest steps dropped).

    Args:
        max_bytes: Limit per model, in bytes.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes: expected a positive integer, got {max_bytes!r}.")
    _LIMIT["bytes"] = max_bytes


@contextlib.contextmanager
def transaction(model: nn.Module, name: str, detail: str = "") -> Iterator[Transaction]:
    """Run an in-place edit of ``model`` all-or-nothing and record it for undo.

    On any exception (including ``KeyboardInterrupt``) everything saved through the
    transaction is restored bit-exactly and the exception propagates. On success one
    :class:`Step` is appended to ``history(model)``. Nested transactions on the same
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
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise
    finally:
        stack.pop()
    step = tx._finish()
    if step._tensors or step._modules:
        hist = _HISTORIES.setdefault(model, History())
        hist.append(step)
        _enforce_limit(hist)


@contextlib.contextmanager
def trial(model: nn.Module) -> Iterator[Transaction]:
    """Edit ``model`` temporarily: everything saved is rolled back on exit, always.

    Used by sensitivity sweeps and "evaluate without keeping" buttons. Edits made by
    nbcompress verbs inside the block join this trial and are rolled back too.

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
        stack.pop()
        tx.rollback()


def history(model: nn.Module) -> History:
    """Return the recorded compression steps of ``model``, oldest first.

    Args:
        model: A model edited by nbcompress verbs.

    Returns:
        The steps (a copy; editing it does not change the record).
    """
    check_module(model)
    return History(_HISTORIES.get(model, History()))


def undo_(model: nn.Module, *, all: bool = False, force: bool = False) -> nn.Module:  # noqa: A002
    """Revert the last compression step of ``model`` (or all of them) bit-exactly.

    Args:
        model: The model to restore in place.
        all: Revert every recorded step, back to the model nbcompress first saw.
        force: Undo even when a weight stored as a diff was changed after the step
            (e.g. by fine-tuning without kept masks); only the saved entries are restored.

    Returns:
        The model.

    Raises:
        ValueError: Nothing to undo, or the model changed since in a way undo cannot
            reverse exactly (and ``force`` is not set).
    """
    check_module(model)
    hist = _HISTORIES.get(model)
    if not hist:
        # History is kept per object: a step on model.encoder is not model's step.
        inner = [n for n, m in model.named_modules() if n and _HISTORIES.get(m)]
        where = (
            f" Steps are recorded on its sub-module(s) {', '.join(repr(n) for n in inner[:5])}: "
            f"undo those, e.g. undo_(model.get_submodule({inner[0]!r}))."
            if inner
            else ""
        )
        raise ValueError(
            "model: nothing to undo — no nbcompress step is recorded for this object. "
            "Undo works on the same object that was compressed (not a copy)." + where
        )
    count = len(hist) if all else 1
    with torch.no_grad():
        for done in range(count):
            step = hist[-1]
            # Checked step by step: a later step's rollback restores what it overwrote.
            stale = [s for s in step._tensors if s.full is None and s.modified_since()]
            if stale and not force:
                undone = f" ({done} later step(s) were undone)" if done else ""
                raise ValueError(
                    f"model: a weight was changed after step '{step.name}' (e.g. by training), "
                    "so undo cannot restore it bit-exactly. Pass force=True (%undo --force) to "
                    f"restore the saved entries anyway{undone}."
                )
            step._rollback()
            hist.pop()
    return model
