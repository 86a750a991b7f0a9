"""Four Python threads calling shared sparse modules at once, run as its own process.

``python -m tests.kernels.concurrent_calls`` (from the repository root) with the
environment's default thread settings: the test suite's process has one numba thread
(``tests/conftest.py``), where the pool is never entered, so ``test_threads.py`` runs
this in a subprocess without ``NUMBA_NUM_THREADS`` / ``OMP_NUM_THREADS``. It prints one
JSON line: the thread count the kernels used, the largest error of any concurrent call
against a single-threaded reference, and any exception raised in a thread.
"""

from __future__ import annotations

import copy
import json
import threading

import torch
from torch import nn

from nbcompress.kernels import get_threads, set_threads
from nbcompress.kernels.modules import SparseConv2d, SparseLinear

THREADS = 4
CALLS = 50


def _pruned(module: nn.Module, block: bool = False) -> nn.Module:
    # 70% zeros; with ``block``, in groups of four output rows (4 × 1 blocks).
    with torch.no_grad():
        w = module.weight
        if block:
            keep = torch.rand(w.shape[0] // 4, 1, *w.shape[1:]) < 0.3
            w.mul_(keep.expand(-1, 4, *w.shape[1:]).reshape(w.shape))
        else:
            w.mul_(torch.rand_like(w) < 0.3)
    return module


def _cases() -> list[tuple[str, nn.Module, list[torch.Tensor]]]:
    lin = nn.Linear(300, 128)
    lin_block = _pruned(nn.Linear(300, 128), block=True)
    _pruned(lin)
    linear_inputs = [torch.randn(b, 300) for b in (1, 8, 64, 70)]
    conv = _pruned(nn.Conv2d(8, 16, 3, padding=1))
    conv_block = _pruned(nn.Conv2d(8, 16, 3, padding=1), block=True)
    conv_inputs = [torch.randn(n, 8, h, w) for n, h, w in ((1, 9, 9), (2, 6, 30), (1, 2, 62))]
    return [
        ("linear csr", SparseLinear.from_dense(lin), linear_inputs),
        ("linear csr_int8", SparseLinear.from_dense(lin, format="csr_int8"), linear_inputs),
        ("linear bsr", SparseLinear.from_dense(lin_block, format="bsr"), linear_inputs),
        ("conv csr", SparseConv2d.from_dense(conv), conv_inputs),
        ("conv bsr", SparseConv2d.from_dense(conv_block, format="bsr"), conv_inputs),
    ]


def _references(cases: list) -> list[list[torch.Tensor]]:
    # Copies of the modules on one thread: the concurrent calls measure their own choice.
    set_threads(1)
    try:
        with torch.no_grad():
            return [[copy.deepcopy(m)(x) for x in xs] for _, m, xs in cases]
    finally:
        set_threads(None)


def main() -> None:
    """Run every module from four threads at once, 50 calls each; print the outcome."""
    torch.manual_seed(0)
    cases = _cases()
    refs = _references(cases)
    errors: dict[str, float] = {name: 0.0 for name, _, _ in cases}
    raised: list[str] = []
    start = threading.Barrier(THREADS)

    def work(seed: int) -> None:
        start.wait()
        try:
            with torch.no_grad():
                for call in range(CALLS):
                    i = (seed + call) % len(cases)
                    name, module, inputs = cases[i]
                    j = (seed * 7 + call) % len(inputs)
                    y, ref = module(inputs[j]), refs[i][j]
                    err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                    errors[name] = max(errors[name], err)
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            raised.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work, args=(s,)) for s in range(THREADS)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    print(json.dumps({"threads": get_threads(), "errors": errors, "raised": raised}))


if __name__ == "__main__":
    main()
