"""What every magic shares: name resolution, option types, and engine errors as UsageError.

A magic parses its line (``parse_argstring``, which raises ``UsageError`` on a bad
option), resolves names in the user namespace (:class:`ModelMagics`), calls one engine
function inside :func:`engine_errors` and displays the result. The engine validates its
arguments; this module only turns its message into one line that names the magic's option.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics
from IPython.core.magic_arguments import argument
from torch import nn

__all__ = [
    "ModelMagics",
    "at_least",
    "checked",
    "engine_errors",
    "input_argument",
    "option_name",
    "split_patterns",
]

# The last example input given for each model, so that `%prune model 0.5` after
# `%summary model --input x` can still measure latency before and after.
_LAST_INPUT: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


class ModelMagics(Magics):
    """Base of the nbcompress magic classes: resolves names in the user namespace."""

    def value(self, expr: str | None, arg: str) -> Any:
        """Evaluate ``expr`` in the user namespace (``model.encoder`` works).

        Args:
            expr: The expression the user typed.
            arg: The option or argument it was given for, named in errors.

        Returns:
            The value of the expression.
        """
        if expr is None or not str(expr).strip():
            raise UsageError(f"{arg}: missing; name an object in the notebook namespace.")
        shell = self.shell
        try:
            return eval(expr, shell.user_global_ns, shell.user_ns)  # noqa: S307 - the user's own namespace
        except NameError:
            raise UsageError(
                f"{arg}: {expr!r} is not defined in the notebook namespace; define it first or "
                "check the spelling."
            ) from None
        except Exception as err:  # noqa: BLE001 - any failure of the user's expression
            raise UsageError(
                f"{arg}: evaluating {expr!r} failed: {type(err).__name__}: {err}"
            ) from None

    def optional(self, expr: str | None, arg: str) -> Any:
        """Like :meth:`value`, but ``None`` when the option was not given."""
        return None if expr is None else self.value(expr, arg)

    def model(self, expr: str, arg: str = "model") -> nn.Module:
        """Evaluate ``expr`` and check that it is an ``nn.Module``."""
        obj = self.value(expr, arg)
        if not isinstance(obj, nn.Module):
            raise UsageError(
                f"{arg}: {expr!r} is a {type(obj).__name__}, not a torch.nn.Module; name the "
                "model object (e.g. `model` or `model.encoder`)."
            )
        return obj

    def example_input(self, model: nn.Module, expr: str | None) -> Any:
        """Resolve ``--input`` (and remember it for ``model``), or recall the last one given."""
        if expr:
            value = self.value(expr, "--input")
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


def at_least(minimum: int, example: str, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type``: a number of at least ``minimum`` (stages, moves, a drop).

    Args:
        minimum: The smallest value accepted.
        example: A sensible use shown in the message, e.g. ``"--stages 5"``.
        kind: ``int`` for counts, ``float`` for amounts.
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}, e.g. {example}.")
        return value

    return parse


def checked(check: Callable[[float], Any]) -> Callable[[str], Any]:
    """An argparse ``type``: a number the engine's ``check`` validates at parse time.

    Options checked so are refused before a long run (a sweep) rather than after it,
    with the engine's own message.
    """

    def parse(text: str) -> Any:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        try:
            return check(value)
        except (ValueError, TypeError) as err:
            # argparse names the option itself: drop the engine's keyword head.
            head, sep, rest = str(err).partition(": ")
            raise argparse.ArgumentTypeError(rest if sep else head) from None

    return parse


# Engine keyword → the magic option that sets it; other keywords are left as they are.
_DASHED = (
    "layers types method scope granularity min_density seed target_sparsity max_drop objective "
    "refine stages ratios max_layers early_stop metric repeats backend mode calibrate"
)
_OPTION_NAMES = {
    **{k: "--" + k.replace("_", "-") for k in _DASHED.split()},
    "example_inputs": "--input",
    "evaluate": "--eval",
    "budget": "--refine",
    "path": "--save",
}
_HEAD = re.compile(r"[a-z_]+( / [a-z_]+)*")


def option_name(keyword: str) -> str:
    """The magic option for an engine keyword (``target_sparsity`` → ``--target-sparsity``)."""
    return _OPTION_NAMES.get(keyword, keyword)


def _translate(message: str) -> str:
    # Only the head of the message ("target_sparsity / max_drop: ...") names arguments.
    head, sep, rest = message.partition(": ")
    if not sep or not _HEAD.fullmatch(head):
        return message
    return " / ".join(option_name(k) for k in head.split(" / ")) + sep + rest


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Re-raise the engine's ``ValueError``/``TypeError`` as a one-line ``UsageError``.

    The message keeps the engine's wording (what is wrong and the fix) but names the
    magic's option (``--input`` rather than ``example_inputs``).
    """
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UsageError(_translate(str(err))) from None
