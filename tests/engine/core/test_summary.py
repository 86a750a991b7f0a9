import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.core.costs import layer_bytes
from nbcompress.kernels.formats import index_dtype, pack_csr
from tests.helpers import assert_same_state, cnn, mlp, snapshot


def test_summary_rows_shapes_macs_and_sizes():
    model = cnn()
    s = nc.summary(model, torch.randn(4, 1, 8, 8), repeats=3)
    names = [r["layer"] for r in s.rows]
    assert names == ["0", "1", "3", "6"]
    conv = s.layer("0")
    assert conv["output"] == (4, 8, 6, 6)
    assert conv["MACs (est.)"] == 4 * 8 * 6 * 6 * 9
    assert s.layer("6")["MACs (est.)"] == 4 * 288 * 10
    assert conv["params"] == 8 * 9 + 8 and conv["fp32 (est.)"] == 80 * 4
    assert conv["int8 (est.)"] == 72 + 8 * 4 + 8 * 4
    assert all(r["latency"] > 0 for r in s.rows)
    assert s.latency.median > 0 and s.latency.p10 <= s.latency.median <= s.latency.p90
    assert s.totals["params"] == sum(p.numel() for p in model.parameters())
    assert "est." in str(s) and "<table>" in s._repr_html_()


def test_summary_counts_sparsity_and_csr_bytes():
    model = nn.Sequential(nn.Linear(100, 50, bias=False), nn.Linear(50, 2))
    nc.prune_(model, 0.5)
    row = nc.summary(model).layer("0")
    assert row["nonzeros"] == 2500 and row["sparsity"] == 0.5
    # Values + uint16 indices, int64 row pointers, a float32 scale per row (as pack_csr).
    assert row["CSR (est.)"] == 2500 * (4 + 2) + 51 * 8 + 50 * 4
    assert row["latency"] is None and row["MACs (est.)"] is None


@pytest.mark.parametrize(
    ("layer", "density"),
    [
        (nn.Linear(16, 8), 1.0),
        (nn.Linear(70, 33, bias=False), 0.1),
        (nn.Linear(1, 1), 0.0),
        (nn.Conv2d(3, 4, 3), 0.5),  # packed as 4 × (3·3·3)
        (nn.Linear(70_000, 1, bias=False), 0.01),  # > 65535 columns: uint32 indices
    ],
)
def test_csr_estimate_is_what_pack_csr_stores(layer, density):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < density)
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    bias = 0 if layer.bias is None else layer.bias.numel() * 4
    assert layer_bytes(layer)["csr"] == pack_csr(weight).nbytes + bias
    wide = weight.shape[1] > 65535
    assert (
        pack_csr(weight).indices.dtype
        == index_dtype(weight.shape[1])
        == ("uint32" if wide else "uint16")
    )


def test_summary_leaves_the_model_untouched_in_training_mode():
    model = cnn().train()
    saved = snapshot(model)
    nc.summary(model, torch.randn(4, 1, 8, 8), repeats=2)
    assert_same_state(model, saved)  # BatchNorm running stats not updated
    assert model.training and model[1].training


@pytest.mark.parametrize(
    ("model", "x", "kind"),
    [
        (
            nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
            torch.randn(2, 5, 16),
            "MultiheadAttention",
        ),
        (nn.LSTM(8, 16, 2), torch.randn(5, 3, 8), "LSTM"),
        (
            nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(24, 2)),
            torch.randint(0, 50, (4, 3)),
            "Embedding",
        ),
    ],
)
def test_summary_handles_attention_recurrent_and_embedding_layers(model, x, kind):
    s = nc.summary(model, x, repeats=2)
    row = next(r for r in s.rows if r["type"] == kind)
    assert row["params"] == sum(
        p.numel()
        for p in (
            model if kind == "LSTM" else model.get_submodule(row["layer"].replace("(model)", ""))
        ).parameters()
    )
    assert row["MACs (est.)"] is not None


def test_summary_bad_input_names_the_argument():
    with pytest.raises(
        ValueError, match=r"example_inputs: .*shape \(3, 7\).*expects last dimension 16"
    ):
        nc.summary(mlp(), torch.randn(3, 7))
    with pytest.raises(TypeError, match="model"):
        nc.summary("model", torch.randn(3, 16))
    with pytest.raises(TypeError, match="example_inputs"):
        nc.summary(mlp(), 3.0)


@pytest.mark.parametrize("density", [1.0, 0.9, 0.5, 0.1, 0.0])
def test_int8_estimate_is_what_the_int8_modules_save(density):
    from nbcompress.engine.quantize.bitmask import pack_bitmask

    torch.manual_seed(0)
    layer = nn.Linear(37, 23, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < density)
    codes = (layer.weight.detach() != 0).to(torch.int8) * 7  # zero exactly where the weight is
    packed = pack_bitmask(codes)
    saved = codes.numel() if packed is None else packed.numel()
    assert layer_bytes(layer)["int8"] == saved + 23 * 4
