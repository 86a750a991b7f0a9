"""``%quantize``: a thin wrapper over :func:`nbcompress.engine.quantize.quantize.quantize_`."""

from __future__ import annotations

import dataclasses
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.quantize.quantize import MODES, QuantizeReport, quantize_, quantize_report
from nbcompress.notebook.magics._common import (
    ModelMagics,
    engine_errors,
    input_argument,
    interrupt_note,
    repeats_argument,
    split_patterns,
)

__all__ = ["QuantizeMagics"]

_DTYPES = ("int8", "fp16", "bf16")
_INT8_MODES = ("dynamic", "weight", "static")


def _mode(dtype: str, mode: str | None) -> str:
    if dtype not in _DTYPES:
        raise UsageError(f"dtype: unknown {dtype!r}; use one of {', '.join(_DTYPES)}.")
    if dtype != "int8":
        if mode is not None:
            raise UsageError(f"--mode applies to int8 only; drop it for {dtype}.")
        return dtype
    mode = mode or "dynamic"
    if mode not in _INT8_MODES:
        raise UsageError(f"--mode: unknown {mode!r}; use one of {', '.join(_INT8_MODES)}.")
    return mode


@magics_class
class QuantizeMagics(ModelMagics):
    """The ``%quantize`` magic."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace, e.g. `model.encoder`.")
    @argument("dtype", nargs="?", default="int8", help="int8 (default), fp16 or bf16.")
    @argument("--mode", help="int8 mode: dynamic (default), weight (weight-only) or static.")
    @argument("--calibrate", help="Static mode: name of a DataLoader, tensor or iterable.")
    @input_argument("Example input: backends are timed on it (default: the last one given).")
    @argument("--eval", dest="evaluate", help="Metric function model -> float, run before/after.")
    @argument("--layers", help='Glob(s) on layer names, e.g. "encoder.*" (comma-separated).')
    @argument(
        "--types",
        help="Layer types, e.g. Linear,Conv2d (default Linear, Conv, ConvTranspose, LSTM, GRU, "
        "MultiheadAttention).",
    )
    @argument("--backend", default="auto", help="auto (fastest measured), torch, torchao, ...")
    @argument("--per-tensor", action="store_true", help="int8: one weight scale per tensor.")
    @argument("--only-faster", action="store_true", help="Keep layers float where int8 is slower.")
    @repeats_argument(1, 10, "Timed samples per measurement (default 10).")
    @line_magic
    def quantize(self, line: str) -> QuantizeReport:
        """Quantize a model in place (undoable with %undo) and show measured figures.

        Examples: ``%quantize model int8 --input x``, ``%quantize model int8 --mode static
        --calibrate x_train``, ``%quantize model bf16``. For every layer each installed
        backend (torch.ao, torchao, numba kernels, nbcompress) is checked against the float
        layer and timed on its real input; the fastest correct one is used and named.
        Layers a mode cannot handle are listed with the reason. Returns the report.
        """
        args = parse_argstring(self.quantize, line)
        model = self.model(args.model)
        mode: Any = _mode(args.dtype.lower(), args.mode)
        if args.per_tensor:
            if mode not in ("dynamic", "static"):
                raise UsageError("--per-tensor applies to int8 dynamic and static modes.")
            mode = dataclasses.replace(MODES[mode], per_channel=False)
        x = self.example_input(model, args.input)
        calibrate = self.optional(args.calibrate, "--calibrate")
        evaluate = self.optional(args.evaluate, "--eval")
        given = {"--eval": evaluate, "--calibrate": calibrate}
        # The model runs on --calibrate batches when no --input is given (static mode).
        inputs = "--calibrate" if x is None and calibrate is not None else "--input"
        with interrupt_note(model, args.model), engine_errors(given, model_option=inputs):
            quantize_(
                model,
                mode,
                layers=split_patterns(args.layers),
                types=split_patterns(args.types),
                calibrate=calibrate,
                example_inputs=x,
                evaluate=evaluate,
                backend=args.backend,
                only_faster=args.only_faster,
                repeats=args.repeats,
            )
        return quantize_report(model)
