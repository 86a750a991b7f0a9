"""Overhead of ``finetune`` over a hand-written training loop, per epoch (issue 14: <= 5%).

    python benchmarks/bench_finetune_overhead.py                  # LeNet-300-100 and SeedCNN
    python benchmarks/bench_finetune_overhead.py --rounds 21 --models lenet

Same model (two copies of one seeded initialisation), same data (sklearn digits: 8×8
flattened for LeNet-300-100, 28×28 for the seed CNN), same batches (the same seeded
shuffle), same optimizer (Adam 1e-3, one per copy, kept across epochs). Each round times
one epoch of the hand-written loop (forward, cross-entropy, zero_grad, backward, step; no
``.item()``) and one ``finetune(model, (x, y), 1, optimizer=opt)`` call with its defaults
(progress bar on, written to stderr, per-epoch sparsity measured), in alternating order, so
that load from the other processes on this shared machine falls on both alike. Reported:
median seconds per epoch of each and the median of the per-round ratios, single thread.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nbcompress.engine.schedule.finetune import finetune  # noqa: E402
from nbcompress.zoo import LeNet300, SeedCNN, load_digits  # noqa: E402


def hand_epoch(model, opt, x, y, batch_size, seed):
    """One epoch as people write it by hand."""
    model.train()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def setup(name):
    torch.manual_seed(0)
    if name == "lenet":
        data = load_digits(8)
        x, model = data.x_train.flatten(1), LeNet300()
    else:
        data = load_digits(28)
        x, model = data.x_train, SeedCNN()
    return model, x, data.y_train


def bench(name, rounds, batch_size):
    model, x, y = setup(name)
    a, b = model, copy.deepcopy(model)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-3)
    hand, ours, ratios = [], [], []
    for r in range(rounds + 1):  # round 0 warms up both
        times = {}
        order = ("hand", "ours") if r % 2 else ("ours", "hand")
        for which in order:
            start = time.perf_counter()
            if which == "hand":
                hand_epoch(a, opt_a, x, y, batch_size, seed=r)
            else:
                finetune(b, (x, y), 1, optimizer=opt_b, batch_size=batch_size, seed=r)
            times[which] = time.perf_counter() - start
        if r:
            hand.append(times["hand"])
            ours.append(times["ours"])
            ratios.append(times["ours"] / times["hand"])
    steps = -(-len(y) // batch_size)
    return {
        "model": name,
        "steps": steps,
        "hand": statistics.median(hand),
        "ours": statistics.median(ours),
        "ratio": statistics.median(ratios),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default="lenet,cnn")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = [bench(m, args.rounds, args.batch_size) for m in args.models.split(",")]
    print(f"\n1 thread, {args.rounds} interleaved rounds, load average {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}", file=sys.stderr)  # fmt: skip
    print("| model | steps/epoch | hand loop s/epoch | finetune s/epoch | overhead (median) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['steps']} | {row['hand']:.4f} | {row['ours']:.4f} | "
            f"{row['ratio'] - 1:+.1%} |"
        )


if __name__ == "__main__":
    main()
