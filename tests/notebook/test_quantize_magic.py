"""%quantize through a real InteractiveShell."""

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

from nbcompress.engine.core.history import history
from nbcompress.engine.quantize.quantize import QuantizeReport
from tests.helpers import assert_same_state, cnn, snapshot


def big_mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


@pytest.fixture
def ns(shell):
    shell.user_ns.update(
        model=big_mlp(),
        conv=cnn().eval(),
        x=torch.randn(4, 64),
        xc=torch.rand(8, 1, 8, 8),
        acc=lambda m: 0.75,
    )
    return shell


def q(shell, rest):
    return shell.run_line_magic("quantize", rest)


def test_int8_dynamic_returns_the_report_and_undo_restores(ns):
    saved = snapshot(ns.user_ns["model"])
    report = q(ns, "model int8 --input x --eval acc --repeats 3")
    assert isinstance(report, QuantizeReport)
    assert report.mode == "int8 dynamic" and len(report.quantized) == 2
    assert report.metric_before == 0.75 and report.latency_after is not None
    ns.run_line_magic("undo", "model")
    assert_same_state(ns.user_ns["model"], saved)


def test_static_with_calibration_name_and_layer_selection(ns):
    saved = snapshot(ns.user_ns["conv"])
    report = q(ns, 'conv int8 --mode static --calibrate xc --layers "0,3" --repeats 3')
    assert report.mode == "int8 static"
    assert report.quantized == ["0", "3"]
    assert history(ns.user_ns["conv"])[-1].name == "quantize"
    ns.run_line_magic("undo", "conv")
    assert_same_state(ns.user_ns["conv"], saved)


def test_half_and_weight_modes_and_input_is_remembered(ns):
    ns.run_line_magic("summary", "model --input x --no-latency")
    report = q(ns, "model bf16 --repeats 3")
    assert report.mode == "bf16" and report.latency_after is not None  # --input remembered
    with pytest.raises(UsageError, match="model: already quantized"):
        q(ns, "model int8")
    ns.run_line_magic("undo", "model")
    report = q(ns, "model int8 --mode weight --backend nbcompress --repeats 3 --types Linear")
    assert {r["backend"] for r in report.rows} == {"nbcompress-dequant"}


@pytest.mark.parametrize(
    "line, match",
    [
        ("model int4", "dtype: unknown 'int4'"),
        ("model int8 --mode sparse", "--mode: unknown 'sparse'"),
        ("model fp16 --mode static", "--mode applies to int8 only"),
        ("model int8 --mode static", "calibrate: static mode needs calibration data"),
        ("conv int8 --mode static --calibrate x", "calibrate: the model failed"),
        ("model int8 --calibrate nothing_here --mode static", "--calibrate: 'nothing_here' is not"),
        ("model int8 --layers nope", "layers: pattern 'nope' matches no layer"),
        ("x int8", "model: 'x' is a Tensor, not a torch.nn.Module"),
        ("model int8 --bogus", "--bogus: %[a-z]+ has no such option"),
    ],
)
def test_mistakes_raise_usage_error_and_leave_the_model_alone(ns, line, match):
    name = line.split()[0]
    obj = ns.user_ns[name]
    saved = snapshot(obj) if isinstance(obj, nn.Module) else None
    with pytest.raises(UsageError, match=match):
        q(ns, line)
    if saved is not None:
        assert_same_state(obj, saved)
        assert not history(obj)


def test_per_tensor_static(ns):
    report = q(ns, "conv int8 --mode static --calibrate xc --per-tensor --repeats 3")
    qconv = ns.user_ns["conv"][0][1]
    assert qconv.weight().qscheme() == torch.per_tensor_affine and report.quantized
    with pytest.raises(UsageError, match="--per-tensor applies to int8 dynamic and static"):
        q(ns, "model fp16 --per-tensor")


def test_help_is_the_docstring(ns):
    doc = ns.magics_manager.magics["line"]["quantize"].__doc__
    assert "Quantize a model in place" in doc and "--calibrate" in doc
