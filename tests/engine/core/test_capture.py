"""The inputs an evaluation function feeds the model are recorded, bounded, not copied."""

from __future__ import annotations

import torch
from torch import nn

from nbcompress.engine.core.capture import captured_inputs, input_bytes
from nbcompress.engine.core.validation import call_model


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(input_ids * mask)


def test_top_level_calls_are_recorded_as_copies_up_to_the_budget() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(10, 4)
    with captured_inputs(model, max_bytes=2 * 4 * 4 * 4) as seen:
        for i in range(0, 10, 4):  # batches of 4 rows: 64 bytes each
            model(x[i : i + 4])
    assert len(seen) == 2  # the budget holds two batches; nested calls are not recorded
    # A copy: an evaluate that reuses one input buffer must not change what was recorded.
    assert torch.equal(seen[0][0], x[:4]) and seen[0][0].data_ptr() != x.data_ptr()
    x.zero_()
    assert seen[0][0].abs().sum() > 0
    assert input_bytes(seen[0]) == 64
    model(x)  # after the block nothing is recorded
    assert len(seen) == 2 and not model._forward_pre_hooks


def test_keyword_calls_replay_through_call_model_and_mixed_calls_are_skipped() -> None:
    model = Keywords()
    ids, mask = torch.randn(3, 4), torch.ones(3, 4)
    with captured_inputs(model) as seen:
        expected = model(input_ids=ids, mask=mask)
        model(ids, mask=mask)  # mixed: call_model could not replay it
    assert len(seen) == 1
    assert torch.equal(call_model(model, seen[0]), expected)
