"""L1 sensitivity sweep: how much each layer's metric drops when only it is pruned.

(First version: API contract only; the implementation follows.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "ApplyReport",
    "SensitivityResult",
    "Suggestion",
    "apply_suggestion_",
    "latest",
    "latest_suggestion",
    "sensitivity",
]


@dataclass
class Suggestion:
    """Per-layer pruning ratios chosen from sensitivity curves."""

    ratios: dict[str, float]
    predicted: float
    sparsity: float
    removed: int
    objective: str
    target: str


@dataclass
class ApplyReport:
    """What :func:`apply_suggestion_` did: predicted vs measured metric."""

    suggestion: Suggestion
    predicted: float
    measured: float | None
    baseline: float
    metric: str


@dataclass
class SensitivityResult:
    """Metric per layer and pruning ratio, from :func:`sensitivity`."""

    layers: list[str]
    ratios: list[float]
    baseline: float
    curves: dict[str, list[float | None]]
    sizes: dict[str, int]
    macs: dict[str, int | None]
    metric: str
    higher_is_better: bool
    proxy: bool
    granularity: str
    evaluations: int
    seconds: float
    complete: bool
    notes: list[str] = field(default_factory=list)

    def suggest(
        self,
        target_sparsity: float | None = None,
        *,
        max_drop: float | None = None,
        objective: str = "params",
    ) -> Suggestion:
        """Per-layer ratios for a sparsity target or a maximum metric drop."""
        raise NotImplementedError

    def predict(self, ratios: dict[str, float]) -> float:
        """Metric predicted from the curves for per-layer ``ratios``."""
        raise NotImplementedError

    def sparsity_of(self, ratios: dict[str, float]) -> float:
        """Overall fraction of weights removed over the analysed layers."""
        raise NotImplementedError

    def plot(self, kind: str = "auto") -> Any:
        """Matplotlib figure of the curves ("curves", "heatmap" or "auto")."""
        raise NotImplementedError

    def save(self, path: Any) -> None:
        """Write the result as JSON."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: Any) -> SensitivityResult:
        """Read a result written by :meth:`save`."""
        raise NotImplementedError


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float] | None = None,
    *,
    ratios: Sequence[float] | None = None,
    layers: str | Sequence[str] | None = None,
    types: Any = None,
    granularity: str = "element",
    example_inputs: Any = None,
    higher_is_better: bool = True,
    metric: str | None = None,
    max_layers: int | None = None,
    early_stop: float | None = None,
    progress: bool = True,
    callback: Callable[[SensitivityResult, str, float], None] | None = None,
) -> SensitivityResult:
    """Prune each layer alone at each ratio, evaluate, restore."""
    raise NotImplementedError


def latest(model: nn.Module) -> SensitivityResult | None:
    """The most recent sensitivity result of ``model``."""
    raise NotImplementedError


def latest_suggestion(model: nn.Module) -> Suggestion | None:
    """The most recent suggestion made for ``model``."""
    raise NotImplementedError


def apply_suggestion_(
    model: nn.Module,
    suggestion: Suggestion | None = None,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    example_inputs: Any = None,
) -> ApplyReport:
    """Prune ``model`` in place with a suggestion's per-layer ratios."""
    raise NotImplementedError
