import copy
import signal

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from nbcompress.engine.schedule.finetune import FinetuneResult, finetune
from tests.helpers import assert_same_state, cnn, mlp, snapshot


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, x[:, :4].argmax(1)


def _hand_loop(model, x, y, epochs, lr=1e-3, batch_size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def test_finetune_matches_a_hand_written_loop_bit_for_bit():
    x, y = _data()
    torch.manual_seed(0)
    a = mlp()
    b = copy.deepcopy(a)
    result = finetune(a, (x, y), 3, progress=False)
    _hand_loop(b, x, y, 3)
    assert_same_state(a, snapshot(b))
    assert isinstance(result, FinetuneResult)
    assert result.steps == 12 and len(result.loss) == 3 and not result.interrupted
    assert result.loss[-1] < result.loss[0]
    assert len(result.seconds) == 3 and all(s > 0 for s in result.seconds)


def test_dataloader_val_metric_and_training_flags_restored():
    x, y = _data()
    model = mlp().eval()
    model[1].train()  # a mixed state comes back as it was
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    result = finetune(model, loader, 2, val=(x, y), progress=False)
    assert result.metric_name == "accuracy" and len(result.metric) == 2
    assert result.steps == 16
    assert [m.training for m in model.modules()] == [False, False, True, False, False, False]
    with torch.no_grad():  # the metric of the last epoch is the trained model's accuracy
        assert result.metric[1] == float((model(x).argmax(1) == y).float().mean())

    def score(m):
        assert not m.training  # evaluated in eval mode
        return 0.5

    assert finetune(model, loader, 1, val=score, progress=False).metric == [0.5]


class FakePruner:
    """Zeroes the smallest weights of layer 0 to a growing fraction at each step."""

    def __init__(self, model, target=0.5, steps=8):
        self.model, self.target, self.steps, self.calls, self.finished = model, target, steps, 0, 0

    @property
    def sparsity(self):
        return self.target * min(1.0, self.calls / self.steps)

    def step(self):
        self.calls += 1
        w = self.model[0].weight
        k = int(self.sparsity * w.numel())
        if k:
            with torch.no_grad():
                w.view(-1)[w.abs().flatten().argsort()[:k]] = 0

    def finish(self):
        self.finished += 1


def test_pruner_is_stepped_after_each_optimizer_step_and_finished_only_when_asked():
    x, y = _data()
    model = mlp()
    pruner = FakePruner(model)
    seen = []
    result = finetune(model, (x, y), 2, pruner=pruner, progress=False, callback=seen.append)
    assert pruner.calls == result.steps == 8 and pruner.finished == 0
    assert result.sparsity[-1] == pytest.approx(0.5 * 512 / (512 + 768 + 96), abs=1e-3)
    assert result.curve[-1] == (8, pytest.approx(result.curve[-1][1]), 0.5)
    assert seen and seen[-1] is result
    finetune(model, (x, y), 1, pruner=pruner, finish=True, progress=False)
    assert pruner.finished == 1


def test_l1_term_is_added_and_scheduled_by_step():
    x, y = _data()
    torch.manual_seed(0)
    plain, with_l1 = mlp(), mlp()
    with_l1.load_state_dict(plain.state_dict())
    finetune(plain, (x, y), 2, progress=False)
    steps = []
    finetune(with_l1, (x, y), 2, l1=lambda s: steps.append(s) or 1e-2, progress=False)
    assert steps == list(range(8))
    assert with_l1[0].weight.abs().sum() < plain[0].weight.abs().sum()


def test_an_l1_penalty_object_is_used_as_given_not_taken_for_a_schedule():
    from nbcompress.engine.schedule.regularize import L1Penalty

    x, y = _data()
    torch.manual_seed(0)
    lasso, hand = mlp(), mlp()
    hand.load_state_dict(lasso.state_dict())
    finetune(lasso, (x, y), 1, l1=L1Penalty(lasso, 1e-2, group=True), progress=False)
    # The same run by hand: cross-entropy + 1e-2 · Σ_rows ‖W_row‖₂ of the hidden layers
    # (the output layer is left alone, as prune_ leaves it).
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(hand.parameters(), lr=1e-3)
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), 64):
        idx = order[i : i + 64]
        opt.zero_grad(set_to_none=True)
        rows = sum(torch.linalg.vector_norm(hand[i].weight, dim=1).sum() for i in (0, 2))
        (F.cross_entropy(hand(x[idx]), y[idx]) + rows * 1e-2).backward()
        opt.step()
    assert_same_state(lasso, snapshot(hand))


