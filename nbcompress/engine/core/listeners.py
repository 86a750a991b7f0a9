"""Listeners told when a model's history changes: a step recorded or undone.

Every in-place verb records its step through :func:`~nbcompress.engine.core.history.transaction`
and every undo goes through :func:`~nbcompress.engine.core.history.undo_`; both call
:func:`notify` once the model is in its new state. A display that shows the model as it is
(the sensitivity explorer) subscribes with :func:`on_change` and stays true when the model is
changed elsewhere, e.g. by ``%prune`` or ``%undo`` in another cell.

Nothing here keeps anything alive: the registry is keyed weakly by model, and a bound method
is held through a weak reference to its object, so a closed, garbage-collected widget never
keeps the model (or itself) in memory. A listener that raises is reported as a warning; the
operation that triggered it stands.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

from torch import nn

__all__ = ["Change", "Subscription", "notify", "on_change"]


@dataclass(frozen=True)
class Change:
    """What happened to a model's history, as passed to an :func:`on_change` callback.

    Attributes:
        model: The model the callback subscribed to.
        module: The module the verb was called on: ``model`` itself, one of its sub-modules
            or a module that contains it.
        kind: ``"recorded"`` (a step was added) or ``"undone"`` (steps were reverted).
        steps: The steps recorded or undone, oldest first.
    """

    model: nn.Module
    module: nn.Module
    kind: str
    steps: tuple[Any, ...]


class Subscription:
    """A callback registered with :func:`on_change`; :meth:`remove` ends it.

    Args:
        callback: The callable; a bound method is held weakly (see :func:`on_change`).
    """

    def __init__(self, callback: Callable[[Change], Any]) -> None:
        self._ref: Callable[[], Callable[[Change], Any] | None]
        if isinstance(callback, MethodType):
            self._ref = weakref.WeakMethod(callback)
        else:
            self._ref = lambda: callback
        self.active = True

    @property
    def callback(self) -> Callable[[Change], Any] | None:
        """The callable, or ``None`` once removed or its object was garbage-collected."""
        return self._ref() if self.active else None

    def remove(self) -> None:
        """Stop calling the callback (idempotent); the registry drops it on the next change."""
        self.active = False
        self._ref = lambda: None


_LISTENERS: weakref.WeakKeyDictionary[nn.Module, list[Subscription]] = weakref.WeakKeyDictionary()


def on_change(model: nn.Module, callback: Callable[[Change], Any]) -> Subscription:
    """Call ``callback(change)`` after every step recorded on, or undone from, ``model``.

    Steps on a sub-module of ``model`` (``prune_(model.encoder, 0.5)``) and on a module that
    contains it count too. Trials (sweeps, "evaluate without keeping") are rolled back and
    call nothing. The callback runs after the model is in its new state, once per step
    recorded and once per ``undo_`` call.

    Memory: the model is not kept alive by the subscription. A bound method
    (``widget.refresh``) is held weakly, so its object is not kept alive either and the
    subscription ends when that object is collected; any other callable is held until
    :meth:`Subscription.remove` or until the model is collected (so a closure that refers
    to the model keeps it alive until removed).

    Errors: an exception raised by the callback is reported as a ``RuntimeWarning`` and does
    not undo or break the operation that triggered it.

    Args:
        model: The model to follow.
        callback: Called with a :class:`Change`.

    Returns:
        The subscription; call ``.remove()`` to stop.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}.")
    if not callable(callback):
        raise TypeError(f"callback: expected a callable, got {type(callback).__name__}.")
    subscription = Subscription(callback)
    _LISTENERS.setdefault(model, []).append(subscription)
    return subscription


def _overlaps(watched: nn.Module, module: nn.Module) -> bool:
    # A step on a sub-module changes the watched model; a step on a module containing the
    # watched one may change it too.
    return any(m is module for m in watched.modules()) or any(
        m is watched for m in module.modules()
    )


def notify(module: nn.Module, kind: str, steps: tuple[Any, ...]) -> None:
    """Tell the listeners of every model that overlaps ``module`` what just happened.

    Called by the history after a step is recorded or undone; not meant for users.

    Args:
        module: The module the verb was called on.
        kind: ``"recorded"`` or ``"undone"``.
        steps: The steps concerned.
    """
    if not _LISTENERS:
        return
    for watched, subscriptions in list(_LISTENERS.items()):
        subscriptions[:] = [s for s in subscriptions if s.callback is not None]
        if not subscriptions or not _overlaps(watched, module):
            continue
        change = Change(watched, module, kind, steps)
        for subscription in list(subscriptions):
            callback = subscription.callback
            if callback is None:
                continue
            try:
                callback(change)
            except Exception as err:  # noqa: BLE001 - a display must not break the edit
                who = getattr(callback, "__qualname__", repr(callback))
                warnings.warn(
                    f"nbcompress: a history listener ({who}) raised {type(err).__name__}: "
                    f"{err}; the {kind} step stands.",
                    RuntimeWarning,
                    stacklevel=2,
                )
