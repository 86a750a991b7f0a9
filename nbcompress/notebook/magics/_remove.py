"""``%prune --remove``: physical removal of channels, its options and its report.

``%prune model 0.3 --remove --input x`` calls :func:`~nbcompress.engine.structural.remove.
remove_` (the structural engine, imported when first used: it loads Torch-Pruning) inside
the same all-or-nothing comparison as every ``%prune``; this module checks the options that
only make sense together, before anything runs, and writes the report's removal lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument
from torch import nn

from nbcompress.engine.core.compare import Comparison
from nbcompress.engine.core.history import history
from nbcompress.engine.core.summary import REMOVE_STEP, size_change
from nbcompress.engine.sensitivity.registry import latest_suggestion
from nbcompress.notebook.magics._common import at_least, split_patterns, within

__all__ = [
    "NEW_PARAMETERS",
    "check_group_suggestion",
    "check_remove",
    "needs_input",
    "remove_amount",
    "remove_arguments",
    "remove_change",
    "remove_notes",
]

#: Told after every removal: an optimizer built before it holds the old tensors.
NEW_PARAMETERS = (
    "The removed layers have new parameter objects: rebuild any optimizer (and LR "
    "scheduler) made before this, e.g. opt = torch.optim.SGD(model.parameters(), lr=...)."
)

# Options only physical removal takes, with an example of each.
_REMOVE_ONLY = {
    "round_to": "--round-to 8",
    "heads": "--heads 0.25",
    "ffn": "--ffn 0.5",
    "ignore": '--ignore "features.0"',
}
# %prune options that mask weights in place and mean nothing for removal.
_MASK_ONLY = {
    "keep_masks": "--keep-masks",
    "reconstruct": "--reconstruct",
    "types": "--types",
    "remove_masks": "--remove-masks",
}


def remove_arguments(func: Callable) -> Callable:
    """Add ``--remove`` and the options that go with it to a magic."""
    options = [
        argument(
            "--remove",
            action="store_true",
            help="Physically remove the pruned channels/neurons (and every dimension coupled to "
            "them): a smaller dense model, faster on any runtime. Needs --input.",
        ),
        argument(
            "--round-to",
            type=at_least(1, "--round-to 8"),
            help="With --remove: keep channel counts multiples of N (fast on real kernels).",
        ),
        argument(
            "--heads",
            type=within(0, 0.99, "--heads 0.25"),
            help="With --remove: fraction of attention heads to remove.",
        ),
        argument(
            "--ffn",
            type=within(0, 0.99, "--ffn 0.5"),
            help="With --remove: fraction of transformer FFN neurons to remove.",
        ),
        argument(
            "--ignore",
            help='With --remove: glob(s) of layers never removed from, e.g. "features.0".',
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def check_remove(args: Any, granularity: str | None) -> None:
    """Refuse option combinations before anything runs (one line naming the option).

    Args:
        args: The parsed ``%prune`` options.
        granularity: What ``--granularity``/``--structured``/``--blocks`` chose, ``None`` if
            none was given.
    """
    if not args.remove:
        given = [k for k in _REMOVE_ONLY if getattr(args, k) is not None]
        if given:
            option = _REMOVE_ONLY[given[0]]
            raise UsageError(
                f"{option.split()[0]}: only used with --remove (physical removal), e.g. "
                f"%prune {args.model} 0.3 --remove --input x {option}."
            )
        return
    if granularity not in (None, "channel"):
        raise UsageError(
            f"--granularity {granularity}: --remove removes whole channels; drop --granularity "
            "(or give --granularity channel), or drop --remove to zero single weights/blocks."
        )
    for key, option in _MASK_ONLY.items():
        if getattr(args, key):
            raise UsageError(f"{option}: not used with --remove (nothing is masked); drop it.")
    if args.scope != "layer":
        raise UsageError(
            "--scope: --remove ranks channels within each coupled group; drop --scope global."
        )
    if args.suggested and any(getattr(args, k) is not None for k in _REMOVE_ONLY):
        raise UsageError(
            "--suggested: the suggestion's per-group ratios are applied as they are; drop "
            "--round-to/--heads/--ffn/--ignore."
        )


def needs_input(expr: str) -> UsageError:
    """The refusal of ``--remove`` without an example input (none given, none remembered)."""
    return UsageError(
        "--input: --remove traces the model on an example input to find the coupled "
        f"channels; pass one, e.g. %prune {expr} 0.3 --remove --input x."
    )


def check_group_suggestion(model: nn.Module, expr: str, x: Any) -> None:
    """``--suggested --remove``: the latest suggestion must be a group sweep's, with an input."""
    suggestion = latest_suggestion(model)
    if suggestion is None:
        raise UsageError(
            "--suggested: no suggestion recorded for this model (a sweep records one only with "
            f"a budget); sweep coupled groups with one first: %sensitivity {expr} --eval f "
            "--remove --input x --target-sparsity 0.3 (or --max-drop 0.01)."
        )
    if not suggestion.remove:
        raise UsageError(
            "--remove: the latest suggestion is per-layer (its sweep zeroed single layers); "
            f"sweep coupled groups first: %sensitivity {expr} --eval f --remove --input x "
            "--target-sparsity 0.3, or drop --remove to apply it as zeros."
        )
    if x is None:
        raise needs_input(expr)


def remove_amount(args: Any, amount: Any) -> Any:
    """The amount to remove: 0 when only ``--heads``/``--ffn`` are asked for."""
    if amount is None and (args.heads is not None or args.ffn is not None):
        return 0.0
    return amount


def remove_change(args: Any, amount: Any, x: Any) -> Callable[[nn.Module], Any]:
    """``change(model)`` for ``compare_change``: ``remove_`` with the magic's options."""
    # Imported here: the structural engine loads Torch-Pruning, which only removal needs.
    from nbcompress.engine.structural.remove import remove_

    options = dict(
        example_inputs=x,
        importance=args.method,
        round_to=args.round_to,
        layers=split_patterns(args.layers),
        ignore=split_patterns(args.ignore),
        heads=args.heads,
        ffn=args.ffn,
        include_output=args.include_output,
    )
    return lambda m: remove_(m, amount, **options)


def remove_notes(report: Comparison, model: nn.Module) -> Comparison:
    """Put the removal's lines first: sizes before → after, the step's notes, the optimizer."""
    steps = [s for s in history(model) if s.name == REMOVE_STEP]
    # A note the title (the step's detail) already says is not repeated under the table.
    notes = steps[-1].info.get("notes", []) if steps else []
    step_notes = [n for n in notes if n.rstrip(".") not in report.title]
    told = any("optimizer" in text for text in [report.title, *step_notes])
    extra = [] if told else [NEW_PARAMETERS]
    report.notes[:0] = [size_change(report.before, report.after), *step_notes, *extra]
    return report
