"""A 40-evaluation sensitivity sweep, serial vs 2 dask workers (issue 15, part 3).

Issue 15's target: "dask with 2 workers: a 40-evaluation sweep of >= 0.5 s per evaluation
>= 1.6x faster than serial (on this 2-core machine, with the start cost counted and shown
separately), identical results".

The model is LeNet-300-100 trained on sklearn digits (8x8). Each evaluation is real work,
the seed's "gradient descent" inner loop: 3 epochs of masked SGD fine-tuning (pruned weights
held at zero) on the training split repeated ``--copies`` times with a little noise, then
minus the validation loss. Its batches come from a generator seeded inside evaluate, so the
value depends on the model alone (the condition for identical results on workers). The sweep
is the two hidden layers x 20 ratios = 40 evaluations (+ the baseline, measured in the
notebook process either way).

Arms, after one warm-up evaluation, in ``--repeats`` interleaved rounds (this machine is
shared: load hits every arm of a round alike), ratios as the median of the paired rounds:

* **serial, 1 thread** (and with ``--threads 1,2`` also 2 threads, torch's default here):
  ``sensitivity(m, f)``;
* **dask, 2 workers**: a ``LocalCluster`` of 2 single-threaded processes on 127.0.0.1
  (``resolve_executor(None, workers=2)``, what ``workers=2`` and ``%sensitivity --workers 2``
  start). Its start and close are timed apart; the first sweep (model and data shipped,
  worker-side first imports) is shown apart from the warm ones.

Every sweep's curves are checked bit for bit against a first serial sweep. The load average
is printed at start and end: figures taken under load are not this machine's best.

Usage::

    python benchmarks/bench_sensitivity_scaleout.py [--repeats 3] [--copies 6] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbcompress as nc  # noqa: E402
from nbcompress.datasets import digits  # noqa: E402
from nbcompress.engine.core.distribute import resolve_executor  # noqa: E402
from nbcompress.zoo import LeNet300, train  # noqa: E402

RATIOS = [round(0.05 * k, 2) for k in range(1, 20)] + [0.99]  # 20 ratios x 2 layers = 40


def make_evaluate(split, copies: int, epochs: int = 3, batch: int = 32):
    """Masked SGD fine-tuning for ``epochs``, then minus the validation loss (a closure)."""
    g = torch.Generator().manual_seed(1)
    x = split.x_train.flatten(1).repeat(copies, 1)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    y = split.y_train.repeat(copies)
    x_val, y_val = split.x_val.flatten(1), split.y_val

    def finetuned_val_loss(model: torch.nn.Module) -> float:
        order_rng = torch.Generator().manual_seed(0)  # the same batches at every call
        masks = {n: p != 0 for n, p in model.named_parameters() if p.dim() > 1}
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=order_rng)
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in masks:
                            p.mul_(masks[n])  # pruned weights stay pruned
        with torch.no_grad():
            return -float(F.cross_entropy(model(x_val), y_val))

    return finetuned_val_loss


def sweep(model, evaluate, executor=None):
    """One sweep and its wall time."""
    start = time.perf_counter()
    result = nc.sensitivity(model, evaluate, ratios=RATIOS, progress=False, executor=executor)
    return result, time.perf_counter() - start


def same(a, b) -> bool:
    return a.curves == b.curves and a.baseline == b.baseline and a.evaluations == b.evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--threads", default="1", help="Serial arms' torch threads, e.g. 1,2.")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} (2 cores)")
    threads_arms = [int(t) for t in args.threads.split(",")]

    torch.set_num_threads(1)
    split = digits(8, seed=0)
    model = train(LeNet300(), split.x_train.flatten(1), split.y_train, epochs=20, seed=0)
    evaluate = make_evaluate(split, args.copies)
    evaluate(model)  # warm-up: the first optimizer step imports torch._dynamo
    times = []
    for _ in range(3):
        start = time.perf_counter()
        evaluate(model)
        times.append(time.perf_counter() - start)
    per_eval = statistics.median(times)
    print(f"one evaluation: {per_eval:.3f} s (1 thread, median of 3)")

    reference = sweep(model, evaluate)[0]  # serial, 1 thread: what every arm must match
    start = time.perf_counter()
    with resolve_executor(None, workers=2) as pool:
        started = time.perf_counter() - start
        result, first = sweep(model, evaluate, pool)  # ships the model and data
        identical = same(result, reference)
        times: dict[str, list[float]] = {}
        # Interleaved rounds: the machine's load (shared here) hits every arm alike.
        for _ in range(args.repeats):
            for threads in threads_arms:
                torch.set_num_threads(threads)
                result, seconds = sweep(model, evaluate)
                if threads == 1:  # other thread counts sum in another order: not bit-equal
                    identical &= same(result, reference)
                times.setdefault(f"serial, {threads} thread(s)", []).append(seconds)
            torch.set_num_threads(1)  # the notebook process only records; workers evaluate
            result, seconds = sweep(model, evaluate, pool)
            identical &= same(result, reference)
            times.setdefault("dask 2 workers, warm", []).append(seconds)
        closing = time.perf_counter()
    closed = time.perf_counter() - closing
    for name, values in times.items():
        print(f"{name}: {[round(t, 2) for t in values]} s")
    print(f"evaluations per sweep: {reference.evaluations - 1} (+ the baseline)")
    dask = times["dask 2 workers, warm"]
    rows = {name: statistics.median(values) for name, values in times.items()}
    rows["dask 2 workers, first sweep"] = first
    rows["dask 2 workers, start + first sweep + close"] = started + first + closed
    print()
    print("| arm | sweep (s, median) | serial / arm (median of paired rounds) |")
    print("|---|---|---|")
    serial = times[f"serial, {threads_arms[0]} thread(s)"]
    for name, value in rows.items():
        paired = times.get(name, [value] * len(serial))
        ratio = statistics.median(s / v for s, v in zip(serial, paired, strict=True))
        print(f"| {name} | {value:.2f} | {ratio:.2f}x |")
    print(f"\ncluster start {started:.2f} s, close {closed:.2f} s; per evaluation {per_eval:.3f} s")
    print(f"dask warm sweeps: {[round(t, 2) for t in dask]} s")
    print(f"results identical to serial (curves, baseline, evaluations): {identical}")
    print(f"load average at end: {os.getloadavg()[0]:.1f} (2 cores)")


if __name__ == "__main__":
    main()
