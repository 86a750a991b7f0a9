"""How the explorer writes metrics, and the colours and CSS it uses in any theme.

An accuracy is shown as the notebooks print it (``94.67%``, ``−1.33 pts vs baseline
96.00%``), not as a raw fraction; a loss or a proxy keeps its own units. Colours are
JupyterLab theme variables with a light-theme fallback, so captions stay readable on a
dark background; :data:`STYLE` lets the status and model lines wrap instead of being cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["CAPTION", "ERROR", "STYLE", "SUCCESS", "MetricText", "metric_text"]

#: Caption and note text: readable grey on a light and on a dark theme.
CAPTION = "var(--jp-ui-font-color2, #555)"
#: A worse metric or a drift from the swept model.
ERROR = "var(--jp-error-color1, #b00020)"
#: A metric as good as the baseline.
SUCCESS = "var(--jp-success-color1, #1b5e20)"

#: ipywidgets' Label neither wraps nor grows (``nowrap``, one line high): long status
#: messages were cut at the right edge. Scoped to the explorer's own labels.
STYLE = """<style>
.nbc-explorer .nbc-status, .nbc-explorer .nbc-model {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
  height: auto !important; min-height: var(--jp-widgets-inline-height, 28px);
  line-height: 1.4 !important; overflow-wrap: anywhere; max-width: 100%;
}
.nbc-explorer .nbc-group {
  margin: 6px 0 2px 0; font-weight: 600; color: var(--jp-ui-font-color1, #222);
}
</style>"""

_MINUS = "\N{MINUS SIGN}"


@dataclass(frozen=True)
class MetricText:
    """Formats a sweep's metric: percentages for an accuracy-like fraction, else as is.

    Attributes:
        percent: Values are fractions of 1 shown as ``94.67%``; changes as points.
    """

    percent: bool

    def value(self, value: float | None) -> str:
        """``94.67%``, or five significant digits (proxies differ in the 4th–5th)."""
        if value is None or not math.isfinite(value):
            return "—"
        return f"{100 * value:.2f}%" if self.percent else f"{value:.5g}".replace("-", _MINUS)

    def change(self, change: float) -> str:
        """A signed change: ``−1.33 pts`` (points of a percentage) or ``−0.0133``."""
        text = f"{100 * change:+.2f} pts" if self.percent else f"{change:+.3g}"
        return text.replace("-", _MINUS)


def metric_text(result: Any) -> MetricText:
    """How to write ``result``'s metric: in percent when it is an accuracy-like fraction.

    That is a higher-is-better metric, not the data-free proxy, whose baseline and every
    measured point lie in [0, 1] (an accuracy, an F1, a recall); a loss or a perplexity
    keeps its units.
    """
    if not result.higher_is_better or result.proxy:
        return MetricText(False)
    values = [result.baseline] + [
        v for curve in result.curves.values() for v in curve if v is not None
    ]
    fraction = all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
    return MetricText(fraction)
