"""optuna, loaded lazily (an optional extra): samplers and the study, fresh or resumed."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["SAMPLERS", "load_optuna", "make_sampler", "one_thread", "open_study", "population"]

#: Sampler names: Bayesian optimisation (``tpe``, ``gp``), a genetic algorithm
#: (``nsga2``), random proposals (the baseline) and CMA-ES (needs ``cmaes``).
SAMPLERS = ("tpe", "gp", "nsga2", "random", "cmaes")

_PREFIX = "nbcompress-search"


def load_optuna() -> Any:
    """Import optuna, or say which extra to install."""
    try:
        import optuna
    except ImportError:
        raise ImportError('search needs optuna: pip install "nbcompress[search]"') from None
    return optuna


def population(n_trials: int) -> int:
    """NSGA-II's population for a budget: ``max(10, min(20, n_trials // 6))``.

    optuna's default of 50 is too large for budgets of tens of trials (measured, see the
    search notes); a front search without a target seeds its first generation with this
    many allocations (:func:`~nbcompress.engine.search.space.front_seeds`).
    """
    return max(10, min(20, n_trials // 6))


def make_sampler(name: str, n_trials: int, seed: int | None, n_objectives: int) -> Any:
    """The optuna sampler called ``name``, seeded, sized for the budget.

    NSGA-II's population is :func:`population` of the budget.
    """
    optuna = load_optuna()
    samplers = optuna.samplers
    if name == "tpe":
        return samplers.TPESampler(multivariate=True, seed=seed)
    if name == "gp":
        return samplers.GPSampler(seed=seed)
    if name == "nsga2":
        return samplers.NSGAIISampler(population_size=population(n_trials), seed=seed)
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if n_objectives > 1:
        raise ValueError(
            "sampler: 'cmaes' optimises one objective; pass objectives=('metric',), a "
            "target_sparsity, or another sampler."
        )
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise ImportError('sampler="cmaes" needs cmaes: pip install "nbcompress[search]"') from None
    return samplers.CmaEsSampler(seed=seed)


class _Controller:
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries, kept between uses.

    Looked up again only when modules were imported since: an import can load a library.
    """

    controller: Any = None
    modules = -1


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One BLAS/OpenMP thread inside (nothing changes without ``threadpoolctl``).

    GP oversubscribes the cores without it (0.56 s a trial instead of 0.06, see the search
    notes). ``threadpool_limits(1)`` looks the libraries up on every use, 0.7-3 ms, as much
    as a TPE trial; a kept controller costs about 0.01 ms, so every sampler can run under
    it (``benchmarks/bench_search_overhead.py``).
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # threadpoolctl missing: samplers run with their default threads
        yield
        return
    if _Controller.controller is None or _Controller.modules != len(sys.modules):
        _Controller.controller = ThreadpoolController()
        _Controller.modules = len(sys.modules)
    with _Controller.controller.limit(limits=1):
        yield


def storage_url(storage: str | Path) -> str:
    """A SQLite file path becomes optuna's RDB URL; a URL is kept."""
    text = str(storage)
    return text if "://" in text else f"sqlite:///{text}"


def open_study(storage: str | Path | None, model_sig: str, config_sig: str, **kw: Any) -> Any:
    """Create the study, or load it from ``storage`` to resume it.

    The study is named from the searched layers' names and shapes (``model_sig``) and the
    search settings (``config_sig``); a storage whose studies were all made for other
    layers is refused, so that trials of another model never mix in.
    """
    optuna = load_optuna()
    name = f"{_PREFIX}-{model_sig}-{config_sig}"
    if storage is None:
        return optuna.create_study(study_name=name, **kw)
    url = storage_url(storage)
    try:
        names = optuna.study.get_all_study_names(storage=url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's errors, shown in one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"storage: {str(storage)!r} cannot be opened as an optuna storage ({first}); "
            "pass a SQLite file name in an existing folder, e.g. 'search.db'."
        ) from None
    ours = [n for n in names if n.startswith(f"{_PREFIX}-")]
    if ours and not any(n.startswith(f"{_PREFIX}-{model_sig}-") for n in ours):
        raise ValueError(
            f"storage: {str(storage)!r} holds a search of another model (different layer "
            "names or shapes); pass a new file, or the model that search was made for."
        )
    return optuna.create_study(study_name=name, storage=url, load_if_exists=True, **kw)
