"""``%summary`` and ``%prune``: thin wrappers over the engine verbs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.core.compare import Comparison, compare_change
from nbcompress.engine.core.summary import Summary, summary
from nbcompress.engine.prune.prune import prune_, remove_masks_
from nbcompress.engine.sensitivity.suggestion import apply_suggestion_
from nbcompress.notebook.magics._common import (
    ModelMagics,
    compressed_note,
    engine_errors,
    input_argument,
    interrupt_note,
    repeats_argument,
    seed_type,
    split_patterns,
    step_ids,
    within,
)
from nbcompress.notebook.magics._remove import (
    check_group_suggestion,
    check_remove,
    needs_input,
    remove_amount,
    remove_arguments,
    remove_change,
    remove_notes,
)

__all__ = ["CoreMagics"]

_NOT_FASTER = (
    "Unstructured zeros on dense kernels do not make a model faster; run "
    "%speedup model --input x to measure (and apply) sparse kernels."
)
_KEPT_MASKS = "Masks kept for fine-tuning; %prune model --remove-masks makes them permanent."


@magics_class
class CoreMagics(ModelMagics):
    """Summary and pruning magics."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace, e.g. `model.encoder`.")
    @input_argument("Example input tensor (or tuple); remembered for later magics on this model.")
    @repeats_argument(0, 10, "Timed repeats per layer (default 10; 0: no per-layer latency).")
    @argument("--no-latency", action="store_true", help="Skip latency measurement.")
    @line_magic
    def summary(self, line: str) -> Summary:
        """Per-layer table: type, params, nonzeros, sparsity, MACs, measured latency, sizes.

        Example: ``%summary model --input x``. MACs and sizes are estimates (labelled
        est.); latencies are measured medians on this machine. Returns the
        :class:`~nbcompress.Summary`.
        """
        args = parse_argstring(self.summary, line)
        model = self.model(args.model)
        x = self.example_input(model, args.input)
        with engine_errors():
            return summary(model, x, repeats=args.repeats, measure_latency=not args.no_latency)

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace.")
    @argument("amount", nargs="?", help="Fraction of weights to remove, e.g. 0.5, or a dict name.")
    @argument(
        "--method",
        default="l1",
        help="l1 (smallest magnitudes, default), random, or wanda (|weight| × input norm over "
        "the --input calibration batch, compared within each output row). With --remove: "
        "how channels are scored (l1, group-aware; or wanda).",
    )
    @argument(
        "--reconstruct",
        action="store_true",
        help="After masking, re-fit each layer's kept weights by least squares on the --input "
        "calibration batch (Linear, Conv1d, Conv2d; layer by layer in forward order).",
    )
    @argument("--scope", default="layer", help="layer (amount per layer, default) or global.")
    @argument("--layers", help='Glob(s) on layer names, e.g. "features.*" (comma-separated).')
    @argument("--types", help="Layer types, e.g. Linear,Conv2d (default Linear and Conv).")
    @argument(
        "--granularity",
        help="What is removed: element (single weights, default), block (4×1 blocks: four "
        "outputs at one input, which sparse kernels run faster) or channel (whole output "
        "channels/neurons).",
    )
    @argument("--structured", action="store_true", help="Alias of --granularity channel.")
    @argument("--blocks", action="store_true", help="Alias of --granularity block.")
    @argument("--include-output", action="store_true", help="Also prune the output layer.")
    @argument("--keep-masks", action="store_true", help="Keep masks for fine-tuning.")
    @argument("--remove-masks", action="store_true", help="Make kept masks permanent.")
    @argument(
        "--min-density",
        type=within(0, 1, "--min-density 0.05"),
        default=0.05,
        help="Global scope: min kept per layer.",
    )
    @argument("--suggested", action="store_true", help="Apply the latest %%sensitivity suggestion.")
    @argument("--eval", dest="evaluate", help="With --suggested: metric function to measure.")
    @argument("--seed", type=seed_type, default=0, help="Seed of the random criterion.")
    @input_argument(
        "Example input: latency before/after, and the calibration batch of --method wanda and "
        "--reconstruct (default: the last one given)."
    )
    @remove_arguments
    @line_magic
    def prune(self, line: str) -> Comparison:
        """Prune a model in place (undoable with %undo) and show before/after figures.

        Examples: ``%prune model 0.5``, ``%prune model 0.8 --scope global``,
        ``%prune model 0.3 --layers "features.*" --granularity channel``,
        ``%prune model 0.9 --granularity block``, ``%prune model --suggested``,
        ``%prune model 0.3 --remove --input x --round-to 8`` (physically removes the
        lowest-L1 channels and every dimension coupled to them: a smaller dense model;
        ``--heads 0.25 --ffn 0.5`` for transformers; the report shows params, MACs and
        measured dense latency before → after),
        ``%prune model 0.5 --method wanda --input x --reconstruct`` (activation-aware: the
        input is the calibration batch; a list of batches or a DataLoader works too).
        The final classifier layer is left alone unless --include-output is given.
        All or nothing: on an error or Ctrl-C the model is left as it was, and one line
        says so (or, should a step have been recorded, how to undo it).
        Always returns a :class:`~nbcompress.Comparison` of the model before and after
        (``nbcompress.compare_change``); with ``--suggested`` its ``result`` is the
        ``ApplyReport`` (predicted vs measured metric).
        """
        args = parse_argstring(self.prune, line)
        check_remove(args, _granularity(args, given_only=True))
        model = self.model(args.model)
        if args.remove and not args.suggested:
            return self._remove(model, args)
        if args.remove_masks:
            x = self.example_input(model, args.input)
            return _compare(model, args.model, x, remove_masks_, "Remove masks", [])
        if args.suggested:
            return self._apply_suggestion(model, args)
        amount = self._amount(args.amount)
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
            reconstruct=args.reconstruct,
        )
        x = self.example_input(model, args.input)
        if args.method == "wanda" or args.reconstruct:
            options["example_inputs"] = x
        notes = [_KEPT_MASKS, _NOT_FASTER] if args.keep_masks else [_NOT_FASTER]
        # A list of batches or a DataLoader calibrates; latency is timed on one input only.
        timed = x if x is None or isinstance(x, (torch.Tensor, tuple, Mapping)) else None
        return _compare(
            model, args.model, timed, lambda m: prune_(m, amount, **options), "Pruned", notes
        )

    def _remove(self, model: Any, args: Any) -> Comparison:
        amount = self._amount(remove_amount(args, args.amount))
        x = self.example_input(model, args.input)
        if x is None:
            raise needs_input(args.model)
        report = _compare(model, args.model, x, remove_change(args, amount, x), "Removed", [])
        return remove_notes(report, model)

    def _apply_suggestion(self, model: Any, args: Any) -> Comparison:
        evaluate = self.optional(args.evaluate, "--eval")
        x = self.example_input(model, args.input)
        if args.remove:
            check_group_suggestion(model, args.model, x)
        report = _compare(
            model,
            args.model,
            x,
            lambda m: apply_suggestion_(m, evaluate=evaluate, example_inputs=x),
            "Applied suggestion",
            [],
            evaluate=evaluate,
        )
        r = report.result
        measured = "not measured" if r.measured is None else f"{r.measured:.4g}"
        # The apply report's own notes say how the metric was measured (proxy or evaluate).
        metric = f"{r.metric}: predicted {r.predicted:.4g}, measured {measured}."
        report.notes[:0] = [metric, *r.notes]
        if r.suggestion.remove:
            return remove_notes(report, model)
        return report

    def _amount(self, text: Any) -> Any:
        if isinstance(text, float):
            return text
        if text is None:
            raise UsageError(
                "amount: missing; give a fraction in [0, 1) such as `%prune model 0.5`, a dict "
                "of per-layer amounts, or --suggested after %sensitivity."
            )
        try:
            return float(text)
        except ValueError:
            # A name such as `ratios` refers to a dict (or a number) in the namespace.
            return self.value(text, "amount")


