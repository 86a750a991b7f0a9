"""A background warm-up while four Python threads call a SparseLinear, run as its own process.

``python -m tests.kernels.warmup_while_calling`` (from the repository root), with the
environment's default thread settings, as ``concurrent_calls``: the warm-up's daemon
thread compiles or loads every common kernel (serial and parallel builds) while four
threads make first calls of their own. Prints one JSON line: the largest error against a
reference computed beforehand, any exception raised in a thread, the warm-up's outcome,
and the process's stdout lines from nbcompress (the warm-up itself must print none).
"""

from __future__ import annotations

import contextlib
import io
import json
import threading

import torch
from torch import nn

from nbcompress.kernels import get_threads, warmup
from nbcompress.kernels.modules import SparseLinear

THREADS = 4
CALLS = 30


def main() -> None:
    """Start the warm-up, call one SparseLinear from four threads at once; print the outcome."""
    torch.manual_seed(0)
    lin = nn.Linear(768, 256)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
    inputs = [torch.randn(b, 768) for b in (1, 8, 64, 100)] + [torch.randn(2, 37, 768)]
    with torch.no_grad():
        refs = [lin(x) for x in inputs]  # dense torch: no kernel runs before the warm-up
    sparse = SparseLinear.from_dense(lin)
    errors: list[float] = []
    raised: list[str] = []
    start = threading.Barrier(THREADS + 1)

    def work(seed: int) -> None:
        start.wait()
        try:
            with torch.no_grad():
                for call in range(CALLS):
                    j = (seed + call) % len(inputs)
                    y, ref = sparse(inputs[j]), refs[j]
                    errors.append(float((y - ref).abs().max() / ref.abs().max()))
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            raised.append(f"{type(exc).__name__}: {exc}")

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        workers = [threading.Thread(target=work, args=(s,)) for s in range(THREADS)]
        for t in workers:
            t.start()
        result = warmup(background=True)
        start.wait()
        for t in workers:
            t.join()
        finished = result.wait(timeout=900)
    outcome = {
        "threads": get_threads(),
        "max_error": max(errors),
        "calls": len(errors),
        "raised": raised,
        "warmup": {"finished": finished, "error": result.error, "kernels": result.kernels},
        "printed": [line for line in printed.getvalue().splitlines() if line],
    }
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
