"""SearchResult: the deduplicated front, best, apply_ + undo, JSON round trip, plot, table."""

from __future__ import annotations

import pytest
import torch

from nbcompress.engine.core.history import history, undo_
from nbcompress.engine.search.result import SearchResult, SearchTrial
from nbcompress.engine.search.search import search
from tests.engine.search.search_helpers import Fidelity
from tests.helpers import assert_same_state, mlp, snapshot, zero_fraction


def _trial(number: int, metric: float | None, sparsity: float, state: str = "complete"):
    return SearchTrial(number, {"0": sparsity, "2": sparsity}, metric, sparsity, state)


def _made_up() -> SearchResult:
    return SearchResult(
        trials=[
            _trial(0, 0.90, 0.5),
            _trial(1, 0.80, 0.7),
            _trial(2, 0.90, 0.5),  # a repeat of #0
            _trial(3, 0.70, 0.6),  # dominated by #1
            _trial(4, 0.60, 0.9),
            _trial(5, None, 0.95, "fail"),
            _trial(6, 0.90, 0.4),  # dominated by #0
        ]
    )


def test_pareto_is_the_deduplicated_non_dominated_set_by_sparsity() -> None:
    assert [t.number for t in _made_up().pareto()] == [0, 1, 4]


def test_best_under_a_sparsity_constraint() -> None:
    result = _made_up()
    assert result.best().number == 0
    assert result.best(min_sparsity=0.65).number == 1
    assert result.best(min_sparsity=0.9).number == 4
    with pytest.raises(ValueError, match=r"^min_sparsity: no completed trial reaches 0.950"):
        result.best(min_sparsity=0.95)
    with pytest.raises(ValueError, match=r"^result: no trial completed"):
        SearchResult(trials=[_trial(0, None, 0.5, "fail")]).best()


def test_apply_is_one_undoable_step() -> None:
    torch.manual_seed(0)
    model = mlp()
    evaluate = Fidelity(model, (16,))
    result = search(model, evaluate, target_sparsity=0.7, n_trials=6, seed=0, progress=False)
    saved = snapshot(model)
    chosen = result.best()
    result.apply_(model, chosen.number)
    assert len(history(model)) == 1
    for name, ratio in chosen.ratios.items():
        assert zero_fraction(model.get_submodule(name).weight) == pytest.approx(ratio, abs=0.01)
    assert zero_fraction(model[4].weight) == 0.0  # the output layer was not searched
    undo_(model)
    assert_same_state(model, saved)
    result.apply_(model, {"0": 0.5, "2": 0.0})
    assert zero_fraction(model[0].weight) == pytest.approx(0.5, abs=0.01)
    assert zero_fraction(model[2].weight) == 0.0
    undo_(model)
    assert_same_state(model, saved)
    with pytest.raises(ValueError, match=r"^choice: no trial number 99"):
        result.apply_(model, 99)
    with pytest.raises(TypeError, match=r"^choice: "):
        result.apply_(model, "best")
    assert_same_state(model, saved)


def test_save_and_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp()
    result = search(model, Fidelity(model, (16,)), n_trials=6, seed=0, progress=False)
    result.trials.append(SearchTrial(6, {"0": 0.1, "2": 0.2}, None, 0.15, "fail", "KeyError: x"))
    path = tmp_path / "search.json"
    result.save(path)
    loaded = SearchResult.load(path)
    assert loaded == result
    assert loaded.pareto() == result.pareto()
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match=r"^path: .* is not a saved nbcompress search result"):
        SearchResult.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match=r"^path: .* is not a saved search result"):
        SearchResult.load(tmp_path / "junk.json")


def test_plot_draws_trials_and_front() -> None:
    fig = _made_up().plot()
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("sparsity")
    (front,) = [line for line in ax.get_lines() if line.get_label().startswith("Pareto")]
    assert list(front.get_xdata()) == [0.5, 0.7, 0.9]
    assert len(ax.collections[0].get_offsets()) == 6  # every completed trial


def test_table_and_repr_are_readable() -> None:
    result = _made_up()
    text = str(result)
    assert text.splitlines()[0] == "search (tpe, metric vs sparsity): 6/7 trials complete"
    assert "fail" in text and "—" in text
    assert "best metric 0.9000 at sparsity 0.500 (#0)" in repr(result)
    printed = []
    result._repr_pretty_(type("P", (), {"text": lambda self, t: printed.append(t)})(), False)
    assert printed == [text]


def test_the_progress_bar_counts_the_trials(capsys) -> None:
    torch.manual_seed(0)
    model = mlp()
    search(model, Fidelity(model, (16,)), target_sparsity=0.5, n_trials=4, seed=0)
    out, err = capsys.readouterr()
    assert "search: 4 trials in" in out and "best metric" in out and err == ""


def test_pareto_treats_sparsities_equal_to_rounding_as_one_sparsity() -> None:
    trials = [
        SearchTrial(0, {"a": 0.8}, 0.90, 0.8 + 1e-10),
        SearchTrial(1, {"a": 0.8}, 0.95, 0.8 - 1e-10),
        SearchTrial(2, {"a": 0.5}, 0.97, 0.5),
    ]
    front = SearchResult(trials=trials).pareto()
    assert [t.number for t in front] == [2, 1]
