"""``%sensitivity``: a thin wrapper over :func:`nbcompress.engine.sensitivity.sweep.sensitivity`."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.core.distribute import resolve_executor
from nbcompress.engine.core.validation import check_amount
from nbcompress.engine.sensitivity.evaluate import EvaluationError, eta_status
from nbcompress.engine.sensitivity.result import SensitivityResult
from nbcompress.engine.sensitivity.staged import DEFAULT_RATIOS, prune_to_
from nbcompress.engine.sensitivity.suggestion import ApplyReport, Suggestion, apply_suggestion_
from nbcompress.engine.sensitivity.sweep import DEFAULT_RATIOS as SWEEP_RATIOS
from nbcompress.engine.sensitivity.sweep import sensitivity
from nbcompress.notebook.display.live import LiveView, closing
from nbcompress.notebook.magics._common import (
    ModelMagics,
    at_least,
    checked,
    engine_errors,
    input_argument,
    scale_out_arguments,
    split_patterns,
)

__all__ = ["SensitivityMagics"]


def _ratios(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(p) for p in text.replace(" ", ",").split(",") if p]
    except ValueError:
        raise UsageError(
            f"--ratios: {text!r} is not a comma-separated list of fractions, e.g. 0.1,0.5,0.9."
        ) from None


def _target(value: float) -> float:
    return check_amount(value, "target_sparsity", allow_zero=False)


def _check_modes(args: Any) -> None:
    """Refuse option combinations the modes of %sensitivity do not take, before the sweep."""
    target, drop = args.target_sparsity, args.max_drop
    if target is not None and drop is not None:
        raise UsageError("--target-sparsity / --max-drop: give one of the two, not both.")
    if args.apply and target is None and drop is None:
        raise UsageError("--apply: give the budget to apply, e.g. --target-sparsity 0.8.")
    if args.refine is not None:
        if target is None or args.objective != "params":
            raise UsageError(
                "--refine: refines a --target-sparsity suggestion (over params), e.g. "
                "--target-sparsity 0.8 --refine 100."
            )
        if args.evaluate is None and args.stages is None:
            raise UsageError("--refine: measures real allocations; give --eval fn.")
    if args.remove:
        if args.workers is not None or args.executor is not None:
            raise UsageError(
                "--workers / --executor: --remove (a sweep over channel groups) runs serially; "
                "drop them."
            )
        if args.granularity not in (None, "channel"):
            raise UsageError(
                f"--granularity {args.granularity}: --remove sweeps whole channel groups; drop "
                "--granularity or give --granularity channel."
            )
        for option in ("stages", "refine", "types", "max_layers"):
            if getattr(args, option) is not None:
                name = "--" + option.replace("_", "-")
                raise UsageError(f"{name}: not available with --remove (a group sweep); drop it.")
        if args.reconstruct:
            raise UsageError("--reconstruct: not available with --remove (nothing is re-fitted).")
    if args.granularity is None:
        args.granularity = "channel" if args.remove else "element"
    if args.stages is not None and (target is None or not args.apply):
        # Staged pruning changes the model, so it is only done when asked explicitly.
        raise UsageError(
            "--stages: prunes in stages to a sparsity; give --target-sparsity and --apply, "
            "e.g. --target-sparsity 0.9 --stages 5 --apply."
        )


def in_notebook(shell: Any) -> bool:
    """True when a frontend can show rich output (a kernel, not a terminal)."""
    return getattr(shell, "kernel", None) is not None


@magics_class
class SensitivityMagics(ModelMagics):
    """The ``%sensitivity`` magic."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace, e.g. `model.encoder`.")
    @argument("--eval", dest="evaluate", help="Metric function evaluate(model) -> float.")
    @input_argument("Example input (proxy metric, MAC estimates).")
    @argument("--ratios", help="Comma-separated fractions, default 0.1,0.2,…,0.9,0.95,0.98,0.99.")
    @argument("--layers", help='Glob(s) on layer names, e.g. "features.*" (comma-separated).')
    @argument(
        "--types",
        help="Layer types, e.g. Linear,Conv2d (default: what prune_ prunes: Linear, Conv, "
        "ConvTranspose, attention projections, LSTM/GRU/RNN gates).",
    )
    @argument(
        "--granularity",
        help="element (default; channel with --remove), block (4×1) or channel.",
    )
    @argument(
        "--remove",
        action="store_true",
        help="Sweep coupled channel groups by physically removing channels (needs --input; "
        "the suggestion is applied with removal).",
    )
    @argument(
        "--include-output",
        action="store_true",
        help="Analyse the output layer too (left alone by default, as %%prune leaves it).",
    )
    @argument(
        "--method",
        default="l1",
        choices=("l1", "wanda"),
        help="How each point prunes: l1 (default) or wanda (|W|·‖X‖, calibrated on --input "
        "or on the batches --eval feeds the model).",
    )
    @argument(
        "--reconstruct",
        action="store_true",
        help="Re-fit each point's kept weights by least squares on the calibration inputs.",
    )
    @argument(
        "--no-check",
        action="store_true",
        help="Suggest from the curves alone, without measuring against uniform/global L1.",
    )
    @argument("--lower-is-better", action="store_true", help="Loss, perplexity, RMSE, ...")
    @argument("--metric", help="Name of the metric shown in tables and plots.")
    @argument(
        "--max-layers",
        type=at_least(1, "--max-layers 10"),
        help="Analyse only the N largest layers.",
    )
    @argument(
        "--early-stop",
        type=at_least(0, "--early-stop 0.1", float),
        help="Stop a layer once the metric fell by this.",
    )
    @argument(
        "--target-sparsity", type=checked(_target), help="Suggest ratios removing this fraction."
    )
    @argument(
        "--max-drop",
        type=at_least(0, "--max-drop 0.01", float),
        help="Suggest ratios losing at most this much metric.",
    )
    @argument("--objective", default="params", choices=("params", "macs"), help="params or macs.")
    @argument("--apply", action="store_true", help="Prune in place with the suggestion (undoable).")
    @argument(
        "--stages",
        type=at_least(1, "--stages 5"),
        help="With --apply: sweep, suggest, apply in N stages.",
    )
    @argument(
        "--refine",
        type=at_least(0, "--refine 100"),
        help="Refine the suggestion by up to N measured moves.",
    )
    @scale_out_arguments
    @argument("--no-widget", action="store_true", help="Do not show the explorer widget.")
    @argument("--save", help="Write the result (even a partial one) to this JSON file.")
    @line_magic
    def sensitivity(self, line: str) -> SensitivityResult:
        """L1 sensitivity sweep: prune each layer alone at each ratio, evaluate, restore.

        Examples: ``%sensitivity model --eval evaluate``,
        ``%sensitivity model --eval val_loss --lower-is-better --target-sparsity 0.8``,
        ``%sensitivity model --input x`` (no eval function: a data-free proxy, the
        agreement of the pruned with the dense output, labelled as such),
        ``%sensitivity model --eval f --remove --input x --target-sparsity 0.3`` (sweeps
        coupled channel groups, one entry per group named by its root layer, each point
        physically removing that group's lowest-L1 channels and rolling back; the
        suggestion is checked against uniform removal, and ``%prune model --suggested``
        applies it by removal).

        The model is unchanged afterwards (also on errors or Ctrl-C, which keeps the
        partial result). ``--workers 2`` evaluates on a local dask cluster of two processes
        started for the call and closed after (``--executor tcp://host:8786``: a running
        scheduler; ``--executor pool``: an Executor or dask Client in the namespace); the
        result is the serial one, with a note saying where it ran. The output layer is left
        alone unless ``--include-output``, as ``%prune`` leaves it. With --target-sparsity or
        --max-drop a per-layer suggestion is made from the curves and, for a sparsity
        target, checked by measuring it against
        uniform and global L1 at the same sparsity (the best measured is kept; ``--no-check``
        skips that); ``%prune model --suggested`` or ``--apply`` applies it (undoable).
        ``--target-sparsity 0.9 --stages 5 --apply`` prunes in stages instead:
        sweep, suggest and apply five times, each sweep on the already pruned model (layers
        that look harmless alone can hurt together; re-measuring catches that). It returns
        shows the per-stage report and ``%undo model`` reverts all stages; score it with a
        continuous metric (``--eval val_loss --lower-is-better``) rather than accuracy on a
        few hundred examples, which is flat over most ratios. ``--refine 100`` checks the
        choice by measuring: the suggestion (or the stages' result) and the ratios uniform
        and global L1 would give are evaluated, then up to 100 moves of sparsity between
        layers are tried, each kept only if the measured metric improves; the recommended
        use is ``--eval val_loss --lower-is-better --target-sparsity 0.9 --stages 5
        --refine 100 --apply``. In a notebook the curves update live and the explorer
        widget follows. Returns the :class:`~nbcompress.SensitivityResult`
        (``r = %sensitivity model --eval evaluate``); with ``--stages`` the last stage's
        sweep, and the per-stage report (what ``prune_to_`` returns) is kept as
        ``nbcompress.history(model)[-1].info["report"]``.
        """
        args = parse_argstring(self.sensitivity, line)
        _check_modes(args)
        model = self.model(args.model)
        evaluate = self.optional(args.evaluate, "--eval")
        x = self.example_input(model, args.input)
        if args.remove and x is None:
            raise UsageError(
                "--input: --remove traces the model on an example input to find its coupled "
                f"channel groups; pass one, e.g. %sensitivity {args.model} --remove --input x."
            )
        where = self.executor(args.executor)
        with contextlib.ExitStack() as stack:
            with engine_errors({"--executor": where}):
                pool = stack.enter_context(resolve_executor(where, args.workers))
            if args.stages is not None:
                return self._staged(model, evaluate, x, args, pool)
            # No explorer after --apply: its sliders would start from the unpruned model.
            explorer = None if args.no_widget or args.apply else self._explorer_class()
            result = self._sweep(model, evaluate, x, args, pool, explorer is not None)
            suggestion = self._suggest(result, args, evaluate, pool)
        if args.save:
            result.save(args.save)
        if suggestion is not None and args.apply:
            self._show(_apply(model, suggestion, evaluate, x))
        elif explorer is not None:
            # The input lets Evaluate measure the proxy after `%sensitivity model --input x`.
            self._show(explorer(result, model, evaluate, suggestion=suggestion, example_inputs=x))
        if in_notebook(self.shell):
            # Plotted live (or in the explorer): in this cell the returned result shows its
            # table only, not the same curves again.
            cell = self.shell.execution_count
            result.shown_elsewhere(lambda: self.shell.execution_count == cell)
        return result

    def _staged(self, model: Any, evaluate: Any, x: Any, args: Any, pool: Any) -> SensitivityResult:
        # Per-stage progress lines go to the notebook's normal output, not the error box.
        progress = contextlib.redirect_stderr(sys.stdout) if in_notebook(self.shell) else None
        with engine_errors({"--eval": evaluate}), progress or contextlib.nullcontext():
            try:
                report = prune_to_(
                    model, evaluate, args.target_sparsity, stages=args.stages,
                    ratios=_ratios(args.ratios) or DEFAULT_RATIOS, objective=args.objective,
                    granularity=args.granularity, layers=split_patterns(args.layers),
                    types=split_patterns(args.types), example_inputs=x,
                    higher_is_better=not args.lower_is_better, metric=args.metric,
                    refine=args.refine, method=args.method, reconstruct=args.reconstruct,
                    executor=pool,
                )  # fmt: skip
            except KeyboardInterrupt:
                print("Interrupted: every stage rolled back, the model is unchanged.")
                raise
        if args.save and report.result is not None:
            report.result.save(args.save)
        self._show(report)
        if report.refinement is not None:
            self._show(report.refinement)  # candidates and kept moves, measured
        return report.result

    def _show(self, obj: Any) -> None:
        if in_notebook(self.shell):
            from IPython.display import display

            display(obj)
        else:
            print(obj)

    def _explorer_class(self) -> Any:
        """The explorer widget's class, or ``None`` in a terminal or without ipywidgets."""
        if not in_notebook(self.shell):
            return None
        try:
            from nbcompress.notebook.widgets import SensitivityExplorer
        except ImportError:  # the explorer is optional; the result is shown anyway
            return None
        return SensitivityExplorer

    def _sweep(
        self, model: Any, evaluate: Any, x: Any, args: Any, pool: Any, explorer: bool
    ) -> SensitivityResult:
        notebook = in_notebook(self.shell)
        ratios = _ratios(args.ratios)
        live = None
        if notebook:
            layers = split_patterns(args.layers)
            # The total is only known after selection; an estimate suffices for the bar.
            live = _Live(_estimate_total(model, layers, args, ratios))
        with engine_errors({"--eval": evaluate}), closing(live):
            try:
                result = sensitivity(
                    model, evaluate, ratios=ratios, layers=split_patterns(args.layers),
                    types=split_patterns(args.types), granularity=args.granularity,
                    example_inputs=x, higher_is_better=not args.lower_is_better,
                    metric=args.metric, max_layers=args.max_layers, early_stop=args.early_stop,
                    progress=not notebook, callback=live, include_output=args.include_output,
                    method=args.method, reconstruct=args.reconstruct, remove=args.remove,
                    executor=pool,
                )  # fmt: skip
            except (EvaluationError, TypeError) as err:
                partial = getattr(err, "result", None)
                if partial is None:
                    raise
                if args.save:
                    partial.save(args.save)
                raise type(err)(
                    f"{err} Partial results are kept: "
                    f"nbcompress.engine.sensitivity.registry.latest({args.model})."
                ) from None
        if live is not None:
            live.total = result.evaluations - 1
            state = "done" if result.complete else "interrupted"
            # The explorer below draws the same curves: the live plot gives way to it.
            where = f"{state}, curves in the explorer below" if explorer else state
            live.show(result, where, plot=not explorer)
        for note in result.notes:
            print(note)  # explanations, not errors: the notebook's normal output
        return result

    def _suggest(
        self, result: SensitivityResult, args: Any, evaluate: Any, pool: Any
    ) -> Suggestion | None:
        if args.target_sparsity is None and args.max_drop is None:
            return None
        options = {} if args.refine is None else {"evaluate": evaluate, "refine": args.refine}
        if pool is not None:
            options["executor"] = pool  # the check and the refinement measure there too
        if args.no_check:
            options["check"] = False
        try:
            suggestion = result.suggest(
                args.target_sparsity, max_drop=args.max_drop, objective=args.objective, **options
            )
        except KeyboardInterrupt:
            print("Refinement interrupted: no suggestion; the model is unchanged.")
            return None
        except (ValueError, TypeError) as err:
            # The sweep may have taken long: report, and keep the result.
            print(f"No suggestion: {err}")
            return None
        self._show(suggestion)
        if suggestion.refinement is not None:
            self._show(suggestion.refinement)
        if not args.apply:
            print(f"Apply it with: %prune {args.model} --suggested  (undo: %undo {args.model})")
        return suggestion


