"""Gradual pruning during fine-tuning vs one-shot pruning with the same fine-tuning budget.

Issue 14's targets: gradual (PolynomialDecay to the target over the fine-tuning budget) ≥
one-shot + the same fine-tuning budget at 90% and 95% sparsity, on LeNet-300-100 and the seed
CNN; LeNet-300-100 ≥ 95% sparse within 0.5 point of dense, the seed CNN ≥ 90% within 1 point.

Per model, data set and seed: train dense to convergence (``zoo.train``, Adam 1e-3: 30 epochs
for LeNet-300-100, 20 for the seed CNN), then from copies of that model
* **one-shot**: ``prune_(m, s, keep_masks=True)`` then ``finetune`` for the budget (10 epochs,
  Adam 1e-3; masks keep pruned weights at zero), masks made permanent;
* **gradual**: ``finetune`` for the same budget with a ``GradualPruner`` whose
  ``PolynomialDecay`` rises from 0 to ``s`` over the first half of the steps in 40 updates
  (the rest recovers at the final sparsity, as Zhu & Gupta recommend).
Test accuracy of each (layer scope, L1, output layer left alone). The recipe (dense epochs,
budget, share of the rise, number of updates, start sparsity, constant vs cosine rate, layer
vs global scope) was chosen with ``sweep_gradual.py`` on digits' validation split; real
MNIST-5000 is held out (reported only). An earlier recipe (dense 10 epochs, budget 5, rise
over 75%) compared against an under-trained dense model and favoured one-shot, whose 5 epochs
all trained at the final sparsity.

Usage::

    python benchmarks/bench_training.py            # 3 seeds, digits + MNIST
    python benchmarks/bench_training.py --quick    # 1 seed, digits, LeNet only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbcompress import (  # noqa: E402
    GradualPruner,
    PolynomialDecay,
    finetune,
    prune_,
    remove_masks_,
)
from nbcompress.datasets import Split, digits, mnist  # noqa: E402
from nbcompress.zoo import LeNet300, SeedCNN, accuracy, train  # noqa: E402

BATCH = 64
RISE = 0.5  # share of the fine-tuning steps over which the sparsity rises
UPDATES = 40  # mask updates while rising
DENSE_EPOCHS = {"LeNet-300-100": 30, "seed CNN": 20}


def _sparsity(model: torch.nn.Module) -> float:
    weights = [
        m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    total = sum(w.numel() for w in weights[:-1])  # output layer left alone
    zeros = sum(int((w == 0).sum()) for w in weights[:-1])
    return zeros / total


def one_shot(dense: torch.nn.Module, split: Split, s: float, epochs: int, seed: int) -> tuple:
    """Prune to ``s`` at once, then fine-tune ``epochs`` with kept masks."""
    model = copy.deepcopy(dense)
    prune_(model, s, keep_masks=True)
    finetune(model, (split.x_train, split.y_train), epochs, batch_size=BATCH, seed=seed,
             progress=False)  # fmt: skip
    remove_masks_(model)
    return accuracy(model, split.x_test, split.y_test), _sparsity(model)


def gradual(dense: torch.nn.Module, split: Split, s: float, epochs: int, seed: int) -> tuple:
    """Fine-tune ``epochs`` while the sparsity rises 0 → ``s`` over the first half of steps."""
    model = copy.deepcopy(dense)
    steps = epochs * -(-len(split.y_train) // BATCH)
    end = int(RISE * steps)
    schedule = PolynomialDecay(0.0, s, 0, end, frequency=max(1, end // UPDATES))
    pruner = GradualPruner(model, schedule)
    finetune(model, (split.x_train, split.y_train), epochs, pruner=pruner, batch_size=BATCH,
             seed=seed, progress=False)  # fmt: skip
    pruner.finish()
    return accuracy(model, split.x_test, split.y_test), _sparsity(model)


def main() -> None:
    """Print one row per model, data set, sparsity and seed, then the means."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, help="dense training epochs (default per model)")
    parser.add_argument("--budget", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--data", default="digits,MNIST", help="digits and/or MNIST")
    parser.add_argument("--models", default="LeNet-300-100,seed CNN")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    known = {"LeNet-300-100": (LeNet300, 8), "seed CNN": (SeedCNN, 28)}
    names = ["LeNet-300-100"] if args.quick else args.models.split(",")
    models = {name: known[name] for name in names}
    print(f"fine-tuning budget {args.budget} epochs; accuracy on the test split", flush=True)
    print(
        "| model | data | sparsity | seed | dense | one-shot + ft | gradual | gradual − one-shot |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, (cls, size) in models.items():
        sets = [("digits", lambda s, z=size: digits(z, seed=s), size)]
        if not args.quick and "MNIST" in args.data:
            sets.append(("MNIST", lambda s: mnist(seed=s), 28))
        if "digits" not in args.data and not args.quick:
            sets = sets[1:]
        epochs = args.epochs or DENSE_EPOCHS[label]
        for data, make, side in sets:
            for target in (0.9, 0.95):
                diffs, gaps = [], []
                for seed in seeds:
                    split = make(seed)
                    torch.manual_seed(seed)
                    base = LeNet300(side * side) if cls is LeNet300 else cls()
                    dense = train(base, split.x_train, split.y_train, epochs=epochs, seed=seed)
                    acc = accuracy(dense, split.x_test, split.y_test)
                    a1, _ = one_shot(dense, split, target, args.budget, seed)
                    a2, s2 = gradual(dense, split, target, args.budget, seed)
                    diffs.append(100 * (a2 - a1))
                    gaps.append(100 * (acc - max(a1, a2)))
                    print(
                        f"| {label} | {data} | {target:.0%} ({s2:.1%}) | {seed} | {acc:.3f} | "
                        f"{a1:.3f} | {a2:.3f} | {100 * (a2 - a1):+.1f} |",
                        flush=True,
                    )
                spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                print(
                    f"| {label} | {data} | {target:.0%} | mean | | | | "
                    f"{statistics.mean(diffs):+.1f} ± {spread:.1f} "
                    f"(best below dense by {statistics.mean(gaps):.1f}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
