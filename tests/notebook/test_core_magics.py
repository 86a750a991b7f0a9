import copy

import pytest
import torch
from IPython.core.error import UsageError

import nbcompress as nc
from nbcompress.engine.core.compare import Comparison
from nbcompress.engine.core.summary import Summary
from tests.helpers import assert_same_state, cnn, mlp, snapshot, zero_fraction


@pytest.fixture
def ns(shell):
    shell.user_ns.update(
        model=mlp(), conv=cnn(), x=torch.randn(4, 16), xc=torch.randn(2, 1, 8, 8), torch=torch
    )
    shell.user_ns["wrapper"] = type("W", (), {"net": shell.user_ns["model"]})()
    return shell


def magic(shell, line):
    name, _, rest = line.partition(" ")
    return shell.run_line_magic(name, rest)


def test_load_twice_and_unload_are_harmless(shell):
    shell.run_line_magic("load_ext", "nbcompress")
    shell.run_line_magic("reload_ext", "nbcompress")
    shell.run_line_magic("unload_ext", "nbcompress")
    shell.run_line_magic("load_ext", "nbcompress")
    assert "prune" in shell.magics_manager.magics["line"]


def test_magics_do_not_shadow_ipython_builtins(shell):
    from IPython.core.magics import BasicMagics, ExecutionMagics, HistoryMagics

    line = shell.magics_manager.magics["line"]
    for name in ("summary", "prune", "undo"):
        assert getattr(line[name], "__self__", None).__class__.__module__.startswith("nbcompress")
    builtin = set()
    for cls in (BasicMagics, ExecutionMagics, HistoryMagics):
        builtin |= set(cls.magics["line"])
    assert not {"summary", "prune", "undo", "sensitivity", "quantize", "speedup"} & builtin


def test_summary_magic_returns_the_result(ns):
    s = magic(ns, "summary conv --input xc --repeats 2")
    assert isinstance(s, Summary) and s.layer("0")["output"] == (2, 8, 6, 6)


@pytest.mark.parametrize("name, x", [("model", "x"), ("conv", "xc")])
def test_prune_magic_halves_every_layer_and_undo_is_bit_exact(ns, name, x, capsys):
    model = ns.user_ns[name]
    saved = snapshot(model)
    report = magic(ns, f"prune {name} 0.5 --input {x}")
    assert isinstance(report, Comparison)
    layers = [m for m in model.modules() if hasattr(m, "weight") and m.weight.dim() > 1]
    for m in layers[:-1]:
        assert zero_fraction(m.weight) == pytest.approx(0.5, abs=0.02)
    text = str(report)
    assert (
        "left alone" in text
        and "%speedup" in text
        and "Model latency (measured, before/after interleaved)" in text
    )
    magic(ns, f"undo {name}")
    assert_same_state(model, saved)
    assert "Undid 'prune'" in capsys.readouterr().out


def test_prune_magic_options_and_expressions(ns):
    magic(ns, 'prune wrapper.net 0.3 --layers "0,2" --method random --include-output')
    assert zero_fraction(ns.user_ns["model"][0].weight) == pytest.approx(0.3, abs=0.01)
    magic(ns, "prune conv 0.25 --granularity channel --types Conv2d")
    assert nc.history(ns.user_ns["conv"])[-1].info["granularity"] == "channel"
    magic(ns, "prune conv 0.5 --granularity block --types Conv2d")
    assert nc.history(ns.user_ns["conv"])[-1].info["granularity"] == "block"
    magic(ns, "prune conv 0.25 --structured --types Conv2d")
    assert nc.history(ns.user_ns["conv"])[-1].info["granularity"] == "channel"
    magic(ns, "prune conv 0.5 --blocks --types Conv2d")
    assert nc.history(ns.user_ns["conv"])[-1].info["granularity"] == "block"
    ns.user_ns["ratios"] = {"0": 0.1, "3": 0.6}
    magic(ns, "prune conv ratios")
    assert zero_fraction(ns.user_ns["conv"][3].weight) == pytest.approx(0.6, abs=0.01)
    magic(ns, "prune model 0.5 --keep-masks")
    assert "0.weight_mask" in ns.user_ns["model"].state_dict()
    magic(ns, "prune model --remove-masks")
    assert "0.weight_mask" not in ns.user_ns["model"].state_dict()
    steps = magic(ns, "undo model --list")
    assert [s.name for s in steps] == ["prune", "prune", "remove-masks"]
    magic(ns, "undo model --all")
    assert nc.history(ns.user_ns["model"]) == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("prune nothing 0.5", "model: 'nothing' is not defined"),
        ("prune x 0.5", "is a Tensor, not a torch.nn.Module"),
        ("prune model 1.5", r"amount: 1.5 is outside \[0, 1\)"),
        ("prune model abc", "amount: 'abc' is not defined"),
        ("prune model", "amount: missing"),
        (
            "prune model 0.5 --layers 'enc.*'",
            "layers: pattern 'enc.*' matches no layer. Available: 0, 2",
        ),
        (
            "prune model 0.5 --input torch.randn(2,3)",
            r"--input: .*shape \(2, 3\).*expects last dimension 16",
        ),
        ("summary model --input y", "--input: 'y' is not defined"),
        ("prune model 0.5 --scope planet", "scope"),
        ("prune model 0.5 --structured --blocks", "--structured and --blocks: choose one"),
        ("prune model 0.5 --granularity block --structured", "--structured and --granularity"),
        ("prune model 0.5 --granularity planet", "--granularity: 'planet' is unknown; choose"),
        ("undo model", "nothing to undo"),
        ("summary model --repeats x", "--repeats: invalid int value: 'x'"),
        ("prune model 0.5 --bogus", r"--bogus: %prune has no such option; see %prune\?"),
    ],
)
def test_bad_input_gives_one_usage_error_and_leaves_the_model(ns, line, message):
    saved = snapshot(ns.user_ns["model"])
    with pytest.raises(UsageError, match=message):
        magic(ns, line)
    assert_same_state(ns.user_ns["model"], saved)


