"""Pareto front of metric vs sparsity: 60-trial searches vs a 300-trial NSGA-II reference.

Issue 15's target: the NSGA-II front (60 trials) reaches ≥ 0.97 of the hypervolume of a
300-trial reference front. LeNet-300-100 on digits (dense 30 epochs), no target sparsity:
``search(model, val_accuracy, sampler=…, n_trials=…, seed=seed)`` with both objectives, plain L1
trials. Hypervolume of the (validation accuracy, sparsity) front with reference point (0, 0),
both maximised; the reference front is NSGA-II with 300 trials on the same model. Also reports
tpe / random with 60 trials, per seed and the mean.

Usage::

    python benchmarks/bench_search_front.py [--seeds 3] [--trials 60] [--reference 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _datasets import digits  # noqa: E402

import nbcompress as nc  # noqa: E402
from nbcompress.zoo import LeNet300, accuracy, train  # noqa: E402


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both coordinates maximised) above the origin."""
    area, best_y = 0.0, 0.0
    for x, y in sorted(points, key=lambda p: -p[0]):  # by x, descending
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


def front_hv(result) -> float:
    """Hypervolume of a search result's Pareto front (validation metric, sparsity)."""
    return hypervolume([(t.sparsity, t.metric) for t in result.pareto()])


def main() -> None:
    """Print one row per seed and sampler, then the means."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--reference", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ratios: dict[str, list[float]] = {}
    print(
        "| seed | sampler | trials | front points | HV | HV / reference |\n"
        "|---|---|---|---|---|---|"
    )
    for seed in range(args.seeds):
        split = digits(8, seed=seed)
        torch.manual_seed(seed)
        dense = train(LeNet300(64), split.x_train, split.y_train, epochs=30, seed=seed)
        val = lambda m, s=split: accuracy(m, s.x_val, s.y_val)  # noqa: E731
        ref = nc.search(dense, val, sampler="nsga2", n_trials=args.reference, seed=seed,
                        progress=False)  # fmt: skip
        ref_hv = front_hv(ref)
        print(f"| {seed} | nsga2 (reference) | {args.reference} | {len(ref.pareto())} | "
              f"{ref_hv:.4f} | 1 |", flush=True)  # fmt: skip
        for sampler in ("nsga2", "tpe", "random"):
            result = nc.search(dense, val, sampler=sampler, n_trials=args.trials, seed=seed,
                               progress=False)  # fmt: skip
            hv = front_hv(result)
            ratios.setdefault(sampler, []).append(hv / ref_hv)
            print(f"| {seed} | {sampler} | {args.trials} | {len(result.pareto())} | {hv:.4f} | "
                  f"{hv / ref_hv:.3f} |", flush=True)  # fmt: skip
    for sampler, values in ratios.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"mean HV / reference, {sampler} ×{args.trials}: "
            f"{statistics.mean(values):.3f} ± {sd:.3f}"
        )


if __name__ == "__main__":
    main()
