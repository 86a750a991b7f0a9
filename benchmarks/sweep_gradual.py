"""Tune the gradual-pruning recipe of ``bench_training.py`` on digits' VALIDATION split only.

The held-out MNIST set and digits' test split are never looked at here. Each configuration
runs both arms (one-shot + fine-tune, gradual) with the same fine-tuning budget and the same
learning-rate schedule, over ``--seeds`` seeds; the table shows the mean validation accuracy
of each arm and the mean paired difference. Levers:

* ``end``: share of the budget over which the sparsity rises (the rest recovers);
* ``start``: initial sparsity of the ``PolynomialDecay`` (0 as Zhu & Gupta, 0.5 as the seed);
* ``updates``: number of mask updates while rising;
* ``lr``: ``const`` Adam(1e-3), or ``cos`` (cosine decay to 0 over the budget, both arms);
* ``scope``: ``layer`` (uniform) or ``global`` (one threshold, each layer keeps >= 1%);
* ``l1``: an L1 penalty weight in both arms.

Usage::

    python benchmarks/sweep_gradual.py --model lenet --seeds 5
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbcompress import GradualPruner, PolynomialDecay, finetune, prune_, remove_masks_  # noqa: E402
from nbcompress.datasets import digits  # noqa: E402
from nbcompress.zoo import LeNet300, SeedCNN, accuracy, train  # noqa: E402

BATCH = 64


class _Steps:
    """Steps a learning-rate scheduler and, optionally, a pruner after each optimizer step."""

    def __init__(self, scheduler: object, pruner: GradualPruner | None) -> None:
        self.scheduler, self.pruner = scheduler, pruner

    def step(self) -> None:
        if self.pruner is not None:
            self.pruner.step()
        if self.scheduler is not None:
            self.scheduler.step()


def _arm(dense, split, s, budget, seed, lr, cfg, scope="layer", l1=0.0):
    """Fine-tune a copy of ``dense`` in one arm; ``cfg`` None = one-shot, else gradual."""
    model = copy.deepcopy(dense)
    steps = budget * -(-len(split.y_train) // BATCH)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if lr == "cos" else None
    pruner = None
    if cfg is None:
        prune_(model, s, keep_masks=True, scope=scope, min_density=0.01)
    else:
        end_frac, start, updates = cfg
        end = int(end_frac * steps)
        schedule = PolynomialDecay(start, s, 0, end, frequency=max(1, end // updates))
        pruner = GradualPruner(model, schedule, scope=scope, min_density=0.01)
    finetune(model, (split.x_train, split.y_train), budget, optimizer=opt,
             pruner=_Steps(sched, pruner), batch_size=BATCH, seed=seed, progress=False,
             l1=l1)  # fmt: skip
    if pruner is not None:
        pruner.finish()
    else:
        remove_masks_(model)
    return accuracy(model, split.x_val, split.y_val)


def main() -> None:
    """Print one row per configuration and sparsity: validation means over the seeds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["lenet", "cnn"], default="lenet")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10, help="dense training epochs")
    parser.add_argument("--budget", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--ends", default="0.5,0.75")
    parser.add_argument("--starts", default="0,0.5")
    parser.add_argument("--updates", default="20")
    parser.add_argument("--lrs", default="const,cos")
    parser.add_argument("--scopes", default="layer", help="layer and/or global (min density 1%%)")
    parser.add_argument("--sparsities", default="0.9,0.95")
    parser.add_argument("--l1", type=float, default=0.0, help="L1 weight in both arms")
    args = parser.parse_args()
    torch.set_num_threads(1)
    side = 8 if args.model == "lenet" else 28
    seeds = range(100, 100 + args.seeds)  # not the bench's seeds 0-2
    dense_models = {}
    for seed in seeds:
        split = digits(side, seed=seed)
        torch.manual_seed(seed)
        base = LeNet300(side * side) if args.model == "lenet" else SeedCNN()
        dense = train(base, split.x_train, split.y_train, epochs=args.epochs, seed=seed)
        dense_models[seed] = (split, dense, accuracy(dense, split.x_val, split.y_val))
    dense_mean = statistics.mean(v[2] for v in dense_models.values())
    print(f"{args.model}: dense val {dense_mean:.3f}; budget {args.budget} epochs")
    print("| sparsity | scope | lr | end | start | updates | one-shot | gradual | diff | min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    grid = list(itertools.product(
        [float(v) for v in args.ends.split(",")], [float(v) for v in args.starts.split(",")],
        [int(v) for v in args.updates.split(",")]))  # fmt: skip
    runs = itertools.product([float(v) for v in args.sparsities.split(",")],
                             args.scopes.split(","), args.lrs.split(","))  # fmt: skip
    for s, scope, lr in runs:
        base = {seed: _arm(d, sp, s, args.budget, seed, lr, None, scope, args.l1)
                    for seed, (sp, d, _) in dense_models.items()}  # fmt: skip
        for cfg in grid:
            diffs, accs = [], []
            for seed, (sp, d, _) in dense_models.items():
                acc = _arm(d, sp, s, args.budget, seed, lr, cfg, scope, args.l1)
                accs.append(acc)
                diffs.append(100 * (acc - base[seed]))
            print(
                f"| {s:.0%} | {scope} | {lr} | {cfg[0]} | {cfg[1]} | {cfg[2]} | "
                f"{statistics.mean(base.values()):.3f} | {statistics.mean(accs):.3f} | "
                f"{statistics.mean(diffs):+.1f} | {min(diffs):+.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
