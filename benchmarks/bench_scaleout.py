"""Scale-out of search(): serial vs a dask LocalCluster vs a process pool, same trials.

Issue 15's target: with 2 workers, a 40-evaluation search whose evaluation takes >= 0.5 s
runs >= 1.6x faster than serial on this 2-core machine, with identical results, the start
cost counted and shown separately; and the sampler overhead per trial <= 5% of the
evaluation time.

The evaluation is real work: the seed CNN (trained 3 epochs on digits 28x28), pruned to the
trial's allocation at 90% sparsity, fine-tuned with its masks kept (Adam, ``--epochs``
passes over ``--rows`` training rows) and scored on the validation split. The evaluate
function is defined here, in ``__main__``, as in a notebook: cloudpickle ships it by value.

Arms (each a ``search(..., sampler="tpe", n_trials=40, seed=0, batch=2)``):

* **serial, 1 thread**: in this process, torch at 1 thread (the reference for identity);
* **serial, N threads**: in this process at torch's default thread count (the honest
  single-process baseline: one process may use both cores);
* **dask 2 workers**: ``resolve_executor(None, workers=2)`` (LocalCluster, 1 thread each);
* **process pool 2**: ``process_pool(2)`` (forkserver).

The start of a cluster or pool is timed apart from the searches (its first search, the
warm-up, is timed apart too: workers import torch and unpickle the model). Wall times are the
median of ``--repeats`` runs. The machine is shared: the load average is printed.

Sampler overhead: ``Runner.ask`` + ``Runner.tell`` (asking, proposing and projecting,
telling) timed per trial over a 40-trial search per sampler, on the one-shot validation
accuracy (cheap, so that the run is short), divided by the fine-tune evaluation time.

Usage::

    python benchmarks/bench_scaleout.py [--trials 40] [--epochs 3] [--rows 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbcompress.datasets import digits  # noqa: E402
from nbcompress.engine.core.distribute import process_pool, resolve_executor  # noqa: E402
from nbcompress.engine.search import run as search_run  # noqa: E402
from nbcompress.engine.search.search import search  # noqa: E402
from nbcompress.zoo import SeedCNN, accuracy, train  # noqa: E402

TARGET = 0.9


def make_evaluate(split, rows: int, epochs: int):
    """Masked fine-tune then validation accuracy: a closure over the data, as in a notebook."""
    # Copies: a slice would pickle the whole data set's storage along with it.
    x, y = split.x_train[:rows].clone(), split.y_train[:rows].clone()
    x_val, y_val = split.x_val.clone(), split.y_val.clone()

    def evaluate(model: torch.nn.Module) -> float:
        weights = [
            m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
        ]
        masks = [(w != 0).float() for w in weights]
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 32):
                idx = order[i : i + 32]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                with torch.no_grad():
                    for w, m in zip(weights, masks):
                        w.mul_(m)
        model.eval()
        return accuracy(model, x_val, y_val)

    return evaluate


def _key(result) -> list:
    return [(t.number, t.state, t.ratios, t.metric) for t in result.trials]


def _timed_searches(dense, evaluate, kw, repeats, **where):
    walls, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(search(copy.deepcopy(dense), evaluate, **kw, **where))
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), results[0]


def _scaled_arm(name, starter, dense, evaluate, kw, repeats):
    start = time.perf_counter()
    with starter() as executor:
        started = time.perf_counter() - start
        warm = time.perf_counter()
        search(copy.deepcopy(dense), evaluate, **{**kw, "n_trials": 2}, executor=executor)
        warm = time.perf_counter() - warm
        wall, result = _timed_searches(dense, evaluate, kw, repeats, executor=executor)
    return name, started, warm, wall, result


def scale_out(dense, evaluate, args) -> float:
    """The arms table, a row as each arm ends; returns the serial seconds per evaluation."""
    kw = dict(target_sparsity=TARGET, sampler="tpe", n_trials=args.trials, seed=0,
              batch=args.workers, progress=False)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    serial1, reference = _timed_searches(dense, evaluate, kw, args.repeats)
    evaluations = len({tuple(t.ratios.values()) for t in reference.trials})
    per_eval = serial1 / evaluations
    cores = os.cpu_count() or 1
    serial_n, threaded = serial1, reference
    if not args.no_threaded:
        torch.set_num_threads(cores)
        serial_n, threaded = _timed_searches(dense, evaluate, kw, args.repeats)
        torch.set_num_threads(1)
    best = min(serial1, serial_n)
    print(f"\n{args.trials} trials, {evaluations} distinct evaluations, {per_eval:.2f} s each "
          f"(serial, 1 thread); load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(
        "| arm | start s | warm-up s | search s (median) | speedup vs serial 1 thread | "
        "vs best serial | with start + warm-up | identical to serial 1 thread |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)

    def row(name, started, warm, wall, result) -> None:
        total = wall + started + warm
        print(f"| {name} | {started:.1f} | {warm:.1f} | {wall:.1f} | {serial1 / wall:.2f}x | "
              f"{best / wall:.2f}x | {best / total:.2f}x | "
              f"{'yes' if _key(result) == _key(reference) else 'no'} |", flush=True)  # fmt: skip

    row("serial, 1 thread", 0.0, 0.0, serial1, reference)
    if not args.no_threaded:
        row(f"serial, {cores} threads", 0.0, 0.0, serial_n, threaded)
    n = args.workers
    row(*_scaled_arm(f"dask {n} workers", lambda: resolve_executor(None, n), dense, evaluate,
                     kw, args.repeats))  # fmt: skip
    row(*_scaled_arm(f"process pool {n}", lambda: process_pool(n), dense, evaluate, kw,
                     args.repeats))  # fmt: skip
    print(f"(load average at the end {os.getloadavg()[0]:.1f})", flush=True)
    torch.set_num_threads(threads)
    return per_eval


def sampler_overhead(dense, split, per_eval: float, args) -> None:
    """Seconds in ask + tell per trial, per sampler, against the fine-tune evaluation."""
    spent = {"s": 0.0}

    def timed(method):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                spent["s"] += time.perf_counter() - start

        return wrapper

    ask, tell = search_run.Runner.ask, search_run.Runner.tell
    search_run.Runner.ask, search_run.Runner.tell = timed(ask), timed(tell)
    oneshot = lambda m: accuracy(m, split.x_val, split.y_val)  # noqa: E731
    print(f"\n| sampler | ask + tell per trial ({args.trials} trials) | "
          f"share of a {per_eval:.2f} s evaluation |\n|---|---|---|")  # fmt: skip
    try:
        for sampler in args.samplers.split(","):
            spent["s"] = 0.0
            search(dense, oneshot, target_sparsity=TARGET, sampler=sampler,
                   n_trials=args.trials, seed=0, progress=False)  # fmt: skip
            each = spent["s"] / args.trials
            print(f"| {sampler} | {each * 1000:.1f} ms | {each / per_eval:.1%} |")
    finally:
        search_run.Runner.ask, search_run.Runner.tell = ask, tell


def main() -> None:
    """Train the dense CNN once, then the scale-out table and the sampler overhead table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune passes per trial")
    parser.add_argument("--rows", type=int, default=128, help="training rows fine-tuned on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samplers", default="tpe,gp,nsga2,random")
    parser.add_argument("--no-threaded", action="store_true", help="skip serial at N threads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = digits(28, seed=0)
    torch.manual_seed(0)
    dense = train(SeedCNN(), split.x_train, split.y_train, epochs=3, seed=0)
    print(f"dense seed CNN: val {accuracy(dense, split.x_val, split.y_val):.3f}", flush=True)
    per_eval = scale_out(dense, make_evaluate(split, args.rows, args.epochs), args)
    sampler_overhead(dense, split, per_eval, args)


if __name__ == "__main__":
    main()
