"""ORT int8 graphs: per-tensor weight scales where no less accurate, the compiled session
call, one thread for small inputs where measured faster, and the positional-call check."""

import operator

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.quantize import ort_chain, ort_scales, ort_threads
from nbcompress.engine.quantize.cpu import cpu_has_vnni, forced_int8_cpu
from nbcompress.engine.quantize.ort_block import CallSpec
from nbcompress.engine.quantize.ort_chain import FusedForward, OrtInt8Chain
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear, per_tensor, runner
from tests.helpers import assert_same_state, concurrent_calls, fixed_race, needs_ort, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def even_linear(n_in, n_out, seed):
    """A Linear whose rows reach almost the same max |w| (per-row scales differ a little)."""
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.clamp_(-0.05, 0.05)
        layer.weight[:, 0] = 0.1 + 1e-3 * torch.rand(n_out)
    return layer.eval()


def even_chain():
    return nn.Sequential(even_linear(64, 128, 0), nn.GELU(), even_linear(128, 32, 1)).eval()


def uneven_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight[0] *= 30  # one row's range: per-tensor scales lose the others
    return model


def _fuse(monkeypatch):
    monkeypatch.delenv(ort_chain.ENV_FUSE, raising=False)
    monkeypatch.delenv(ort_scales.ENV_SCALES, raising=False)
    monkeypatch.setattr(ort_chain, "race", fixed_race({"layers": 1.0, "graph": 0.5}.get))


@needs_ort
@pytest.mark.parametrize("vnni", [False, True])
def test_a_per_tensor_layer_matches_its_dequantized_weight_and_the_graph_matches_the_layers(vnni):
    torch.manual_seed(0)
    lin, x = nn.Linear(96, 80).eval(), torch.randn(8, 96)
    with forced_int8_cpu(vnni), torch.no_grad():
        q = OrtInt8Linear(lin, per_tensor=True)
        assert per_tensor(q.scale) and q.scale.shape == (80,)
        assert int(q.qweight.abs().max()) == (127 if vnni else 63)
        assert "per-tensor" in repr(q)
        dequant = nn.functional.linear(x, q.dequantized_weight(), q.bias)
        if not vnni or cpu_has_vnni():
            assert float((q(x) - dequant).norm() / dequant.norm()) < 0.02
        # One graph of per-tensor and per-row layers = the layers one by one.
        steps = [q, nn.GELU(), OrtInt8Linear(nn.Linear(80, 24))]
        chain = OrtInt8Chain(steps)
        by_layer = steps[2](nn.functional.gelu(q(x)))
        assert torch.allclose(chain(x), by_layer, rtol=1e-4, atol=1e-5)


@needs_ort
def test_the_compiled_session_call_gives_the_numbers_of_the_public_run():
    q, x = OrtInt8Linear(nn.Linear(48, 40)), torch.randn(5, 48)
    session = q.session()
    run, names = runner(session)
    assert run is not session.run  # the compiled call, not the wrapper
    public = session.run(None, {"x": x.numpy()})[0]
    assert (run(names, {"x": x.numpy()}, None)[0] == public).all()
    with torch.no_grad():
        assert torch.equal(q(x), torch.from_numpy(public))


@needs_ort
@pytest.mark.parametrize("tensor_wins", [True, False])
def test_per_tensor_scales_are_chosen_only_where_measured_no_less_accurate(
    monkeypatch, tensor_wins
):
    _fuse(monkeypatch)
    errors = (0.02, 0.01) if tensor_wins else (0.01, 0.02)  # (per-row, per-tensor)
    monkeypatch.setattr(ort_scales, "scale_errors", lambda *a: errors)
    monkeypatch.setattr(ort_scales, "graph_errors", lambda ref, out: (0.0, 0.0))
    model, x = even_chain(), torch.randn(8, 64)
    saved, originals = snapshot(model), list(model)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3)
    assert isinstance(model.__dict__["forward"], FusedForward)
    assert [per_tensor(m.scale) for m in model[::2]] == [tensor_wins] * 2
    note = nc.quantize_report(model).rows[0]["note"]
    assert ("2 Linear(s) with per-tensor weight scales" in note) == tensor_wins
    nc.undo_(model)
    assert_same_state(model, saved)
    assert "forward" not in model.__dict__ and all(a is b for a, b in zip(model, originals))


@needs_ort
def test_real_errors_keep_per_row_scales_where_one_row_has_a_larger_range(monkeypatch):
    _fuse(monkeypatch)
    seen = []
    real = ort_scales.scale_errors
    monkeypatch.setattr(ort_scales, "scale_errors", lambda *a: seen.append(real(*a)) or seen[-1])
    model = uneven_chain()
    nc.quantize_(model, "dynamic", example_inputs=torch.randn(8, 64), repeats=3)
    assert len(seen) == 2 and all(tensor > row for row, tensor in seen)
    assert not any(per_tensor(m.scale) for m in model[::2])


