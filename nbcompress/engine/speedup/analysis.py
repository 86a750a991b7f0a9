"""What ``sparsify_`` and ``speedup`` measure and decide: options, per-layer and model results.

Plain data, shared by :mod:`.sparsify` (which fills it) and :mod:`.speedup` (which reports it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.speedup.coverage import Uncovered
from nbcompress.kernels.tuning import Entry
from nbcompress.timing import Race, Timing

__all__ = [
    "ATOL",
    "RTOL",
    "Analysis",
    "LayerResult",
    "SparsifyOptions",
    "is_int8",
    "rtol",
    "tolerance",
]

#: Stated output tolerance per path, relative to the largest dense output magnitude:
#: float32 kernels differ from dense only by summation order; int8 also by rounding
#: (sparse or dense: torch's and ONNX Runtime's dynamic int8 twins of a Linear).
RTOL = {
    "csr": 1e-4,
    "bsr": 1e-4,
    "csr_int8": 2e-2,
    "torch_int8": 2e-2,
    "ort_int8": 2e-2,
}
ATOL = 1e-5


def is_int8(path: str) -> bool:
    """Whether path ``path`` computes with int8 values (chosen only with ``allow_int8``)."""
    return "int8" in path


def rtol(path: str) -> float:
    """The relative tolerance of ``path``: :data:`RTOL`, else that of its kind.

    A sparse format registered later (``kernels.modules.FORMATS``) joins the race without
    an entry here: it gets the int8 or the float32 tolerance by its name.
    """
    return RTOL.get(path, RTOL["csr_int8"] if is_int8(path) else RTOL["csr"])


def tolerance(fmt: str, reference: torch.Tensor | float) -> float:
    """The stated output tolerance of path ``fmt`` around the dense output ``reference``.

    Args:
        fmt: The path (a sparse format or a dense int8 twin; see :func:`rtol`).
        reference: The dense output, or its largest magnitude (``OutputDifference.peak``).
    """
    if isinstance(reference, torch.Tensor):
        reference = float(reference.abs().max()) if reference.numel() else 0.0
    return rtol(fmt) * reference + ATOL


@dataclass(frozen=True)
class SparsifyOptions:
    """What ``analyse``, ``sparsify_`` and ``speedup`` consider, and how they decide.

    Attributes:
        layers: Glob pattern(s) on qualified layer names; ``None`` = all eligible.
        types: Layer types to list (default every Linear / Conv type); only Linear and
            Conv2d have sparse kernels, the others are listed with why they stay dense.
        allow_int8: Also consider int8 values (changes results by rounding; off by default):
            sparse int8 formats and the dense int8 twins of a Linear (torch's and ONNX
            Runtime's dynamic int8).
        allow_bsr: Consider block-sparse storage when weights come in 4-row blocks.
        repeats: Timed rounds of the race between dense and the sparse candidates.
        min_gain: Required relative speed-up, e.g. 0.05 = 5% faster than dense.
        remeasure: Race every layer even if its decision is in the tuning record (and
            record the new one in its place); ``speedup`` always does.
    """

    layers: str | Sequence[str] | None = None
    types: Any = None
    allow_int8: bool = False
    allow_bsr: bool = True
    repeats: int = 15
    min_gain: float = 0.05
    remeasure: bool = False

    def __post_init__(self) -> None:
        repeats = self.repeats
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 3:
            raise ValueError(f"repeats: expected an integer ≥ 3, got {repeats!r}.")
        gain = self.min_gain
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 <= gain < 10:
            raise ValueError(
                f"min_gain: expected a relative speed-up ≥ 0 such as 0.05 (5% faster than "
                f"dense), got {gain!r}."
            )

    @classmethod
    def of(cls, options: SparsifyOptions | None = None, **overrides: Any) -> SparsifyOptions:
        """``options`` (default: the defaults) with keyword ``overrides``; names checked."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(
                f"{unknown[0]}: not an option of sparsify_/speedup; the options are "
                f"{', '.join(names)}."
            )
        return dataclasses.replace(options or cls(), **overrides)

    def allows(self, path: str) -> bool:
        """Whether the choice may take ``path`` (an int8 one only with ``allow_int8``)."""
        return self.allow_int8 or not is_int8(path)


