"""Consecutive sparse Linear layers run in one call, from kernel to kernel on numpy arrays.

Through the modules, every layer of a sparse stack pays ``Module.__call__``, its input
checks, the pool wake and a tensor↔numpy conversion each way. Those are microseconds
warm, but every kernel streams its weights and evicts the interpreter's code and data
from L2, so between two kernels they cost several times that: BERT-FFN ×2 at 90% in 4 × 1
int8 blocks (4 layers, batch 1, 1 thread) took 152 µs through the modules and 98 µs as
one loop over the same kernels (``benchmarks/bench_runs.py``). :class:`SparseRun` is that
loop: the input is checked once, each layer's product (:func:`~nbcompress.kernels.linear.
linear_array`, the modules' own) reads the previous one's array, and the result becomes
a tensor once. The same kernels run in the same order on the same arrays, so the output
is bit-identical to calling the layers one by one.

A run is installed in an ``nn.Sequential`` by
:func:`~nbcompress.engine.core.runs.add_run`, which calls it only while its layers are
still the Sequential's children and none has a hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nbcompress.kernels import _gomp
from nbcompress.kernels.inputs import checked_tensor
from nbcompress.kernels.linear import linear_array
from nbcompress.kernels.modules import SparseLinear
from nbcompress.kernels.notices import COMPILE_NOTICE
from nbcompress.kernels.threads import get_threads

__all__ = ["SparseRun", "joinable"]


def joinable(steps: Sequence[nn.Module]) -> bool:
    """Whether ``steps`` can run as one :class:`SparseRun`.

    At least two ``SparseLinear`` layers (exactly that class: a subclass may compute
    something else), the first and last steps among them, only ``nn.Identity`` (what a
    folded activation leaves) between them, each layer's input as wide as the previous
    one's output.
    """
    layers = [s for s in steps if type(s) is SparseLinear]
    if len(layers) < 2 or steps[0] is not layers[0] or steps[-1] is not layers[-1]:
        return False
    if any(type(s) not in (SparseLinear, nn.Identity) for s in steps):
        return False
    return all(a.out_features == b.in_features for a, b in zip(layers, layers[1:]))


class SparseRun:
    """``SparseLinear`` layers (and ``nn.Identity`` steps) computed in one call.

    Args:
        steps: The children the run stands for, in order (:func:`joinable`).

    Raises:
        ValueError: If ``steps`` are not :func:`joinable`.
    """

    def __init__(self, steps: Sequence[nn.Module]) -> None:
        if not joinable(steps):
            kinds = [type(s).__name__ for s in steps]
            raise ValueError(
                "steps: expected ≥ 2 chained SparseLinear layers, first and last, with only "
                f"nn.Identity between them; got {kinds}"
            )
        self.steps = nn.ModuleList(steps)
        self.layers = tuple(s for s in steps if type(s) is SparseLinear)

    def forward(self, x: Any) -> Any:
        """The run's output for ``x`` (the steps' output, to the bit)."""
        first = self.layers[0]
        if type(x) is not torch.Tensor or x.ndim == 0 or x.shape[-1] != first.in_features:
            return self.one_by_one(x)  # the first layer says what is wrong
        threads = get_threads()
        if threads > 1:
            # Once, not per layer as the modules do: a launch wakes a worker that parked
            # meanwhile, and a wake per layer measured 3–12% of the run at 2 threads
            # (BERT-FFN ×2, batch 1 and 8, csr and int8 formats).
            _gomp.prewake(threads)
        with COMPILE_NOTICE:  # one line if this call compiles kernels (notices.py)
            x = checked_tensor(type(first).__name__, x)
            a = (x if x.ndim == 2 else x.reshape(-1, first.in_features)).numpy()
            for layer in self.layers:
                a = linear_array(layer, a)
        y = torch.from_numpy(a)
        return y if x.ndim == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    def one_by_one(self, x: Any) -> Any:
        """The steps called in turn, as modules (hooks, checks and all)."""
        for step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return f"SparseRun({len(self.layers)} SparseLinear layers, {len(self.steps)} steps)"
