"""The proxy plot and table stay readable when pruning barely moves the metric (untrained model)."""

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from nbcompress.engine.sensitivity.result import SensitivityResult
from nbcompress.notebook.display.sensitivity import MIN_SPAN, curves_figure, heatmap_figure


def flat_proxy(higher=True):
    # What an untrained model gives: the proxy moves in the fifth decimal.
    curves = {"fc1": [1.0, 0.99998, 0.99991], "fc2": [0.99999, 0.99995, 0.9999]}
    if not higher:
        curves = {n: [1 - v for v in c] for n, c in curves.items()}
    return SensitivityResult(
        layers=list(curves), ratios=[0.3, 0.6, 0.9], baseline=1.0 if higher else 0.0,
        curves=curves, sizes={"fc1": 100, "fc2": 100}, macs=dict.fromkeys(curves),
        metric="feature cosine", higher_is_better=higher, proxy=True, granularity="element",
        evaluations=7, seconds=0.1, complete=True,
    )  # fmt: skip


@pytest.mark.parametrize("higher", [True, False])
def test_curves_have_plain_tick_labels_a_sensible_range_and_end_at_the_last_ratio(higher):
    fig = curves_figure(flat_proxy(higher))
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "+9.999e−1"
    low, high = ax.get_ylim()
    assert high - low >= MIN_SPAN * 0.99
    unpruned = 1.0 if higher else 0.0
    assert low <= unpruned <= high and abs(unpruned - (high if higher else low)) < MIN_SPAN / 10
    assert ax.get_xlim()[1] == pytest.approx(0.91)  # the last ratio measured, not 1.0


def test_heatmap_colour_bar_has_no_offset():
    fig = heatmap_figure(flat_proxy())
    FigureCanvasAgg(fig).draw()
    bar_axis = fig.axes[1].yaxis
    assert bar_axis.get_major_formatter().get_offset() == ""


def test_table_shows_enough_digits_to_tell_values_from_the_baseline():
    text = str(flat_proxy())
    rows = {line.split()[0]: line.split()[-3:] for line in text.splitlines()[3:5]}
    assert rows == {"fc1": ["1", "0.99998", "0.99991"], "fc2": ["0.99999", "0.99995", "0.9999"]}
    assert "baseline 1;" in text
    # Ordinary values keep four significant digits.
    result = flat_proxy()
    result.curves = {"fc1": [0.97, 0.8, 0.41234], "fc2": [0.99, 0.9, 0.5]}
    assert "0.4123\n" in str(result) and "0.41234" not in str(result)
