"""Sparse int8 (``SparseLinear`` formats) against ONNX Runtime's dense int8 on BERT-FFN ×2.

Every variant runs the same pruned stack (Linear 768→3072, GELU, Linear 3072→768, twice)
on the same input, interleaved in one process (warm-up, then rounds in rotating order,
median per variant): torch eager fp32 (the reference), ONNX Runtime dynamic int8 of the
whole exported model (the dense int8 a user would deploy), and the stack with every Linear
a ``SparseLinear`` of each format asked for, at each thread count asked for (``--threads``;
every runtime on that many threads; as in bench_runtimes, ``OMP_WAIT_POLICY=PASSIVE``
unless set). Prints time, speed-up over torch and over ONNX Runtime, and max relative
output error (max |Δ| / max |ref|) of each. The sparse kernels' choices (on the pool or
on one thread) are raced in the warm-up call, as ``sparsify_`` does ahead of time.

Run under ``flock -x /work/bench.lock`` on a shared machine, e.g.::

    NBCOMPRESS_TUNING=off python benchmarks/bench_int8.py --models ffn90,ffn95,ffn90b4 --threads 1,2
"""

from __future__ import annotations

import os

# Before torch loads its OpenMP runtime, as bench_runtimes (whose models this uses) does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtimes as br  # noqa: E402 - the models and the ORT export live there

from nbcompress.kernels import tuning  # noqa: E402
from nbcompress.kernels.modules import SparseLinear  # noqa: E402

#: Formats per model (4 × 1 blocks also on the block-sparse formats).
FORMATS = {
    "ffn90": ("csr_int8", "csr_int8_dynamic"),
    "ffn95": ("csr_int8", "csr_int8_dynamic"),
    "ffn90b4": ("bsr", "csr_int8_dynamic", "bsr_int8"),
}


def sparse_stack(model: nn.Module, fmt: str) -> nn.Module:
    """A copy of ``model`` with every Linear a ``SparseLinear`` in ``fmt``."""
    out = copy.deepcopy(model)
    for name, layer in list(out.named_children()):
        if isinstance(layer, nn.Linear):
            setattr(out, name, SparseLinear.from_dense(layer, format=fmt))
    return out


def run_model(name: str, batches: list[int], rounds: int, threads: int) -> list[str]:
    """Rows of one model at ``threads``: each batch, each variant."""
    spec = br.MODELS[name]
    model = spec.build()
    onnx = br.Onnx(model, spec, Path(tempfile.mkdtemp()), "legacy")
    stacks = {fmt: sparse_stack(model, fmt) for fmt in FORMATS[name]}
    rows = []
    for batch in batches:
        x = spec.inputs(batch)
        with torch.no_grad():
            ref = model(*x)
            calls = {
                "torch fp32": lambda x=x: model(*x),
                "ORT int8": onnx.build("ORT int8", x, threads).run,
            }
            calls.update({fmt: (lambda s=s, x=x: s(*x)) for fmt, s in stacks.items()})
            with tuning.eager():  # first calls race the kernels' choices now
                errors = {k: br.output_error(f(), ref)[0] for k, f in calls.items()}
            for f in calls.values():  # warm-up
                f()
            times: dict[str, list[float]] = {k: [] for k in calls}
            names = list(calls)
            for r in range(rounds):
                for k in names[r % len(names) :] + names[: r % len(names)]:
                    t = time.perf_counter()
                    calls[k]()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in names:
            rows.append(
                f"| {name} | {threads} | {batch} | {k} | {med[k] * 1e6:.0f} µs | "
                f"{med['torch fp32'] / med[k]:.2f}× | {med['ORT int8'] / med[k]:.2f}× | "
                f"{errors[k]:.1e} |"
            )
    return rows


def main() -> None:
    """Parse the arguments and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ffn90,ffn95,ffn90b4")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", default="1", help="thread counts, e.g. 1,2")
    args = parser.parse_args()
    os.environ.setdefault("NBCOMPRESS_TUNING", "off")
    print(f"load: {os.getloadavg()[0]:.2f}; cpu: {br.cpu_features()}")
    print(
        "| model | threads | batch | runtime | median | vs torch fp32 | vs ORT int8 "
        "| max rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    batches = [int(b) for b in args.batches.split(",")]
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name in args.models.split(","):
            for row in run_model(name, batches, args.rounds, threads):
                print(row, flush=True)


if __name__ == "__main__":
    main()
