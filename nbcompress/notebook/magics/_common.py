"""What every magic shares: name resolution, option types, and engine errors as UsageError.

A magic parses its line (``parse_argstring``, through the shared parser of
:mod:`._parsing`, which raises a one-line ``UsageError`` on a bad option; the number types
here refuse out-of-range values at that point, naming the option), resolves names in the
user namespace (:class:`ModelMagics`), calls one engine function inside
:func:`engine_errors` and returns the result; a magic that recorded a step prints one line
saying so, so that it shows even when the magic is not the cell's last line. The engine
validates its arguments; :mod:`._errors` turns what the user can fix into one line that
names the magic's option, and lets nbcompress's own failures show their traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shlex
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics
from IPython.core.magic_arguments import argument
from torch import nn

from nbcompress.engine.core.history import History, history
from nbcompress.notebook.magics._errors import engine_errors, option_name
from nbcompress.notebook.magics._parsing import rebuild

__all__ = [
    "ModelMagics",
    "at_least",
    "checked",
    "compressed_note",
    "engine_errors",
    "input_argument",
    "interrupt_note",
    "module_name",
    "option_name",
    "seed_type",
    "split_patterns",
    "step_ids",
    "within",
]

# The last example input given for each model, so that `%prune model 0.5` after
# `%summary model --input x` can still measure latency before and after.
_LAST_INPUT: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


class ModelMagics(Magics):
    """Base of the nbcompress magic classes: resolves names in the user namespace.

    Every magic of a subclass gets the shared parser (:mod:`._parsing`): bracketed
    expressions kept whole, argparse's complaints as one line with the fix, plain-text help.
    """

    _touched: list[tuple[nn.Module, str, list[int]]]
    _inputs: list[tuple[nn.Module, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, func in list(vars(cls).items()):
            if getattr(func, "parser", None) is not None:
                rebuild(func)
                setattr(cls, name, _announcing(func))

    def _announce(self) -> None:
        """Print one line per model a magic changed: the steps it recorded, and the undo.

        The rich report is displayed only when the magic is the cell's last line; this
        line shows even mid-cell (``%prune`` then ``%speedup`` in one cell).
        """
        for model, expr, before in self._touched:
            known = set(before)
            steps = [step for step in history(model) if id(step) not in known]
            if steps:
                done = "; ".join(f"{step.name} {step.detail}" for step in steps)
                print(f"{expr}: {done} (%undo {expr} reverts it)")

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

    def executor(self, expr: str | None) -> Any:
        """``--executor``: an address (``tcp://…``) as text, else an Executor / dask Client."""
        return expr if expr is None or ":" in expr else self.value(expr, "--executor")

    def model(self, expr: str, arg: str = "model") -> nn.Module:
        """Evaluate ``expr`` and check that it is an ``nn.Module``."""
        obj = self.value(expr, arg)
        if not isinstance(obj, nn.Module):
            raise UsageError(
                f"{arg}: {expr!r} is a {type(obj).__name__}, not a torch.nn.Module; name the "
                "model object (e.g. `model` or `model.encoder`)."
            )
        if hasattr(self, "_touched"):
            self._touched.append((obj, expr, step_ids(obj)))
        return obj

    def example_input(self, model: nn.Module, expr: str | None) -> Any:
        """Resolve ``--input`` (remembered for ``model`` once the magic succeeds), or recall it.

        An input the magic refused (a wrong shape) is not remembered: the next magic that
        recalls it would fail with this one's error.
        """
        if expr:
            value = self.value(expr, "--input")
            if hasattr(self, "_inputs"):
                self._inputs.append((model, value))
            else:
                _LAST_INPUT[model] = value
            return value
        return _LAST_INPUT.get(model)


def _announcing(magic: Callable[..., Any]) -> Callable[..., Any]:
    """``magic``, printing one line for each step it recorded (see ``_announce``)."""

    @functools.wraps(magic)
    def run(self: ModelMagics, *args: Any, **kwargs: Any) -> Any:
        self._touched, self._inputs = [], []
        try:
            result = magic(self, *args, **kwargs)
            for model, value in self._inputs:
                _LAST_INPUT[model] = value
            self._announce()
            return result
        finally:
            del self._touched, self._inputs

    return run


def input_argument(help: str) -> Any:  # noqa: A002 - argparse's own name
    """The ``--input``/``-i`` option every magic shares, with a magic-specific help line."""
    return argument("--input", "-i", dest="input", help=help)


def scale_out_arguments(func: Any) -> Any:
    """The ``--workers``/``--executor`` options of the verbs that measure on an executor."""
    func = argument(
        "--executor", help="A dask scheduler address (tcp://host:8786) or an Executor."
    )(func)
    return argument(
        "--workers",
        type=at_least(1, "--workers 2"),
        help="Evaluate on a local dask cluster of N processes (started for the call, closed "
        "after; the result is the serial one).",
    )(func)


def repeats_argument(minimum: int, default: int, help: str) -> Any:  # noqa: A002
    """The ``--repeats`` option (timed samples) with its lower bound, checked when parsed."""
    example = f"--repeats {default}"
    return argument("--repeats", type=at_least(minimum, example), default=default, help=help)


def split_patterns(text: str | None) -> list[str] | None:
    """Split a ``--layers`` value on commas/whitespace (quotes respected)."""
    if text is None:
        return None
    parts = [p for chunk in shlex.split(text) for p in chunk.split(",")]
    return [p for p in parts if p] or None


def within(
    low: float, high: float, example: str, kind: type = float, *, what: str = ""
) -> Callable[[str], Any]:
    """An argparse ``type``: a number in ``[low, high]``, refused at parse time otherwise.

    NaN is refused (it compares false), and so is a value the engine would only reject
    after a long run or with a message that does not name the option.

    Args:
        low: The smallest value accepted.
        high: The largest value accepted (``math.inf``: no bound).
        example: A sensible use shown in the message, e.g. ``"--stages 5"``.
        kind: ``int`` for counts, ``float`` for amounts.
        what: What the number must be, for the message (``"a 64-bit integer"``).
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not low <= value <= high:
            bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            must = f"{what} {bounds}" if what else bounds
            raise argparse.ArgumentTypeError(f"{value} must be {must}, e.g. {example}.")
        return value

    return parse


def at_least(minimum: int, example: str, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type``: a number of at least ``minimum`` (stages, moves, a drop).

    Args:
        minimum: The smallest value accepted.
        example: A sensible use shown in the message, e.g. ``"--stages 5"``.
        kind: ``int`` for counts, ``float`` for amounts.
    """
    return within(minimum, math.inf, example, kind)


#: ``--seed``: a non-negative 64-bit integer, as ``prune_`` takes it.
seed_type = within(0, 2**63 - 1, "--seed 0", int, what="an integer")


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


# Steps after which the model's Linear/Conv layers are no longer float torch layers.
_SWAPPING = {
    "quantize": "quantized (%quantize)",
    "sparsify": "converted to sparse kernels (%speedup --apply)",
}


def compressed_note(model: nn.Module, expr: str, err: UsageError, why: str) -> UsageError:
    """Say why a model has "no layer" to work on when a recorded step swapped its layers.

    ``%prune`` after ``%quantize`` finds no ``Linear`` left: the engine's message is right
    but does not say that the quantization is the reason, nor how to go back.

    Args:
        model: The model the magic worked on.
        expr: How the user named it (``model.encoder``), for the undo command.
        err: The magic's one-line refusal.
        why: What the magic needs, e.g. ``"%prune works on float layers"``.

    Returns:
        A new ``UsageError`` with the reason and the way back, or ``err`` itself when the
        refusal is not about a missing layer or no recorded step swapped layers.
    """
    message = str(err)
    if not message.startswith(("--types:", "--layers:")) or "no layer" not in message:
        return err
    steps = history(model)
    swaps = [step for step in steps if step.name in _SWAPPING]
    if not swaps:
        return err
    step = swaps[-1]
    where = module_name(steps, step, expr)
    return UsageError(
        f"{message.rstrip('.')}: {where} was {_SWAPPING[step.name]} ({step.detail}), and {why}. "
        f"Undo it first (%undo {expr}; %undo {expr} --list shows the steps), then run this "
        "again and re-apply it."
    )


def step_ids(model: nn.Module) -> list[int]:
    """Identity of every step recorded on ``model`` (and its sub-modules), oldest first."""
    return [id(step) for step in history(model)]


def module_name(steps: History, step: Any, expr: str) -> str:
    """The module ``step`` was recorded on, as the user names it (``model.encoder``).

    ``history(model)`` lists the steps of the model's sub-modules too, naming each one's
    module in ``History.where`` (the core helper's change for issue 11); without that,
    every step listed is the model's own.
    """
    path = steps.where.get(id(step), "")
    return f"{expr}.{path}" if path else expr


@contextlib.contextmanager
def interrupt_note(model: nn.Module, expr: str) -> Iterator[None]:
    """On Ctrl-C, print one line saying what the user has, then re-raise.

    Every verb rolls back when interrupted, so the line is usually "restored"; it is read
    from the record (a step recorded or not) rather than taken from that promise.
    """
    before = step_ids(model)
    try:
        yield
    except KeyboardInterrupt:
        if step_ids(model) == before:
            print("Interrupted: the model is restored (nothing was changed).", file=sys.stderr)
        else:
            print(
                f"Interrupted after the change was recorded: %undo {expr} reverts it.",
                file=sys.stderr,
            )
        raise
