"""NSGA-II settings for a 60-trial front, swept: what bench_search_front.py's defaults came from.

Each configuration runs a 60-trial front search (no target; validation accuracy and sparsity
maximised, plain L1 trials) through the search's own ``Runner``, and its hypervolume is
divided by that of a reference front (NSGA-II ×300, population 20, ``--reference-log``
choosing its parameterisation). Configuration keys (JSON): ``sampler`` (nsga2 / tpe /
random), ``pop``, ``cross`` (an optuna crossover class name), ``mut`` (mutation
probability), ``poly`` (polynomial mutation eta), ``log`` (keep on a log scale, as
``space.suggest_ratios``; else ratios uniform in [0, 0.99], as before) and ``seeds``
(``space.front_seeds`` enqueued first). Tune on ``lenet`` (digits), confirm on ``cnn`` and
``mnist`` without changing anything.

Usage::

    python benchmarks/sweep_nsga_front.py lenet --seeds 5 --configs '{"base": {}, "log+seeds":
        {"log": true, "seeds": 10}}' [--reference-log]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search_front import _dense, _pareto, hypervolume  # noqa: E402

from nbcompress.engine.search.run import Runner  # noqa: E402
from nbcompress.engine.search.samplers import load_optuna, population  # noqa: E402
from nbcompress.engine.search.space import (  # noqa: E402
    MAX_RATIO,
    Space,
    front_seeds,
    suggest_ratios,
)

OPTS = dict(method="l1", granularity="element", example_inputs=None, reconstruct=False)


class _Linear(Runner):
    """Ratios uniform in [0, 0.99] (the parameterisation before ``keep-log``)."""

    def propose(self, trial):
        return [trial.suggest_float(n, 0.0, MAX_RATIO) for n in self.space.names]


class _Log(Runner):
    """Keep on a log scale (``space.suggest_ratios``)."""

    def propose(self, trial):
        return suggest_ratios(trial, self.space, None)


def _sampler(cfg: dict, n: int, seed: int):
    optuna = load_optuna()
    ns = optuna.samplers.nsgaii
    kind = cfg.get("sampler", "nsga2")
    if kind == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    kw = {}
    if cfg.get("cross"):
        kw["crossover"] = getattr(ns, cfg["cross"])()
    if cfg.get("mut") is not None:
        kw["mutation_prob"] = cfg["mut"]
    if cfg.get("poly"):
        kw["mutation"] = ns.PolynomialMutation(cfg["poly"])
    return optuna.samplers.NSGAIISampler(
        population_size=cfg.get("pop") or population(n), seed=seed, **kw
    )


def front(model, val, cfg: dict, n: int, seed: int) -> list[tuple[float, float]]:
    """The (sparsity, metric) front of one search of ``n`` trials with settings ``cfg``."""
    optuna = load_optuna()
    space = Space.of(model, None, "element")
    study = optuna.create_study(sampler=_sampler(cfg, n, seed), directions=["maximize"] * 2)
    runner = (_Log if cfg.get("log") else _Linear)(
        model, val, space, None, ("metric", "sparsity"), OPTS
    )
    for params in front_seeds(model, space, cfg.get("seeds", 0)):
        if not cfg.get("log"):  # the seeds are keeps; the linear parameters are ratios
            params = {k: min(1.0 - v, MAX_RATIO) for k, v in params.items()}
        study.enqueue_trial(params, skip_if_exists=True)
    points = []
    for _ in range(n):
        t = runner.step(study)
        if t.metric is not None:
            points.append((t.sparsity, t.metric))
    return _pareto(points)


def main() -> None:
    """One row per seed (HV / reference of each configuration), then the means."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("lenet", "cnn", "mnist"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--configs", type=json.loads, required=True)
    parser.add_argument("--reference-log", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # experimental-class and global-pruning warnings
    load_optuna().logging.set_verbosity(load_optuna().logging.ERROR)
    ref_cfg = {"pop": 20, "log": args.reference_log}
    ratios: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        dense, val = _dense(args.model, seed)
        ref_hv = hypervolume(front(dense, val, ref_cfg, 300, seed))
        union = []
        row = {}
        for name, cfg in args.configs.items():
            points = front(dense, val, cfg, args.trials, seed)
            union += points
            row[name] = hypervolume(points) / ref_hv
            ratios.setdefault(name, []).append(row[name])
        best = hypervolume(_pareto(union)) / ref_hv
        cells = " ".join(f"{k}={v:.3f}" for k, v in row.items())
        print(f"seed {seed}: reference HV {ref_hv:.4f}, union of the 60-trial fronts "
              f"{best:.3f}; {cells}", flush=True)  # fmt: skip
    print(f"\n| config | {args.model}: HV / reference (mean ± sd, min) |\n|---|---|")
    for name, values in ratios.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.3f} ± {sd:.3f}, min {min(values):.3f} |")


if __name__ == "__main__":
    main()
