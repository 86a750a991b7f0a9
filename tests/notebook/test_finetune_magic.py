import sys
import types

import pytest
import torch
from IPython.core.error import UsageError
from torch.utils.data import DataLoader, TensorDataset

from nbcompress.engine.schedule.finetune_result import FinetuneResult
from tests.helpers import assert_refused, assert_same_state, mlp, snapshot


@pytest.fixture
def ns(shell):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = x[:, :4].argmax(1)
    shell.user_ns.update(
        model=mlp(),
        train=(x, y),
        val=(x[:50], y[:50]),
        loader=DataLoader(TensorDataset(x, y), batch_size=50),
        torch=torch,
    )
    return shell


def magic(shell, line):
    return shell.run_line_magic("finetune", line)


def test_finetune_magic_trains_in_place_and_returns_the_history(ns):
    model = ns.user_ns["model"]
    before = snapshot(model)
    result = magic(ns, "model --data train --epochs 2 --val val --lr 1e-2 --l1 1e-4")
    assert isinstance(result, FinetuneResult)
    assert len(result.loss) == 2 and result.steps == 8 and result.metric_name == "accuracy"
    assert not torch.equal(model[0].weight, before["0.weight"])
    assert magic(ns, "model -d loader -e 1").steps == 4


class FakeSchedule:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakePruner:
    made = []

    def __init__(self, model, schedule, layers=None, include_output=False):
        self.model, self.schedule, self.steps, self.finished = model, schedule, 0, 0
        self.layers, self.include_output, self.aborted = layers, include_output, 0
        FakePruner.made.append(self)

    @property
    def sparsity(self):
        return 0.5

    @property
    def step_count(self):
        return self.steps

    def step(self):
        self.steps += 1

    def abort(self):
        self.aborted += 1

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_gradual(monkeypatch):
    FakePruner.made = []
    schedules = types.ModuleType("nbcompress.engine.schedule.schedules")
    schedules.PolynomialDecay = FakeSchedule
    gradual = types.ModuleType("nbcompress.engine.schedule.gradual")
    gradual.GradualPruner = FakePruner
    monkeypatch.setitem(sys.modules, schedules.__name__, schedules)
    monkeypatch.setitem(sys.modules, gradual.__name__, gradual)


def test_gradual_builds_a_polynomial_schedule_over_the_whole_run(ns, fake_gradual, capsys):
    result = magic(ns, "model --data train --epochs 5 --gradual 0.5:0.9 --batch-size 10")
    (pruner,) = FakePruner.made
    assert pruner.model is ns.user_ns["model"]
    assert pruner.schedule.kwargs == {
        "initial_sparsity": 0.5,
        "final_sparsity": 0.9,
        "begin_step": 0,
        "end_step": 100,
        "frequency": 5,
    }
    assert pruner.steps == result.steps == 100 and pruner.finished == 1
    assert "%undo model reverts it" in capsys.readouterr().out


def test_a_refused_option_after_the_pruner_was_built_leaves_the_model_untouched(ns):
    # The pruner applies its first masks when built (0.5 at step 0); --val is refused after
    # that, before any optimizer step: the masks come off and nothing is recorded.
    from nbcompress import history

    ns.user_ns["notval"] = "hello"
    model = ns.user_ns["model"]
    before = snapshot(model)
    with pytest.raises(UsageError, match=r"^--val: expected a metric function"):
        magic(ns, "model --data train --gradual 0.5:0.9 --val notval")
    assert_same_state(model, before)
    assert not hasattr(model[0], "weight_mask") and len(history(model)) == 0


def test_an_error_after_training_started_records_the_pruning_so_far(ns):
    from nbcompress import history

    calls = []

    def val(m):
        calls.append(1)
        raise RuntimeError("val boom")

    ns.user_ns["bad_val"] = val
    model = ns.user_ns["model"]
    before = snapshot(model)
    with pytest.raises(UsageError, match=r"^--val: the function raised RuntimeError: val boom"):
        magic(ns, "model --data train --epochs 2 --gradual 0.5:0.9 --val bad_val")
    assert calls == [1] and not hasattr(model[0], "weight_mask")
    assert [s.name for s in history(model)] == ["gradual-prune"]
    assert float((model[0].weight == 0).float().mean()) >= 0.5
    ns.run_line_magic("undo", "model")
    assert_same_state(model, before)


