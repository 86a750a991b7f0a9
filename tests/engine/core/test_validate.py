import pytest
import torch

import nbcompress as nc
from nbcompress import timing
from nbcompress.engine.core import summary_timing as profile
from nbcompress.engine.core.validation import as_inputs, check_amount, run_forward
from tests.helpers import mlp


def test_missing_input_says_how_to_pass_one():
    with pytest.raises(ValueError, match="example_inputs: .*--input x"):
        as_inputs(None)


@pytest.mark.parametrize("bad", [True, "0.5", None, [0.5]])
def test_amount_must_be_a_number(bad):
    with pytest.raises(TypeError, match="amount: expected a number"):
        check_amount(bad)


@pytest.mark.parametrize("ok", [0, 0.0, 0.5, 0.999])
def test_amount_in_range(ok):
    assert check_amount(ok) == float(ok)


def test_shape_error_names_argument_and_expected_shape():
    with pytest.raises(ValueError, match=r"example_inputs: .*\(2, 5\).*last dimension 16"):
        run_forward(mlp(), (torch.randn(2, 5),))


def test_every_speed_figure_is_measured(monkeypatch):
    seen = []
    real = timing.measure

    def spy(fn, **kw):
        result = real(fn, **kw)
        seen.append(result)
        return result

    monkeypatch.setattr(profile, "measure", spy)
    s = nc.summary(mlp(), torch.randn(4, 16), repeats=3)
    assert s.latency is seen[0]
    assert [r["latency"] for r in s.rows] == [t.median for t in seen[1:]]
    assert all(t.repeats >= 3 for t in seen)


def test_measure_reports_a_median_within_its_spread():
    t = timing.measure(lambda: sum(range(1000)), warmup=1, repeats=9)
    assert t.p10 <= t.median <= t.p90 and t.repeats == 9
    both = timing.measure_interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, repeats=5)
    assert set(both) == {"a", "b"} and all(v.repeats == 5 for v in both.values())
