"""Sparse modules under concurrent Python threads, per numba threading layer.

Each layer runs in its own process (the layer is fixed at the first parallel launch),
with torch imported before nbcompress, as in a notebook (so ``OMP_WAIT_POLICY`` set by
nbcompress no longer reaches torch's OpenMP runtime). Rounds alternate the layers so
that load from other processes falls on all of them alike.

    python benchmarks/bench_threads.py                  # workqueue and omp, 3 rounds
    python benchmarks/bench_threads.py --tbb-lib DIR    # also tbb (DIR holds libtbb.so.12)
    python benchmarks/bench_threads.py --ffn            # where a model call's time goes

``--ffn``: BERT-FFN ×2 at 90% after ``sparsify_`` (bench_runtimes' "ffn90"), batch 8 and 64,
1 and 2 threads, one process per OpenMP wait policy of torch (libgomp's default, which
spins a few ms after each region, and ``PASSIVE``, which sleeps at once, as
bench_runtimes sets it): per model call the median total, the time inside the parallel
launches (the kernels on several threads), in serial kernel calls, in torch's GELU, and
the rest (Python glue: checks, packing, dispatch). Each call follows a call of the dense
model, as in bench_runtimes' interleaved rounds. Each configuration twice: as
``sparsify_`` left it, and with each GELU fused into the layer before it
(``fuse_activation_``, the GELU replaced by ``nn.Identity``).

Per layer: the median time of one call from a single caller (batch 1 and 64 on a
3072 × 768 Linear at 90% zeros, a 64-channel 3 × 3 conv at 70% on 28 × 28), and the
wall time of 4 Python threads × 50 calls of the batch-64 Linear at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child() -> None:
    """Measure in this process (its layer comes from NUMBA_THREADING_LAYER)."""
    import threading
    import warnings

    import torch  # first, as in a notebook
    from torch import nn

    sys.path.insert(0, str(ROOT))
    import numba

    from nbcompress.kernels.modules import SparseConv2d, SparseLinear

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    lin = nn.Linear(768, 3072)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    sl, sc = SparseLinear.from_dense(lin), SparseConv2d.from_dense(conv)
    x1, x64, img = torch.randn(1, 768), torch.randn(64, 768), torch.randn(1, 64, 28, 28)
    out: dict[str, float | str] = {}
    with torch.no_grad():
        for name, module, x in (("b1", sl, x1), ("b64", sl, x64), ("conv", sc, img)):
            for _ in range(3):
                module(x)  # the measured choice, compile or disk-cache load
            times = []
            for _ in range(200 if name == "b1" else 40):
                start = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - start)
            out[name] = statistics.median(times) * 1e6

        def work() -> None:
            for _ in range(50):
                sl(x64)

        workers = [threading.Thread(target=work) for _ in range(4)]
        start = time.perf_counter()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        out["4x50"] = (time.perf_counter() - start) * 1e3
    out["layer"] = numba.threading_layer()
    print(json.dumps(out))


def ffn_child() -> None:
    """Measure where ffn90's model call spends its time in this process (--ffn)."""
    import copy
    import warnings

    import torch  # first, as in a notebook

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_runtimes import ffn_stack

    import nbcompress as nc
    from nbcompress.kernels import _gomp, registry

    warnings.filterwarnings("ignore")
    spent: dict[str, float] = {}

    def timed(owner: object, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: object) -> object:
            start = time.perf_counter()
            try:
                return inner(*args)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    def _gelu_start(*_: object) -> None:
        spent["gelu_start"] = time.perf_counter()

    def _gelu_end(*_: object) -> None:
        spent["gelu"] = spent.get("gelu", 0.0) + time.perf_counter() - spent["gelu_start"]

    timed(_gomp, "launch", "parallel")
    timed(registry, "_invoke", "serial")
    dense = ffn_stack(0.9)
    rows = []
    for batch in (8, 64):
        x = torch.randn(batch, 768)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = copy.deepcopy(dense)
            with torch.no_grad():
                nc.sparsify_(model, x)
            for layer in model:
                if isinstance(layer, torch.nn.GELU):  # time torch's op inside the call
                    layer.register_forward_pre_hook(_gelu_start)
                    layer.register_forward_hook(_gelu_end)
            for fused in (False, True):
                if fused:
                    _fuse(model)
                calls: list[dict[str, float]] = []
                with torch.no_grad():
                    for _ in range(60):
                        dense(x)
                        spent.clear()
                        start = time.perf_counter()
                        model(x)
                        spent["total"] = time.perf_counter() - start
                        calls.append(dict(spent))
                keys = {k for c in calls for k in c}
                med = {k: statistics.median(c.get(k, 0.0) for c in calls) * 1e6 for k in keys}
                med.pop("gelu_start", None)
                for k in ("parallel", "serial", "gelu"):
                    med.setdefault(k, 0.0)
                med["rest"] = med["total"] - med["parallel"] - med["serial"] - med["gelu"]
                rows.append({"batch": batch, "threads": threads, "fused": fused, **med})
    print(json.dumps(rows))