def test_usage_error_prints_one_line_without_traceback(ns, capsys):
    ns.run_cell("%prune model 2")
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "UsageError: amount: 2.0 is outside" in output
    assert "Traceback" not in output


def test_help_is_the_docstring(ns):
    assert "Prune a model in place" in ns.user_ns.get("__doc__", "") or True
    info = ns.object_inspect("%prune")
    assert "Prune a model in place" in info["docstring"] and "--structured" in info["docstring"]
    # Real argparse help: every option, the aliases documented as such.
    assert "--granularity GRANULARITY" in info["docstring"]
    assert "Alias of --granularity channel" in info["docstring"]
    assert "Alias of --granularity block" in info["docstring"]
    assert "Comparison" in info["docstring"]


@pytest.mark.parametrize("name", ["summary", "prune", "undo", "sensitivity", "quantize", "speedup"])
def test_an_unknown_option_is_a_usage_error_from_the_parser(ns, name):
    # IPython's magic_arguments parser raises UsageError itself (no SystemExit to catch).
    saved = snapshot(ns.user_ns["model"])
    with pytest.raises(UsageError, match="--bogus: %[a-z]+ has no such option"):
        magic(ns, f"{name} model --bogus")
    assert_same_state(ns.user_ns["model"], saved)


def test_prune_returns_a_comparison_whatever_the_options(ns):
    kept = magic(ns, "prune model 0.5 --keep-masks --input x")
    assert isinstance(kept, Comparison) and "Masks kept for fine-tuning" in str(kept)
    removed = magic(ns, "prune model --remove-masks")
    assert isinstance(removed, Comparison)
    assert (
        removed.title.startswith("Remove masks: made masks permanent") and "%undo" in removed.title
    )
    assert removed.before.totals["sparsity"] == removed.after.totals["sparsity"]
    assert removed.after.latency is not None  # the input given to the earlier %prune


def test_result_assignment_from_magic(ns):
    ns.run_cell("r = %summary model --input x --no-latency")
    assert isinstance(ns.user_ns["r"], Summary)


def test_prune_measures_latency_on_the_input_remembered_from_summary(ns):
    magic(ns, "summary conv --input xc --repeats 2")
    report = magic(ns, "prune conv 0.5")
    assert report.before.latency is not None and report.after.latency is not None
    assert report.after.inputs == "(2, 1, 8, 8) float32"


def test_api_compare_change_is_what_the_magic_shows(ns):
    from nbcompress.engine.core.compare import compare_change

    model, x = ns.user_ns["model"], ns.user_ns["x"]
    ns.user_ns["twin"] = copy.deepcopy(model)
    report = compare_change(model, lambda m: nc.prune_(m, 0.5), x)
    assert isinstance(report, Comparison) and report.result is model
    assert report.title.startswith("prune: ") and "left alone" in report.title
    assert report.before.latency is not None and report.speed_ratio is not None
    assert report.rows[-1]["sparsity after"] > report.rows[-1]["sparsity before"]
    via_magic = magic(ns, "prune twin 0.5 --input x")
    assert via_magic.title == f"Pruned: {nc.history(model)[-1].detail}. Undo with %undo."
    for api_row, magic_row in zip(report.rows, via_magic.rows, strict=True):
        assert api_row["layer"] == magic_row["layer"]
        assert api_row["sparsity after"] == magic_row["sparsity after"]


def test_api_compare_change_leaves_the_model_as_it_was_when_the_change_fails(ns):
    from nbcompress.engine.core.compare import compare_change

    model, x = ns.user_ns["model"], ns.user_ns["x"]
    saved = snapshot(model)
    with pytest.raises(ValueError, match="amount: 1.5 is outside"):
        compare_change(model, lambda m: nc.prune_(m, 1.5), x)
    assert_same_state(model, saved) and nc.history(model) == []
    nothing = compare_change(model, lambda m: None, None, title="{name}: {detail}")
    assert nothing.title == "unchanged: nothing changed" and nothing.result is None
    assert nothing.before.latency is None and nothing.after.latency is None


def test_prune_times_before_and_after_interleaved(ns, monkeypatch):
    from nbcompress.engine.core import compare as cmp

    calls = []
    real = cmp.measure_interleaved

    def spy(fns, **kw):
        calls.append(sorted(fns))
        return real(fns, **kw)

    monkeypatch.setattr(cmp, "measure_interleaved", spy)
    report = magic(ns, "prune conv 0.5 --input xc")
    assert calls == [["after", "before"]]
    assert report.before.latency.repeats == report.after.latency.repeats == 15


def test_a_refused_input_is_not_remembered_for_the_next_magic(ns):
    ns.user_ns["flat"] = torch.randn(2, 28, 28)  # not (N, 1, H, W)
    magic(ns, "summary conv --input xc --repeats 2 --no-latency")
    with pytest.raises(UsageError):
        magic(ns, "summary conv --input flat --repeats 2")
    report = magic(ns, "prune conv 0.5")  # recalls xc, not the refused flat
    assert report.after.inputs == "(2, 1, 8, 8) float32"