def test_layers_choose_what_gradual_prunes_and_what_l1_penalises(ns):
    from nbcompress.engine.schedule.regularize import L1Penalty

    model = ns.user_ns["model"]
    magic(ns, "model --data train --epochs 1 --gradual 0.5:0.8 --layers 2")
    assert float((model[0].weight == 0).float().mean()) == 0.0
    assert float((model[2].weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)

    def only_first(twin):
        return L1Penalty(twin, 1e-2, layers=["0"])

    ns.user_ns["model"] = mlp()  # dense again: no pruned zeros to warn about

    model, twin = _l1_run(ns, "model --data train --epochs 2 --l1 1e-2 --layers 0", only_first)
    assert_same_state(model, snapshot(twin))


def test_include_output_reaches_the_pruner(ns, fake_gradual):
    magic(ns, "model --data train --gradual 0.5:0.9 --include-output")
    magic(ns, "model --data train --gradual 0.5:0.9")
    assert [p.include_output for p in FakePruner.made] == [True, False]


@pytest.mark.parametrize(
    "line, match",
    [
        ("model", r"^--data: missing; name an object"),
        ("model --data nope", r"^--data: 'nope' is not defined"),
        ("model --data 3", r"^--data: expected \(x, y\) tensors"),
        ("model --data (torch.ones(3,16),torch.ones(2))", r"^--data: x has 3 rows and y 2"),
        ("model --data train --val 3", r"^--val: expected a metric function"),
        ("model --data train --gradual 0.9:0.5", r"^--gradual: '0\.9:0\.5' is not initial:final"),
        ("model --data train --gradual 0.5", r"^--gradual: '0\.5' is not initial:final"),
        ("model --data train --epochs 0", r"--epochs 3"),
        ("model --data train --l1 -1", r"^--l1: '-1' is not a penalty weight >= 0"),
        ("model --data train --l1 1e-4:x", r"^--l1: '1e-4:x' is not a penalty weight"),
        ("model --data train --l1-group", r"^--l1-group: needs a penalty weight; add e\.g\. --l1"),
        ("model --data train --lr 0", r"--lr 1e-3"),
        ("model --data train --layers 0", r"^--layers: chooses the layers of --gradual and --l1"),
        ("model --data train --gradual 0.5:0.9 --layers nope", r"^--layers: pattern 'nope'"),
        ("model --data train --l1 1e-4 --layers nope", r"^--layers: pattern 'nope'"),
        ("torch --data train", r"^model: 'torch' is a module, not a torch\.nn\.Module"),
    ],
)
def test_bad_options_are_one_usage_error_line_and_the_model_is_untouched(ns, line, match):
    assert_refused(ns, "finetune", line, match)


def _l1_run(ns, line, l1):
    """The model after ``%finetune line`` and a copy after ``finetune(l1=l1)``."""
    from nbcompress.engine.schedule.finetune import finetune

    model = ns.user_ns["model"]
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    magic(ns, line)
    finetune(twin, ns.user_ns["train"], 2, l1=l1(twin), progress=False, plot=False)
    return model, twin


def test_l1_ramp_rises_linearly_over_the_run(ns):
    seen = []

    def ramp(twin):
        # 200 rows / 64 = 4 steps per epoch, 8 in all: 0 → 1e-2 linearly.
        return lambda step: seen.append(step) or 1e-2 * min(1.0, step / 8)

    model, twin = _l1_run(ns, "model --data train --epochs 2 --l1 0:1e-2", ramp)
    assert seen == list(range(8))
    assert_same_state(model, snapshot(twin))


def test_l1_group_is_the_group_lasso_of_the_hidden_layers(ns):
    from nbcompress.engine.schedule.regularize import L1Penalty

    def lasso(twin):
        return L1Penalty(twin, 1e-2, group=True)

    plain = mlp()
    plain.load_state_dict(ns.user_ns["model"].state_dict())
    model, twin = _l1_run(ns, "model --data train --epochs 2 --l1 1e-2 --l1-group", lasso)
    assert_same_state(model, snapshot(twin))
    magic(ns.user_ns.update(model=plain) or ns, "model --data train --epochs 2")
    assert not torch.equal(model[0].weight, plain[0].weight)  # the penalty did something


def test_gradual_on_data_of_unknown_length_is_refused(ns, fake_gradual):
    class Batches:
        def __iter__(self):
            yield ns.user_ns["train"]

    ns.user_ns["stream"] = Batches()
    with pytest.raises(UsageError, match=r"^--gradual: the schedule spans the run"):
        magic(ns, "model --data stream --gradual 0.5:0.9")
    assert magic(ns, "model --data stream").steps == 1  # without --gradual it trains


def test_a_model_that_raises_is_named_with_the_data_option(ns):
    ns.run_cell(
        "class Bad(torch.nn.Linear):\n"
        "    def forward(self, x):\n"
        "        raise KeyError('input_ids')\n"
        "bad = Bad(16, 4)\n"
    )
    with pytest.raises(UsageError, match=r"^--data: the model raised KeyError: 'input_ids'"):
        magic(ns, "bad --data train")


def test_live_plot_redraws_at_each_epoch_end_and_draws_the_pruner_sparsity(shell, monkeypatch):
    import IPython.display

    from nbcompress.notebook.display.training import LiveTrainingPlot

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj)

    def display(obj, display_id=False):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    live = LiveTrainingPlot(min_interval=1e9)  # only epoch ends redraw
    result = FinetuneResult(epochs=2, curve=[(1, 2.0, 0.5), (2, 1.5, 0.6)])
    live(result)  # no epoch finished yet, but nothing shown so far either
    live(result)
    assert live.updates == 1
    result.loss.append(1.7), result.metric.append(None)
    result.sparsity.append(0.6), result.seconds.append(0.1)
    live(result)
    assert live.updates == 2 and len(shown) == 2
    fig = result.plot()
    assert len(fig.axes) == 2 and list(fig.axes[1].lines[0].get_ydata()) == [0.5, 0.6]


def test_ctrl_c_during_gradual_finetune_keeps_the_steps_and_records_the_pruning(
    ns, fake_gradual, capsys
):
    import signal

    class Stopping(FakePruner):
        def step(self):
            super().step()
            if self.steps == 3:  # arrives inside the step: delivered once it finished
                signal.raise_signal(signal.SIGINT)

    sys.modules["nbcompress.engine.schedule.gradual"].GradualPruner = Stopping
    result = magic(ns, "model --data train --epochs 2 --gradual 0.5:0.9")
    (pruner,) = FakePruner.made
    assert result.interrupted and result.steps == pruner.steps == 3
    assert pruner.finished == 1  # the pruning done so far is recorded, undoable
    captured = capsys.readouterr()
    assert "Interrupted: the model is as after optimizer step 3" in captured.out