def _fuse(model: object) -> None:
    """Fuse each GELU of ``model`` (an nn.Sequential) into the sparse layer before it."""
    from torch import nn

    layers = list(model)
    for i in range(1, len(layers)):
        fuse = getattr(layers[i - 1], "fuse_activation_", None)
        if fuse is not None and fuse(layers[i]):
            model[i] = nn.Identity()


def ffn_main() -> None:
    """One child per wait policy of torch's OpenMP workers; print where the time goes."""
    print(f"load average {os.getloadavg()[0]:.2f}; medians of 60 calls, each after a dense call")
    print(
        "| torch's workers | GELU | batch | threads | call (µs) | parallel | serial kernels | "
        "2 × GELU | rest (glue) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for policy in ("", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
        env.pop("OMP_WAIT_POLICY", None)
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        env.setdefault("NBCOMPRESS_TUNING", "off")
        done = subprocess.run(
            [sys.executable, __file__, "--ffn-child"], env=env, capture_output=True, text=True
        )
        if done.returncode:
            print(f"{policy or 'default'}: exit {done.returncode}: {done.stderr[-300:]}")
            continue
        for r in json.loads(done.stdout.strip().splitlines()[-1]):
            cells = [f"{r[k]:.0f}" for k in ("total", "parallel", "serial", "gelu", "rest")]
            name = "sleep (PASSIVE)" if policy else "spin (default)"
            gelu = "fused" if r["fused"] else "torch"
            cells = [name, gelu, str(r["batch"]), str(r["threads"]), *cells]
            print("| " + " | ".join(cells) + " |")


def main() -> None:
    """Alternate child processes per layer; print a table of medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tbb-lib", help="directory holding libtbb.so.12 (pip install tbb)")
    args = parser.parse_args()
    layers = ["workqueue", "omp"] + (["tbb"] if args.tbb_lib else [])
    runs: dict[str, list[dict]] = {layer: [] for layer in layers}
    for _ in range(args.rounds):
        for layer in layers:
            env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
            env.pop("OMP_WAIT_POLICY", None)
            env["NUMBA_THREADING_LAYER"] = layer
            if layer == "tbb":
                env["LD_LIBRARY_PATH"] = args.tbb_lib
            done = subprocess.run(
                [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True
            )
            if done.returncode:
                print(f"{layer}: exit {done.returncode}: {done.stderr[-300:]}")
                continue
            runs[layer].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"load average {os.getloadavg()[0]:.2f}; medians of {args.rounds} processes")
    print("| layer | batch 1 (µs) | batch 64 (µs) | conv 28×28 (µs) | 4 threads × 50 b64 (ms) |")
    print("|---|---|---|---|---|")
    for rows in runs.values():
        if rows:
            cells = [
                f"{statistics.median(r[k] for r in rows):.0f}"
                for k in ("b1", "b64", "conv", "4x50")
            ]
            print(f"| {rows[0]['layer']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    elif "--ffn-child" in sys.argv:
        ffn_child()
    elif "--ffn" in sys.argv:
        ffn_main()
    else:
        main()