@dataclass
class LayerResult:
    """What was measured for one layer and what was chosen.

    Attributes:
        name: Qualified layer name.
        module: The dense layer.
        input_shape: Shape of its input in the example run.
        sparsity: Fraction of exactly-zero weights.
        times: Path → measured timing (``dense``, the sparse formats, ``torch_int8``,
            ``ort_int8``).
        errors: Path → max |sparse − dense| output difference.
        tolerances: Path → the tolerance that difference must stay within.
        chosen: ``"dense"``, the chosen sparse format or dense int8 twin.
        reason: Why it was chosen (or why the layer stays dense).
        break_even: Estimated sparsity at which the sparse fp32 kernel matches dense.
        candidates: Path → built module (sparse, or a dense int8 twin).
        sure: Path → 25th percentile of its per-round speed-up over dense.
        race: The race of the paths (dense the incumbent), or ``None`` if not timed.
        allowed: The paths the choice could take (int8 ones only when allowed).
        dropped: Chosen here, then left dense because the whole model was not faster.
        key: Its key in the tuning record (``None``: not timed).
        recorded: The decision reused from the tuning record (``None``: measured now);
            then only the chosen path was built and its output checked, nothing timed.
        others: Input shape → the chosen path's speed-up over dense on the layer's input
            from each of ``other_inputs`` (one per shape bucket; see :mod:`.shapes`).
        fused: Set at install when the layer runs inside one ONNX Runtime int8 graph
            with its neighbours (:mod:`.fused`): that run's note.
    """

    name: str
    module: nn.Module
    input_shape: tuple = ()
    sparsity: float = 0.0
    times: dict[str, Timing] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    chosen: str = "dense"
    reason: str = ""
    break_even: float | None = None
    candidates: dict[str, nn.Module] = field(default_factory=dict)
    sure: dict[str, float] = field(default_factory=dict)
    race: Race | None = None
    allowed: tuple[str, ...] = ()
    dropped: bool = False
    key: tuple | None = None
    recorded: Entry | None = None
    others: dict[tuple, float] = field(default_factory=dict)
    fused: str = ""

    def within(self, path: str) -> bool:
        """Whether ``path``'s output was checked and found within its tolerance."""
        return self.errors.get(path, float("inf")) <= self.tolerances.get(path, 0.0)

    @property
    def accurate(self) -> list[str]:
        """The allowed paths whose output is within tolerance (the choice's candidates)."""
        return [p for p in self.allowed if self.within(p)]

    @property
    def replacement(self) -> nn.Module | None:
        """The sparse module to install, or ``None`` to keep the dense layer."""
        return self.candidates.get(self.chosen)


@dataclass
class Analysis:
    """Per-layer results plus the end-to-end comparison of dense vs compressed.

    Attributes:
        layers: One result per selected layer.
        dense: End-to-end time of the dense model.
        compressed: End-to-end time with the chosen sparse layers.
        max_abs_diff: Largest end-to-end output difference, compressed vs dense.
        tolerance: The stated tolerance that difference is checked against.
        verdict: One line: what is converted, and the end-to-end gain.
        warnings: Backend warning (first line) → count, shown once in reports.
        sure: 25th percentile of the per-round end-to-end speed-up.
        race: The end-to-end race, ``dense`` (incumbent) vs ``compressed``.
        uncovered: Parameters outside the listed layers, by kind, with why.
        total_params: The model's parameter count (shared tensors once).
        recorded: The end-to-end verdict reused from the tuning record (``"faster"`` or
            ``"not faster"``, margin = gain − 1); then ``dense``/``compressed`` are ``None``.
        fused: At install: one line per run of Linears made one ONNX Runtime int8 graph
            (:mod:`.fused`), with its gain over the run as chosen per layer.
    """

    layers: list[LayerResult]
    dense: Timing | None = None
    compressed: Timing | None = None
    max_abs_diff: float = 0.0
    tolerance: float = 0.0
    verdict: str = ""
    warnings: dict[str, int] = field(default_factory=dict)
    sure: float = 0.0
    race: Race | None = None
    uncovered: list[Uncovered] = field(default_factory=list)
    total_params: int = 0
    recorded: Entry | None = None
    fused: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> dict[str, LayerResult]:
        """Layers that get a sparse module."""
        return {r.name: r for r in self.layers if r.replacement is not None}
