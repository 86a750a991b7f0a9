"""Issue 11, F20/F21 through the magics: what the user can fix is one line, bugs keep a traceback.

The rule is in ``nbcompress.notebook.magics._errors``: an exception raised by the user's own
code (the model's forward, the --eval function, the --calibrate data) becomes one
``UsageError`` line naming the option and the fix, with the exception chained; a bad option
value is refused at parse time naming the option; any other exception of nbcompress keeps
its traceback.
"""

import operator

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.compare import compare_change
from nbcompress.notebook.magics._errors import engine_errors
from tests.helpers import assert_same_state, mlp, snapshot


class KeyModel(nn.Module):
    """A Hugging Face-style forward that looks its input up by name."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A model that expects its inputs in a side table (e.g. an input_ids lookup).
        return self.b(torch.relu(self.a(x + self.cache["input_ids"])))


class AssertModel(nn.Module):
    """A forward with the user's own shape check."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == 8, "expected a batch of 8"
        return self.b(torch.relu(self.a(x)))


class SecondCallModel(nn.Module):
    """Runs once, then raises: a failure later than the engine's first checked forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise KeyError("input_ids")
        return self.b(torch.relu(self.a(x)))


def lookup_eval(model: nn.Module) -> float:
    scores: dict[str, float] = {}
    return scores["accuracy"]


@pytest.fixture
def ns(shell):
    shell.user_ns.update(
        keymodel=KeyModel(),
        assertmodel=AssertModel(),
        secondcall=SecondCallModel(),
        model=mlp(),
        x=torch.randn(4, 16),
        xc=torch.randn(32, 16),
        lookup_eval=lookup_eval,
    )
    return shell


def magic(shell, line):
    name, _, rest = line.partition(" ")
    return shell.run_line_magic(name, rest)


def causes(err):
    """The chain of ``__cause__`` below ``err``."""
    found = []
    while err.__cause__ is not None:
        err = err.__cause__
        found.append(err)
    return found


MAGIC_LINES = [
    "summary {m} --input x --repeats 2",
    "prune {m} 0.5 --input x",
    "sensitivity {m} --input x --ratios 0.5 --no-widget",
    "quantize {m} int8 --input x --repeats 2",
    "speedup {m} --input x --repeats 3",
]


@pytest.mark.parametrize("line", MAGIC_LINES)
@pytest.mark.parametrize(
    ("name", "raised", "said"),
    [("keymodel", KeyError, "input_ids"), ("assertmodel", AssertionError, "expected a batch of 8")],
)
def test_a_forward_that_raises_is_one_line_naming_input(ns, line, name, raised, said):
    model = ns.user_ns[name]
    saved = snapshot(model)
    with pytest.raises(UsageError) as info:
        magic(ns, line.format(m=name))
    message = str(info.value)
    assert message.startswith("--input: ") and said in message and "\n" not in message
    # The original exception is kept, chained (directly or under the engine's ValueError).
    assert raised in [type(e) for e in causes(info.value)]
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_the_user_sees_one_line_and_no_traceback(ns, capsys):
    ns.run_cell("%summary assertmodel --input x")
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "UsageError: --input: " in output and "expected a batch of 8" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1


@pytest.mark.parametrize("line", MAGIC_LINES)
def test_a_later_failure_of_the_model_says_where_its_code_raised(ns, line):
    model = ns.user_ns["secondcall"]
    saved = snapshot(model)
    with pytest.raises(UsageError) as info:
        magic(ns, line.format(m="secondcall"))
    message = str(info.value)
    assert message.startswith("--input: ") and "input_ids" in message
    assert KeyError in [type(e) for e in causes(info.value)]
    assert_same_state(model, saved)


def test_the_message_says_where_the_users_code_raised(ns):
    # The engine checks the first forward itself; this one fails in a later forward.
    with pytest.raises(UsageError) as info:
        magic(ns, "prune secondcall 0.5 --input x")
    assert str(info.value).startswith(
        "--input: the model raised KeyError: 'input_ids' (in forward, line "
    )
    line = SecondCallModel.forward.__code__.co_firstlineno + 3  # its `raise KeyError`
    assert f"line {line} of test_magic_errors.py); fix the model or pass --input an input" in str(
        info.value
    )
    assert isinstance(info.value.__cause__, KeyError)


def test_an_eval_function_that_raises_is_named_as_eval(ns):
    model, saved = ns.user_ns["model"], snapshot(ns.user_ns["model"])
    for line in (
        "sensitivity model --eval lookup_eval --ratios 0.5 --no-widget",
        "quantize model int8 --eval lookup_eval --repeats 2",
    ):
        with pytest.raises(UsageError, match=r"^--eval: .*KeyError: 'accuracy'"):
            magic(ns, line)
    assert_same_state(model, saved)


def test_engine_errors_names_the_user_callable_that_raised():
    # compare_change calls the change directly: the user's function is on the traceback.
    model, calls = mlp(), []

    def evaluate(m):
        calls.append(m)
        raise KeyError("labels")

    with (
        pytest.raises(UsageError, match=r"^--eval: the function raised KeyError: 'labels'") as info,
        engine_errors({"--eval": evaluate}),
    ):
        compare_change(model, evaluate)
    assert isinstance(info.value.__cause__, KeyError) and calls == [model]


def test_a_genuine_nbcompress_failure_keeps_its_traceback(ns, monkeypatch, capsys):
    # A C-level callable raising inside the engine: no user code on the way, so a bug.
    from nbcompress.engine.core import summary as summary_module

    broken = operator.attrgetter("no_such_attribute")
    monkeypatch.setattr(summary_module, "weighted_layers", broken)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        magic(ns, "summary model")
    ns.run_cell("%summary model")
    captured = capsys.readouterr()
    assert "Traceback" in captured.out + captured.err


def test_a_validation_error_of_the_engine_stays_one_line_naming_the_option(ns):
    with pytest.raises(UsageError, match=r"^--layers: pattern 'zz\*' matches no layer"):
        magic(ns, "prune model 0.5 --layers zz*")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("summary model --repeats -5", r"^--repeats: -5 must be >= 0, e.g. --repeats 10"),
        ("prune model 0.5 --scope global --min-density nan", r"--min-density: nan must be in"),
        ("prune model 0.5 --scope global --min-density -1", r"--min-density: -1.0 must be in"),
        ("prune model 0.5 --scope global --min-density 1.5", r"--min-density: 1.5 must be in"),
        ("prune model 0.5 --method random --seed 1180591620717411303424", r"--seed: .*\[0, "),
        ("prune model 0.5 --method random --seed -1", r"--seed: -1 must be an integer in \[0, "),
        ("prune model 0.5 --seed 1.5", r"--seed: invalid int value: '1.5'"),
        ("prune model 0.5 --types 42", r"^--types: '42' is not a torch.nn layer type"),
        ("quantize model int8 --repeats 0", r"--repeats: 0 must be >= 1, e.g. --repeats 10"),
        ("quantize model int8 --repeats -5", r"--repeats: -5 must be >= 1"),
        ("speedup model --input x --repeats 1", r"--repeats: 1 must be >= 3, e.g. --repeats 15"),
        ("sensitivity model --input x --max-layers 0", r"--max-layers: 0 must be >= 1"),
        ("sensitivity model --input x --early-stop nan", r"--early-stop: nan must be >= 0"),
        ("sensitivity model --input x --early-stop -1", r"--early-stop: -1.0 must be >= 0"),
    ],
)
def test_a_bad_number_is_refused_naming_the_option_and_an_example(ns, line, message):
    model, saved = ns.user_ns["model"], snapshot(ns.user_ns["model"])
    with pytest.raises(UsageError, match=message):
        magic(ns, line)
    assert_same_state(model, saved)
    assert nc.history(model) == []


def test_the_largest_seed_is_accepted(ns):
    for seed in (0, 2**63 - 1):
        magic(ns, f"prune model 0.5 --method random --seed {seed}")
    assert len(nc.history(ns.user_ns["model"])) == 2


class TorchRaisesModel(nn.Module):
    """A forward that reads an attribute torch's Module does not have: torch raises it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.weight_fast_path.t()


def test_an_error_raised_inside_torch_is_not_blamed_on_the_user():
    # Raised in torch's Module.__getattr__, as torch's fast paths do when a swapped layer
    # lacks `.weight`: the user's code is on the way, but the raise is not theirs.
    model = TorchRaisesModel()

    def change(m):
        return m(torch.randn(4, 16))

    with pytest.raises(AttributeError, match="weight_fast_path"), engine_errors():
        compare_change(model, change)


def test_a_python_error_inside_nbcompress_keeps_its_traceback():
    from nbcompress.engine.quantize.modules import per_row_int8

    # Raised inside nbcompress and naming no argument: a bug of ours, not a user's mistake.
    with pytest.raises(TypeError, match="unsupported operand"), engine_errors():
        per_row_int8(torch.ones(2, 2), None)
    # An engine refusal names its argument, also after a context (the staged run's).
    from nbcompress.notebook.magics._errors import _names_an_argument

    assert _names_an_argument("stage 2 of 2: target_sparsity: 90.0% cannot be reached")
    assert not _names_an_argument("unsupported operand type(s) for /: 'Tensor' and 'NoneType'")
