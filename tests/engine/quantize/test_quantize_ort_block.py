"""Whole submodules as one ORT graph (``ort_block``/``ort_fuse``): correct, ordinary, optional."""

import copy
import pickle

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.quantize import ort_fuse, ort_int8
from nbcompress.engine.quantize.ort_block import BlockForward
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear
from tests.helpers import assert_same_state, fixed_race, needs_ort, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Block(nn.Module):
    """A small transformer block: attention (masked), residual LayerNorms, GELU FFN."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask=None, scale_scores=True):
        b, s, d = x.shape

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2)
        if scale_scores:
            scores = scores / (d // self.heads) ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], -1e4)
        ctx = scores.softmax(-1) @ v
        h = self.ln1(x + self.o(ctx.transpose(1, 2).reshape(b, s, d)))
        return (self.ln2(h + self.down(nn.functional.gelu(self.up(h)))),)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 8)

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask, scale_scores=True)[0]
        return self.head(x.mean(1))


def model_and_input(batch=4, seq=9):
    torch.manual_seed(0)
    return Encoder().eval(), inputs(batch, seq)


def inputs(batch, seq):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, seq // 2 :] = False  # one padded sentence
    return torch.randn(batch, seq, 32, generator=g), mask


def _graph_wins(monkeypatch, wins=True, whole=False):
    monkeypatch.delenv(ort_fuse.ENV_BLOCKS, raising=False)  # on by default
    if not whole:  # the Encoder skipped like a container: its blocks are the candidates
        monkeypatch.setattr(ort_fuse, "_CONTAINERS", (*ort_fuse._CONTAINERS, Encoder))
    monkeypatch.setattr(
        ort_fuse, "race", fixed_race({"layers": 1.0, "graph": 0.5 if wins else 0.95}.__getitem__)
    )


def per_layer(model, x):
    """The same model quantized per layer (blocks off): the accuracy reference."""
    twin = copy.deepcopy(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ort_fuse.ENV_BLOCKS, "0")
        nc.quantize_(twin, "dynamic", example_inputs=x, repeats=3, backend="onnxruntime")
    return twin


def rel(a, b):
    return float((a - b).norm() / b.norm())


def quantized(monkeypatch, wins=True):
    _graph_wins(monkeypatch, wins)
    model, x = model_and_input()
    float_model = copy.deepcopy(model)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3, backend="onnxruntime")
    return model, float_model, x


@needs_ort
def test_each_block_runs_as_one_graph_close_to_per_layer_int8_at_any_batch_and_length(
    monkeypatch,
):
    model, float_model, x = quantized(monkeypatch)
    reference = per_layer(float_model, x)
    for block in model.blocks:
        assert isinstance(block.__dict__.get("forward"), BlockForward)
        assert all(type(m) is OrtInt8Linear for m in (block.q, block.k, block.up, block.down))
    rows = {r["layer"]: r for r in nc.quantize_report(model).rows}
    assert "one ORT graph with blocks.0" in rows["blocks.0.up"]["note"]

    shapes = [(4, 9), (1, 3), (3, 17), (6, 1)]
    with torch.inference_mode():
        refs = {bs: (float_model(*inputs(*bs)), reference(*inputs(*bs))) for bs in shapes}

    real = OrtInt8Linear._product

    def per_layer_call(layer, a):
        assert layer is model.head, "a block fell back to its layers"
        return real(layer, a)

    monkeypatch.setattr(OrtInt8Linear, "_product", per_layer_call)  # the graph must run
    with torch.inference_mode():
        for bs in shapes:
            (ref, per), got = refs[bs], model(*inputs(*bs))
            assert got.shape == ref.shape
            assert rel(got, per) < 0.02  # the same int8 weights, the same kernel
            assert rel(got, ref) <= 1.2 * rel(per, ref) + 0.01


@needs_ort
def test_the_outermost_submodule_that_wins_is_one_graph_here_the_whole_model(monkeypatch):
    _graph_wins(monkeypatch, whole=True)
    model, x = model_and_input()
    float_model = copy.deepcopy(model)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3, backend="onnxruntime")
    assert isinstance(model.__dict__.get("forward"), BlockForward)
    assert not any("forward" in m.__dict__ for m in model.blocks.modules())
    with torch.inference_mode():
        xb = inputs(2, 5)
        assert rel(model(*xb), per_layer(float_model, x)(*xb)) < 0.02


@needs_ort
def test_undo_restores_the_exact_original_and_no_instance_forward(monkeypatch):
    _graph_wins(monkeypatch)
    model, x = model_and_input()
    saved = snapshot(model)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3, backend="onnxruntime")
    assert "forward" in model.blocks[0].__dict__
    nc.undo_(model)
    assert_same_state(model, saved)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert type(model.blocks[0].q) is nn.Linear


@needs_ort
def test_state_dict_pickle_and_deepcopy_round_trip(monkeypatch):
    model, float_model, x = quantized(monkeypatch)
    reference = per_layer(float_model, x)
    assert list(model.state_dict()) == list(reference.state_dict())
    with torch.inference_mode():
        y = model(*x)
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        forward = copied.blocks[1].__dict__["forward"]
        assert isinstance(forward, BlockForward) and forward.block is copied.blocks[1]
        assert forward.graph.block is copied.blocks[1]
        with torch.inference_mode():
            assert torch.allclose(copied(*x), y, atol=1e-5)
        assert forward.graph._sessions  # rebuilt lazily, and used
    # load_state_dict of other weights: the graph is exported again from them.
    other = per_layer(Encoder().eval(), x)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert rel(model(*x), other(*x)) < 0.02


@needs_ort
def test_a_hook_inside_a_block_falls_back_to_the_layers_and_fires(monkeypatch):
    model, _, x = quantized(monkeypatch)
    with torch.inference_mode():
        y = model(*x)
        seen = []
        handle = model.blocks[0].up.register_forward_hook(lambda *a: seen.append(1))
        assert rel(model(*x), y) < 0.02 and seen == [1]
        handle.remove()
        assert torch.allclose(model(*x), y, atol=1e-5) and seen == [1]  # graph again


@needs_ort
def test_a_call_unlike_the_captured_one_runs_the_layers(monkeypatch):
    model, float_model, x = quantized(monkeypatch)
    block, ref_block = model.blocks[0], float_model.blocks[0]
    with torch.inference_mode():
        # A constant argument other than the captured one: the block's own forward.
        got = block(x[0], x[1], scale_scores=False)[0]
        ref = ref_block(x[0], x[1], scale_scores=False)[0]
        assert rel(got, ref) < 0.05
        assert rel(block(x[0], None)[0], ref_block(x[0], None)[0]) < 0.05  # no mask


@needs_ort
def test_a_thread_count_change_builds_its_own_session_with_the_same_result(monkeypatch):
    model, _, x = quantized(monkeypatch)
    graph = model.blocks[0].forward.graph
    with torch.inference_mode():
        y = model(*x)
        torch.set_num_threads(2)
        y2 = model(*x)
    assert set(graph._sessions) == {1, 2}
    assert torch.allclose(y, y2, atol=1e-4)


@needs_ort
def test_a_block_not_clearly_faster_stays_per_layer(monkeypatch):
    model, _, _ = quantized(monkeypatch, wins=False)
    assert all("forward" not in m.__dict__ for m in model.modules())


@needs_ort
def test_a_block_the_exporter_cannot_take_stays_per_layer_with_one_notice(monkeypatch):
    _graph_wins(monkeypatch)
    model, x = model_and_input()

    class Odd:  # an argument the graph could not hold
        pass

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask, scale_scores=Odd())[0]
        return self.head(x.mean(1))

    model.forward = forward.__get__(model)
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3, backend="onnxruntime")
    assert not any(isinstance(m.__dict__.get("forward"), BlockForward) for m in model.modules())
    notes = [n for n in nc.quantize_report(model).notes if "not exportable" in n]
    assert len(notes) == 1 and "Odd" in notes[0]


def test_without_onnxruntime_blocks_stay_per_layer_with_one_notice(monkeypatch):
    monkeypatch.setattr(ort_int8, "ort_problem", lambda: "onnxruntime is not installed")
    model, x = model_and_input()
    nc.quantize_(model, "dynamic", example_inputs=x, repeats=3)
    report = nc.quantize_report(model)
    assert "onnxruntime-int8" not in {r["backend"] for r in report.rows}
    assert not any("forward" in m.__dict__ for m in model.modules())
    notes = [n for n in report.notes if "ONNX Runtime graph" in n]
    assert notes == [
        "Blocks kept per layer, not one ONNX Runtime graph: onnxruntime is not installed."
    ]


@needs_ort
def test_a_failure_part_way_leaves_the_model_untouched(monkeypatch):
    _graph_wins(monkeypatch)
    model, x = model_and_input()
    saved = snapshot(model)
    real = ort_fuse._install
    calls = []

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom while installing the second block")
        real(*args)

    monkeypatch.setattr(ort_fuse, "_install", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        nc.quantize_(model, "dynamic", example_inputs=x, repeats=3, backend="onnxruntime")
    assert_same_state(model, saved)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(type(m) is not OrtInt8Linear for m in model.modules())


class Tiny(nn.Module):
    """An int8 table, an ORT int8 Linear and a weight-only int8 Linear, in one block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.a, self.b = nn.Embedding(50, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, ids):
        h = self.emb(ids)
        h = nn.functional.gelu(self.a(h))
        return self.b(h * self.boost)


