"""Join consecutive swapped sparse Linear layers of each ``nn.Sequential`` into one run.

After ``sparsify_``/``speedup`` swap layers, a stack such as BERT's FFN (Linear, GELU,
Linear; the GELU folded into the first layer's kernels) is a Sequential of
``SparseLinear`` and ``nn.Identity`` children. Each stretch of them is then called as one
:class:`~nbcompress.kernels.run.SparseRun` (no per-layer module glue; the same kernels,
the same bits) through the Sequential's
:class:`~nbcompress.engine.core.runs.FusedForward`. This is done on the twin whose
end-to-end race gives the verdict as well as on the model at install, so the figure
shown is the one of what is installed. :data:`ENV_RUNS` ``=0`` switches it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import nn

from nbcompress.engine.core.runs import add_run, covered
from nbcompress.kernels.modules import SparseLinear
from nbcompress.kernels.run import SparseRun, joinable

__all__ = ["ENV_RUNS", "join_runs"]

#: Environment variable switching the runs off (``0``); on by default.
ENV_RUNS = "NBCOMPRESS_SPARSE_RUNS"


def join_runs(model: nn.Module, save: Callable[[nn.Module], None] | None = None) -> int:
    """Install a :class:`SparseRun` for each joinable stretch of children; how many.

    Only in Sequentials of exactly that class (a subclass may have its own ``forward``)
    and only over children no other run (an ORT graph) covers already.

    Args:
        model: The model, its chosen sparse layers installed.
        save: Called with each Sequential before its ``forward`` is first set (the
            history transaction's ``save``, so that undo removes it).
    """
    if os.environ.get(ENV_RUNS, "").strip() == "0":
        return 0
    joined = 0
    for seq in [m for m in model.modules() if type(m) is nn.Sequential]:
        children = list(seq._modules.values())
        taken = covered(seq)
        for start, stop in _stretches(children, taken):
            add_run(seq, start, SparseRun(children[start:stop]), save)
            joined += 1
    return joined


def _stretches(children: list[nn.Module], taken: set[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each longest joinable stretch of ``children`` outside ``taken``."""
    found, i = [], 0
    while i < len(children):
        stop = i
        while stop < len(children) and stop not in taken and _member(children[stop]):
            stop += 1
        # The longest joinable prefix of children[i:stop] (trailing Identities stay out).
        best = next((j for j in range(stop, i + 1, -1) if joinable(children[i:j])), None)
        if best is None:
            i += 1
        else:
            found.append((i, best))
            i = best
    return found


def _member(module: nn.Module) -> bool:
    return type(module) in (SparseLinear, nn.Identity)
