"""Every magic on the real architectures of ``tests/real_models.py`` (issue 11).

Each magic runs through a real ``InteractiveShell`` on ``nn.TransformerEncoder``,
``nn.TransformerDecoder``, ``nn.MultiheadAttention`` and ``nn.LSTM`` models: it either
works or refuses in one ``UsageError`` line, never with a traceback, and ``%undo --all``
brings the model back bit-exactly (state, module types, training flags).
"""

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress as nc
from tests import real_models
from tests.helpers import assert_same_state, snapshot

BUILDERS = sorted(real_models.BUILDERS)
# --granularity channel removes output neurons of hidden Linear layers; the LSTM classifier
# has none (its only Linear is the output layer).
CHANNEL = ["attention", "transformer_decoder", "transformer_encoder"]


def structure(model: nn.Module) -> list[tuple[str, str, bool]]:
    return [(n, type(m).__name__, m.training) for n, m in model.named_modules()]


def agreement(model: nn.Module, inputs: tuple, reference: torch.Tensor):
    """An evaluate function: how close the model's logits stay to the dense ones."""

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float(-(m(*inputs) - reference).pow(2).mean())

    return evaluate


@pytest.fixture(params=BUILDERS)
def ns(request, shell):
    model, x = real_models.BUILDERS[request.param]()
    inputs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        reference = model(*inputs)
    shell.user_ns.update(model=model, x=x, ev=agreement(model, inputs, reference))
    shell.user_ns["_saved"] = (snapshot(model), structure(model))
    shell.user_ns["_builder"] = request.param
    return shell


def run(shell, line: str):
    """Run a magic line as a user does: its result, or the one-line refusal it printed."""
    name, _, rest = line.partition(" ")
    try:
        return shell.run_line_magic(name, rest)
    except UsageError as err:
        assert "\n" not in str(err), f"{line}: a refusal of more than one line: {err}"
        return err


def works(shell, line: str):
    result = run(shell, line)
    assert not isinstance(result, UsageError), f"{line}: refused: {result}"
    return result


def assert_back_to_the_start(shell) -> None:
    model = shell.user_ns["model"]
    state, modules = shell.user_ns["_saved"]
    assert_same_state(model, state)
    assert structure(model) == modules
    assert nc.history(model) == []


def test_summary(ns):
    s = works(ns, "summary model --input x --repeats 2")
    assert s.latency is not None and s.rows
    assert_back_to_the_start(ns)


def test_prune_element_and_undo(ns):
    report = works(ns, "prune model 0.5 --input x")
    assert report.rows[-1]["sparsity after"] > report.rows[-1]["sparsity before"]
    works(ns, "undo model --all")
    assert_back_to_the_start(ns)


@pytest.mark.parametrize("ns", CHANNEL, indirect=True)
def test_prune_channel_and_undo(ns):
    report = works(ns, "prune model 0.3 --granularity channel --input x")
    assert report.rows[-1]["sparsity after"] > report.rows[-1]["sparsity before"]
    works(ns, "undo model --all")
    assert_back_to_the_start(ns)


@pytest.mark.parametrize("types", ["LSTM", "MultiheadAttention"])
def test_prune_by_recurrent_or_attention_type_never_gives_a_traceback(ns, types):
    result = run(ns, f"prune model 0.3 --types {types} --include-output")
    if not isinstance(result, UsageError):
        works(ns, "undo model --all")
    assert_back_to_the_start(ns)


def test_sensitivity_with_eval_and_with_input_leave_the_model_unchanged(ns):
    with_eval = works(ns, "sensitivity model --eval ev --ratios 0.5,0.9 --no-widget")
    assert with_eval.complete and not with_eval.proxy and with_eval.layers
    proxy = works(ns, "sensitivity model --input x --ratios 0.5,0.9 --no-widget")
    assert proxy.complete and proxy.proxy and proxy.layers == with_eval.layers
    assert_back_to_the_start(ns)


@pytest.mark.parametrize("mode", ["dynamic", "weight"])
def test_quantize_and_undo(ns, mode):
    report = works(ns, f"quantize model int8 --mode {mode} --input x --repeats 2")
    assert report.quantized
    # Quantizing again is refused ("already quantized", or no float layer it can take).
    assert isinstance(run(ns, f"quantize model int8 --mode {mode} --repeats 2"), UsageError)
    works(ns, "undo model --all")
    assert_back_to_the_start(ns)


def test_speedup_measures_without_changing_the_model(ns):
    report = works(ns, "speedup model --input x --repeats 3")
    assert report.rows
    assert_back_to_the_start(ns)


def test_every_magic_in_turn_then_undo_all_is_bit_exact(ns):
    works(ns, "summary model --input x --repeats 2")
    works(ns, "prune model 0.3")  # the input is remembered
    works(ns, "sensitivity model --eval ev --ratios 0.5 --no-widget")
    works(ns, "speedup model --repeats 3")
    works(ns, "quantize model int8 --mode weight --repeats 2")
    after = run(ns, "prune model 0.5")  # float layers left (if any) can still be pruned
    if isinstance(after, UsageError):
        assert "quantized (%quantize)" in str(after)
    listed = works(ns, "undo model --list")
    assert [s.name for s in listed][:2] == ["prune", "quantize"]
    works(ns, "undo model --all")
    assert_back_to_the_start(ns)
