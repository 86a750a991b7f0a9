"""``%summary``, ``%prune`` and ``%undo``: thin wrappers over the engine verbs."""

from __future__ import annotations

import copy
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.core.compare import Comparison, compare, measure_pair
from nbcompress.engine.core.history import History, history, undo_
from nbcompress.engine.core.summary import Summary, summary
from nbcompress.engine.prune.prune import prune_, remove_masks_
from nbcompress.notebook.magics._common import (
    api_errors,
    example_input,
    input_argument,
    resolve_model,
    resolve_value,
    split_patterns,
)

__all__ = ["CoreMagics"]

_NOT_FASTER = (
    "Unstructured zeros on dense kernels do not make a model faster; run "
    "%speedup model --input x to measure (and apply) sparse kernels."
)


def _parse(magic: Any, line: str) -> Any:
    try:
        return parse_argstring(magic, line)
    except UsageError:
        raise
    except SystemExit:  # argparse exits on bad options
        raise UsageError(f"could not parse {line!r}; see the help with `?`.") from None


def _amount(shell: Any, text: str | None) -> Any:
    if text is None:
        raise UsageError(
            "amount: missing; give a fraction in [0, 1) such as `%prune model 0.5`, a dict of "
            "per-layer amounts, or --suggested after %sensitivity."
        )
    try:
        return float(text)
    except ValueError:
        # A name such as `ratios` refers to a dict (or a number) in the namespace.
        return resolve_value(shell, text, "amount")


@magics_class
class CoreMagics(Magics):
    """Summary, pruning and undo magics."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace, e.g. `model.encoder`.")
    @input_argument("Example input tensor (or tuple); remembered for later magics on this model.")
    @argument("--repeats", type=int, default=10, help="Timed repeats per layer (default 10).")
    @argument("--no-latency", action="store_true", help="Skip latency measurement.")
    @line_magic
    def summary(self, line: str) -> Summary:
        """Per-layer table: type, params, nonzeros, sparsity, MACs, measured latency, sizes.

        Example: ``%summary model --input x``. MACs and sizes are estimates (labelled
        est.); latencies are measured medians on this machine.
        """
        args = _parse(self.summary, line)
        model = resolve_model(self.shell, args.model)
        x = example_input(self.shell, model, args.input)
        with api_errors():
            return summary(model, x, repeats=args.repeats, measure_latency=not args.no_latency)

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace.")
    @argument("amount", nargs="?", help="Fraction of weights to remove, e.g. 0.5, or a dict name.")
    @argument("--method", default="l1", help="l1 (smallest magnitudes, default) or random.")
    @argument("--scope", default="layer", help="layer (amount per layer, default) or global.")
    @argument("--layers", help='Glob(s) on layer names, e.g. "features.*" (comma-separated).')
    @argument("--types", help="Layer types, e.g. Linear,Conv2d (default Linear and Conv).")
    @argument("--structured", action="store_true", help="Zero whole output channels/neurons.")
    @argument(
        "--blocks",
        action="store_true",
        help="Remove 4×1 blocks (four outputs at one input), which sparse kernels run faster.",
    )
    @argument("--include-output", action="store_true", help="Also prune the output layer.")
    @argument("--keep-masks", action="store_true", help="Keep masks for fine-tuning.")
    @argument("--remove-masks", action="store_true", help="Make kept masks permanent.")
    @argument("--min-density", type=float, default=0.05, help="Global scope: min kept per layer.")
    @argument("--suggested", action="store_true", help="Apply the latest %%sensitivity suggestion.")
    @argument("--eval", dest="evaluate", help="With --suggested: metric function to measure.")
    @argument("--seed", type=int, default=0, help="Seed of the random criterion.")
    @input_argument("Example input to measure latency before/after (default: the last one given).")
    @line_magic
    def prune(self, line: str) -> Any:
        """Prune a model in place (undoable with %undo) and show before/after figures.

        Examples: ``%prune model 0.5``, ``%prune model 0.8 --scope global``,
        ``%prune model 0.3 --layers "features.*" --structured``, ``%prune model 0.9 --blocks``,
        ``%prune model --suggested``.
        The final classifier layer is left alone unless --include-output is given.
        """
        args = _parse(self.prune, line)
        model = resolve_model(self.shell, args.model)
        if args.remove_masks:
            with api_errors():
                remove_masks_(model)
            return history(model)
        if args.suggested:
            return self._apply_suggestion(model, args)
        amount = _amount(self.shell, args.amount)
        x = example_input(self.shell, model, args.input)
        options = dict(
            method=args.method,
            scope=args.scope,
            layers=split_patterns(args.layers),
            types=split_patterns(args.types),
            granularity=_granularity(args),
            include_output=args.include_output,
            keep_masks=args.keep_masks,
            min_density=args.min_density,
            seed=args.seed,
        )
        with api_errors():
            return _pruned_report(model, amount, x, options)

    def _apply_suggestion(self, model: Any, args: Any) -> Any:
        from nbcompress.engine.sensitivity.sweep import apply_suggestion_

        evaluate = resolve_value(self.shell, args.evaluate, "--eval") if args.evaluate else None
        x = example_input(self.shell, model, args.input)
        with api_errors():
            return apply_suggestion_(model, evaluate=evaluate, example_inputs=x)

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace.")
    @argument("--all", action="store_true", help="Undo every step, back to the original.")
    @argument("--force", action="store_true", help="Undo even if weights changed since.")
    @argument("--list", action="store_true", help="Only list the recorded steps.")
    @line_magic
    def undo(self, line: str) -> History:
        """Revert the last compression step of a model bit-exactly (``--all``: every step).

        ``%undo model --list`` shows the recorded steps and the memory undo holds.
        """
        args = _parse(self.undo, line)
        model = resolve_model(self.shell, args.model)
        if args.list:
            return history(model)
        steps = history(model)
        with api_errors():
            undo_(model, all=args.all, force=args.force)
        undone = steps if args.all else steps[-1:]
        names = ", ".join(f"'{s.name}'" for s in reversed(undone))
        left = history(model)
        print(f"Undid {names}; {len(left)} step(s) remain.")
        return left


# Models up to this size keep a copy so that before/after are timed interleaved.
_COPY_LIMIT_BYTES = 1 << 30


def _granularity(args: Any) -> str:
    if args.structured and args.blocks:
        raise UsageError("--structured and --blocks: choose one (whole channels, or 4×1 blocks).")
    return "channel" if args.structured else "block" if args.blocks else "element"


def _pruned_report(model: Any, amount: Any, x: Any, options: dict[str, Any]) -> Comparison:
    measure = x is not None
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    reference = copy.deepcopy(model) if measure and size <= _COPY_LIMIT_BYTES else None
    before = summary(model, x, measure_latency=measure)
    prune_(model, amount, **options)
    after = summary(model, x, measure_latency=measure)
    if reference is not None:
        before.latency, after.latency = measure_pair(reference, model, x)
    step = history(model)[-1]
    notes = [_NOT_FASTER]
    if options["keep_masks"]:
        notes.insert(
            0, "Masks kept for fine-tuning; %prune model --remove-masks makes them permanent."
        )
    return compare(before, after, f"Pruned: {step.detail}. Undo with %undo.", notes)