def test_an_l1_penalty_of_another_model_is_refused():
    from nbcompress.engine.schedule.regularize import L1Penalty

    model, other = mlp(), mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^l1: this L1Penalty was built for another model"):
        finetune(model, _data(), 1, l1=L1Penalty(other, 1e-4), progress=False)
    assert_same_state(model, before)


def test_ctrl_c_keeps_the_last_finished_step_and_returns_the_history(capsys):
    model = cnn()
    xs = torch.randn(64, 1, 8, 8)
    ys = torch.randint(0, 10, (64,))
    states = []

    class Interrupting:
        """Records the state after each step; at step 5 Ctrl-C arrives in the next forward."""

        calls = 0

        def step(self):
            self.calls += 1
            states.append(snapshot(model))
            if self.calls == 5:
                model[0].register_forward_pre_hook(lambda *a: signal.raise_signal(signal.SIGINT))

    result = finetune(model, (xs, ys), 10, pruner=Interrupting(), batch_size=8, progress=False)
    assert result.interrupted and result.steps == 5 and result.loss == []
    assert_same_state(model, states[-1])  # BatchNorm statistics of the cut step put back
    out = capsys.readouterr()
    assert "Interrupted: the model is as after optimizer step 5 (0 of 10 epochs" in out.out
    assert len(out.out.strip().splitlines()) == 1 and out.err == ""


def test_ctrl_c_during_the_optimizer_step_is_deferred_until_it_finished():
    x, y = _data()
    model = mlp()
    before = snapshot(model)

    class Optim(torch.optim.Adam):
        def step(self, closure=None):
            signal.raise_signal(signal.SIGINT)  # arrives mid-step: held back until it ends
            return super().step(closure)

    result = finetune(model, (x, y), 3, optimizer=Optim(model.parameters()), progress=False)
    assert result.interrupted and result.steps == 1
    assert not torch.equal(model[0].weight, before["0.weight"])  # the step was finished


