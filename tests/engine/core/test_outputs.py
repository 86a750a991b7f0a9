from dataclasses import dataclass

import pytest
import torch

from nbcompress.engine.core.outputs import compare_outputs, output_tensors


@dataclass
class Out:
    logits: torch.Tensor
    hidden: tuple


def test_every_floating_tensor_of_any_structure_is_compared():
    a = {"ids": torch.arange(3), "emb": torch.ones(2, 2), "more": (torch.zeros(3), [torch.ones(1)])}
    b = {"ids": torch.arange(3), "emb": torch.ones(2, 2), "more": (torch.zeros(3), [torch.ones(1)])}
    b["more"][1][0] += 0.5  # the last tensor of a nested list differs
    diff = compare_outputs(a, b)
    assert diff.tensors == 3 and diff.max_abs == 0.5 and diff.peak == 1.0  # ids are not outputs
    lstm_like = (torch.ones(2, 3), (torch.ones(1, 2, 3), torch.ones(1, 2, 3)))
    assert len(output_tensors(lstm_like)) == 3
    dc = Out(torch.ones(2), (torch.full((2,), 2.0),))
    assert compare_outputs(dc, Out(torch.ones(2), (torch.full((2,), 2.5),))).relative == 0.25


def test_a_comparison_of_nothing_is_refused():
    with pytest.raises(ValueError, match="model: its output holds no floating-point tensor"):
        compare_outputs({"ids": torch.arange(3)}, {"ids": torch.arange(3)})
    with pytest.raises(ValueError, match="differently shaped"):
        compare_outputs(torch.ones(2), torch.ones(3))


def test_an_empty_batch_compares_without_error():
    diff = compare_outputs(torch.ones(0, 4), torch.ones(0, 4))
    assert diff.elements == 0 and diff.max_abs == 0.0 and diff.relative == 0.0
