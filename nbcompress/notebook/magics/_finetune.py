"""``%finetune``: a thin wrapper over :func:`nbcompress.engine.schedule.finetune.finetune`."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.schedule.finetune import finetune, in_kernel
from nbcompress.engine.schedule.finetune_result import FinetuneResult
from nbcompress.engine.schedule.trainingdata import batches
from nbcompress.notebook.magics._common import (
    ModelMagics,
    at_least,
    engine_errors,
    seed_type,
    split_patterns,
    within,
)

__all__ = ["FinetuneMagics"]

# finetune's keywords → the options of %finetune that set them.
_OPTIONS = {
    "train": "--data",
    "val": "--val",
    "epochs": "--epochs",
    "lr": "--lr",
    "l1": "--l1",
    "batch_size": "--batch-size",
    "layers": "--layers",
}
#: Progress points of a --gradual schedule over the run (TF-MOT's frequency).
SCHEDULE_UPDATES = 20


@contextlib.contextmanager
def _named_options() -> Iterator[None]:
    """Refusals of ``finetune`` (``train: ...``) as one UsageError line naming the option."""
    try:
        yield
    except (ValueError, TypeError) as err:
        head, sep, rest = str(err).partition(": ")
        if not sep or head not in _OPTIONS:
            raise
        raise UsageError(f"{_OPTIONS[head]}: {rest}") from err


def _span(text: str) -> tuple[float, float]:
    """``--gradual a:b``: initial and final sparsity, 0 <= a <= b < 1."""
    first, sep, last = text.partition(":")
    try:
        a, b = float(first), float(last)
    except ValueError:
        a = b = math.nan
    if not sep or not (0 <= a <= b < 1):
        raise UsageError(
            f"--gradual: {text!r} is not initial:final sparsity with 0 <= initial <= final < 1; "
            "e.g. --gradual 0.5:0.9 rises from 50% to 90% over the run."
        )
    return a, b


def _steps(data: Any, batch_size: int, epochs: int, option: str) -> int:
    """Optimizer steps of the whole run, which a schedule given with ``option`` spans."""
    with _named_options():
        per_epoch = batches(data, batch_size, 0)[1]
    if per_epoch is None:
        raise UsageError(
            f"{option}: the schedule spans the run, whose length is unknown for this --data; "
            "pass (x, y) tensors or a DataLoader with a length."
        )
    return per_epoch * epochs


def _l1_span(text: str) -> tuple[float, float]:
    """``--l1 λ`` or ``--l1 a:b`` (a ramp from a to b): both finite and >= 0."""
    first, sep, last = text.partition(":")
    try:
        a, b = float(first), float(last if sep else first)
    except ValueError:
        a = b = math.nan
    if not (math.isfinite(a) and math.isfinite(b) and a >= 0 and b >= 0):
        raise UsageError(
            f"--l1: {text!r} is not a penalty weight >= 0 (e.g. --l1 1e-4) or a ramp start:end "
            "of two such weights (e.g. --l1 0:1e-4 rises linearly over the run)."
        )
    return a, b


class LinearRamp:
    """A penalty weight rising (or falling) linearly from ``start`` to ``end`` over ``steps``."""

    def __init__(self, start: float, end: float, steps: int) -> None:
        self.start, self.end, self.steps = start, end, max(1, steps)

    def __call__(self, step: int) -> float:
        """The weight at optimizer ``step`` (held at ``end`` after the last step)."""
        return self.start + (self.end - self.start) * min(1.0, step / self.steps)

    def __repr__(self) -> str:
        return f"LinearRamp({self.start:g} -> {self.end:g} over {self.steps} steps)"


def l1_term(model: Any, args: Any, data: Any) -> Any:
    """``finetune``'s ``l1`` from ``--l1``, ``--l1-group`` and ``--layers``: a weight or penalty."""
    start, end = _l1_span(args.l1)
    weight: Any = start
    if start != end:
        weight = LinearRamp(start, end, _steps(data, args.batch_size, args.epochs, "--l1"))
    if start == end == 0:
        if args.l1_group:
            raise UsageError("--l1-group: needs a penalty weight; add e.g. --l1 1e-4.")
        if args.layers is not None and args.gradual is None:
            raise UsageError(
                "--layers: chooses the layers of --gradual and --l1; add one of them, e.g. "
                "--gradual 0.5:0.9."
            )
        return 0.0
    if not args.l1_group and args.layers is None:
        return weight
    from nbcompress.engine.schedule.regularize import L1Penalty

    layers = split_patterns(args.layers)
    with _named_options():
        return L1Penalty(model, weight, layers=layers, group=args.l1_group, arg="l1")