def test_an_error_before_the_first_step_leaves_the_model_exactly_as_it_was():
    model = cnn()
    before = snapshot(model)
    xs = torch.randn(16, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^train: the model failed on the first batch") as info:
        finetune(model, (xs, torch.full((16,), 99)), 1, progress=False)  # label out of range
    assert isinstance(info.value.__cause__, IndexError)  # the loss's own error, chained
    assert "IndexError: Target 99 is out of bounds; pass (x, y)" in str(info.value)
    assert_same_state(model, before)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"epochs": 0}, ValueError, r"^epochs: 0 is not a whole number >= 1"),
        ({"batch_size": 2.5}, ValueError, r"^batch_size: 2\.5 is not a whole number"),
        ({"lr": -1}, ValueError, r"^lr: -1 is not a number > 0"),
        ({"l1": -1e-4}, ValueError, r"^l1: -0\.0001 is not a finite number >= 0"),
        ({"l1": "x"}, TypeError, r"^l1: expected a number >= 0"),
        ({"train": (torch.randn(4, 16), torch.zeros(3))}, ValueError, r"^train: x has 4 rows"),
        ({"train": iter([])}, TypeError, r"^train: a one-shot iterator runs out"),
        ({"train": 3}, TypeError, r"^train: expected \(x, y\) tensors"),
        ({"val": 3}, TypeError, r"^val: expected a metric function"),
        ({"pruner": object()}, TypeError, r"^pruner: expected an object with a \.step\(\)"),
        ({"optimizer": "adam"}, TypeError, r"^optimizer: expected a torch\.optim optimizer"),
        ({"loss": 1}, TypeError, r"^loss: expected f\(output, y\)"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument_and_the_model_is_untouched(kwargs, error, match):
    model = mlp()
    before = snapshot(model)
    args = {"train": _data(), "epochs": 1, **kwargs}
    with pytest.raises(error, match=match) as info:
        finetune(model, args.pop("train"), args.pop("epochs"), progress=False, **args)
    assert "\n" not in str(info.value)
    assert_same_state(model, before)


def test_progress_bar_shows_loss_and_sparsity(capsys):
    x, y = _data()
    model = mlp()
    finetune(model, (x, y), 1, pruner=FakePruner(model), batch_size=16)
    out = capsys.readouterr()
    last = out.out.strip().splitlines()[-1]  # the final line: steps, total time, figures
    assert last.startswith("finetune: 16 steps in ") and "(done)" in last
    assert "loss=" in last and "sparsity=50.0%→50%" in last
    assert out.err == ""  # progress is normal output, never the stderr (error) box


def test_result_prints_a_table_and_plots():
    x, y = _data()
    result = finetune(mlp(), (x, y), 2, val=(x, y), progress=False)
    text = str(result)
    assert text.splitlines()[0] == "finetune: 2/2 epochs, 8 steps"
    assert "accuracy" in text and "<table>" in result._repr_html_()
    fig = result.plot()
    assert fig.axes and len(fig.axes[0].lines[0].get_xdata()) == len(result.curve)


def test_the_sigint_handler_is_put_back_after_a_run_and_after_an_interrupt():
    before = signal.getsignal(signal.SIGINT)
    finetune(mlp(), _data(), 1, progress=False)
    assert signal.getsignal(signal.SIGINT) is before
    model = mlp()
    model[0].register_forward_pre_hook(lambda *a: signal.raise_signal(signal.SIGINT))
    assert finetune(model, _data(), 1, progress=False).interrupted
    assert signal.getsignal(signal.SIGINT) is before


def _first_batch_cases():
    x, y = _data()
    return [
        ((torch.randn(64, 5), y[:64]), r"\(x of shape \(64, 5\), y int64\): RuntimeError: mat1"),
        ((x, y.float()), r"\(x of shape \(64, 16\), y float32\): RuntimeError: expected target"),
    ]


@pytest.mark.parametrize("train, detail", _first_batch_cases())
def test_a_first_batch_the_model_fails_on_is_one_line_naming_train_and_the_fix(train, detail):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^train: the model failed on the first batch " + detail):
        finetune(model, train, 1, progress=False)
    assert_same_state(model, before)


def test_a_first_batch_error_after_the_forward_puts_batchnorm_back():
    model = cnn()
    before = snapshot(model)
    xs, ys = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)).float()
    with pytest.raises(ValueError) as info:
        finetune(model, (xs, ys), 1, batch_size=8, progress=False)
    text = str(info.value)
    assert text.startswith("train: the model failed on the first batch (x of shape (8, 1, 8, 8)")
    assert text.endswith(
        "; pass (x, y) shaped like a real batch (y int64 class indices for the default "
        "cross-entropy)."
    )
    assert "\n" not in text and isinstance(info.value.__cause__, RuntimeError)
    assert_same_state(model, before)  # the forward's BatchNorm update is undone
    assert model.training


def test_a_long_multiline_first_batch_error_is_collapsed_and_shortened():
    def loss(out, y):
        raise RuntimeError("line one\n  line two " + "x" * 1000)

    with pytest.raises(ValueError) as info:
        finetune(mlp(), _data(), 1, loss=loss, progress=False)
    text = str(info.value)
    assert "RuntimeError: line one line two xxx" in text and "\n" not in text
    assert len(text) < 400 and text.endswith("; pass (x, y) shaped like a real batch.")


def test_errors_after_the_first_step_propagate_unchanged():
    calls = []

    def loss(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match=r"^boom$"):
        finetune(mlp(), _data(), 1, loss=loss, progress=False)


def _trained_one_epoch(model, x, y):
    twin = copy.deepcopy(model)
    finetune(twin, (x, y), 1, progress=False)
    return snapshot(twin)


def test_a_val_pair_the_model_fails_on_is_one_line_naming_val():
    x, y = _data()
    model = mlp()
    expected = _trained_one_epoch(model, x, y)
    with pytest.raises(ValueError) as info:
        finetune(model, (x, y), 2, val=(torch.randn(10, 5), y[:10]), progress=False)
    text = str(info.value)
    assert text.startswith(
        "val: the model failed on the first batch (x of shape (10, 5), y int64): "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    )
    assert "\n" not in text and isinstance(info.value.__cause__, RuntimeError)
    assert_same_state(model, expected)  # as after the last finished step


