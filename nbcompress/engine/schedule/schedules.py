"""Sparsity schedules for gradual pruning, with the semantics of TF-MOT's schedules.

A schedule is a pure function of the training step: ``schedule(step)`` returns
``(should_prune, sparsity)`` like ``tfmot.sparsity.keras.PruningSchedule.__call__``. Masks are
updated only at steps where ``should_prune`` is true: every ``frequency`` steps from
``begin_step`` up to ``end_step`` (TF-MOT's ``_should_prune_in_step``). One deliberate
difference: when ``end_step - begin_step`` is not a multiple of ``frequency``, TF-MOT never
updates at ``end_step`` and so never applies the final sparsity; here ``end_step`` is an
update step too, so the final sparsity is always reached there. On the usual grid
(``end_step - begin_step`` a multiple of ``frequency``) the two are identical.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["ConstantSparsity", "PolynomialDecay", "should_prune_in_step"]


def _int(name: str, value: Any, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer step count, got {value!r}; {fix}.")
    if value < low:
        raise ValueError(f"{name}: must be at least {low}, got {value}; {fix}.")
    return int(value)


def _sparsity(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a fraction in [0, 1) such as 0.9, got {value!r}.")
    if not (0.0 <= float(value) < 1.0) or math.isnan(float(value)):
        raise ValueError(
            f"{name}: {value!r} is outside [0, 1); give the fraction of weights that are zero, "
            "e.g. 0.9 for 90% (1.0 would remove every weight)."
        )
    return float(value)


def _check_steps(begin_step: Any, end_step: Any, frequency: Any, forever: bool) -> None:
    _int("begin_step", begin_step, 0, "the first step is 0")
    _int("frequency", frequency, 1, "use e.g. frequency=100 (update the masks every 100 steps)")
    if forever and end_step == -1:
        return
    _int("end_step", end_step, 0, "give the step where pruning ends" + (
        ", or -1 to never end" if forever else ""))  # fmt: skip
    if end_step <= begin_step:
        raise ValueError(
            f"end_step: {end_step} is not after begin_step={begin_step}; pass an end_step "
            f"greater than begin_step (e.g. end_step={begin_step + 1000})."
        )


def should_prune_in_step(step: int, begin_step: int, end_step: int, frequency: int) -> bool:
    """Whether masks are updated at ``step``: every ``frequency`` steps in [begin, end].

    ``end_step=-1`` means pruning never ends (TF-MOT's convention).
    """
    if step < begin_step or (end_step >= 0 and step > end_step):
        return False
    return (step - begin_step) % frequency == 0 or step == end_step


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step: expected an integer training step, got {step!r}.")
    return int(step)


@dataclass(frozen=True)
class PolynomialDecay:
    """Sparsity rising from ``initial_sparsity`` to ``final_sparsity`` (Zhu & Gupta, 2017).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin)) ** power``, with ``t``
    clamped to [begin, end]: flat at ``initial_sparsity`` before ``begin_step`` and at
    ``final_sparsity`` after ``end_step``. Masks are updated every ``frequency`` steps from
    ``begin_step`` and at ``end_step``.

    Attributes:
        initial_sparsity: Sparsity at ``begin_step``, in [0, 1).
        final_sparsity: Sparsity at and after ``end_step``, in [0, 1).
        begin_step: First update step (>= 0).
        end_step: Step where ``final_sparsity`` is reached (> ``begin_step``).
        power: Exponent of the decay (> 0; 3 as in TF-MOT and the paper).
        frequency: Steps between mask updates (>= 1).
    """

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    power: float = 3
    frequency: int = 100

    def __post_init__(self) -> None:
        _sparsity("initial_sparsity", self.initial_sparsity)
        _sparsity("final_sparsity", self.final_sparsity)
        _check_steps(self.begin_step, self.end_step, self.frequency, forever=False)
        p = self.power
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0 or math.isinf(p):
            raise ValueError(
                f"power: {p!r} must be a positive number; use power=3 (TF-MOT's default) or "
                "power=1 for a linear ramp."
            )

    @property
    def final(self) -> float:
        """The sparsity the schedule ends at."""
        return float(self.final_sparsity)

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at ``step`` (whether or not masks are updated there)."""
        step = _check_step(step)
        span = self.end_step - self.begin_step
        p = min(1.0, max(0.0, (step - self.begin_step) / span))
        if p == 1.0:
            return float(self.final_sparsity)
        s_i, s_f = float(self.initial_sparsity), float(self.final_sparsity)
        return s_f + (s_i - s_f) * (1.0 - p) ** self.power

    def __call__(self, step: int) -> tuple[bool, float]:
        """``(should_prune, sparsity)`` at ``step``, like TF-MOT's ``PruningSchedule``."""
        step = _check_step(step)
        due = should_prune_in_step(step, self.begin_step, self.end_step, self.frequency)
        return due, self.sparsity_at(step)


@dataclass(frozen=True)
class ConstantSparsity:
    """One sparsity, re-applied every ``frequency`` steps from ``begin_step`` to ``end_step``.

    Attributes:
        target_sparsity: The sparsity, in [0, 1).
        begin_step: First update step (>= 0).
        end_step: Last update step (> ``begin_step``), or -1 to keep updating forever.
        frequency: Steps between mask updates (>= 1).
    """

    target_sparsity: float
    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def __post_init__(self) -> None:
        _sparsity("target_sparsity", self.target_sparsity)
        _check_steps(self.begin_step, self.end_step, self.frequency, forever=True)

    @property
    def final(self) -> float:
        """The sparsity the schedule ends at."""
        return float(self.target_sparsity)

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at ``step``: always ``target_sparsity``."""
        _check_step(step)
        return float(self.target_sparsity)

    def __call__(self, step: int) -> tuple[bool, float]:
        """``(should_prune, sparsity)`` at ``step``, like TF-MOT's ``PruningSchedule``."""
        step = _check_step(step)
        due = should_prune_in_step(step, self.begin_step, self.end_step, self.frequency)
        return due, float(self.target_sparsity)
