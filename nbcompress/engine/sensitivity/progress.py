"""What every sweep shares: its ratio grid, the baseline check, MAC estimates, progress lines.

Used by the per-layer sweep (:mod:`.sweep`) and the sweep over coupled channel groups
(:mod:`.groups`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from nbcompress.engine.core.validation import check_amount, eval_mode
from nbcompress.engine.sensitivity.evaluate import (
    EvaluationError,
    eta_status,
    fmt_value,
    metric_name,
    progress_line,
)

if TYPE_CHECKING:
    from nbcompress.engine.sensitivity.result import SensitivityResult

__all__ = ["BASE", "Progress", "check_baseline", "check_ratios", "layer_macs", "run_all"]

#: Where the first evaluation runs, as errors name it.
BASE = "on the unpruned model"


def check_ratios(ratios: Any, default: Sequence[float]) -> list[float]:
    """The sweep's ratios, ascending and without repeats (``default`` when ``None``)."""
    if ratios is None:
        return list(default)
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
        raise TypeError(
            f"ratios: expected a non-empty list of fractions in (0, 1) such as [0.1, 0.5, 0.9], "
            f"got {ratios!r}."
        )
    checked = [check_amount(r, f"ratios[{i}]", allow_zero=False) for i, r in enumerate(ratios)]
    return sorted(set(checked))


def layer_macs(
    model: nn.Module, selected: dict[str, nn.Module], inputs: tuple | None
) -> dict[str, int | None]:
    """Estimated MACs per call of each selected layer on ``inputs`` (``None``: unknown)."""
    if inputs is None:
        return dict.fromkeys(selected)
    # Imported here: MAC estimates load the kernel registry (numba, ~65 MiB), which a
    # sweep without example inputs never needs.
    from nbcompress.engine.core.costs import macs
    from nbcompress.engine.core.summary import capture_calls

    with eval_mode(model):
        calls = capture_calls(model, selected, inputs)
    return {
        n: (macs(selected[n], calls[n][0], calls[n][2]) if n in calls else None) for n in selected
    }


def check_baseline(baseline: float, evaluate: Any) -> None:
    """Refuse a non-finite metric on the unpruned model (one line naming ``evaluate``)."""
    if not math.isfinite(baseline):
        raise ValueError(
            f"evaluate: returned {baseline} on the unpruned model "
            f"({metric_name(evaluate) if evaluate else 'the proxy'}); it must return a finite "
            "number there (check for an empty data set or a division by zero). A NaN at a "
            "pruned point is fine: it is recorded as a collapsed layer."
        )


class Progress:
    """Plain-text progress on stderr: a line per finished layer, and one every ``every`` s.

    Each line says the points done of all, the time elapsed and the ETA (mean time of the
    evaluated points times the points left; ``ETA —`` until one was measured).
    """

    def __init__(self, enabled: bool, total: int, every: float = 10.0) -> None:
        self.enabled, self.total, self.every = enabled, total, every
        self.done = self.measured = 0
        self.start = self.last = time.perf_counter()

    def step(self, result: SensitivityResult, layer: str, finished: bool, evaluated: bool) -> None:
        """One point of ``layer`` is done (``evaluated``: measured, not filled in)."""
        self.done += 1
        self.measured += evaluated
        now = time.perf_counter()
        if self.enabled and (finished or now - self.last >= self.every):
            self.last = now
            values = " ".join(fmt_value(v) for v in result.curves[layer])
            status = eta_status(self.done, self.total, now - self.start, self.measured)
            progress_line(f"sensitivity [{status}] {layer}: {values}")


def run_all(
    result: SensitivityResult, names: Sequence[str], each: Callable[[str], None], start: float
) -> int:
    """Run ``each(name)`` for every entry; the partial result survives Ctrl-C and errors.

    On Ctrl-C a note says how far the sweep got (the caller adds "restored" once checksums
    confirm it); an ``EvaluationError``/``TypeError`` is noted, carries the partial result
    as ``err.result`` and propagates.

    Returns:
        1 + the index of the interruption's note, or 0 if the sweep was not interrupted.
    """
    try:
        for name in names:
            each(name)
        result.complete = True
    except KeyboardInterrupt:
        result.notes.append(
            f"Interrupted after {result.evaluations} evaluations: partial result, "
            "unevaluated points are None."
        )
        return len(result.notes)
    except (EvaluationError, TypeError) as err:
        result.notes.append(f"Stopped by an error: {err}")
        err.result = result  # partial results stay usable
        raise
    finally:
        result.seconds = time.perf_counter() - start
    return 0
