"""An ``nn.Sequential``'s ``forward`` that calls runs of its children as one callable each.

Some consecutive children compute faster together than one by one: Linear layers in one
ONNX Runtime graph (:mod:`~nbcompress.engine.quantize.ort_chain`), sparse Linear layers
passing numpy arrays from kernel to kernel (:class:`~nbcompress.kernels.run.SparseRun`).
Every layer stays a child, addressable by name, with its own weights and forward;
``state_dict`` keys are unchanged. :class:`FusedForward`, set as the Sequential's
instance attribute ``forward`` (undo removes it with the rest of its step), calls a run
instead of its children only while they are still the run's steps and none has a hook
(global hooks included), so per-layer tools still see every layer.

A run is any object with ``steps`` (an ``nn.ModuleList`` of the children it stands for,
in order) and ``forward(x)``. :func:`join_runs` installs the sparse ones: after
``sparsify_``/``speedup`` swap layers, a stack such as BERT's FFN (Linear, GELU, Linear; the
GELU folded into the first layer's kernels) is a Sequential of ``SparseLinear`` and
``nn.Identity`` children, and each stretch of them is called as one ``SparseRun``.
:data:`ENV_RUNS` ``=0`` switches that off.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from nbcompress.kernels.modules import SparseLinear
from nbcompress.kernels.run import SparseRun, joinable

__all__ = ["ENV_RUNS", "FusedForward", "add_run", "covered", "fused_forward", "join_runs"]

#: Environment variable switching the sparse runs off (``0``); on by default.
ENV_RUNS = "NBCOMPRESS_SPARSE_RUNS"


class FusedForward:
    """The ``forward`` of an ``nn.Sequential`` whose runs of children are called as one.

    Set as the Sequential's instance attribute ``forward``; ``runs`` maps a run's first
    child index to ``(stop, run)``. A run is called child by child instead whenever a
    child has hooks (global ones included) or is no longer the run's step.
    """

    def __init__(self, seq: nn.Sequential) -> None:
        self.seq = seq
        self.runs: dict[int, tuple[int, Any]] = {}

    def __call__(self, x: Any) -> Any:  # noqa: D102
        children = tuple(self.seq._modules.values())
        hooked = _global_hooks()
        i = 0
        while i < len(children):
            run = self.runs.get(i)
            if run is not None and not hooked and _intact(children[i : run[0]], run[1]):
                # The run's forward, not a module __call__: it is no user-visible module (no
                # hooks), and every Python call between two runs is slow (cold caches).
                x, i = run[1].forward(x), run[0]
            else:
                x, i = children[i](x), i + 1
        return x


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


#: A module's forward hook dicts (any non-empty one: the module has a hook).
_HOOKS = operator.attrgetter("_forward_hooks", "_forward_pre_hooks")


def _intact(children: tuple[Any, ...], run: Any) -> bool:
    """Whether ``children`` are the run's steps, none with a hook.

    C-level iteration (``map``), no Python frame per child: the check runs on every call.
    """
    steps = run.steps._modules.values()
    return (
        len(children) == len(steps)
        and all(map(operator.is_, children, steps))
        and not any(map(any, map(_HOOKS, children)))
    )


def fused_forward(seq: nn.Module) -> FusedForward | None:
    """``seq``'s :class:`FusedForward`, if one is set."""
    forward = seq.__dict__.get("forward")
    return forward if isinstance(forward, FusedForward) else None


def covered(seq: nn.Module) -> set[int]:
    """Indices of ``seq``'s children inside one of its runs."""
    forward = fused_forward(seq)
    if forward is None:
        return set()
    return {i for start, (stop, _) in forward.runs.items() for i in range(start, stop)}


def add_run(
    seq: nn.Sequential, start: int, run: Any, save: Callable[[nn.Module], None] | None = None
) -> None:
    """Call ``run`` for ``seq``'s children from index ``start`` on (as many as its steps).

    Args:
        seq: The Sequential.
        start: Index of the run's first child.
        run: The run (``steps`` and ``forward``).
        save: Called with ``seq`` before its ``forward`` is first set (a history
            transaction's ``save``, so that undo removes it).
    """
    forward = fused_forward(seq)
    if forward is None:
        if save is not None:
            save(seq)
        forward = FusedForward(seq)
        seq.forward = forward
    forward.runs[start] = (start + len(run.steps), run)


def join_runs(model: nn.Module, save: Callable[[nn.Module], None] | None = None) -> int:
    """Call each joinable stretch of sparse children as one ``SparseRun``; how many joined.

    Only in Sequentials of exactly that class (a subclass may have its own ``forward``),
    only over children no other run (an ORT graph) covers; a sparse run whose children
    changed since (an ORT graph took some of them) is dropped and what is left joined anew.

    Args:
        model: The model, its chosen sparse layers installed.
        save: Called with each Sequential before its ``forward`` is first set (the
            history transaction's ``save``, so that undo removes it).
    """
    if os.environ.get(ENV_RUNS, "").strip() == "0":
        return 0
    joined = 0
    for seq in [m for m in model.modules() if type(m) is nn.Sequential]:
        children = tuple(seq._modules.values())
        forward = fused_forward(seq)
        if forward is not None:
            for start, (stop, run) in list(forward.runs.items()):
                steps = tuple(run.steps._modules.values())
                if isinstance(run, SparseRun) and children[start:stop] != steps:
                    del forward.runs[start]  # (a hook is no reason: it may go again)
        taken = covered(seq)
        for start, stop in _stretches(list(children), taken):
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
