"""Accuracy after structural removal: the seed CNN with 50% of its channels removed, fine-tuned.

The issue's target: the seed CNN on digits with 50% of channels removed and 3 epochs of
fine-tuning within 1 point of dense. Per seed and data set: train dense (10 epochs), remove
50% of the channels of every coupled group by group L1 (``remove_``; the classifier's outputs
stay), measure test accuracy right after removal, fine-tune 3 epochs with a fresh optimizer
(removal creates new parameters), measure again. Parameters and MACs are counted on the
models. sklearn digits is the tuning set; real MNIST-5000 is held out (reported only).

Usage::

    python benchmarks/bench_structural_accuracy.py            # 3 seeds, digits + MNIST
    python benchmarks/bench_structural_accuracy.py --quick    # 1 seed, digits only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbcompress import summary  # noqa: E402
from nbcompress.datasets import Split, digits, mnist  # noqa: E402
from nbcompress.engine.structural.remove import remove_  # noqa: E402
from nbcompress.zoo import SeedCNN, accuracy, train  # noqa: E402


def _counts(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    totals = summary(model, x[:1], measure_latency=False).totals
    return totals["params"], totals["MACs (est.)"]


def run(split: Split, seed: int, ratio: float, epochs: int, finetune: int) -> dict:
    """Dense → removed → fine-tuned accuracy of the seed CNN on one split and seed."""
    torch.manual_seed(seed)
    model = train(SeedCNN(), split.x_train, split.y_train, epochs=epochs, seed=seed)
    dense = accuracy(model, split.x_test, split.y_test)
    params0, macs0 = _counts(model, split.x_test)
    # The fair dense reference trains as many epochs in total as removal + fine-tuning.
    longer = train(copy.deepcopy(model), split.x_train, split.y_train, epochs=finetune, seed=seed)
    dense_more = accuracy(longer, split.x_test, split.y_test)
    remove_(model, ratio, example_inputs=split.calibration(64))
    removed = accuracy(model, split.x_test, split.y_test)
    params1, macs1 = _counts(model, split.x_test)
    train(model, split.x_train, split.y_train, epochs=finetune, seed=seed)
    tuned = accuracy(model, split.x_test, split.y_test)
    return dict(
        data=split.name,
        seed=seed,
        dense=dense,
        dense_more=dense_more,
        removed=removed,
        tuned=tuned,
        params=params1 / params0,
        macs=macs1 / macs0,
    )


def main() -> None:
    """Print one row per data set and seed, then the mean gaps to dense (gap > 0: worse)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, digits only")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    sets = [lambda s: digits(28, seed=s)] + ([] if args.quick else [lambda s: mnist(seed=s)])
    print(f"seed CNN, {args.ratio:.0%} of channels removed, {args.finetune} epochs fine-tuning")
    print(
        f"| data | seed | dense | dense +{args.finetune} ep | removed | + fine-tune | "
        "gap (pts) | gap to dense +ep | params | MACs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for make in sets:
        rows = []
        for seed in seeds:
            r = run(make(seed), seed, args.ratio, epochs=10, finetune=args.finetune)
            rows.append(r)
            gap = 100 * (r["dense"] - r["tuned"])
            gap_more = 100 * (r["dense_more"] - r["tuned"])
            print(
                f"| {r['data']} | {seed} | {r['dense']:.3f} | {r['dense_more']:.3f} | "
                f"{r['removed']:.3f} | {r['tuned']:.3f} | {gap:+.1f} | {gap_more:+.1f} | "
                f"{r['params']:.2f}× | {r['macs']:.2f}× |",
                flush=True,
            )
        gaps = [100 * (r["dense"] - r["tuned"]) for r in rows]
        more = [100 * (r["dense_more"] - r["tuned"]) for r in rows]
        print(
            f"| {rows[0]['data']} | mean | | | | | {statistics.mean(gaps):+.1f} | "
            f"{statistics.mean(more):+.1f} | | |"
        )


if __name__ == "__main__":
    main()
