"""search(callback=): one call per finished trial, in order, failures included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbcompress import search

pytest.importorskip("optuna")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def test_callback_sees_every_trial_in_order_with_counts() -> None:
    model = _model()
    x = torch.randn(32, 8)
    calls = []
    state = {"n": 0}

    def evaluate(m: nn.Module) -> float:
        state["n"] += 1
        if state["n"] == 3:
            raise RuntimeError("boom")
        with torch.no_grad():
            return float(-m(x).abs().mean())

    result = search(model, evaluate, target_sparsity=0.5, n_trials=5, seed=0, progress=False,
                    callback=lambda t, done, total: calls.append((t, done, total)))  # fmt: skip
    assert [(d, t) for _, d, t in calls] == [(i, 5) for i in range(1, 6)]
    assert [c[0].number for c in calls] == [t.number for t in result.trials]
    assert [c[0].state for c in calls] == [t.state for t in result.trials]
    assert any(c[0].state == "fail" and "boom" in c[0].error for c in calls)
    for (trial, _, _), stored in zip(calls, result.trials):
        assert trial.ratios == stored.ratios and trial.metric == stored.metric


def test_callback_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="callback"):
        search(_model(), lambda m: 0.0, target_sparsity=0.5, n_trials=2, callback=3)
