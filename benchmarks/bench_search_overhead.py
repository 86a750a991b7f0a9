"""Sampler overhead per trial (ask + projection + tell) against the trial's evaluation.

Issue 15's target: the sampler's time per trial is ≤ 5% of the evaluation time, threads
limited around the samplers. LeNet-300-100 and the seed CNN on digits at 90% (target
sparsity: every sampler, CMA-ES included, sees one objective), one-shot and with 3 epochs
of masked fine-tuning per trial (as ``bench_search.py --finetune 3``). One search runs
exactly as ``search()`` runs it (``Runner.batch`` of one: ask, project, prune on a restored model,
evaluate, restore, tell); the bench only times the parts:

* **sampler** = the trial minus ``measure`` (ask, projection, user attributes, tell and the
  thread limit around them);
* **evaluation** = ``measure`` (prune, ``evaluate``, restore); ``evaluate`` alone is shown too.

Each configuration runs with three thread settings: limited around GP only with
``threadpool_limits(1)`` (what ``search()`` does now), around every sampler with it
(``run.quiet_threads``), and around every sampler with ``samplers.one_thread`` (one kept
threadpoolctl controller; swapped in for ``run.quiet_threads`` by the bench). A warm-up
search runs first; the figures are medians over ``--repeats`` searches of the total sampler
time / total evaluation time, of the per-trial sampler milliseconds and of the median
sampler time / median evaluation time per trial (robust to a busy machine's preemptions;
trials whose proposal was memoised count: they cost the sampler the same).

Usage::

    python benchmarks/bench_search_overhead.py [--trials 60] [--repeats 3] [--models lenet,cnn]
        [--modes one-shot,finetune] [--samplers tpe,gp,nsga2,random,cmaes]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import MODELS, TARGET, _masked_finetune  # noqa: E402

from nbcompress.datasets import digits  # noqa: E402
from nbcompress.engine.search import run  # noqa: E402
from nbcompress.engine.search.run import Runner  # noqa: E402
from nbcompress.engine.search.samplers import load_optuna, make_sampler, one_thread  # noqa: E402
from nbcompress.engine.search.space import Space  # noqa: E402
from nbcompress.zoo import LeNet300, SeedCNN, accuracy, train  # noqa: E402


class _TimedMeasure:
    """``run.measure`` (prune, evaluate, restore) with the seconds spent in it added up."""

    def __init__(self) -> None:
        self.measured = 0.0
        self.original = run.measure

    def __call__(self, bench, ratios):
        start = time.perf_counter()
        try:
            return self.original(bench, ratios)
        finally:
            self.measured += time.perf_counter() - start


#: Thread settings: (label, limit every sampler, kept controller).
SETTINGS = (
    ("GP only, threadpool_limits (before)", False, False),
    ("all, threadpool_limits", True, False),
    ("all, one_thread (search() now)", True, True),
)


@contextlib.contextmanager
def _kept(enabled: bool = True):
    with one_thread() if enabled else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _looked_up(enabled: bool = True):
    """threadpoolctl's ``threadpool_limits(1)``: looks the libraries up on every use."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1) if enabled else contextlib.nullcontext():
        yield


def _search(model, evaluate, sampler: str, trials: int, seed: int, setting: tuple) -> dict:
    """One search of ``trials`` trials; seconds in the sampler, in measure and in evaluate."""
    _, limit_all, kept = setting
    original = run.quiet_threads
    run.quiet_threads = _kept if kept else _looked_up
    try:
        return _timed_search(model, evaluate, sampler, trials, seed, limit_all)
    finally:
        run.quiet_threads = original


def _timed_search(model, evaluate, sampler: str, trials: int, seed: int, limit_all: bool):
    optuna = load_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    timed = {"evaluate": 0.0}

    def timed_evaluate(m):
        start = time.perf_counter()
        try:
            return evaluate(m)
        finally:
            timed["evaluate"] += time.perf_counter() - start

    space = Space.of(model, None, "element")
    study = optuna.create_study(sampler=make_sampler(sampler, trials, seed, 1),
                                directions=["maximize"])  # fmt: skip
    opts = dict(method="l1", granularity="element", example_inputs=None, reconstruct=False)
    runner = Runner(model, timed_evaluate, space, TARGET, ("metric",), opts)
    runner.limit_threads = limit_all or sampler == "gp"  # before: GP only
    timer = _TimedMeasure()
    run.measure = timer
    per_trial, per_eval = [], []
    total = 0.0
    try:
        for _ in range(trials):
            before = timer.measured
            start = time.perf_counter()
            for _ in runner.batch(study, 1):  # ask, measure, tell one trial as search() does
                pass
            step = time.perf_counter() - start
            total += step
            per_eval.append(timer.measured - before)
            per_trial.append(step - per_eval[-1])
    finally:
        run.measure = timer.original
    sampler_s = total - timer.measured
    return {
        "sampler": sampler_s,
        "measure": timer.measured,
        "evaluate": timed["evaluate"],
        "per_trial_ms": 1e3 * statistics.median(per_trial),
        "median_share": statistics.median(per_trial) / statistics.median(per_eval),
    }


def main() -> None:
    """Print one row per model, mode, sampler and thread setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="lenet,cnn")
    parser.add_argument("--modes", default="one-shot,finetune")
    parser.add_argument("--samplers", default="tpe,gp,nsga2,random,cmaes")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs per trial")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| model | evaluation | sampler | threads limited | sampler ms/trial (median) | "
        "evaluation ms/trial | evaluate ms/trial | sampler / evaluation (totals) | "
        "(medians) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for key in args.models.split(","):
        label, side, epochs = MODELS[key]
        split = digits(side, seed=0)
        torch.manual_seed(0)
        base = LeNet300(side * side) if key == "lenet" else SeedCNN()
        dense = train(base, split.x_train, split.y_train, epochs=epochs, seed=0)
        for mode in args.modes.split(","):
            if mode == "finetune":

                def evaluate(m, s=split):
                    tuned = _masked_finetune(copy.deepcopy(m), s, args.epochs, 0)
                    return accuracy(tuned, s.x_val, s.y_val)

            else:
                evaluate = lambda m, s=split: accuracy(m, s.x_val, s.y_val)  # noqa: E731
            trials = args.trials
            for sampler in args.samplers.split(","):
                for setting in SETTINGS:
                    if sampler == "gp" and setting is SETTINGS[1]:
                        continue  # search() limits GP already
                    _search(dense, evaluate, sampler, min(trials, 10), 99, setting)  # warm-up
                    runs = [
                        _search(dense, evaluate, sampler, trials, seed, setting)
                        for seed in range(args.repeats)
                    ]
                    share = statistics.median(r["sampler"] / r["measure"] for r in runs)
                    ms = statistics.median(r["per_trial_ms"] for r in runs)
                    meas = statistics.median(1e3 * r["measure"] / trials for r in runs)
                    ev = statistics.median(1e3 * r["evaluate"] / trials for r in runs)
                    limited = setting[0]
                    mid = statistics.median(r["median_share"] for r in runs)
                    row = f"{ms:.2f} | {meas:.1f} | {ev:.1f} | {share:.1%} | {mid:.1%}"
                    print(f"| {label} | {mode} ({trials} trials) | {sampler} | {limited} | {row} |",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
