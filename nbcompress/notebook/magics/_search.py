"""``%search``: a thin wrapper over :func:`nbcompress.engine.search.search.search`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.search.result import SearchResult
from nbcompress.engine.search.search import search
from nbcompress.notebook.magics._common import (
    ModelMagics,
    at_least,
    engine_errors,
    input_argument,
    scale_out_arguments,
    seed_type,
    split_patterns,
)
from nbcompress.notebook.magics._sensitivity import in_notebook

__all__ = ["SearchMagics"]


@contextlib.contextmanager
def _extra_needed() -> Iterator[None]:
    """A missing optional dependency (optuna) as one UsageError line saying what to install."""
    try:
        yield
    except ImportError as err:
        if "nbcompress[" not in str(err):  # the search or the dask extra
            raise
        raise UsageError(f"%search: {err}") from None


@magics_class
class SearchMagics(ModelMagics):
    """The ``%search`` magic."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace, e.g. `model`.")
    @argument("--eval", "-e", dest="evaluate", help="evaluate(model) -> float, higher is better.")
    @argument("--target-sparsity", "-t", type=float, help="Overall sparsity every trial meets.")
    @argument("--trials", "-n", type=at_least(1, "--trials 60"), default=60, help="Default 60.")
    @argument(
        "--sampler",
        default="tpe",
        help="tpe (default), gp (Bayesian optimisation), nsga2 (genetic), random, cmaes.",
    )
    @argument("--layers", help='Glob(s) on layer names, e.g. "features.*" (comma-separated).')
    @argument("--granularity", default="element", help="element (default), block or channel.")
    @argument("--method", default="l1", help="Importance within a layer: l1, random, wanda.")
    @argument("--reconstruct", action="store_true", help="Re-fit kept weights in every trial.")
    @input_argument("Calibration inputs for --method wanda and --reconstruct (training rows).")
    @argument("--storage", help="A SQLite file (search.db): trials are kept; a rerun resumes.")
    @argument("--seed", type=seed_type, help="Seed of the sampler (same seed, same trials).")
    @argument("--no-warm-start", action="store_true", help="Skip uniform and global L1 first.")
    @scale_out_arguments
    @line_magic
    def search(self, line: str) -> SearchResult:
        """Search per-layer pruning ratios by measuring whole allocations (optuna).

        Examples: ``%search model --eval evaluate --target-sparsity 0.9 --trials 60``
        (every trial prunes to exactly 90% overall and is measured with ``evaluate``; the
        uniform and global-L1 allocations are tried first), ``--sampler gp`` (Bayesian
        optimisation, for expensive evaluations), ``%search model --eval evaluate --sampler
        nsga2 --trials 200`` (no target: the Pareto front of metric vs sparsity, by a genetic
        algorithm), ``--reconstruct --input xcal`` (every trial re-fits the kept weights on
        calibration rows, as the sensitivity default path does; ``result.apply_(model,
        result.best(), example_inputs=xcal)``). Every trial runs on a restored model: the
        model is left as it was. ``--workers 2`` measures trials on a local dask cluster of
        two processes started for the call (closed after); ``--executor tcp://host:8786`` on
        a running scheduler (or ``--executor pool``, an Executor or dask Client).
        Ctrl-C keeps the finished trials; ``--storage search.db`` resumes them in a new
        kernel. Returns the :class:`~nbcompress.engine.search.result.SearchResult`:
        ``result.apply_(model, result.best())`` applies the best allocation (``%undo model``
        reverts it).
        """
        args = parse_argstring(self.search, line)
        model = self.model(args.model)
        evaluate = self.value(args.evaluate, "--eval")
        calibration = self.optional(args.input, "--input")
        where = self.executor(args.executor)
        with engine_errors({"--eval": evaluate}), _extra_needed():
            view = None
            if in_notebook(self.shell):  # a widget frontend: the live view, not the table
                from nbcompress.notebook.display.search_live import SearchView

                view = SearchView(model, args.trials, name=args.model, example_inputs=calibration,
                                  target_sparsity=args.target_sparsity, sampler=args.sampler,
                                  show=True)  # fmt: skip
            try:
                result = search(
                    model, evaluate, target_sparsity=args.target_sparsity, sampler=args.sampler,
                    progress=view is None, callback=None if view is None else view.update,
                    n_trials=args.trials, layers=split_patterns(args.layers),
                    granularity=args.granularity, method=args.method, storage=args.storage,
                    seed=args.seed, warm_start=not args.no_warm_start,
                    example_inputs=calibration, reconstruct=args.reconstruct, executor=where,
                    workers=args.workers,
                )  # fmt: skip
            except Exception as err:
                if view is not None:  # e.g. every trial failed: the view must not say "searching…"
                    view.fail(err)
                raise
        if view is None:
            print(result)
        else:
            view.finish(result)
        return result
