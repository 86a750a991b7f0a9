"""quantize_ under issue 11's attacks: flags, pickling, re-quantizing, empty batches, outputs."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.history import history
from nbcompress.engine.quantize import modes as qmod
from nbcompress.engine.quantize import quantize as qtop
from nbcompress.engine.quantize.config import StaticInt8Config
from nbcompress.engine.quantize.measure import output_cosine, rel_errors
from nbcompress.engine.quantize.static import StaticRegion, calibration_batches
from nbcompress.timing import Race, Timing
from tests.helpers import assert_same_state, cnn, mlp, snapshot

FAST = dict(repeats=3)


def run(model, *x):
    with torch.no_grad():
        return model(*x)


def flags(model):
    return [(n, m.training) for n, m in model.named_modules()]


def train_mode_mlp():
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.0), nn.Linear(32, 24), nn.Linear(24, 4))
    model.train()
    model[1].eval()  # a mixed state must come back as it was, not as all-train
    return model


def slower_race(fns, **kw):
    names = tuple(fns)
    seconds = {n: 1.0 if n == "float" else 2.0 for n in names}
    times = {n: Timing(seconds[n], 1, 1, 3) for n in names}
    return Race(names, times, {n: (seconds[n],) * 3 for n in names})


# --- F6: training flags after undo and after every rollback ------------------------------


def test_undo_after_quantize_restores_every_training_flag():
    model, x = train_mode_mlp(), torch.randn(4, 16)
    before, saved = flags(model), snapshot(model)
    nc.quantize_(model, "dynamic", example_inputs=x, **FAST)
    assert flags(model)[0] == ("", True)  # the model's own flag is back after measuring
    nc.undo_(model)
    assert flags(model) == before
    assert_same_state(model, saved)


def _evaluate_fails(m):
    if type(m[0]) is not nn.Linear:
        raise RuntimeError("metric fails on the quantized model")
    return 1.0


def _interrupt(job, tx):
    raise KeyboardInterrupt


@pytest.mark.parametrize("failure", ["evaluate", "only_faster", "ctrl-c"])
def test_every_rolled_back_quantize_restores_every_training_flag(failure, monkeypatch):
    model, x = train_mode_mlp(), torch.randn(4, 16)
    before, saved = flags(model), snapshot(model)
    kwargs: dict = {}
    if failure == "evaluate":
        kwargs["evaluate"], error = _evaluate_fails, ValueError
    elif failure == "only_faster":
        monkeypatch.setattr(qtop, "race", slower_race)  # the whole model measures slower
        monkeypatch.setattr(qmod, "clearly_faster", lambda race, name: True)
        kwargs["only_faster"], error = True, ValueError
    else:
        monkeypatch.setattr(qmod, "keep_within_budget", _interrupt)  # after every swap
        error = KeyboardInterrupt
    with pytest.raises(error):
        nc.quantize_(model, "dynamic", example_inputs=x, **kwargs, **FAST)
    assert flags(model) == before
    assert_same_state(model, saved)
    assert not history(model)


# --- F10: static int8 conv models survive pickle and torch.save ---------------------------


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_static_conv_model_survives_pickle_torch_save_and_deepcopy(fuse):
    model, x = cnn().eval(), torch.randn(8, 1, 8, 8)
    nc.quantize_(model, StaticInt8Config(fuse=fuse), calibrate=x, **FAST)
    assert any("Conv" in type(m).__name__ and m.__module__.startswith("torch.ao") for m in
               model.modules())  # fmt: skip
    out = run(model, x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [
        pickle.loads(pickle.dumps(model)),
        torch.load(buf, weights_only=False),
        copy.deepcopy(model),
    ]
    for loaded in copies:
        assert torch.equal(run(loaded.eval(), x), out)


def test_static_refuses_and_rolls_back_when_a_region_does_not_survive_pickle(monkeypatch):
    # Without the recipe, torch 2.14's quantized Conv unpickles without _modules.
    monkeypatch.setattr(StaticRegion, "__getstate__", nn.Module.__getstate__)
    model, x = cnn().eval(), torch.randn(8, 1, 8, 8)
    saved = snapshot(model)
    with pytest.raises(ValueError, match="does not survive pickle"):
        nc.quantize_(model, "static", calibrate=x, **FAST)
    assert_same_state(model, saved)
    assert not history(model)


class _LoadsBroken(nn.Module):
    """Pickles fine, loads broken (as torch 2.14's quantized convolutions do)."""

    def __init__(self, layer):
        super().__init__()
        self.inner = copy.deepcopy(layer)

    def forward(self, x):
        return self.inner(x)

    def __setstate__(self, state):
        self.__dict__["_broken"] = True  # no _modules: the call fails after loading


def test_every_candidate_is_pickled_loaded_and_called_before_it_is_used(monkeypatch):
    from nbcompress.engine.quantize.backends import Backend

    fake = Backend(
        "loads-broken", "nbcompress", object, lambda c, m: None, lambda c, m: _LoadsBroken(m)
    )
    monkeypatch.setattr(qmod, "backends_for", lambda config, family: [fake])
    for x in (torch.randn(4, 16), None):  # with an example input, and with a probe input
        model = mlp().eval()
        with pytest.raises(ValueError, match="rejected: does not survive pickle"):
            nc.quantize_(model, "weight", example_inputs=x, **FAST)
        assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())