@needs_ort
def test_int8_tables_gather_int8_rows_and_weight_only_layers_split_their_outliers():
    from onnx import load_from_string

    from nbcompress.engine.quantize.embedding_int8 import Int8Embedding
    from nbcompress.engine.quantize.modules import Int8WeightOnly
    from nbcompress.engine.quantize.ort_block import OrtInt8Block
    from nbcompress.engine.quantize.ort_rewrite import outlier_channels

    float_block = Tiny().eval()
    float_block.boost = torch.ones(64)
    float_block.boost[[3, 40]] = 300.0  # two outlier channels into b, which b damps:
    with torch.no_grad():  # they set a per-tensor activation scale, not the output
        float_block.b.weight[:, [3, 40]] /= 300.0
    block = copy.deepcopy(float_block)
    block.emb, block.a, block.b = (
        Int8Embedding(float_block.emb),
        OrtInt8Linear(float_block.a),
        Int8WeightOnly(float_block.b),
    )
    ids = torch.randint(0, 50, (3, 7))
    seen = []
    block.b.register_forward_pre_hook(lambda m, a: seen.append(outlier_channels(a[0])))
    with torch.inference_mode():
        per_layer_out = block(ids)
    block.b._forward_pre_hooks.clear()
    assert set(seen[0].tolist()) == {3, 40}
    graph = OrtInt8Block(block, (ids,), {}, per_layer_out)
    plain_b = OrtInt8Linear(float_block.b)  # b in int8 without the split
    with torch.inference_mode():
        ref = float_block(ids)
        h = nn.functional.gelu(block.a(block.emb(ids))) * float_block.boost
        err_plain = rel(plain_b(h), ref)
        for outliers in ({"b": seen[0]}, {}):
            graph.outliers = outliers
            graph._forget_sessions()
            out = graph.run([ids])
            err = rel(out, ref)
            assert err <= 1.2 * rel(per_layer_out, ref) + 0.01
        graph.outliers = {"b": seen[0]}
        graph._forget_sessions()
        split = graph.run([ids])
        assert rel(split, ref) < err_plain / 2  # the outliers no longer set the scale
        graph.example = [ids]
        model = load_from_string(graph.graph(True))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 2  # a, and b's split int8 part
    sizes = {tuple(i.dims): i.data_type for i in model.graph.initializer}
    assert sizes.get((50, 64)) == 2  # the table as its 8-bit codes (UINT8), no fp32 copy


