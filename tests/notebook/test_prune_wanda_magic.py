"""%prune --method wanda / --reconstruct through a real InteractiveShell."""

import pytest
import torch
from IPython.core.error import UsageError

import nbcompress as nc
from tests.helpers import assert_same_state, mlp, snapshot


@pytest.fixture
def ns(shell):
    torch.manual_seed(0)
    shell.user_ns.update(model=mlp(), x=torch.randn(32, 16), bad=torch.randn(4, 7))
    return shell


def test_wanda_with_reconstruct_from_the_magic_is_one_undoable_step(ns):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    ns.run_line_magic("prune", "model 0.5 --method wanda --input x --reconstruct")
    step = nc.history(model)[-1]
    assert "wanda + reconstruct element" in step.detail and step.info["reconstruct"] is True
    assert ((model[0].weight == 0).sum(1) == 8).all()  # every row at 50%
    ns.run_line_magic("undo", "model")
    assert_same_state(model, saved)


def test_the_magic_prunes_as_the_api_does(ns):
    model, x = ns.user_ns["model"], ns.user_ns["x"]
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    ns.run_line_magic("prune", "model 0.6 --method wanda --input x")
    nc.prune_(twin, 0.6, method="wanda", example_inputs=x)
    assert_same_state(model, snapshot(twin))


@pytest.mark.parametrize(
    "line, message",
    [
        ("model 0.5 --method wanda", r"^--input: method='wanda' needs calibration inputs"),
        ("model 0.5 --method wanda --input bad --reconstruct", r"^--input: the model failed"),
        ("model 0.5 --reconstruct", r"^--input: reconstruct=True needs calibration inputs"),
    ],
)
def test_bad_calibration_input_is_a_usage_error_and_the_model_is_untouched(ns, line, message):
    model = ns.user_ns["model"]
    saved = snapshot(model)
    with pytest.raises(UsageError, match=message):
        ns.run_line_magic("prune", line)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_wanda_with_global_scope_is_a_usage_error(ns):
    with pytest.raises(UsageError, match=r"scope: method='wanda'"):
        ns.run_line_magic("prune", "model 0.5 --method wanda --scope global --input x")
