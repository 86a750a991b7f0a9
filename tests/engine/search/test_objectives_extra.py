"""Size and latency objectives measured on a pruned model; warm-start allocations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbcompress import prune_, sensitivity
from nbcompress.engine.core.costs import csr_bytes
from nbcompress.engine.search.objectives import measure_extras, stored_bytes
from nbcompress.engine.search.space import Space, project
from nbcompress.engine.search.warm import warm_allocations


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def test_stored_bytes_is_dense_until_csr_is_smaller_then_csr() -> None:
    model = _mlp()
    dense = sum(p.numel() * 4 for p in model.parameters())
    names = ["0", "2"]
    assert stored_bytes(model, names) == dense  # dense weights: CSR would be larger
    prune_(model, 0.9, layers=names)
    got = stored_bytes(model, names)
    w0, w2 = model[0].weight, model[2].weight
    want = dense - sum(
        w.numel() * 4 - csr_bytes(w.shape[0], w.shape[1], int(w.count_nonzero())) for w in (w0, w2)
    )
    assert got == want < dense
    # A layer not searched is counted dense even when sparse.
    assert stored_bytes(model, ["0"]) > got


def test_stored_bytes_counts_a_shared_parameter_once() -> None:
    model = _mlp()
    tied = nn.Sequential(model, nn.Linear(64, 10))
    tied[1].weight = model[4].weight
    assert stored_bytes(tied, []) == stored_bytes(model, []) + 10 * 4


def test_measure_extras_gives_only_what_is_asked_and_a_positive_latency() -> None:
    model = _mlp()
    prune_(model, 0.9)
    x = torch.randn(8, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert measure_extras(model, ["metric"], ["0", "2"], x) == {}
    got = measure_extras(model, ["size", "latency"], ["0", "2"], x)
    assert set(got) == {"size", "latency"}
    assert got["size"] == stored_bytes(model, ["0", "2"]) and got["latency"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_warm_allocations_are_uniform_global_and_the_suggestion_on_budget() -> None:
    model = _mlp()
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))

    def evaluate(m: nn.Module) -> float:
        return float((m(x).argmax(1) == y).float().mean())

    space = Space.of(model, None, "element")
    plain = warm_allocations(model, space, 0.8)
    assert [label for label, _ in plain] == ["uniform", "global L1"]
    result = sensitivity(model, evaluate, ratios=[0.5, 0.8, 0.9, 0.95], progress=False)
    warm = warm_allocations(model, space, 0.8, result)
    assert [label for label, _ in warm] == ["uniform", "global L1", "sensitivity suggestion"]
    for _, scores in warm:
        ratios = project([scores[n] for n in space.names], space.counts, 0.8)
        assert space.sparsity(ratios) == pytest.approx(0.8, abs=1e-6)
    suggested = result.suggest(target_sparsity=0.8, check=False).ratios
    scores = warm[2][1]
    assert scores == {n: pytest.approx(1 - suggested.get(n, 0.8)) for n in space.names}


def _scored_mlp() -> tuple[nn.Module, object, torch.Tensor]:
    model = _mlp()
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    return model, evaluate, x


def test_search_with_size_objective_minimises_stored_bytes_on_budget() -> None:
    from nbcompress import search

    model, evaluate, _ = _scored_mlp()
    result = search(model, evaluate, target_sparsity=0.8, objectives=("metric", "size"),
                    n_trials=6, seed=0, progress=False)  # fmt: skip
    done = result.completed()
    assert done and all(t.size is not None and t.latency is None for t in done)
    pruned = _mlp()
    result.apply_(pruned, done[0])
    assert done[0].size == stored_bytes(pruned, ["0", "2"])
    assert "size" in str(result)


def test_latency_objective_needs_example_inputs_and_is_measured() -> None:
    from nbcompress import search

    model, evaluate, x = _scored_mlp()
    with pytest.raises(ValueError, match="example_inputs"):
        search(model, evaluate, objectives=("metric", "latency"), n_trials=2, progress=False)
    result = search(model, evaluate, objectives=("metric", "latency"), n_trials=3, seed=0,
                    example_inputs=x[:8], progress=False)  # fmt: skip
    assert all(t.latency > 0 for t in result.completed())


def test_search_starts_from_the_latest_sensitivity_suggestion() -> None:
    from nbcompress import search

    model, evaluate, _ = _scored_mlp()
    plain = search(model, evaluate, target_sparsity=0.8, n_trials=3, seed=0, progress=False)
    assert plain.notes == ["First trials: uniform, global L1."]
    swept = sensitivity(model, evaluate, ratios=[0.5, 0.8, 0.9, 0.95], progress=False)
    result = search(model, evaluate, target_sparsity=0.8, n_trials=3, seed=0, progress=False)
    assert "sensitivity suggestion" in result.notes[0]
    suggested = swept.suggest(target_sparsity=0.8, check=False).ratios
    space = Space.of(model, None, "element")
    scores = [max(1 - suggested.get(n, 0.8), 0.01) for n in space.names]
    third = result.trials[2].ratios
    assert list(third.values()) == pytest.approx(project(scores, space.counts, 0.8))
    off = search(model, evaluate, target_sparsity=0.8, n_trials=2, seed=0, progress=False,
                 warm_start=False)  # fmt: skip
    assert off.notes == []
    with pytest.raises(TypeError, match="warm_start"):
        search(model, evaluate, target_sparsity=0.8, n_trials=2, warm_start="yes")


def test_a_target_channel_pruning_cannot_reach_is_refused_in_one_line() -> None:
    from nbcompress import search

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"target_sparsity: 0.9 cannot be reached.*channel"):
        search(model, lambda m: 0.0, target_sparsity=0.9, granularity="channel", n_trials=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    space = Space.of(model, None, "channel")
    assert space.reachable("channel") == pytest.approx(0.75)
    assert space.reachable("element") == pytest.approx(0.99)
