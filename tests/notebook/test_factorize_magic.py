"""%factorize through a real InteractiveShell."""

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

from nbcompress.engine.core.history import history
from nbcompress.engine.schedule.factorize import FactorizeReport, LowRankConv2d, LowRankLinear
from tests.helpers import assert_same_state, cnn, snapshot


def mlp():
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()


@pytest.fixture
def ns(shell):
    shell.user_ns.update(
        model=mlp(), conv=cnn().eval(), x=torch.randn(8, 64), xc=torch.randn(2, 1, 8, 8)
    )
    return shell


def f(shell, rest):
    return shell.run_line_magic("factorize", rest)


def test_rank_returns_the_report_and_undo_restores(ns):
    model = ns.user_ns["model"]
    saved, first = snapshot(model), model[0]
    report = f(ns, "model --rank 8 --input x --no-speed-check --repeats 3")
    assert isinstance(report, FactorizeReport) and report.rule == "rank 8"
    assert report.factorised == ["0", "2"] and isinstance(model[0], LowRankLinear)
    assert report.rows[0]["time before"] is not None  # timed on x even without the check
    assert history(model)[-1].name == "factorize"
    ns.run_line_magic("undo", "model")
    assert model[0] is first
    assert_same_state(model, saved)


def test_energy_layers_and_remembered_input_on_a_cnn(ns):
    ns.run_line_magic("summary", "conv --input xc --no-latency")
    report = f(ns, 'conv --energy 0.8 --layers "3" --no-speed-check --repeats 3')
    assert report.rule == "energy 0.8" and [r["layer"] for r in report.rows] == ["3"]
    assert isinstance(ns.user_ns["conv"][3], LowRankConv2d)
    assert report.rows[0]["output error"] is not None  # the remembered input was used


def test_default_times_every_layer(ns):
    with torch.no_grad():  # trained-like: a few directions hold most of the energy
        for layer in ns.user_ns["model"][0:3:2]:
            out, inp = layer.weight.shape
            layer.weight.copy_(torch.randn(out, 4) @ torch.randn(4, inp))
    report = f(ns, "model --input x --repeats 3")
    assert report.rule == "energy 0.9"
    for row in report.rows:
        assert row["time before"] > 0 and row["time after"] > 0
        assert row["rank"] == 4 and row["params after"] < row["params before"]
        assert row["result"] in ("factorised", "skipped: not measured faster")


@pytest.mark.parametrize(
    ("rest", "match"),
    [
        ("model --rank 64 --input x", r"^--rank: 64 is not below min\(in, out\) = 64"),
        ("model --rank 0 --input x", r"^--rank: 0 is below 1; pass a rank such as 16\.$"),
        ("model --rank big --input x", "--rank"),
        ("model --energy 1.5 --input x", "--energy"),
        ("model --energy 0.9 --rank 4 --input x", "^--rank / --energy: give one"),
        ('model --layers "nope*" --input x', "^--layers: pattern 'nope\\*' matches no layer"),
        ("model", "^--input: an example input is needed"),
        ("nothing --input x", "^model: 'nothing' is not defined"),
        ("x --input x", "^model: 'x' is a Tensor, not a torch.nn.Module"),
    ],
)
def test_bad_input_is_one_usage_line_and_the_model_untouched(ns, rest, match):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    with pytest.raises(UsageError, match=match) as info:
        f(ns, rest)
    assert "\n" not in str(info.value).strip()
    assert not history(model)
    assert_same_state(model, saved)


def test_help_is_real(ns):
    assert "--energy" in ns.magics_manager.magics["line"]["factorize"].__doc__
