"""%speedup through a real InteractiveShell."""

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

from nbcompress.engine.core.history import history
from nbcompress.engine.speedup import sparsify as sp
from nbcompress.engine.speedup.speedup import SpeedupReport
from nbcompress.kernels.modules import SparseLinear
from nbcompress.timing import Race, Timing
from tests.helpers import assert_same_state, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


def pruned():
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 6))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    return model


@pytest.fixture
def ns(shell):
    shell.user_ns.update(model=pruned(), x=torch.randn(3, 24), n=5)
    return shell


def run(shell, rest):
    return shell.run_line_magic("speedup", rest)


def test_returns_the_report_and_leaves_the_model_alone(ns):
    saved = snapshot(ns.user_ns["model"])
    report = run(ns, "model --input x --repeats 3")
    assert isinstance(report, SpeedupReport)
    assert [r["layer"] for r in report.rows] == ["0", "2"]
    assert report.outputs_match and not report.applied
    assert_same_state(ns.user_ns["model"], saved)


def test_apply_then_undo(ns, monkeypatch):
    # Fixed timings: the test checks the wiring, never the machine's speed.
    times = {"dense": 1.0, "compressed": 0.4}

    def fixed_race(candidates, *, rounds, **_):
        s = {k: times.get(k, 0.3) for k in candidates}
        timings = {k: Timing(v, v, v, rounds) for k, v in s.items()}
        base = s[next(iter(s))]  # the incumbent: dense, or "compressed" in the variant race
        return Race(tuple(s), timings, {k: (v / base,) * rounds for k, v in s.items()})

    monkeypatch.setattr(sp, "race", fixed_race)
    saved = snapshot(ns.user_ns["model"])
    report = run(ns, 'model --input x --apply --layers "0"')
    assert report.applied and isinstance(ns.user_ns["model"][0], SparseLinear)
    assert type(ns.user_ns["model"][2]) is nn.Linear
    assert history(ns.user_ns["model"])[-1].name == "sparsify"
    ns.run_line_magic("undo", "model")
    assert type(ns.user_ns["model"][0]) is nn.Linear
    assert_same_state(ns.user_ns["model"], saved)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("model", "--input: an example input"),
        ("missing --input x", "model: 'missing' is not defined"),
        ("n --input x", "not a torch.nn.Module"),
        ("model --input x --layers nope", "layers: pattern 'nope'"),
        ("model --input undefined_x", "--input: 'undefined_x' is not defined"),
        ("model --input x --bogus", "--bogus: %[a-z]+ has no such option"),
    ],
)
def test_mistakes_become_one_line_usage_errors(ns, line, match):
    with pytest.raises(UsageError, match=match):
        run(ns, line)


def test_help_is_the_docstring(ns):
    doc = ns.find_line_magic("speedup").__doc__
    assert "--apply" in doc and "break-even" in doc


def test_progress_is_shown_from_the_start_on_stdout(ns, capsys):
    run(ns, "model --input x --repeats 3")
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0] == "speedup: 0 layers, 0.0 s elapsed"  # before the first layer is timed
    assert lines[-1].startswith("speedup: 2 layers in ") and "(done)" in lines[-1]
    assert "speedup:" not in out.err
