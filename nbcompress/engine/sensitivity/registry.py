"""Each model's latest sensitivity result and suggestion, in a weak-keyed registry.

Like the histories in :mod:`nbcompress.engine.core.history`, the records live beside the
model, not on it: ``%prune model --suggested`` and the explorer widget find the latest
suggestion without the model holding anything extra, and a model that is deleted takes
its record with it. This module sits below every other one of the subsystem, so that the
sweep, the suggestion and the staged procedure all record here without importing each
other.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from nbcompress.engine.core.validation import check_module

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult
    from nbcompress.engine.sensitivity.suggestion import Suggestion

__all__ = ["keep_latest", "latest", "latest_suggestion", "remember", "remembered"]


@dataclass
class _Record:
    result: SensitivityResult | None = None
    suggestion: Suggestion | None = None
    evaluate: Callable[[], Any] | None = None  # weak reference to the evaluate function
    inputs: Callable[[], Any] | None = None  # weak reference to the example input


_LATEST: weakref.WeakKeyDictionary[nn.Module, _Record] = weakref.WeakKeyDictionary()


def _weak(obj: Any) -> Callable[[], Any] | None:
    # Weak, so that an evaluate closure over the model cannot keep the model alive.
    if obj is None:
        return None
    try:
        return weakref.WeakMethod(obj) if hasattr(obj, "__self__") else weakref.ref(obj)
    except TypeError:  # tuples of inputs and the like cannot be weakly referenced
        return lambda: obj


def remember(
    model: nn.Module,
    result: SensitivityResult | None = None,
    *,
    suggestion: Suggestion | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    example_inputs: Any = None,
) -> None:
    """Record a sensitivity result and/or a suggestion as the latest for ``model``.

    The sweep and ``SensitivityResult.suggest`` call this; call it yourself after
    ``SensitivityResult.load`` to attach a saved result to a model.

    Args:
        model: The model the result belongs to.
        result: A ``SensitivityResult`` (attached to ``model``; the latest suggestion is reset).
        suggestion: A suggestion for ``model``.
        evaluate: The evaluation function used, to measure after applying a suggestion.
        example_inputs: The example input used by the proxy.
    """
    check_module(model)
    rec = _LATEST.setdefault(model, _Record())
    if result is not None:
        result.attach(model)
        rec.result, rec.suggestion = result, None
        rec.evaluate, rec.inputs = _weak(evaluate), _weak(example_inputs)
    if suggestion is not None:
        rec.suggestion = suggestion


def latest(model: nn.Module) -> SensitivityResult | None:
    """The most recent ``SensitivityResult`` of ``model`` (partial ones included), or ``None``."""
    rec = _LATEST.get(check_module(model))
    return rec.result if rec else None


def latest_suggestion(model: nn.Module) -> Suggestion | None:
    """The most recent suggestion made for ``model``, or ``None``."""
    rec = _LATEST.get(check_module(model))
    return rec.suggestion if rec else None


def remembered(model: nn.Module) -> tuple[Any, Any]:
    """The evaluate function and example input of the model's latest sweep, if still alive."""
    rec = _LATEST.get(model)
    if rec is None:
        return None, None
    return (rec.evaluate() if rec.evaluate else None, rec.inputs() if rec.inputs else None)


def tracked() -> int:
    """How many models have a record (the registry never keeps a model alive)."""
    return len(_LATEST)


@contextlib.contextmanager
def keep_latest(model: nn.Module) -> Iterator[None]:
    """Restore the model's latest result and suggestion if the block fails.

    For procedures that sweep and suggest several times (staged pruning): when they roll
    the model back, the sweeps they made describe a model that no longer exists. On success
    the latest suggestion is cleared, as it was made for an intermediate state.
    """
    rec = _LATEST.get(model)
    saved = copy.copy(rec) if rec is not None else None
    try:
        yield
    except BaseException:
        if saved is None:
            _LATEST.pop(model, None)
        else:
            _LATEST[model] = saved
        raise
    if model in _LATEST:
        _LATEST[model].suggestion = None
