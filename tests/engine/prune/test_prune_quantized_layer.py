"""Pruning a layer that was quantized since is one clear line, and the model is untouched."""

import pytest
import torch

import nbcompress as nc
from nbcompress import zoo
from tests.helpers import assert_same_state, snapshot


def test_per_layer_ratios_on_a_quantized_layer_are_refused_in_one_line() -> None:
    torch.manual_seed(0)
    model = zoo.LeNet300()
    nc.quantize_(model, "dynamic", example_inputs=torch.randn(4, 1, 8, 8))
    before = snapshot(model)
    # fc1 runs on ORT where LeNet300 as one ONNX Runtime graph races faster (timing decides)
    quantized = r"'fc1' \((Int8DynamicLinear|OrtInt8Linear)\) are quantized.*undo"
    with pytest.raises(ValueError, match=quantized):
        nc.prune_ratios_(model, {"fc1": 0.5})
    assert_same_state(model, before)
    assert [s.name for s in nc.history(model)] == ["quantize"]