@needs_ort
def test_a_worse_graph_keeps_per_row_scales_even_if_each_layer_looked_better(monkeypatch):
    _fuse(monkeypatch)
    monkeypatch.setattr(ort_scales, "scale_errors", lambda *a: (0.02, 0.01))
    monkeypatch.setattr(ort_scales, "graph_errors", lambda ref, out: (0.0, 1.0))
    model = even_chain()  # each layer looked better, the whole graph is worse: refused
    nc.quantize_(model, "dynamic", example_inputs=torch.randn(8, 64), repeats=3)
    assert not any(per_tensor(m.scale) for m in model[::2])


@needs_ort
@pytest.mark.parametrize("one_wins", [True, False])
def test_small_inputs_run_on_one_thread_only_where_that_raced_faster(monkeypatch, one_wins):
    table = {"threads": 1.0, "one": 0.8 if one_wins else 0.99}
    monkeypatch.setattr(ort_threads, "race", fixed_race(table.get))
    chain = OrtInt8Chain([OrtInt8Linear(nn.Linear(32, 16))])
    small, large = torch.randn(2, 32), torch.randn(6, 32)
    assert ort_threads.settle_threads(chain, lambda: None, small.numel(), 3) == 0.0  # 1 thread
    torch.set_num_threads(2)
    gain = ort_threads.settle_threads(chain, lambda: None, small.numel(), 3)
    assert gain == pytest.approx(1 / table["one"])
    assert chain.one_thread_upto == (small.numel() if one_wins else 0)
    with torch.no_grad():
        y_small, y_large = chain(small), chain(large)
    assert set(chain._sessions) == ({1, 2} if one_wins else {2})
    torch.set_num_threads(1)
    with torch.no_grad():  # the same numbers on the other session
        assert torch.equal(chain(small), y_small) and torch.equal(chain(large), y_large)


@needs_ort
def test_a_fused_model_called_from_four_threads_after_a_thread_count_change(monkeypatch):
    _fuse(monkeypatch)
    model, x = even_chain(), torch.randn(8, 64)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3)
    with torch.no_grad():
        ref = model(x)
    torch.set_num_threads(2)
    results = concurrent_calls(lambda: model(x), 20)
    assert len(results) == 80 and all(torch.equal(y, ref) for y in results)
    assert 2 in model.__dict__["forward"].runs[0][1]._sessions


def test_the_positional_call_check_matches_the_general_one():
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5)
    spec = CallSpec((ids, mask), {})

    def same(found, expected):
        return found is not None and all(map(operator.is_, found, expected))

    assert spec.plain is not None
    shorter = (ids[:1, :3], mask[:1, :3])
    assert same(spec.tensors(shorter, {}), shorter)  # batch and sequence are dynamic
    assert spec.tensors((ids, mask.double()), {}) is None  # dtype
    assert spec.tensors((ids, mask[0]), {}) is None  # rank
    assert spec.tensors((ids, 3), {}) is None  # not a tensor
    assert spec.tensors((ids,), {}) is None  # structure
    assert spec.tensors((ids,), {"mask": mask}) is None
    grad = mask.clone().requires_grad_()
    assert spec.tensors((ids, grad), {}) is None
    with torch.no_grad():
        assert same(spec.tensors((ids, grad), {}), (ids, grad))
    keyword = CallSpec((ids,), {"mask": mask})
    assert keyword.plain is None and same(keyword.tensors((ids,), {"mask": mask}), (ids, mask))


@needs_ort
@pytest.mark.parametrize("one_wins", [True, False])
def test_a_block_graph_runs_inputs_up_to_the_captured_size_on_one_thread_where_faster(
    monkeypatch, one_wins
):
    from tests.engine.quantize.test_quantize_ort_block import (
        _graph_wins,
        inputs,
        model_and_input,
    )

    _graph_wins(monkeypatch, whole=True)
    table = {"threads": 1.0, "one": 0.8 if one_wins else 0.99}
    monkeypatch.setattr(ort_threads, "race", fixed_race(table.get))
    torch.set_num_threads(2)
    model, x = model_and_input(batch=2, seq=5)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3, backend="onnxruntime")
    graph = model.__dict__["forward"].graph
    assert graph.one_thread_upto == (x[0].numel() if one_wins else 0)
    notes = [r["note"] for r in nc.quantize_report(model).rows if r["backend"]]
    assert all(("on 1 thread" in n) == one_wins for n in notes)
    graph._forget_sessions()
    with torch.inference_mode():
        y_small, y_large = model(*x), model(*inputs(4, 7))
    assert set(graph._sessions) == ({1, 2} if one_wins else {2})
    torch.set_num_threads(1)
    with torch.inference_mode():
        assert torch.allclose(model(*x), y_small, atol=1e-5)
        assert torch.allclose(model(*inputs(4, 7)), y_large, atol=1e-5)
