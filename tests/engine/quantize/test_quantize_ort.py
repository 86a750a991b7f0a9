"""The ONNX Runtime int8 Linear backend: correct, ordinary, optional, raced like the others."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.quantize import modes, ort_int8
from nbcompress.engine.quantize.backends import backends_for
from nbcompress.engine.quantize.choice import NEGLIGIBLE_ERROR, accurate_among_fast
from nbcompress.engine.quantize.config import DynamicInt8Config
from nbcompress.engine.quantize.cpu import cpu_has_vnni, forced_int8_cpu
from nbcompress.engine.quantize.modules import Int8DynamicLinear
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear, session_weight
from nbcompress.engine.quantize.report import serialized_size
from tests.helpers import assert_same_state, concurrent_calls, fixed_race, needs_ort, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def layer(n_in=96, n_out=80, bias=True):
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out, bias=bias).eval()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@needs_ort
@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_close_to_float_and_to_our_int8_on_both_cpu_paths(vnni, bias):
    lin, x = layer(bias=bias), torch.randn(16, 96)
    with forced_int8_cpu(vnni):
        q, ours = OrtInt8Linear(lin), Int8DynamicLinear(lin)
        with torch.no_grad():
            y, ref, y_ours = q(x), lin(x), ours(x)
    assert int(q.qweight.abs().max()) == (127 if vnni else 63)
    assert q.qweight.dtype == torch.int8 and y.dtype == torch.float32
    if not vnni or cpu_has_vnni():  # forced VNNI on a CPU without it saturates for real
        assert rel(y, ref) < 0.02
        # The same quantization as our own int8 (8-bit u8 activations, per-row weights).
        assert rel(y, ref) <= 1.2 * rel(y_ours, ref) + 1e-6


@needs_ort
def test_without_vnni_the_session_weight_cannot_saturate_int16_pair_sums():
    # u8 activations × s8 weights, two neighbouring products summed in int16 (AVX2's
    # vpmaddubsw): 255 × 127 × 2 overflows, 255 × 63 × 2 does not.
    with forced_int8_cpu(True):
        wide = OrtInt8Linear(layer())  # as built on a VNNI machine
    assert int(wide.qweight.abs().max()) == 127
    assert 255 * 127 * 2 > 32767
    q, s = session_weight(wide.qweight, wide.scale, vnni=False)
    pairs = q.float().reshape(q.shape[0], -1, 2).abs().sum(-1) * 255
    assert int(q.abs().max()) <= 63 and float(pairs.max()) <= 32767
    # Requantized from the dequantized weights: the same layer to within 7-bit rounding.
    wq = wide.dequantized_weight()
    assert float((q.float() * s[:, None] - wq).abs().max()) <= float(s.max()) / 2 + 1e-7
    assert session_weight(wide.qweight, wide.scale, vnni=True)[0] is wide.qweight
    # The module uses it when it runs without VNNI (the buffers stay as saved).
    lin, x = layer(), torch.randn(8, 96)
    with forced_int8_cpu(False), torch.no_grad():
        loaded = copy.deepcopy(wide)
        assert rel(loaded(x), lin(x)) < 0.03
    assert torch.equal(loaded.qweight, wide.qweight)


@needs_ort
@pytest.mark.parametrize("shape", [(96,), (3, 96), (2, 5, 96), (2, 3, 4, 96), (0, 96)])
def test_any_leading_dims(shape):
    lin, x = layer(), torch.randn(*shape)
    q = OrtInt8Linear(lin)
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == ref.shape
    if x.numel():
        assert torch.allclose(y, ref, atol=0.05 * float(ref.abs().max()))
        assert torch.equal(y.reshape(-1, 80), q(x.reshape(-1, 96)))


@needs_ort
def test_dtype_layout_device_and_grad_are_handled_or_refused_clearly():
    lin, x = layer(), torch.randn(6, 96)
    q = OrtInt8Linear(lin)
    with torch.no_grad():
        y = q(x)
        assert q(x.double()).dtype == torch.float64
        assert torch.equal(q(x.double()).float(), y)
        wide = torch.randn(96, 6).t()  # not contiguous
        assert torch.equal(q(wide), q(wide.contiguous()))
        assert q(x.bfloat16()).dtype == torch.bfloat16
        with pytest.raises(ValueError, match="float input"):
            q(torch.ones(2, 96, dtype=torch.int64))
        with pytest.raises(ValueError, match="last dimension 96"):
            q(torch.randn(2, 95))
        assert torch.equal(q(x.requires_grad_()), y)  # no grad mode: fine
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x)  # requires grad, grad enabled
    with pytest.raises(TypeError, match="nn.Linear"):
        OrtInt8Linear(nn.Conv1d(2, 2, 1))


@needs_ort
def test_state_dict_pickle_deepcopy_and_torch_save_round_trip_small():
    lin, x = layer(), torch.randn(4, 96)
    q = OrtInt8Linear(lin)
    with torch.no_grad():
        y = q(x)  # a session exists now: it must not travel
        assert set(q.state_dict()) == {"qweight", "scale", "bias"}
        assert serialized_size(q) < 0.4 * serialized_size(lin)  # int8 storage
        for copied in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
            assert copied._sessions == {} and torch.equal(copied(x), y)
        buf = io.BytesIO()
        torch.save(q, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)
        other = OrtInt8Linear(nn.Linear(96, 80))
        other(x)
        other.load_state_dict(q.state_dict())
        assert other._sessions == {}  # rebuilt with the loaded weights
        assert torch.equal(other(x), y)


@needs_ort
def test_a_thread_count_change_builds_its_own_session_with_the_same_result():
    q, x = OrtInt8Linear(layer()), torch.randn(8, 96)
    with torch.no_grad():
        y1 = q(x)
        torch.set_num_threads(2)
        y2 = q(x)
    assert set(q._sessions) == {1, 2} and q._sessions[1] is not q._sessions[2]
    assert torch.equal(y1, y2)  # per-tensor activation scale: no split-dependent rounding
    torch.set_num_threads(1)
    with torch.no_grad():
        q(x)
    assert len(q._sessions) == 2  # reused, not rebuilt


@needs_ort
def test_concurrent_calls_from_four_threads_give_the_same_result():
    q, x = OrtInt8Linear(layer(256, 512)), torch.randn(8, 256)
    with torch.no_grad():
        ref = q(x)
    results = concurrent_calls(lambda: q(x), 25)
    assert len(results) == 100 and all(torch.equal(y, ref) for y in results)


@needs_ort
def test_quantize_with_the_onnxruntime_family_swaps_every_linear_and_undo_is_bit_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16)).eval()
    x, saved = torch.randn(8, 64), snapshot(model)
    with torch.no_grad():
        ref = model(x)
    nc.quantize_(model, "dynamic", example_inputs=x, backend="onnxruntime", repeats=3)
    assert isinstance(model[0], OrtInt8Linear) and isinstance(model[2], OrtInt8Linear)
    report = nc.quantize_report(model)
    assert {row["backend"] for row in report.rows} == {"onnxruntime-int8"}
    assert report.cosine > 0.999
    with torch.no_grad():
        assert rel(model(x), ref) < 0.03
    nc.undo_(model)
    assert_same_state(model, saved)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


@needs_ort
@pytest.mark.parametrize("ort_seconds, expected", [(0.2, "onnxruntime-int8"), (0.9, None)])
def test_the_race_picks_onnxruntime_only_when_measured_faster(monkeypatch, ort_seconds, expected):
    monkeypatch.setenv("NBCOMPRESS_ORT_FUSE", "0")  # the per-layer decision alone
    table = {"float": 1.0, "onnxruntime-int8": ort_seconds}
    monkeypatch.setattr(modes, "race", fixed_race(lambda n: table.get(n, 0.5)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    nc.quantize_(model, "dynamic", example_inputs=torch.randn(8, 64), repeats=3)
    chosen = {row["backend"] for row in nc.quantize_report(model).rows}
    if expected:
        assert chosen == {expected}
    else:
        assert "onnxruntime-int8" not in chosen and len(chosen) >= 1


def test_a_faster_but_less_accurate_backend_does_not_win_on_speed_alone():
    names = ("float", "nbcompress-int8", "onnxruntime-int8")
    race = fixed_race({"float": 1.0, "nbcompress-int8": 0.4, "onnxruntime-int8": 0.25}.get)(
        dict.fromkeys(names)
    )
    sizes = dict.fromkeys(names[1:], 100)
    same = dict.fromkeys(names[1:], 2 * NEGLIGIBLE_ERROR)
    assert accurate_among_fast(race, same, sizes) == "onnxruntime-int8"
    worse = {"nbcompress-int8": 2 * NEGLIGIBLE_ERROR, "onnxruntime-int8": 5 * NEGLIGIBLE_ERROR}
    assert accurate_among_fast(race, worse, sizes) == "nbcompress-int8"


def test_without_onnxruntime_everything_works_as_before(monkeypatch):
    why = "onnxruntime is not installed (pip install 'nbcompress[ort]')"
    monkeypatch.setattr(ort_int8, "ort_problem", lambda: why)
    [ort] = [b for b in backends_for(DynamicInt8Config()) if b.family == "onnxruntime"]
    assert ort.available() == why
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    x = torch.randn(8, 64)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3)
    backends = {row["backend"] for row in nc.quantize_report(model).rows}
    assert backends and "onnxruntime-int8" not in backends
    assert "forward" not in model.__dict__  # no ORT graph either
    nc.undo_(model)
    saved = snapshot(model)
    with pytest.raises(ValueError, match="onnxruntime is not installed"):
        nc.quantize_(model, "dynamic", example_inputs=x, backend="onnxruntime", repeats=3)
    assert_same_state(model, saved)
    assert type(model[0]) is nn.Linear
    with pytest.raises(RuntimeError, match="not installed"):
        OrtInt8Linear(model[0])(x)


def test_the_import_check_names_the_missing_package(monkeypatch):
    real = ort_int8.importlib.util.find_spec
    monkeypatch.setattr(
        ort_int8.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    assert "onnxruntime is not installed" in ort_int8._import_problem.__wrapped__()


@needs_ort
def test_speedup_candidates_offer_the_ort_dense_int8_twin_beside_torch_s():
    from nbcompress.engine.speedup.candidates import dense_int8

    lin, x = layer(), torch.randn(4, 96)
    found = dense_int8(lin, {})
    assert isinstance(found["ort_int8"], OrtInt8Linear)
    with torch.no_grad():
        for module in found.values():
            assert rel(module(x), lin(x)) < 0.03
    assert dense_int8(nn.Conv1d(2, 2, 1), {}) == {}


def test_speedup_candidates_leave_ort_out_when_it_is_not_installed(monkeypatch):
    from nbcompress.engine.speedup.candidates import dense_int8

    monkeypatch.setattr(ort_int8, "ort_problem", lambda: "onnxruntime is not installed")
    assert "ort_int8" not in dense_int8(layer(), {})


def mlp_chain():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 16)
    ).eval()


def _graph_wins(monkeypatch, wins=True):
    from nbcompress.engine.quantize import ort_chain

    monkeypatch.delenv(ort_chain.ENV_FUSE, raising=False)  # on by default
    table = {"layers": 1.0, "graph": 0.5 if wins else 0.95}
    monkeypatch.setattr(ort_chain, "race", fixed_race(table.__getitem__))


@needs_ort
@pytest.mark.parametrize("vnni", [False, True])
def test_a_sequential_run_becomes_one_ort_graph_where_it_races_faster(monkeypatch, vnni):
    from nbcompress.engine.quantize.ort_chain import FusedForward

    _graph_wins(monkeypatch)
    model, x = mlp_chain(), torch.randn(8, 64)
    saved, originals, keys = snapshot(model), list(model), None
    with torch.no_grad():
        ref = model(x)
    with forced_int8_cpu(vnni):
        nc.quantize_(model, "dynamic", example_inputs=x, repeats=3)
        fused = model.__dict__["forward"]
        assert isinstance(fused, FusedForward) and list(fused.runs) == [0]
        # Every layer stays in place, addressable, with its own weights and forward.
        assert [type(m) for m in model] == [OrtInt8Linear, nn.GELU, OrtInt8Linear, nn.ReLU,
                                            OrtInt8Linear]  # fmt: skip
        assert [int(m.qweight.abs().max()) for m in model[::2]] == [127 if vnni else 63] * 3
        keys = set(model.state_dict())
        with torch.no_grad():
            y = model(x)
            if not vnni or cpu_has_vnni():
                assert rel(y, ref) < 0.03
            for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
                assert isinstance(copied.__dict__["forward"], FusedForward)
                assert copied.__dict__["forward"].seq is copied
                assert torch.equal(copied(x), y)
            # A hook on a fused child: the run is called child by child, and the hook fires.
            seen = []
            handle = model[2].register_forward_hook(lambda *a: seen.append(1))
            assert torch.allclose(model(x), y, atol=1e-4) and seen == [1]
            handle.remove()
            # New weights reach the graph: the chain's sessions are dropped with the layer's.
            chain = fused.runs[0][1]
            assert chain._sessions
            model.load_state_dict(model.state_dict())
            assert chain._sessions == {} and torch.equal(model(x), y)
    assert keys == {f"{i}.{k}" for i in (0, 2, 4) for k in ("qweight", "scale", "bias")}
    rows = nc.quantize_report(model).rows
    assert {r["backend"] for r in rows} == {"onnxruntime-int8"}
    assert all("one ORT graph 0…4" in r["note"] for r in rows)
    nc.undo_(model)
    assert_same_state(model, saved)
    assert "forward" not in model.__dict__
    assert all(a is b for a, b in zip(model, originals))


@needs_ort
def test_a_run_stays_layer_by_layer_where_the_graph_is_not_clearly_faster(monkeypatch):

    _graph_wins(monkeypatch, wins=False)
    model = mlp_chain()
    nc.quantize_(model, "dynamic", example_inputs=torch.randn(8, 64), repeats=3)
    assert "forward" not in model.__dict__
    _graph_wins(monkeypatch, wins=True)
    monkeypatch.setenv("NBCOMPRESS_ORT_FUSE", "0")  # switched off, however fast it races
    model = mlp_chain()
    nc.quantize_(model, "dynamic", example_inputs=torch.randn(8, 64), repeats=3)
    assert "forward" not in model.__dict__


@needs_ort
def test_runs_need_two_dense_int8_linears_with_supported_activations_between():
    from nbcompress.engine.quantize.ort_chain import OrtInt8Chain, _runs

    model = nn.Sequential(
        nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8),
        nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), nn.Linear(8, 8),
    )  # fmt: skip
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    backend = dict.fromkeys(names, "nbcompress-int8") | {"6.2": "numba-csr-int8"}
    rows = [{"layer": n, "backend": b} for n, b in backend.items()]
    selected = dict(model.named_modules())
    job = modes.Job(model, DynamicInt8Config(), "auto", selected, None, None, False, 3, rows=rows)
    # LayerNorm breaks the first run; the trailing ReLU stays out; 6.0 has no int8 partner.
    assert list(_runs(job)) == [["2", "3", "4"]]
    with pytest.raises(ValueError, match="steps"):
        OrtInt8Chain([nn.GELU(), OrtInt8Linear(nn.Linear(8, 8))])