# --- F13: quantizing after half-compute ---------------------------------------------------


@pytest.mark.parametrize("second", ["dynamic", "weight", "fp16", "bf16"])
def test_quantize_after_half_compute_refuses_in_one_line(second):
    model, x = mlp().eval(), torch.randn(4, 16)
    nc.quantize_(model, "fp16", example_inputs=x, backend="torch", **FAST)
    assert type(model[0]).__name__ == "HalfCompute"
    saved, out = snapshot(model), run(model, x)
    for inputs in (x, None):
        with pytest.raises(ValueError, match="model: already quantized .*undo first"):
            nc.quantize_(model, second, example_inputs=inputs, **FAST)
    assert_same_state(model, saved)
    assert torch.equal(run(model, x), out) and len(history(model)) == 1


# --- F21 / F4: empty batches, torch.ao layers beside new ones -----------------------------


def test_an_empty_batch_is_refused_in_one_line_and_the_model_is_untouched():
    model = mlp().eval()
    saved = snapshot(model)
    with pytest.raises(ValueError, match="example_inputs: the batch is empty"):
        nc.quantize_(model, "dynamic", example_inputs=torch.randn(0, 16), **FAST)
    with pytest.raises(ValueError, match="calibrate: batch 0 is empty"):
        nc.quantize_(model, "static", calibrate=torch.randn(0, 16), **FAST)
    assert_same_state(model, saved)
    assert not history(model)


def test_quantize_beside_a_torch_ao_layer_records_its_own_step():
    # The history counts torch.ao's packed params (core); quantize's own paths must not
    # treat the tuples as tensors either (F4).
    model, x = mlp().eval(), torch.randn(4, 16)
    nc.quantize_(model, "dynamic", layers="4", backend="torch", example_inputs=x, **FAST)
    first, weight, out = model[0], model[0].weight.clone(), run(model, x)
    nc.quantize_(model, "weight", layers="0", example_inputs=x, **FAST)
    assert [s.name for s in history(model)] == ["quantize", "quantize"]
    nc.undo_(model)
    assert model[0] is first and torch.equal(first.weight, weight)
    assert type(model[4]).__module__.startswith("torch.ao") and torch.equal(run(model, x), out)


# --- outputs: every tensor compared; a cosine that is not a sign count --------------------


def test_errors_cover_every_tensor_of_a_tuple_output():
    out = torch.ones(2, 3, 4)
    h, c = torch.ones(1, 2, 4), torch.ones(1, 2, 4)
    peak, rms = rel_errors((out, (h, c)), (out, (h * 3, c)))  # only the state differs
    assert peak == pytest.approx(2.0) and rms > 0.5
    with pytest.raises(ValueError, match="nothing to compare"):
        rel_errors({"ids": torch.arange(3)}, {"ids": torch.arange(3)})


def test_cosine_of_a_one_column_output_is_taken_across_the_batch():
    ref = torch.tensor([[1.0], [2.0], [-0.001]])
    out = torch.tensor([[1.0], [2.0], [0.001]])  # one tiny value changed sign
    assert output_cosine(out, ref) == pytest.approx(1.0, abs=1e-6)  # rows: a sign count, 1/3
    model, x = (
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)).eval(),
        torch.randn(8, 16),
    )
    ref_out = run(model, x)
    nc.quantize_(model, "dynamic", example_inputs=x, **FAST)
    got = run(model, x)
    expected = torch.nn.functional.cosine_similarity(got.reshape(1, -1), ref_out.reshape(1, -1))
    assert nc.quantize_report(model).cosine == pytest.approx(float(expected), abs=1e-5)


# --- coverage and calibration mappings ----------------------------------------------------


def test_the_report_states_the_share_of_parameters_left_float_and_why():
    from tests.real_models import transformer_encoder

    model, x = transformer_encoder()
    total = sum(p.numel() for p in model.parameters())
    attn = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n)
    nc.quantize_(model, "weight", example_inputs=x, **FAST)
    report = nc.quantize_report(model)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    # The token table is quantized too (per-row int8 rows, issue 16).
    assert report.float_share == pytest.approx((attn + norms) / total)
    note = next(n for n in report.notes if n.startswith("Left in float"))
    assert "MultiheadAttention ×2" in note and "LayerNorm" in note and "Embedding" not in note
    assert "no weight-only kernel" in note


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, features):
        return self.net(features["x"])


def test_calibration_batches_may_be_mappings_of_tensors():
    batches = [{"x": torch.randn(8, 16), "ids": torch.arange(8)} for _ in range(3)]
    assert calibration_batches(batches, 10)[0] == (batches[0],)
    assert calibration_batches([(batches[0], torch.zeros(8))], 10)[0] == (batches[0],)
    model = DictInput().eval()
    ref = run(model, batches[0])
    nc.quantize_(model, "static", calibrate=batches, **FAST)
    assert any(isinstance(m, StaticRegion) for m in model.modules())
    assert torch.allclose(run(model, batches[0]), ref, atol=0.1 * float(ref.abs().max()))