@pytest.mark.parametrize("value, name", [(None, "NoneType"), ("0.9", "str"), ([1], "list")])
def test_a_metric_returning_a_non_number_is_one_line(value, name):
    x, y = _data()
    model = mlp()
    expected = _trained_one_epoch(model, x, y)
    with pytest.raises(TypeError) as info:
        finetune(model, (x, y), 2, val=lambda m: value, progress=False)
    assert str(info.value) == (
        f"val: the metric returned {name}; return a number (e.g. accuracy as a float)."
    )
    assert_same_state(model, expected)


def test_a_metric_may_return_a_one_element_tensor():
    x, y = _data()
    result = finetune(mlp(), (x, y), 1, val=lambda m: torch.tensor(0.25), progress=False)
    assert result.metric == [0.25]


def _last_postfix(out):
    return out.strip().splitlines()[-1]


def test_progress_bar_keeps_loss_sparsity_and_metric_after_each_epoch(capsys):
    x, y = _data()
    model = mlp()
    finetune(model, (x, y), 2, pruner=FakePruner(model), val=(x, y), batch_size=16)
    last = _last_postfix(capsys.readouterr().out)
    assert "32 steps in" in last and "loss=" in last and "accuracy=" in last
    assert "sparsity=50.0%→50%" in last
    finetune(mlp(), (x, y), 1, val=(x, y), batch_size=16)  # no pruner: the measured sparsity
    last = _last_postfix(capsys.readouterr().out)
    assert "loss=" in last and "sparsity=0.0%" in last and "accuracy=" in last


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_pruner_error_leaves_the_optimizer_step_counted_with_its_statistics(error, capsys):
    model = cnn()
    xs, ys = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    states = []

    class Optim(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            states.append(snapshot(model))

    class Failing:
        calls = 0

        def step(self):
            self.calls += 1
            if self.calls == 2:
                raise error("pruner broke")

    optimizer = Optim(model.parameters(), lr=0.1)
    if error is KeyboardInterrupt:
        result = finetune(model, (xs, ys), 1, optimizer=optimizer, pruner=Failing(), batch_size=8)
        assert result.interrupted and result.steps == 2
        assert "as after optimizer step 2" in capsys.readouterr().out
    else:
        with pytest.raises(RuntimeError, match="^pruner broke$"):
            finetune(model, (xs, ys), 1, optimizer=optimizer, pruner=Failing(), batch_size=8)
    assert len(states) == 2 and int(model[1].num_batches_tracked) == 2
    assert_same_state(model, states[-1])


def test_finetune_warns_once_when_a_one_shot_prune_without_masks_would_be_undone():
    from nbcompress.engine.prune.prune import prune_

    x, y = _data()
    model = mlp()
    prune_(model, 0.9)
    with pytest.warns(UserWarning) as record:
        finetune(model, (x, y), 1, progress=False)
    ours = [w for w in record if "zero but not masked" in str(w.message)]
    assert [w.filename for w in ours] == [__file__]  # points at the call of finetune
    texts = [str(w.message) for w in ours]
    assert texts == [
        "train: 84% of the Linear/Conv weights are zero but not masked, and training will make "
        "them non-zero; prune with keep_masks=True (%prune ... --keep-masks) or pass a "
        "GradualPruner to keep them at zero."
    ]


@pytest.mark.parametrize("case", ["kept masks", "dense", "pruner"])
def test_finetune_does_not_warn_with_kept_masks_a_dense_model_or_a_pruner(case, recwarn):
    from nbcompress.engine.prune.prune import prune_

    x, y = _data()
    model = mlp()
    if case != "dense":
        prune_(model, 0.9, keep_masks=case == "kept masks")
    pruner = FakePruner(model) if case == "pruner" else None
    finetune(model, (x, y), 1, pruner=pruner, progress=False)
    assert not [w for w in recwarn if "zero but not masked" in str(w.message)]


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory"), KeyError("input_ids"), AssertionError()]
)
def test_first_batch_errors_that_are_not_about_the_data_are_raised_as_they_are(error):
    # Out of memory is about the batch's size; a KeyError is placed in the user's code by
    # %finetune (it names the line of the forward that raised).
    def loss(out, y):
        raise error

    model = cnn()
    before = snapshot(model)
    with pytest.raises(type(error)) as info:
        finetune(
            model,
            (torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)),
            1,
            loss=loss,
            progress=False,
        )
    assert info.value is error
    assert_same_state(model, before)
