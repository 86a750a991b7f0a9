"""``%factorize``: a thin wrapper over :func:`nbcompress.engine.schedule.factorize.factorize_`."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.schedule.factorize import FactorizeReport, factorize_
from nbcompress.engine.schedule.lowrank import check_energy
from nbcompress.engine.schedule.lowrank_report import factorize_report
from nbcompress.notebook.magics._common import (
    ModelMagics,
    checked,
    engine_errors,
    input_argument,
    interrupt_note,
    repeats_argument,
    split_patterns,
)

__all__ = ["FactorizeMagics"]

# Engine keywords this magic sets under another spelling (the shared table lacks them).
_OWN_OPTIONS = {
    "rank: ": "--rank: ",
    "energy: ": "--energy: ",
    "rank / energy: ": "--rank / --energy: ",
}


def _rank(text: str) -> int | float:
    """``--rank``: an int (``16``) or a fraction of min(in, out) (``0.25``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int such as 16 or a fraction such as 0.25, got {text!r}."
        ) from None


@contextlib.contextmanager
def _own_options() -> Iterator[None]:
    """Name ``--rank``/``--energy`` in engine refusals the shared translation leaves bare."""
    try:
        yield
    except UsageError as err:
        text = str(err)
        for head, option in _OWN_OPTIONS.items():
            if text.startswith(head):
                raise UsageError(option + text[len(head) :]) from err.__cause__
        raise


@magics_class
class FactorizeMagics(ModelMagics):
    """The ``%factorize`` magic."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace, e.g. `model.encoder`.")
    @argument(
        "--energy",
        type=checked(check_energy),
        help="Keep the smallest rank holding this fraction of Σσ² (default 0.9).",
    )
    @argument("--rank", type=_rank, help="Rank: an int, or a fraction of min(in, out) < 1.")
    @input_argument("Example input: each layer is timed on it (default: the last one given).")
    @argument("--layers", help='Glob(s) on layer names, e.g. "encoder.*" (comma-separated).')
    @argument("--include-output", action="store_true", help="Also factorise the output layer.")
    @argument(
        "--no-speed-check",
        action="store_true",
        help="Replace wherever smaller, even where not measured faster.",
    )
    @repeats_argument(1, 15, "Timed rounds per layer (default 15).")
    @line_magic
    def factorize(self, line: str) -> FactorizeReport | None:
        """Replace Linear/Conv2d layers by low-rank SVD pairs where smaller and faster.

        Examples: ``%factorize model --energy 0.9 --input x``, ``%factorize model --rank 16
        --input x --layers "encoder.*"``. Each layer is split by a truncated SVD (a Conv2d
        into a k×k conv to r channels and a 1×1 conv) and replaced only where the pair has
        fewer parameters and is measured faster on the layer's real input. Undoable with
        %undo. Returns the report (rank, params, MACs, latency, output error per layer).
        """
        args = parse_argstring(self.factorize, line)
        model = self.model(args.model)
        x = self.example_input(model, args.input)
        if x is None and not args.no_speed_check:
            raise UsageError(
                "--input: an example input is needed to time each layer; pass --input x "
                "(a batch shaped like real data) or --no-speed-check."
            )
        with interrupt_note(model, args.model), _own_options(), engine_errors():
            factorize_(
                model,
                rank=args.rank,
                energy=args.energy,
                layers=split_patterns(args.layers),
                include_output=args.include_output,
                example_inputs=x,
                only_faster=not args.no_speed_check,
                repeats=args.repeats,
            )
        return factorize_report(model)
