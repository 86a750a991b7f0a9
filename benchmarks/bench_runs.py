"""Sparse layers called as one run (``SparseRun``) against the same layers called one by one.

``sparsify_`` joins consecutive swapped ``SparseLinear`` layers of an ``nn.Sequential``
into one :class:`~nbcompress.kernels.run.SparseRun` (``engine/core/runs.py``).
Here the BERT-FFN ×2 stack of ``bench_runtimes`` (pruned 90% element-wise, "ffn90", or in
4 × 1 blocks, "ffn90b4") is swapped to one format on every layer with the GELUs folded,
then raced three ways in one process, interleaved (warm-up, rounds, median): torch dense
fp32 (whose 9.4 MB of weights evict the caches, as any other work between two calls
would), the layers one by one, and the run. Prints the medians and the ratio of the
run's time to one-by-one's (< 1: the run is faster); the outputs are checked equal.

Run under ``flock -x /work/bench.lock`` on a shared machine, e.g.::

    python benchmarks/bench_runs.py --threads 1,2 --batches 1,8,64
"""

from __future__ import annotations

import os

# Before torch loads its OpenMP runtime, as bench_runtimes does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NBCOMPRESS_TUNING", "off")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtimes as br  # noqa: E402 - the models live there

from nbcompress.engine.core.runs import join_runs  # noqa: E402
from nbcompress.kernels import tuning  # noqa: E402
from nbcompress.kernels.modules import SparseLinear  # noqa: E402
from nbcompress.timing import race  # noqa: E402

#: Model → formats to swap every layer to.
FORMATS = {"ffn90": ("csr", "csr_int8_dynamic"), "ffn90b4": ("bsr", "bsr_int8")}


def swapped(model: nn.Sequential, fmt: str) -> nn.Sequential:
    """A copy with every Linear a ``SparseLinear`` in ``fmt``, its GELU folded in."""
    out = copy.deepcopy(model)
    for i, layer in enumerate(list(out)):
        if isinstance(layer, nn.Linear):
            out[i] = SparseLinear.from_dense(layer, format=fmt)
        elif isinstance(layer, nn.GELU) and out[i - 1].fuse_activation_(layer):
            out[i] = nn.Identity()
    return out


def row(name: str, fmt: str, threads: int, batch: int, rounds: int) -> str:
    """One table row: medians of dense, one by one and the run, and run / one-by-one."""
    model = br.MODELS[name].build()
    x = br.MODELS[name].inputs(batch)
    single = swapped(model, fmt)
    joined = nn.Sequential(*single)  # the same layers (and their kernels' choices)
    assert join_runs(joined) == 1
    with torch.no_grad():
        with tuning.eager():  # the kernels' choices are raced now, not timed below
            want = single(*x)
        if not torch.equal(joined(*x), want):
            raise SystemExit(f"{name} {fmt}: the run's output differs from the layers'")
        calls = {
            "dense": lambda: model(*x),
            "one by one": lambda: single(*x),
            "run": lambda: joined(*x),
        }
        result = race(calls, rounds=rounds, warmup=3, min_sample=2e-4)
    t = {k: v.median * 1e6 for k, v in result.times.items()}
    # Per round, so that both sides of each ratio ran under the same load.
    ratio = statistics.median(
        r / o for r, o in zip(result.ratios["run"], result.ratios["one by one"], strict=True)
    )
    return (
        f"| {name} | {fmt} | {threads} | {batch} | {t['dense']:.0f} µs | "
        f"{t['one by one']:.0f} µs | {t['run']:.0f} µs | {ratio:.2f} |"
    )


def main() -> None:
    """Parse the arguments and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ffn90,ffn90b4")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f}; cpu: {br.cpu_features()}")
    print("| model | format | threads | batch | dense | one by one | run | run / one by one |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name in args.models.split(","):
            for fmt in FORMATS[name]:
                for batch in [int(b) for b in args.batches.split(",")]:
                    print(row(name, fmt, threads, batch, args.rounds), flush=True)
    print(f"load at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