def gradual_pruner(model: Any, text: str, total: int, args: Any) -> Any:
    """A GradualPruner whose PolynomialDecay rises from a to b over ``total`` steps."""
    initial, final = _span(text)
    # Imported here, where it is used: the magic module loads without torch's heavier parts.
    from nbcompress.engine.schedule.gradual import GradualPruner
    from nbcompress.engine.schedule.schedules import PolynomialDecay

    schedule = PolynomialDecay(
        initial_sparsity=initial,
        final_sparsity=final,
        begin_step=0,
        end_step=total,
        frequency=max(1, total // SCHEDULE_UPDATES),
    )
    layers = split_patterns(args.layers)
    return GradualPruner(model, schedule, layers=layers, include_output=args.include_output)


@contextlib.contextmanager
def _settled(pruner: Any) -> Iterator[None]:
    """Record the pruning once training took a step, however the run ends; else undo it.

    A refused argument or an error before the first optimizer step leaves the model exactly
    as it was; after a step, the pruning done so far is one undoable step, as after Ctrl-C.
    """
    try:
        yield
    finally:
        if pruner is not None:
            if pruner.step_count > 0:
                pruner.finish()  # the pruner is the magic's, not the user's, to finish
            else:
                pruner.abort()


@magics_class
class FinetuneMagics(ModelMagics):
    """The ``%finetune`` magic."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace, e.g. `model`.")
    @argument("--data", "-d", help="Training data: (x, y) tensors or a DataLoader (a name).")
    @argument("--epochs", "-e", type=at_least(1, "--epochs 3"), default=1, help="Default 1.")
    @argument("--gradual", help="Prune gradually from a to b sparsity over the run, e.g. 0.5:0.9.")
    @argument("--include-output", action="store_true", help="--gradual prunes the output too.")
    @argument("--layers", help='Glob(s) for --gradual and --l1, e.g. "features.*" (commas).')
    @argument("--lr", type=within(1e-12, 10.0, "--lr 1e-3"), default=1e-3, help="Adam's rate.")
    @argument("--l1", default="0", help="L1 weight λ, or a ramp a:b over the run, e.g. 0:1e-4.")
    @argument("--l1-group", action="store_true", help="Group lasso over output channels.")
    @argument("--val", help="Validation: (x, y) tensors (accuracy) or f(model) -> float.")
    @argument("--batch-size", type=at_least(1, "--batch-size 64"), default=64, help="Rows.")
    @argument("--seed", type=seed_type, default=0, help="Seed of the shuffling of (x, y).")
    @line_magic
    def finetune(self, line: str) -> FinetuneResult:
        """Fine-tune a model in place for a few epochs (Adam, cross-entropy), with a live bar.

        Examples: ``%finetune model --data train --epochs 3 --val val``,
        ``%finetune model --data train --epochs 3 --gradual 0.5:0.9`` (prunes gradually
        while training: the sparsity rises from 50% to 90% along TF-MOT's polynomial
        schedule over the whole run; the pruning is recorded, ``%undo model`` reverts it),
        ``%finetune model --data train --l1 1e-4`` (adds the L1 penalty λ·Σ|w| of the
        prunable layers, so that small weights can be pruned afterwards; ``--l1 0:1e-4``
        raises λ linearly from 0 to 1e-4 over the run; ``--l1-group`` penalises each output
        channel's norm instead, the group lasso, so that whole channels go to zero for
        ``%prune model 0.3 --remove``).

        ``--data`` and ``--val`` name ``(x, y)`` tensors or a ``DataLoader`` of ``(x, y)``
        batches; ``--val`` may also name a function ``f(model) -> float``. A progress bar
        shows the loss, the sparsity, the validation metric and the ETA; in a notebook the
        loss and sparsity curves update live. Ctrl-C stops at the last finished optimizer
        step (never half-way through one), says so, and returns the history so far (with
        ``--gradual`` the pruning done until then is recorded). Returns the
        :class:`~nbcompress.engine.schedule.finetune_result.FinetuneResult`.
        """
        args = parse_argstring(self.finetune, line)
        model = self.model(args.model)
        data = self.value(args.data, "--data")
        val = self.optional(args.val, "--val")
        l1 = l1_term(model, args, data)
        pruner = None
        if args.gradual is not None:
            total = _steps(data, args.batch_size, args.epochs, "--gradual")
            with engine_errors(), _named_options():
                pruner = gradual_pruner(model, args.gradual, total, args)
        errors = engine_errors({"--data": data, "--val": val}, model_option="--data")
        with errors, _named_options(), _settled(pruner):
            result = finetune(
                model, data, args.epochs, pruner=pruner, l1=l1, val=val, lr=args.lr,
                batch_size=args.batch_size, seed=args.seed, plot=in_kernel(),
            )  # fmt: skip
        if pruner is not None and pruner.step_count > 0:
            print(f"Pruned gradually while training; %undo {args.model} reverts it.")
        if result.interrupted and not in_kernel():
            print(result, file=sys.stderr)
        return result
