"""quantize_ on the architectures users bring: torch transformers, attention, LSTM (issue 11).

``nn.TransformerEncoderLayer``'s fused fast path (eval + no_grad) reads ``linear1.weight``
and ``linear2.weight`` directly; every mode must keep such models working there, close to
float, with undo bit-exact.
"""

import pytest
import torch
from torch import nn

import nbcompress as nc
from tests.helpers import assert_same_state, snapshot
from tests.real_models import BUILDERS

FAST = dict(repeats=3)
MODES = ["dynamic", "weight", "fp16", "bf16"]


def run(model, x):
    xs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():  # eval + no_grad: where torch's fused fast paths apply
        return model(*xs)


def close(out, ref, rel=0.05):
    return float((out - ref).abs().max()) <= rel * float(ref.abs().max())


def check(builder, mode, **kwargs):
    model, x = BUILDERS[builder]()
    saved, ref = snapshot(model), run(model, x)
    originals = dict(model.named_modules())
    nc.quantize_(model, mode, example_inputs=x, **kwargs, **FAST)
    report = nc.quantize_report(model)
    assert report.quantized and close(run(model, x), ref)
    nc.undo_(model)
    assert_same_state(model, saved)
    assert all(originals[n] is m for n, m in model.named_modules())
    assert torch.equal(run(model, x), ref)
    return report


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_every_mode_keeps_the_model_working_close_to_float_and_undo_exact(builder, mode):
    report = check(builder, mode)
    if builder.startswith("transformer"):
        # the feed-forward Linears are quantized; attention stays float, with the reason
        assert sum(".linear" in n for n in report.quantized) == 4
        assert all("MultiheadAttention" in why for why in report.skipped.values())


@pytest.mark.parametrize("builder", ["attention", "lstm"])
def test_static_where_it_applies(builder):
    model, x = BUILDERS[builder]()
    check(builder, "static", calibrate=[x])


def test_static_on_a_transformer_encoder():
    # Recording the step counts torch.ao's packed-param tuples (the core's part of F4).
    model, x = BUILDERS["transformer_encoder"]()
    check("transformer_encoder", "static", calibrate=[x])


def test_lstm_dynamic_is_quantized_and_its_error_covers_output_and_state():
    report = check("lstm", "dynamic")
    rows = {row["layer"]: row for row in report.rows}  # the token table has a row too
    assert "lstm" in report.quantized and "torch.ao" in rows["lstm"]["backend"]


class PaddedEncoder(nn.Module):
    """torch's default encoder (nested tensors on) called with a padding mask."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 3)

    def forward(self, x, mask):
        h = self.encoder(x, src_key_padding_mask=mask)
        return self.head(h.masked_fill(mask[..., None], 0.0).mean(dim=1))


@pytest.mark.parametrize("mode", MODES)
def test_the_nested_tensor_path_with_a_padding_mask_keeps_working(mode):
    model = PaddedEncoder().eval()
    x, mask = torch.randn(3, 5, 32), torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    saved = snapshot(model)
    with torch.no_grad():
        ref = model(x, mask)
    nc.quantize_(model, mode, example_inputs=(x, mask), **FAST)
    assert sum(".linear" in n for n in nc.quantize_report(model).quantized) == 4
    with torch.no_grad():
        assert close(model(x, mask), ref)
    nc.undo_(model)
    assert_same_state(model, saved)


def test_static_on_a_two_input_decoder_calibrated_with_mappings():
    # A forward of two inputs (tgt, memory) is calibrated with mappings of its argument
    # names: call_model passes a mapping as keywords to such a forward.
    model, (tgt, memory) = BUILDERS["transformer_decoder"]()
    saved, ref = snapshot(model), run(model, (tgt, memory))
    nc.quantize_(model, "static", calibrate=[{"tgt": tgt, "memory": memory}], **FAST)
    assert nc.quantize_report(model).quantized and close(run(model, (tgt, memory)), ref)
    nc.undo_(model)
    assert_same_state(model, saved)
