"""The search space: the searched layers, their weight counts and the budget projection."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.layers import prunable_weights, select_layers
from nbcompress.engine.prune.prune import DEFAULT_TYPES
from nbcompress.engine.prune.targets import split_multi

__all__ = [
    "MAX_RATIO",
    "MIN_KEEP",
    "PARAMETERISATION",
    "Space",
    "front_seeds",
    "project",
    "suggest_ratios",
]

#: Every layer keeps at least this share of its weights (so a ratio is at most 0.99).
MIN_KEEP = 0.01
MAX_RATIO = 1.0 - MIN_KEEP

#: How trial parameters map to ratios (see :func:`suggest_ratios`). It belongs in a study's
#: config signature: a stored study made with another mapping holds parameters of other
#: distributions under the same names, and must not be resumed with this one.
PARAMETERISATION = "keep-log"


@dataclass(frozen=True)
class Space:
    """The layers a search allocates ratios to, with their prunable weight counts."""

    names: tuple[str, ...]
    counts: tuple[int, ...]
    shapes: tuple[tuple[tuple[int, ...], ...], ...]

    @classmethod
    def of(cls, model: nn.Module, layers: str | Sequence[str] | None, granularity: str) -> Space:
        """The layers ``prune_`` would select (output layer left alone)."""
        selected, _ = select_layers(model, layers, DEFAULT_TYPES)
        selected, _ = split_multi(
            selected, keep_masks=False, granularity=granularity, explicit=False
        )
        weights = {n: prunable_weights(m) for n, m in selected.items()}
        weights = {n: w for n, w in weights.items() if w}
        if not weights:
            raise ValueError(
                "layers: no selected layer has a weight to prune; select Linear or Conv layers."
            )
        return cls(
            names=tuple(weights),
            counts=tuple(sum(t.numel() for t in w.values()) for w in weights.values()),
            shapes=tuple(tuple(tuple(t.shape) for t in w.values()) for w in weights.values()),
        )

    def reachable(self, granularity: str) -> float:
        """The highest overall sparsity ratios can give: every layer keeps one unit.

        A unit is a weight (``MIN_KEEP`` of it, in fact), an output channel or a 4×1 block.
        """
        if granularity == "element":
            return MAX_RATIO
        kept = 0.0
        for count, shapes in zip(self.counts, self.shapes):
            rows = shapes[0][0]
            units = rows if granularity == "channel" else max(1, count // 4)
            kept += max(count / units, MIN_KEEP * count)
        return 1.0 - kept / sum(self.counts)

    def signature(self) -> str:
        """A short hash of the layer names and shapes, naming the model in a storage."""
        text = json.dumps([self.names, self.shapes])
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def sparsity(self, ratios: Sequence[float]) -> float:
        """Share of the searched weights that the ratios zero (weighted by weight count)."""
        return sum(r * n for r, n in zip(ratios, self.counts)) / sum(self.counts)

    def global_l1(self, model: nn.Module, target: float) -> list[float]:
        """Per-layer ratios of one magnitude threshold across the layers, at ``target``."""
        with torch.no_grad():
            mags = [
                torch.cat([t.detach().abs().flatten().float().cpu() for t in w.values()])
                for w in (prunable_weights(model.get_submodule(n)) for n in self.names)
            ]
            owner = torch.cat([torch.full((len(m),), i) for i, m in enumerate(mags)])
            order = torch.argsort(torch.cat(mags), stable=True)
            pruned = owner[order[: round(target * len(order))]]
            counts = torch.bincount(pruned, minlength=len(mags)).tolist()
        return [min(c / n, MAX_RATIO) for c, n in zip(counts, self.counts)]


def suggest_ratios(trial: Any, space: Space, target: float | None) -> list[float]:
    """A trial's per-layer ratios, asked of an optuna trial.

    With a target: one score per layer in [0.01, 1], projected onto the budget. Without
    one: the share each layer keeps, on a log scale over [0.01, 1] (ratio = 1 - keep).
    Uniform ratios put most trials near half sparsity, where every allocation is nearly
    as good as dense; on a log scale of what is kept, trials spread out where the front
    bends (90% and above). Measured with :func:`front_seeds` as the first generation
    (``benchmarks/sweep_nsga_front.py``): alone, the log scale lost on the held-out CNN
    (a tiny first conv is often pruned hard); together they lift a 60-trial NSGA-II front
    from 0.93 to 0.99 of a 300-trial reference on LeNet-300-100 and from 0.92 to 0.969 on
    the CNN (``benchmarks/bench_search_front.py``).
    """
    if target is None:
        return [1.0 - trial.suggest_float(n, MIN_KEEP, 1.0, log=True) for n in space.names]
    scores = [trial.suggest_float(n, MIN_KEEP, 1.0) for n in space.names]
    return project(scores, space.counts, target)


def front_seeds(model: nn.Module, space: Space, n: int, *, low: float = 0.3,
                high: float = 0.97) -> list[dict[str, float]]:  # fmt: skip
    """``n`` allocations spread over sparsities ``low``…``high``, to start a front.

    Global-L1 and uniform allocations at evenly spaced sparsities, alternating (global L1
    first), as trial parameters without a target (the share each layer keeps, see
    :func:`suggest_ratios`), ready for ``study.enqueue_trial``: a front search enqueues
    one NSGA-II population of them, so that its first generation already spans the front.

    Returns:
        One ``{layer name: keep}`` per allocation, in order of increasing sparsity.
    """
    steps = [low + (high - low) * i / max(n - 1, 1) for i in range(n)]
    seeds = []
    for i, target in enumerate(steps):
        ratios = space.global_l1(model, target) if i % 2 == 0 else [target] * len(space.names)
        seeds.append({name: max(1.0 - r, MIN_KEEP) for name, r in zip(space.names, ratios)})
    return seeds


def project(scores: Sequence[float], counts: Sequence[int], target: float) -> list[float]:
    """Per-layer ratios whose weighted sparsity is exactly ``target``.

    ``keep_i = clip(c * s_i, MIN_KEEP, 1)`` with ``c`` found by bisection, so that the kept
    weights add up to ``(1 - target)`` of the total: every proposal meets the budget.

    Args:
        scores: One positive score per layer (a larger score keeps more of the layer).
        counts: Weight count of each layer.
        target: Overall sparsity in (0, ``MAX_RATIO``].

    Returns:
        The ratio (1 - keep) of each layer.
    """
    total = sum(counts)
    want = (1.0 - target) * total

    def kept(c: float) -> float:
        return sum(min(max(c * s, MIN_KEEP), 1.0) * n for s, n in zip(scores, counts))

    lo, hi = 0.0, 1.0
    while kept(hi) < want and hi < 1e12:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if kept(mid) < want:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    c = (lo + hi) / 2.0
    return [1.0 - min(max(c * s, MIN_KEEP), 1.0) for s in scores]
