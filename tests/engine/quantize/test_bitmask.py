"""Pruned int8 weights are serialized as a bitmask plus nonzeros: smaller, and exact."""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.memory import twin
from nbcompress.engine.quantize import bitmask
from nbcompress.engine.quantize.bitmask import bitmask_size, pack_bitmask, unpack_bitmask
from nbcompress.engine.quantize.modules import HalfWeight, Int8DynamicLinear, Int8WeightOnly
from nbcompress.engine.quantize.report import serialized_size, storage_quiet
from nbcompress.zoo import SeedCNN
from tests.helpers import assert_same_state, bits, snapshot

BUILDERS = {
    "dynamic": Int8DynamicLinear,
    "weight-only": Int8WeightOnly,
    "half": lambda layer: HalfWeight(layer, torch.float16),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def pruned(layer: nn.Module, zeros: float, seed: int = 0) -> nn.Module:
    """``layer`` with a seeded random ``zeros`` fraction of its weight set to exactly 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = layer.weight
        w.masked_fill_(torch.rand(w.shape, generator=g) < zeros, 0.0)
    return layer


def linear(zeros: float, n_in: int = 37, n_out: int = 29) -> nn.Linear:
    torch.manual_seed(0)
    return pruned(nn.Linear(n_in, n_out), zeros)


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loaded(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def unpacked_size(module) -> int:
    """``serialized_size`` as it was before packing existed (every buffer dense)."""
    orig = bitmask.pack_bitmask
    bitmask.pack_bitmask = lambda t: None
    try:
        return serialized_size(module)
    finally:
        bitmask.pack_bitmask = orig


def call(module, x):
    with torch.no_grad():
        return module(x)


# --- the packed form itself ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (13, 11), (5, 3, 3, 3), (2, 1000)])
@pytest.mark.parametrize("zeros", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float16, torch.bfloat16])
def test_packing_round_trip_is_bit_exact_for_odd_sizes(shape, zeros, dtype):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(shape, generator=g) * 50).to(dtype)
    t[torch.rand(shape, generator=g) < zeros] = 0
    packed = pack_bitmask(t)
    n, nnz = t.numel(), int((bits(t) != 0).sum())
    if packed is None:  # only where the mask does not pay (tiny tensors)
        assert bitmask_size(n, nnz, t.element_size()) >= n * t.element_size()
        return
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n / 8) + nnz * t.element_size()
    back = unpack_bitmask(packed, shape, dtype)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(bits(back), bits(t))


def test_negative_zero_survives_packing_bit_for_bit():
    t = torch.tensor([0.0, -0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    back = unpack_bitmask(pack_bitmask(t), (12,), torch.float32)
    assert torch.equal(bits(back), bits(t))  # -0.0 is a nonzero bit pattern: kept


def test_dense_stays_dense_when_the_mask_would_not_pay():
    t = torch.ones(16, 16, dtype=torch.int8)
    assert pack_bitmask(t) is None  # 0% zeros
    t.view(-1)[:31] = 0  # 31 of 256 zeros: 32 mask bytes + 225 values > 256
    assert pack_bitmask(t) is None
    t.view(-1)[:33] = 0  # 33 zeros: 32 + 223 = 255 < 256
    assert pack_bitmask(t).numel() == 255
    assert pack_bitmask(torch.zeros(0, 4, dtype=torch.int8)) is None


def test_unpacking_refuses_a_packed_form_of_another_shape():
    packed = pack_bitmask(torch.zeros(10, 10, dtype=torch.int8))
    with pytest.raises(ValueError, match="at least 25 bytes, got torch.uint8 of shape \\(13,\\)"):
        unpack_bitmask(packed, (20, 10), torch.int8)
    packed = pack_bitmask(torch.eye(10, dtype=torch.int8))
    with pytest.raises(ValueError, match="marks 10 nonzeros, so 23 bytes, got 22"):
        unpack_bitmask(packed[:-1], (10, 10), torch.int8)


# --- nbcompress's modules -------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("zeros", [0.5, 0.9])
def test_pruned_layers_serialize_smaller_and_load_bit_identical(kind, zeros):
    layer, x = linear(zeros), torch.randn(5, 37)
    module = BUILDERS[kind](layer)
    out = call(module, x)
    assert serialized_size(module) < unpacked_size(module)
    fresh = BUILDERS[kind](linear(0.0))  # other weights, no zeros: overwritten by the load
    fresh.load_state_dict(torch.load(io.BytesIO(saved(module.state_dict()))))
    assert torch.equal(call(fresh, x), out)
    for copied in (
        pickle.loads(pickle.dumps(module)),
        copy.deepcopy(module),
        loaded(saved(module)),
    ):
        assert torch.equal(call(copied, x), out)


def test_size_per_weight_at_50_and_90_percent_zeros_on_a_large_layer():
    torch.manual_seed(0)
    per_weight = {}
    for zeros in (0.0, 0.5, 0.9):
        layer = pruned(nn.Linear(768, 3072), zeros)
        module = Int8DynamicLinear(layer)
        buffer = module.state_dict()["qweight"].numel()
        per_weight[zeros] = buffer / layer.weight.numel()
        assert serialized_size(module) <= unpacked_size(module)
    assert per_weight[0.0] == 1.0  # dense: never larger
    assert per_weight[0.5] == pytest.approx(0.625, abs=0.005)
    assert per_weight[0.9] == pytest.approx(0.225, abs=0.005)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_a_layer_without_zeros_is_saved_exactly_as_before(kind):
    module = BUILDERS[kind](linear(0.0))
    assert serialized_size(module) == unpacked_size(module)
    name = "hweight" if kind == "half" else "qweight"
    assert module.state_dict()[name].shape == (29, 37)


def test_an_all_zero_weight_saves_its_mask_only_and_outputs_the_bias():
    module, x = Int8DynamicLinear(linear(1.0)), torch.randn(3, 37)
    assert module.state_dict()["qweight"].numel() == math.ceil(29 * 37 / 8)
    back = loaded(saved(module))
    assert torch.equal(call(back, x), call(module, x))
    assert torch.allclose(call(back, x), module.bias.expand(3, -1))


def test_a_pruned_conv_weight_only_round_trips():
    torch.manual_seed(0)
    conv, x = pruned(nn.Conv2d(3, 5, 3, padding=1), 0.7), torch.randn(2, 3, 9, 9)
    module = Int8WeightOnly(conv)
    assert serialized_size(module) < unpacked_size(module)
    assert torch.equal(call(loaded(saved(module)), x), call(module, x))
    assert torch.equal(call(pickle.loads(pickle.dumps(module)), x), call(module, x))


def test_an_old_dense_checkpoint_and_pickle_still_load():
    module, x = Int8DynamicLinear(linear(0.9)), torch.randn(4, 37)
    old_state = {k: v.clone() for k, v in module.state_dict(keep_vars=True).items()}
    assert old_state["qweight"].dtype == torch.int8  # as saved before packing
    fresh = Int8DynamicLinear(linear(0.0))
    fresh.load_state_dict(old_state)
    assert torch.equal(call(fresh, x), call(module, x))
    orig = bitmask.pack_bitmask
    bitmask.pack_bitmask = lambda t: None
    try:
        old_pickle = pickle.dumps(module)  # no packed buffers, no shapes entry
    finally:
        bitmask.pack_bitmask = orig
    assert torch.equal(call(pickle.loads(old_pickle), x), call(module, x))


def test_a_corrupt_packed_weight_is_refused_with_its_key():
    state = Int8DynamicLinear(linear(0.9)).state_dict()
    state["qweight"] = state["qweight"][:-1]
    with pytest.raises(RuntimeError, match="qweight: the bitmask"):
        Int8DynamicLinear(linear(0.0)).load_state_dict(state)


def test_running_form_and_copies_stay_dense_and_twins_share_it():
    module = Int8DynamicLinear(linear(0.9))
    assert module.qweight.shape == (29, 37) and module.qweight.dtype == torch.int8
    assert module.state_dict(keep_vars=True)["qweight"] is module.qweight
    assert copy.deepcopy(module).qweight.shape == (29, 37)
    assert twin(module).qweight is module.qweight  # no packing, no copy in a twin


# --- through quantize_ ----------------------------------------------------------------------


def ffn(zeros: float) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    if zeros:
        nc.prune_(model, zeros, include_output=True)
    return model


@pytest.mark.parametrize("mode", ["dynamic", "weight"])
def test_quantize_report_sizes_count_the_packed_bytes_and_undo_is_bit_exact(mode):
    model, x = ffn(0.9), torch.randn(8, 64)
    before, out_float = snapshot(model), call(model, x)
    nc.quantize_(model, mode, example_inputs=x, backend="nbcompress", repeats=3)
    report = nc.quantize_report(model)
    out = call(model, x)
    data = saved(model.state_dict())
    assert report.size_after == len(data) == serialized_size(model)
    assert report.size_after < unpacked_size(model)
    layers = {name: model.get_submodule(name) for name in report.quantized}
    assert report.layers_after == serialized_size(layers) < unpacked_size(layers) / 2.5
    back = loaded(saved(model))
    assert torch.equal(call(back, x), out)
    nc.undo_(model)
    assert_same_state(model, before)
    assert torch.equal(call(model, x), out_float)


# --- static int8 (torch.ao layers inside nbcompress's StaticRegion) ------------------------


def static_cnn(seed: int, zeros: float = 0.9):
    """SeedCNN (seeded), L1-pruned, static int8; the same calibration batch for every seed."""
    torch.manual_seed(seed)
    model = SeedCNN().eval()
    if zeros:
        nc.prune_(model, zeros, include_output=True)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    nc.quantize_(model, "static", calibrate=x, example_inputs=x, repeats=3)
    return model, x


def test_static_int8_weights_save_packed_and_load_into_another_model_bit_identical():
    model, x = static_cnn(0)
    out = call(model, x)
    state = model.state_dict()
    packed = [k for k, v in state.items() if isinstance(v, tuple) and "bitmask" in str(v[0])]
    assert "features.0.1.weight" in packed  # a quantized conv's weight
    assert serialized_size(model) < unpacked_size(model) / 2
    other, _ = static_cnn(1)  # same structure, other weights and scales
    assert not torch.equal(call(other, x), out)
    other.load_state_dict(torch.load(io.BytesIO(saved(state)), weights_only=True))
    assert torch.equal(call(other, x), out)


def test_static_int8_pickles_copies_and_old_dense_state_dicts_stay_exact():
    model, x = static_cnn(0)
    out = call(model, x)
    orig = bitmask.pack_bitmask
    bitmask.pack_bitmask = lambda t: None
    try:
        with storage_quiet():  # torch.ao's weights pickle through the old storage API
            dense_pickle = pickle.dumps(model)  # as pickled before packing existed
    finally:
        bitmask.pack_bitmask = orig
    with storage_quiet():
        assert len(pickle.dumps(model)) < len(dense_pickle) / 2
        copies = [pickle.loads(pickle.dumps(model)), pickle.loads(dense_pickle)]
        copies += [loaded(saved(model)), copy.deepcopy(model)]
    for copied in copies:
        assert torch.equal(call(copied, x), out)
    old_state = model.state_dict(keep_vars=True)  # quantized tensors as torch saves them
    other, _ = static_cnn(1)
    other.load_state_dict(old_state)
    assert torch.equal(call(other, x), out)


def test_static_int8_without_zeros_saves_as_before_and_undo_is_bit_exact():
    torch.manual_seed(0)
    model, x = SeedCNN().eval(), torch.rand(4, 1, 28, 28)
    before = snapshot(model)
    nc.quantize_(model, "static", calibrate=x, example_inputs=x, repeats=3)
    assert serialized_size(model) == unpacked_size(model)
    nc.undo_(model)
    assert_same_state(model, before)


# --- int8 embedding tables (asymmetric rows: 0.0 is not code 0) -----------------------------


def table(cls, zeros: float):
    torch.manual_seed(0)
    layer = cls(300, 19) if cls is nn.Embedding else cls(300, 19, mode="sum")
    return pruned(layer, zeros)


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_int8_tables_with_zeros_save_smaller_and_load_bit_identical(cls):
    from nbcompress.engine.quantize.embedding_int8 import int8_table

    ids = torch.randint(0, 300, (6, 5), generator=torch.Generator().manual_seed(2))
    for zeros in (0.0, 0.5, 0.9):
        module = int8_table(None, table(cls, zeros))
        out = call(module, ids)
        if zeros:
            assert serialized_size(module) < unpacked_size(module) * (0.7 if zeros > 0.5 else 0.9)
        else:
            assert serialized_size(module) == unpacked_size(module)
        fresh = int8_table(None, table(cls, 0.0))
        fresh.load_state_dict(torch.load(io.BytesIO(saved(module.state_dict()))))
        assert torch.equal(fresh.packed, module.packed)
        for copied in (fresh, pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
            assert torch.equal(call(copied, ids), out)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_nbcompress_save_and_load_of_a_pruned_int8_model_are_exact(mode, tmp_path):
    if mode == "static":
        model, x = static_cnn(0)
        torch.manual_seed(1)
        fresh = SeedCNN().eval()
    else:
        model, x = ffn(0.9), torch.randn(4, 64)
        nc.quantize_(model, mode, example_inputs=x, backend="nbcompress", repeats=3)
        fresh = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    nc.save(model, tmp_path / "m.pt")
    nc.load(tmp_path / "m.pt", fresh)
    assert torch.equal(call(fresh, x), call(model, x))