def _compare(
    model: Any, expr: str, x: Any, change: Any, done: str, notes: list[str], evaluate: Any = None
) -> Comparison:
    """``compare_change`` as one all-or-nothing magic: errors as one line, Ctrl-C said so."""
    before = step_ids(model)
    try:
        with interrupt_note(model, expr), engine_errors({"--eval": evaluate}):
            return compare_change(
                model, change, x, title=done + ": {detail}. Undo with %undo.", notes=notes
            )
    except UsageError as err:
        if step_ids(model) != before:
            # compare_change undoes a change whose 'after' measurement fails; should a step
            # be left all the same, the user must not take the model for untouched.
            raise UsageError(f"{err} The change was recorded: %undo {expr} reverts it.") from err
        raise compressed_note(model, expr, err, "%prune works on float layers") from err.__cause__


_ALIASES = {"--structured": "channel", "--blocks": "block"}


def _granularity(args: Any, given_only: bool = False) -> str | None:
    given = {"--structured": args.structured, "--blocks": args.blocks}
    chosen = [o for o, on in given.items() if on]
    if args.granularity is not None:
        chosen.append(f"--granularity {args.granularity}")
    if len(chosen) > 1:
        raise UsageError(
            f"{' and '.join(chosen)}: choose one granularity (--structured is --granularity "
            "channel, --blocks is --granularity block)."
        )
    if args.granularity is not None:
        return args.granularity
    default = None if given_only else "element"
    return next((_ALIASES[o] for o, on in given.items() if on), default)