def _apply(model: Any, suggestion: Suggestion, evaluate: Any, x: Any) -> ApplyReport:
    with engine_errors({"--eval": evaluate}):
        return apply_suggestion_(model, suggestion, evaluate=evaluate, example_inputs=x)


def _estimate_total(model: Any, layers: Any, args: Any, ratios: list[float] | None) -> int:
    from nbcompress.engine.core.layers import select_layers

    try:
        selected, _ = select_layers(
            model, layers, split_patterns(args.types), include_output=args.include_output
        )
    except (ValueError, TypeError):
        return 1  # the sweep itself reports the bad selection
    n = len(selected) if args.max_layers is None else min(args.max_layers, len(selected))
    return max(1, n * len(set(ratios) if ratios else SWEEP_RATIOS))


class _Live(LiveView):
    """The live view, its status also saying the time elapsed and the ETA."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.start = time.perf_counter()

    def show(self, result: SensitivityResult, where: str = "", *, plot: bool = True) -> None:
        """Redraw now; the status ends with the time elapsed and the ETA."""
        status = eta_status(result.evaluations - 1, self.total, time.perf_counter() - self.start)
        elapsed_eta = status.split(", ", 1)[1]  # the bar already shows done/total
        super().show(result, f"{where} · {elapsed_eta}" if where else elapsed_eta, plot=plot)
