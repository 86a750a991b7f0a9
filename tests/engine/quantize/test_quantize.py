"""quantize_: modes, undo, rollback, bad input, prune + quantize, backends."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.history import history
from nbcompress.engine.quantize import modes as qmod
from nbcompress.engine.quantize.backends import backends_for
from nbcompress.engine.quantize.config import DynamicInt8Config, StaticInt8Config
from nbcompress.engine.quantize.report import weight_values
from nbcompress.engine.quantize.static import StaticRegion
from nbcompress.timing import Race, Timing
from nbcompress.zoo import SeedCNN
from tests.helpers import assert_same_state, cnn, mlp, snapshot, zero_fraction

FAST = dict(repeats=3)


def big_mlp():
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def run(model, x):
    with torch.no_grad():
        return model(x)


def fixed_race(seconds):
    """A stand-in for ``race``: every candidate takes ``seconds(name)`` in each of 3 rounds."""

    def fake(fns, **kw):
        names = tuple(fns)
        base = seconds(names[0])
        times = {n: Timing(seconds(n), 1, 1, 3) for n in names}
        return Race(names, times, {n: (seconds(n) / base,) * 3 for n in names})

    return fake


@pytest.mark.parametrize("mode", ["dynamic", "weight", "fp16", "bf16"])
def test_undo_is_bit_exact_after_each_layer_mode(mode):
    model, x = big_mlp().eval(), torch.randn(4, 64)
    saved, originals = snapshot(model), list(model)
    nc.quantize_(model, mode, example_inputs=x, **FAST)
    assert all(model[i] is not originals[i] for i in (0, 2, 4))  # every Linear swapped
    nc.undo_(model)
    assert_same_state(model, saved)
    assert all(a is b for a, b in zip(model, originals))


@pytest.mark.parametrize("make, shape", [(cnn, (8, 1, 8, 8)), (SeedCNN, (8, 1, 28, 28))])
def test_undo_is_bit_exact_after_static_with_fusion(make, shape):
    model = make()
    # Non-trivial BatchNorm statistics so that folding really changes the weights.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.eval()
    saved, calib = snapshot(model), torch.rand(*shape)
    nc.quantize_(model, "static", calibrate=calib, **FAST)
    assert any(isinstance(m, StaticRegion) for m in model.modules())
    nc.undo_(model)
    assert_same_state(model, saved)
    assert not any(isinstance(m, StaticRegion) for m in model.modules())


def test_static_fuses_conv_bn_relu_and_stays_close_to_float():
    model = cnn().eval()
    x = torch.rand(16, 1, 8, 8)
    ref = run(model, x)
    nc.quantize_(model, "static", calibrate=x, example_inputs=x, **FAST)
    report = nc.quantize_report(model)
    names = [type(m).__name__ for m in model.modules()]
    assert "ConvReLU2d" in names  # Conv+BN+ReLU folded into one quantized module
    assert report.rows[0]["note"] == "fused with 1, 2"
    out = run(model, x)
    assert torch.allclose(out, ref, atol=0.05 * ref.abs().max())
    assert report.max_diff == pytest.approx(float((out - ref).abs().max()), rel=1e-5)


def test_static_accepts_dataloader_and_iterable_of_pairs():
    x = torch.rand(32, 1, 8, 8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(32)), 8)
    for calib in (data, [(x[:8], None), (x[8:16], None)], iter([x[:4]])):
        model = cnn().eval()
        nc.quantize_(model, "static", calibrate=calib, **FAST)
        assert nc.quantize_report(model).quantized


def test_dynamic_lists_conv_layers_it_cannot_handle_with_the_reason():
    model, x = cnn().eval(), torch.rand(2, 1, 8, 8)
    nc.quantize_(model, "dynamic", example_inputs=x, **FAST)
    report = nc.quantize_report(model)
    assert report.quantized == ["6"]
    assert set(report.skipped) == {"0", "3"}
    assert all("no Conv kernel" in why for why in report.skipped.values())
    assert "0" in str(report) and "no Conv kernel" in report._repr_html_()


def test_report_has_sizes_latency_diff_and_backend_per_layer():
    model, x = big_mlp().eval(), torch.randn(8, 64)
    ref = run(model, x)
    nc.quantize_(
        model, "dynamic", example_inputs=x, evaluate=lambda m: 0.5, backend="torch", **FAST
    )
    r = nc.quantize_report(model)
    assert {row["backend"] for row in r.rows} <= {
        "torch.ao[fbgemm]",
        "torch.ao[x86]",
        "torch.ao[onednn]",
    }
    assert all(isinstance(row["time quantized"], Timing) for row in r.rows)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert r.size_after == buf.tell() < r.size_before
    assert r.layer_ratio > 3.0  # torch.ao keeps a float64 scale + int64 zero point per row
    assert r.latency_before.repeats == r.latency_after.repeats == 3
    assert r.metric_before == r.metric_after == 0.5
    assert r.max_diff == pytest.approx(float((run(model, x) - ref).abs().max()), rel=1e-5)
    assert r.cosine > 0.99
    assert "int8 dynamic" in str(r) and "<table>" in r._repr_html_()


def test_nbcompress_int8_is_compact_exact_on_zeros_and_survives_state_dict_reload():
    model, x = big_mlp().eval(), torch.randn(8, 64)
    nc.prune_(model, 0.5)
    nc.quantize_(model, "dynamic", example_inputs=x, backend="nbcompress", **FAST)
    r = nc.quantize_report(model)
    assert {row["backend"] for row in r.rows} == {"nbcompress-int8"} and r.layer_ratio > 3.5
    out = run(model, x)
    twin = copy.deepcopy(model)
    twin.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert torch.equal(run(twin, x), out)
    w = model[0].dequantized_weight()
    assert zero_fraction(w) >= 0.5


def test_backend_warnings_are_summarised_not_printed():
    model, x = big_mlp().eval(), torch.randn(2, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nc.quantize_(model, "static", calibrate=x, example_inputs=x, **FAST)
    assert not [w for w in caught if "quantiz" in str(w.message)]
    assert any("Backend warnings, summarised" in n for n in nc.quantize_report(model).notes)


def test_prune_then_quantize_keeps_the_zeros_and_shows_sparsity():
    model, x = big_mlp().eval(), torch.randn(4, 64)
    nc.prune_(model, 0.6)
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    nc.quantize_(model, "dynamic", example_inputs=x, **FAST)
    report = nc.quantize_report(model)
    for name, mask in zeros.items():
        w = weight_values(model.get_submodule(name))
        assert bool((w[mask] == 0).all()), name
    assert report.rows[0]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert report.rows[0]["bits"] == 8
    assert [s.name for s in history(model)] == ["prune", "quantize"]


def test_prune_then_static_keeps_the_zeros():
    model, x = cnn().eval(), torch.rand(8, 1, 8, 8)
    nc.prune_(model, 0.5)
    mask = model[3].weight == 0
    nc.quantize_(model, "static", calibrate=x, **FAST)
    qconv = next(
        m for m in model.modules() if type(m).__name__ == "ConvReLU2d" and m.in_channels == 8
    )
    assert bool((weight_values(qconv)[mask] == 0).all())


def test_failure_midway_rolls_back():
    model, x = big_mlp().eval(), torch.randn(2, 64)
    saved = snapshot(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) > 1:  # fails on the quantized model, after every layer was swapped
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(ValueError, match="evaluate: the eval function raised RuntimeError"):
        nc.quantize_(model, "dynamic", example_inputs=x, evaluate=evaluate, **FAST)
    assert_same_state(model, saved)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())
    assert not history(model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="int4"), ValueError, "mode: unknown quantization mode 'int4'"),
        (dict(mode="static"), ValueError, "calibrate: static mode needs calibration data"),
        (
            dict(mode="static", calibrate=torch.rand(4, 3)),
            ValueError,
            "calibrate: the model failed",
        ),
        (dict(mode="static", calibrate=[]), ValueError, "calibrate: the calibration data is empty"),
        (dict(mode="static", calibrate=5), TypeError, "calibrate: cannot iterate"),
        (dict(layers="nope.*"), ValueError, "layers: pattern 'nope.*' matches no layer"),
        (dict(types="Conv2d"), ValueError, "types: the model has no layer of type Conv2d"),
        (dict(backend="tensorrt"), ValueError, "backend: unknown backend 'tensorrt'"),
        (dict(example_inputs=torch.rand(2, 7)), ValueError, "example_inputs: the model failed"),
        (dict(evaluate=3), TypeError, "evaluate: expected a function"),
    ],
)
def test_bad_input_gets_one_clear_message_and_leaves_the_model_untouched(kwargs, error, match):
    model = mlp().eval()
    saved = snapshot(model)
    with pytest.raises(error, match=match):
        nc.quantize_(model, **kwargs, **FAST)
    assert_same_state(model, saved)
    assert not history(model)


def test_model_without_quantizable_layer_and_non_module():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="model: no quantizable layer"):
        nc.quantize_(model)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        nc.quantize_({"w": torch.ones(2)})
    conv_only = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="no Conv kernel; use mode='static'"):
        nc.quantize_(conv_only, "dynamic")
    assert type(conv_only[0]) is nn.Conv2d and not history(conv_only)


def test_only_faster_keeps_layers_float_when_int8_measures_slower(monkeypatch):
    # deterministic: every quantized candidate "slower" than float
    monkeypatch.setattr(qmod, "race", fixed_race(lambda n: 1.0 if n == "float" else 2.0))
    model, x = big_mlp().eval(), torch.randn(2, 64)
    with pytest.raises(ValueError, match="kept float"):
        nc.quantize_(model, "dynamic", example_inputs=x, only_faster=True, **FAST)
    assert not history(model)
    nc.quantize_(model, "dynamic", example_inputs=x, **FAST)  # default: quantize anyway
    assert len(nc.quantize_report(model).quantized) == 3


def test_fastest_correct_backend_is_picked_and_incorrect_ones_rejected(monkeypatch):
    order = {"float": 5.0, "torch.ao[fbgemm]": 3.0, "torch.ao[x86]": 1.0}
    monkeypatch.setattr(qmod, "race", fixed_race(lambda n: order.get(n, 4.0)))
    model, x = big_mlp().eval(), torch.randn(2, 64)
    nc.quantize_(model, "dynamic", example_inputs=x, backend="torch", **FAST)
    assert {r["backend"] for r in nc.quantize_report(model).rows} == {"torch.ao[x86]"}
    strict = DynamicInt8Config(tolerance=1e-9)  # nothing int8 is that exact
    with pytest.raises(ValueError, match="output error"):
        nc.quantize_(big_mlp().eval(), strict, example_inputs=x, **FAST)


def test_quantized_model_is_still_an_ordinary_model():
    for mode, kw in [("dynamic", {}), ("weight", {}), ("static", {"calibrate": torch.rand(4, 16)})]:
        model, x = mlp().eval(), torch.rand(4, 16)
        nc.quantize_(model, mode, example_inputs=x, **kw, **FAST)
        out = run(model, x)
        assert torch.equal(run(copy.deepcopy(model), x), out)
        assert torch.equal(run(pickle.loads(pickle.dumps(model)), x), out)


def test_without_example_input_sizes_are_reported_and_timing_says_so():
    model = big_mlp().eval()
    nc.quantize_(model, "weight")
    r = nc.quantize_report(model)
    assert r.latency_after is None and r.layer_ratio > 3.5
    assert any("not measured" in n for n in r.notes)


def test_lstm_dynamic():
    model = nn.Sequential(nn.LSTM(8, 16, batch_first=True)).eval()
    x = torch.randn(2, 5, 8)
    ref = run(model, x)[0]
    nc.quantize_(model, "dynamic", example_inputs=x, **FAST)
    assert type(model[0]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert torch.allclose(run(model, x)[0], ref, atol=0.05)


def test_numba_sparse_int8_backend_on_a_pruned_layer():
    if backends_for(DynamicInt8Config(), "numba")[0].available():
        pytest.skip("nbcompress.kernels int8 CSR path not present")
    model, x = big_mlp().eval(), torch.randn(4, 64)
    nc.prune_(model, 0.9)
    ref = run(model, x)
    nc.quantize_(model, "weight", example_inputs=x, backend="numba", **FAST)
    r = nc.quantize_report(model)
    assert {row["backend"] for row in r.rows if row["backend"]} == {"numba-csr-int8"}
    assert "only 0% zeros" in r.skipped["4"]  # the output layer was not pruned
    assert type(model[0]).__name__ == "SparseLinear" and model[0].format == "csr_int8"
    assert torch.allclose(run(model, x), ref, atol=0.02 * ref.abs().max())
    assert torch.equal(run(copy.deepcopy(model), x), run(model, x))
    assert r.rows[0]["sparsity"] >= 0.9


def test_torchao_is_tried_and_rejected_with_the_reason_when_it_cannot_be_pickled():
    pytest.importorskip("torchao")
    model, x = big_mlp().eval(), torch.randn(2, 64)
    saved = snapshot(model)
    try:
        nc.quantize_(model, "weight", example_inputs=x, backend="torchao", **FAST)
    except ValueError as err:  # torchao 0.18: its modules cannot be pickled / torch.save'd
        assert "failed (AttributeError" in str(err)
        assert_same_state(model, saved)
        return
    assert {r["backend"] for r in nc.quantize_report(model).rows} == {"torchao"}
    pickle.dumps(model)
    nc.undo_(model)
    assert_same_state(model, saved)


def test_static_config_engine_and_fusion_can_be_turned_off():
    model, x = cnn().eval(), torch.rand(4, 1, 8, 8)
    nc.quantize_(model, StaticInt8Config(fuse=False), calibrate=x, **FAST)
    kinds = {(type(m).__module__, type(m).__name__) for m in model.modules()}
    assert not any("intrinsic" in mod for mod, _ in kinds)  # nothing fused
    assert ("torch.ao.nn.quantized.modules.batchnorm", "BatchNorm2d") in kinds


def test_numba_sparse_int8_conv_in_weight_mode():
    if backends_for(DynamicInt8Config(), "numba")[0].available():
        pytest.skip("nbcompress.kernels int8 CSR path not present")
    model, x = cnn().eval(), torch.rand(2, 1, 8, 8)
    nc.prune_(model, 0.8)
    ref = run(model, x)
    nc.quantize_(model, "weight", example_inputs=x, backend="numba", **FAST)
    assert type(model[0]).__name__ == type(model[3]).__name__ == "SparseConv2d"
    assert torch.allclose(run(model, x), ref, atol=0.05 * ref.abs().max())


def test_static_per_tensor_weights_are_smaller_than_per_channel():
    x = torch.rand(16, 16)
    sizes = {}
    for per_channel in (True, False):
        model = mlp().eval()
        nc.quantize_(model, StaticInt8Config(per_channel=per_channel), calibrate=x, **FAST)
        qlin = next(m for m in model.modules() if type(m).__name__ == "LinearReLU")
        assert (qlin.weight().qscheme() == torch.per_channel_affine) is per_channel
        sizes[per_channel] = nc.quantize_report(model).layers_after
    assert sizes[False] < sizes[True]


def test_only_faster_rolls_back_when_the_whole_model_is_slower(monkeypatch):
    from nbcompress.engine.quantize import quantize as qtop

    # every int8 layer clearly faster in isolation...
    monkeypatch.setattr(qmod, "race", fixed_race(lambda n: 1.0 if n == "float" else 0.1))
    # ...but the model as a whole slower
    monkeypatch.setattr(qtop, "race", fixed_race(lambda n: 1.0 if n == "float" else 2.0))
    model, x = big_mlp().eval(), torch.randn(2, 64)
    saved = snapshot(model)
    with pytest.raises(ValueError, match="slower end to end"):
        nc.quantize_(model, "dynamic", example_inputs=x, only_faster=True, **FAST)
    assert_same_state(model, saved)
    assert not history(model)


def test_static_keeps_float_logits_via_a_dynamic_output_layer():
    model, x = cnn().eval(), torch.rand(8, 1, 8, 8)
    nc.quantize_(model, "static", calibrate=x, **FAST)
    row = next(r for r in nc.quantize_report(model).rows if r["layer"] == "6")
    assert type(model[6]).__name__ == "Int8DynamicLinear" and row["backend"] == "nbcompress-int8"
    assert "float output" in row["note"]
    assert run(model, x).dtype == torch.float32


def test_static_default_is_per_channel_for_convs_and_per_tensor_for_linear():
    schemes = {}
    for model, x in ((cnn().eval(), torch.rand(4, 1, 8, 8)), (mlp().eval(), torch.rand(16, 16))):
        nc.quantize_(model, "static", calibrate=x, **FAST)
        for m in model.modules():
            if callable(getattr(m, "weight", None)):  # torch.ao quantized layer
                kind = "conv" if "Conv" in type(m).__name__ else "linear"
                schemes.setdefault(kind, set()).add(m.weight().qscheme())
    assert schemes == {"conv": {torch.per_channel_affine}, "linear": {torch.per_tensor_affine}}


def test_negligible_errors_are_equally_accurate_and_the_small_fast_one_wins():
    from nbcompress.engine.quantize.choice import NEGLIGIBLE_ERROR, accurate_among_fast

    seconds = {"float": 1.0, "small": 1.6, "big": 1.9}
    race = fixed_race(seconds.__getitem__)(dict.fromkeys(seconds))
    sizes = {"small": 100, "big": 120}
    # Both errors negligible (LeNet-300-100 without VNNI): the smaller, faster one is kept.
    assert accurate_among_fast(race, {"small": 0.008, "big": 0.004}, sizes) == "small"
    # Above the floor, twice the error of another candidate is not "accurate".
    errors = {"small": 4 * NEGLIGIBLE_ERROR, "big": 2 * NEGLIGIBLE_ERROR}
    assert accurate_among_fast(race, errors, sizes) == "big"
