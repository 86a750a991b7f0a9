"""One thread for small inputs of an ORT graph, where measured faster than torch's count.

An ORT session with several intra-op threads and no spinning (``ort_int8.ALLOW_SPINNING``:
spinning workers would slow torch and every other runtime between calls) wakes its workers
for every parallel node. On a graph of many small nodes at a small input that costs more
than the second core gives: measured here on MiniLM as one graph (2 threads, batch 1,
load ~1.4) the 2-thread session took 4,550 µs and the 1-thread session 4,061 µs; at
batch 8 the 2-thread one won (26.9 against 29.2 ms). :func:`settle_threads` races the two
on the input the graph was installed for and, where one thread is faster by more than
:data:`MARGIN`, has inputs up to that size run on one thread
(``OrtModule.one_thread_upto``); larger inputs keep torch's thread count.

Used for whole blocks (``ort_fuse``: hundreds of small nodes), not for ``ort_chain``'s
runs of a few large MatMuls: there the race at install misjudged. On BERT-FFN ×2 (2
threads, batch 1) it found one thread 1.20× faster, but in use, between other runtimes
that evict the weights from cache, one thread took 893–953 µs against 741–754 µs for two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nbcompress.engine.quantize.ort_int8 import OrtModule
from nbcompress.timing import race

__all__ = ["MARGIN", "settle_threads"]

#: One thread must be at least this much faster (median paired ratio) to be chosen.
MARGIN = 1.05


def settle_threads(graph: OrtModule, call: Callable[[], Any], size: int, repeats: int) -> float:
    """Run inputs of up to ``size`` elements on one thread where that races faster.

    Args:
        graph: The installed graph (its ``one_thread_upto`` is set here).
        call: Runs the graph on the captured input (as the model calls it).
        size: The captured input's element count (what ``one_thread_upto`` compares).
        repeats: Rounds of the race (at least 6).

    Returns:
        The measured speed-up of one thread (> 1: chosen), or 0.0 when nothing was raced
        (torch runs on one thread already).
    """
    if torch.get_num_threads() <= 1:
        return 0.0

    def at(limit: int) -> Callable[[], Any]:
        def run() -> Any:
            graph.one_thread_upto = limit
            return call()

        return run

    try:
        with torch.inference_mode():
            timed = race({"threads": at(0), "one": at(size)}, rounds=max(repeats, 6), warmup=1)
    finally:
        graph.one_thread_upto = 0
    gain = 1 / timed.ratio("one")
    if gain > MARGIN:
        graph.one_thread_upto = int(size)
    return gain
