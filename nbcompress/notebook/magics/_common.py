"""Shared plumbing for the magics: name resolution and turning API errors into UsageError."""

from __future__ import annotations

import contextlib
import shlex
import weakref
from collections.abc import Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument
from torch import nn

__all__ = [
    "api_errors",
    "example_input",
    "input_argument",
    "resolve_model",
    "resolve_value",
    "split_patterns",
]

# The last example input given for each model, so that `%prune model 0.5` after
# `%summary model --input x` can still measure latency before and after.
_LAST_INPUT: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def resolve_value(shell: Any, expr: str, arg: str) -> Any:
    """Evaluate ``expr`` in the user namespace (``model.encoder`` works)."""
    if expr is None or not str(expr).strip():
        raise UsageError(f"{arg}: missing; name an object in the notebook namespace.")
    try:
        return eval(expr, shell.user_global_ns, shell.user_ns)  # noqa: S307 - the user's own namespace
    except NameError:
        raise UsageError(
            f"{arg}: {expr!r} is not defined in the notebook namespace; define it first or check "
            "the spelling."
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure of the user's expression
        raise UsageError(
            f"{arg}: evaluating {expr!r} failed: {type(err).__name__}: {err}"
        ) from None


def resolve_model(shell: Any, expr: str, arg: str = "model") -> nn.Module:
    """Evaluate ``expr`` and check that it is an ``nn.Module``."""
    obj = resolve_value(shell, expr, arg)
    if not isinstance(obj, nn.Module):
        raise UsageError(
            f"{arg}: {expr!r} is a {type(obj).__name__}, not a torch.nn.Module; name the model "
            "object (e.g. `model` or `model.encoder`)."
        )
    return obj


def example_input(shell: Any, model: nn.Module, expr: str | None) -> Any:
    """Resolve ``--input`` (and remember it for ``model``), or recall the last one given."""
    if expr:
        value = resolve_value(shell, expr, "--input")
        _LAST_INPUT[model] = value
        return value
    return _LAST_INPUT.get(model)


def input_argument(help: str) -> Any:  # noqa: A002 - argparse's own name
    """The ``--input``/``-i`` option every magic shares, with a magic-specific help line."""
    return argument("--input", "-i", dest="input", help=help)


def split_patterns(text: str | None) -> list[str] | None:
    """Split a ``--layers`` value on commas/whitespace (quotes respected)."""
    if text is None:
        return None
    parts = [p for chunk in shlex.split(text) for p in chunk.split(",")]
    return [p for p in parts if p] or None


# Engine argument names → the option a magic user typed.
_OPTION_NAMES = {
    "example_inputs": "--input",
    "layers": "--layers",
    "types": "--types",
    "method": "--method",
    "scope": "--scope",
    "evaluate": "--eval",
    "calibrate": "--calibrate",
}


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """Re-raise the engine's ``ValueError``/``TypeError`` as a one-line ``UsageError``.

    The message keeps the engine's wording but names the magic's option (``--input``
    rather than ``example_inputs``).
    """
    try:
        yield
    except (ValueError, TypeError) as err:
        message = str(err)
        head, sep, rest = message.partition(":")
        if sep and head in _OPTION_NAMES:
            message = _OPTION_NAMES[head] + sep + rest
        raise UsageError(message) from None
