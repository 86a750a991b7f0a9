"""``%speedup``: a thin wrapper over :func:`nbcompress.engine.speedup.speedup.speedup`."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.speedup.speedup import SpeedupReport, speedup
from nbcompress.notebook.magics._common import (
    ModelMagics,
    compressed_note,
    engine_errors,
    input_argument,
    interrupt_note,
    repeats_argument,
    split_patterns,
)

__all__ = ["SpeedupMagics"]


@magics_class
class SpeedupMagics(ModelMagics):
    """Measured dense vs sparse-kernel vs int8 execution."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace, e.g. `model.encoder`.")
    @input_argument("Example input tensor (or tuple of tensors).")
    @argument(
        "--apply",
        action="store_true",
        help="Install the sparse layers that measured faster (undo with %%undo model).",
    )
    @argument("--layers", help="Glob pattern(s) on layer names, comma separated.")
    @argument(
        "--int8",
        action="store_true",
        help="Let the choice use int8: sparse int8 and the dense int8 twins (torch, ONNX Runtime).",
    )
    @repeats_argument(3, 15, "Timed samples per candidate (default 15).")
    @line_magic
    def speedup(self, line: str) -> SpeedupReport:
        """Measure each Linear/Conv2d layer dense vs on nbcompress's sparse kernels.

        Example: ``%speedup model --input x`` times every layer on its real input as dense
        fp32, sparse fp32, sparse int8 and torch's dense dynamic int8, shows which path
        would be chosen, the estimated break-even sparsity for the layer shape, the
        end-to-end dense vs compressed time with its spread, and checks the compressed
        output against the dense one within a stated tolerance. ``--apply`` installs the
        faster sparse layers (as ``nbcompress.sparsify_``); ``%undo model`` reverts it.
        While it runs, a progress bar shows the layers timed so far and the ETA.
        Returns the report (``r = %speedup model --input x``; ``r.plot()`` draws bars).
        """
        args = parse_argstring(self.speedup, line)
        model = self.model(args.model)
        x = self.example_input(model, args.input)
        if x is None:
            raise UsageError(
                "--input: an example input is needed to time the layers, e.g. "
                "`%speedup model --input x` with x shaped like a real batch."
            )
        try:
            with interrupt_note(model, args.model), engine_errors():
                return speedup(
                    model,
                    x,
                    layers=split_patterns(args.layers),
                    apply=args.apply,
                    allow_int8=args.int8,
                    repeats=args.repeats,
                    # Layers timed so far and the ETA from the start: a live bar in
                    # a notebook (a first compile of the sparse kernels takes seconds).
                    progress=True,
                )
        except UsageError as err:
            note = "%speedup times float Linear/Conv layers against sparse kernels"
            raise compressed_note(model, args.model, err, note) from err.__cause__