@needs_ort
def test_python_threads_building_the_first_session_at_once_all_get_the_graphs_result(
    monkeypatch,
):
    import threading

    from nbcompress.engine.quantize import ort_block

    model, _, _ = quantized(monkeypatch)
    xs = [(inputs(4, 9)[0] + i, inputs(4, 9)[1]) for i in range(4)]  # one per thread
    with torch.inference_mode():
        refs = [model(*x) for x in xs]
    graph = model.blocks[0].forward.graph
    graph._forget_sessions()  # every thread now finds no session for its thread count
    real, started, seen = ort_block.export_block, threading.Barrier(4), []

    def slow_export(block, spec, example):
        seen.append(len(example))  # an export on an emptied example bakes in no input
        out = real(block, spec, example)
        threading.Event().wait(0.05)  # the others arrive while this export runs
        return out

    monkeypatch.setattr(ort_block, "export_block", slow_export)
    # Each Python thread asks for its own ORT thread count: each builds a session, so
    # each exports (the same count would reuse the first thread's session).
    counts = {}
    monkeypatch.setattr(graph, "threads_for", lambda _n: counts[threading.get_ident()])
    outs, errors = [None] * 4, []

    def call(i):
        counts[threading.get_ident()] = i + 1
        started.wait()
        try:
            with torch.inference_mode():
                outs[i] = model(*xs[i])
        except Exception as err:  # noqa: BLE001 - collected: the test reports every one
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(seen) == 4 and 0 not in seen, seen
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
