"""The live view of ``%search`` without a frontend: updates, throttle, finish, Apply and Undo.

Calling ``update`` is what ``search(callback=...)`` does after each trial; ``button.click()``
and setting ``choice.value`` run the same callbacks a browser does, synchronously, so every
assertion is on a kernel-side effect (the model's weights and history, the text written into
the widgets, the PNG drawn).
"""

from __future__ import annotations

import copy

import pytest
import torch

from nbcompress import history
from nbcompress.engine.core.history import undo_
from nbcompress.engine.prune.prune import prune_ratios_
from nbcompress.engine.search.result import SearchResult, SearchTrial
from nbcompress.engine.search.search import search
from nbcompress.notebook.display import search_live
from nbcompress.notebook.display.search import search_figure
from nbcompress.notebook.display.search_live import SearchView, front_options
from tests.engine.search.search_helpers import Fidelity
from tests.helpers import assert_same_state, mlp, snapshot

PNG = b"\x89PNG"


class Clock:
    """A clock that only moves when told to (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def trial(number: int, metric: float | None, sparsity: float) -> SearchTrial:
    if metric is None:
        return SearchTrial(number, {"0": sparsity}, None, sparsity, "fail", "RuntimeError: x")
    return SearchTrial(number, {"0": sparsity}, metric, sparsity)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return mlp().eval()


@pytest.fixture
def searched(model):
    """A real 6-trial search at 70% of the mlp, its view fed by the callback and finished."""
    view = SearchView(model, 6, target_sparsity=0.7, clock=Clock())
    result = search(model, Fidelity(model, (16,)), target_sparsity=0.7, n_trials=6, seed=0,
                    progress=False, callback=view.update)  # fmt: skip
    view.finish(result)
    yield view, result
    view.close()


def test_updates_move_the_bar_count_failed_trials_and_draw(model):
    clock = Clock()
    view = SearchView(model, 4, clock=clock)
    assert view.apply_button.disabled and view.undo_button.disabled and view.choice.disabled
    view.update(trial(0, 0.9, 0.5), 1, 4)
    assert view.draws == []  # 0 s since the start: not yet
    clock.now += 10
    view.update(trial(1, None, 0.6), 2, 4)
    assert bytes(view.plot.value).startswith(PNG) and len(view.draws) == 1
    clock.now += 10
    view.update(trial(2, 0.8, 0.7), 3, 4)
    assert (view.bar.value, view.bar.max) == (3, 4)
    text = view.progress.value
    assert text.startswith("3/4 trials · 1 failed · 20 s elapsed, ETA 7 s"), text
    assert text.endswith("best 0.9 at 50.0% (#0)"), text
    # Still disabled while the search runs; a call is refused without touching the model.
    assert view.apply_button.disabled
    before = snapshot(model)
    view.apply()
    assert view.status.value == "not applied: the search has not ended"
    assert_same_state(model, before)


def test_redraws_are_throttled_by_interval_and_by_their_cost(model, monkeypatch):
    clock = Clock()
    view = SearchView(model, 100, clock=clock, min_interval=0.5, budget=0.1)
    for i, step in enumerate([0.3] * 5, start=1):
        clock.now += step
        view.update(trial(i, 0.5, 0.5), i, 100)
    assert len(view.draws) == 2  # at 0.6 s and 1.2 s after the start (every ≥ 0.5 s)

    # A redraw that takes 0.2 s waits 0.2 / 0.1 = 2 s before the next.
    def slow(*args, **kwargs):
        clock.now += 0.2
        return search_figure(*args, **kwargs)

    monkeypatch.setattr(search_live, "search_figure", slow)
    clock.now += 1.0
    view.update(trial(6, 0.5, 0.5), 6, 100)
    assert len(view.draws) == 3 and view.draws[-1] == pytest.approx(0.2)
    clock.now += 1.0
    view.update(trial(7, 0.5, 0.5), 7, 100)
    assert len(view.draws) == 3
    clock.now += 1.5  # 2.5 s after the slow redraw
    view.update(trial(8, 0.5, 0.5), 8, 100)
    assert len(view.draws) == 4
    view.update(trial(9, 0.5, 0.5), 100, 100)  # the last update is not due either...
    assert len(view.draws) == 4
    view.finish(SearchResult(trials=[trial(0, 0.5, 0.5)]))  # ...finish() draws the end
    assert len(view.draws) == 5 and view.bar.value == 100


def test_the_selector_lists_the_deduplicated_front_best_first(model):
    trials = [
        trial(0, 0.90, 0.5),
        trial(1, 0.95, 0.3),
        trial(2, 0.90, 0.5),  # a repeat of #0: listed once
        trial(3, 0.80, 0.4),  # dominated by #0
        trial(4, None, 0.9),  # failed
        trial(5, 0.70, 0.8),
    ]
    result = SearchResult(trials=trials)
    assert front_options(result) == [
        ("sparsity 30.0% · metric 0.95 · trial #1", 1),
        ("sparsity 50.0% · metric 0.9 · trial #0", 0),
        ("sparsity 80.0% · metric 0.7 · trial #5", 5),
    ]
    view = SearchView(model, 6, clock=Clock())
    for i, t in enumerate(trials, start=1):
        view.update(t, i, 6)
    view.finish(result)
    assert [v for _, v in view.choice.options] == [1, 0, 5] and view.choice.value == 1
    assert not (view.apply_button.disabled or view.undo_button.disabled or view.choice.disabled)
    assert view.bar.bar_style == "warning"  # a trial failed
    assert view.status.value == "search done: 6 trials, 1 failed; choose a front point and Apply it"
    drawn = bytes(view.plot.value)
    view.choice.value = 5  # the chosen point is ringed: a new picture
    assert view.selected is trials[5] and bytes(view.plot.value) != drawn


def test_a_search_with_no_completed_trial_offers_nothing_to_apply(model):
    view = SearchView(model, 1, clock=Clock())
    view.finish(SearchResult(trials=[trial(0, None, 0.5)], interrupted=True))
    assert view.apply_button.disabled and view.choice.options == ()
    assert (
        view.status.value
        == "search interrupted: 1 trials, 1 failed; no trial completed, nothing to apply"
    )


def test_apply_records_one_step_undo_restores_bit_exactly_and_apply_twice_is_refused(
    model, searched
):
    view, result = searched
    before = snapshot(model)
    assert len(history(model)) == 0  # the search left the model as it was
    chosen = result.trials[view.choice.value]
    view.apply_button.click()
    assert len(history(model)) == 1
    pruned = copy.deepcopy(model)
    expected = mlp()
    expected.load_state_dict(before)
    prune_ratios_(expected, {n: r for n, r in chosen.ratios.items() if r > 0})
    assert_same_state(model, snapshot(expected))  # exactly the chosen allocation
    status = view.status.value
    assert status.startswith(f"applied trial #{chosen.number} (sparsity 70.0%, metric "), status
    assert status.endswith("Undo or %undo model reverts it"), status

    view.apply_button.click()  # once more: refused, the model keeps one step
    assert view.status.value.startswith(f"not applied: trial #{chosen.number} is already applied")
    assert len(history(model)) == 1
    assert_same_state(model, snapshot(pruned))

    view.undo_button.click()
    assert view.status.value.startswith("undone: the last prune step; 1,436 nonzero")
    assert_same_state(model, before)
    assert len(history(model)) == 0
    view.choice.value = view.choice.options[-1][1]
    view.apply_button.click()  # back at the searched model: another point applies
    assert view.status.value.startswith("applied trial #")


def test_apply_is_refused_when_the_model_changed_elsewhere(model, searched):
    view, _ = searched
    prune_ratios_(model, {"0": 0.5})  # e.g. %prune in another cell
    after = snapshot(model)
    view.apply_button.click()
    assert view.status.value.startswith(
        "not applied: the model has steps the search did not see; %undo model back to the "
        "searched model first"
    ), view.status.value
    assert_same_state(model, after)
    assert len(history(model)) == 1

    undo_(model)
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0  # an edit by hand: no step in the history
    edited = snapshot(model)
    view.apply_button.click()
    assert view.status.value == (
        "not applied: the model's weights changed since the search; re-run %search"
    )
    assert_same_state(model, edited)


def test_apply_with_reconstruct_prunes_with_the_search_inputs(model):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    evaluate = Fidelity(model, (16,))
    result = search(model, evaluate, target_sparsity=0.6, n_trials=3, seed=0, progress=False,
                    reconstruct=True, example_inputs=x)  # fmt: skip
    before = snapshot(model)

    bare = SearchView(model, 3, clock=Clock())
    bare.finish(result)
    bare.apply_button.click()  # no calibration inputs: refused, model untouched
    assert bare.status.value.startswith("not applied: example_inputs: this search pruned"), (
        bare.status.value
    )
    assert_same_state(model, before)
    assert len(history(model)) == 0

    view = SearchView(model, 3, example_inputs=x, clock=Clock())
    view.finish(result)
    view.apply_button.click()
    assert view.status.value.startswith("applied trial #")
    expected = mlp()
    expected.load_state_dict(before)
    ratios = {n: r for n, r in view.selected.ratios.items() if r > 0}
    prune_ratios_(expected, ratios, reconstruct=True, example_inputs=x)
    assert_same_state(model, snapshot(expected))  # re-fitted as in the trials
    plain = mlp()
    plain.load_state_dict(before)
    prune_ratios_(plain, ratios)  # without the inputs the kept weights would differ
    assert not torch.equal(plain[0].weight, model[0].weight)


def test_search_magic_shows_the_view_in_a_widget_frontend(shell, monkeypatch, capsys):
    import IPython.display

    torch.manual_seed(0)
    model = mlp()
    shell.user_ns.update(model=model, evaluate=Fidelity(model, (16,)))
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    monkeypatch.setattr(shell, "kernel", object(), raising=False)  # as in a Jupyter kernel
    result = shell.run_line_magic("search", "model --eval evaluate -t 0.8 --trials 4 --seed 0")
    assert isinstance(result, SearchResult)
    (view,) = shown
    assert isinstance(view, SearchView) and view.result is result
    assert view.bar.value == 4 and view.progress.value.startswith("4/4 trials")
    assert not view.apply_button.disabled
    assert "front" not in capsys.readouterr().out  # the view replaces the printed table
    view.close()


def test_a_refused_search_leaves_no_empty_view(shell, monkeypatch):
    import IPython.display
    from IPython.core.error import UsageError

    shell.user_ns.update(model=mlp(), evaluate=lambda m: 0.0)
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    monkeypatch.setattr(shell, "kernel", object(), raising=False)
    with pytest.raises(UsageError, match="^--sampler: "):
        shell.run_line_magic("search", "model --eval evaluate --sampler anneal")
    assert shown == []


def test_a_search_whose_every_trial_failed_says_so_in_the_view(shell, monkeypatch):
    import IPython.display
    from IPython.core.error import UsageError

    def evaluate(m):
        raise RuntimeError("no data")

    shell.user_ns.update(model=mlp(), evaluate=evaluate)
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    monkeypatch.setattr(shell, "kernel", object(), raising=False)
    with pytest.raises(UsageError, match="evaluate"):
        shell.run_line_magic("search", "model --eval evaluate -t 0.8 --trials 3 --seed 0")
    (view,) = shown
    assert view.status.value.startswith("search stopped: ") and "no data" in view.status.value
    assert view.bar.bar_style == "danger" and view.apply_button.disabled
    view.close()


def test_in_a_terminal_search_prints_the_table_as_before_and_shows_no_view(shell, monkeypatch,
                                                                           capsys):  # fmt: skip
    import IPython.display

    torch.manual_seed(0)
    model = mlp()
    shell.user_ns.update(model=model, evaluate=Fidelity(model, (16,)))
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    assert getattr(shell, "kernel", None) is None  # the test shell is a terminal one
    result = shell.run_line_magic("search", "model --eval evaluate -t 0.8 --trials 3 --seed 0")
    assert shown == []
    assert str(result) in capsys.readouterr().out
