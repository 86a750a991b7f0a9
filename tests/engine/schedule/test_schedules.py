"""Sparsity schedules: TF-MOT's published formula, update steps, bad input."""

from __future__ import annotations

import pickle

import pytest

from nbcompress.engine.schedule.schedules import (
    ConstantSparsity,
    PolynomialDecay,
    should_prune_in_step,
)


def _tfmot(step, s_i, s_f, begin, end, power):
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n·Δt))^power, t clamped to [begin, end].
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return s_f + (s_i - s_f) * (1 - p) ** power


@pytest.mark.parametrize(
    ("s_i", "s_f", "begin", "end", "power", "freq"),
    [(0.5, 0.9, 0, 1000, 3, 100), (0.0, 0.95, 200, 1200, 2, 50), (0.1, 0.8, 7, 307, 1.5, 10)],
)
def test_polynomial_matches_the_published_formula(s_i, s_f, begin, end, power, freq):
    sched = PolynomialDecay(s_i, s_f, begin, end, power=power, frequency=freq)
    for step in range(0, end + 3 * freq, 7):
        due, s = sched(step)
        assert s == pytest.approx(_tfmot(step, s_i, s_f, begin, end, power), abs=1e-12)
        assert sched.sparsity_at(step) == s
        assert due == (begin <= step <= end and (step - begin) % freq == 0)
    assert sched(end) == (True, s_f)
    assert sched(begin) == (True, pytest.approx(s_i))


def test_polynomial_rises_monotonically():
    sched = PolynomialDecay(0.5, 0.9, 0, 1000)
    values = [sched.sparsity_at(t) for t in range(1200)]
    assert values == sorted(values)
    assert values[0] == 0.5 and values[-1] == 0.9
    assert sched.sparsity_at(100) == pytest.approx(0.9 + (0.5 - 0.9) * 0.9**3)


def test_end_step_off_the_grid_is_an_update_step():
    # TF-MOT would never update at 950 (950 % 100 != 0) and stop short of the final value.
    sched = PolynomialDecay(0.2, 0.8, 0, 950, frequency=100)
    updates = [t for t in range(2000) if sched(t)[0]]
    assert updates == [*range(0, 1000, 100), 950]
    assert sched(950) == (True, 0.8)


def test_constant_sparsity():
    sched = ConstantSparsity(0.7, begin_step=10, end_step=-1, frequency=5)
    assert sched(9) == (False, 0.7)
    assert sched(10) == (True, 0.7)
    assert sched(12) == (False, 0.7)
    assert sched(10_005) == (True, 0.7)
    ended = ConstantSparsity(0.7, begin_step=0, end_step=20, frequency=10)
    assert [t for t in range(100) if ended(t)[0]] == [0, 10, 20]
    assert ended.final == 0.7 and ended.sparsity_at(3) == 0.7


def test_should_prune_in_step_tfmot_semantics():
    assert should_prune_in_step(0, 0, 100, 10)
    assert not should_prune_in_step(5, 0, 100, 10)
    assert not should_prune_in_step(110, 0, 100, 10)
    assert should_prune_in_step(1_000_000, 0, -1, 10)
    assert not should_prune_in_step(3, 4, -1, 1)


def test_schedules_are_frozen_picklable_and_readable():
    sched = PolynomialDecay(0.5, 0.9, 0, 1000)
    assert pickle.loads(pickle.dumps(sched)) == sched
    assert repr(sched) == (
        "PolynomialDecay(initial_sparsity=0.5, final_sparsity=0.9, begin_step=0, "
        "end_step=1000, power=3, frequency=100)"
    )
    with pytest.raises(AttributeError):
        sched.final_sparsity = 0.1  # type: ignore[misc]
    const = ConstantSparsity(0.5)
    assert pickle.loads(pickle.dumps(const)) == const
    assert (
        repr(const)
        == "ConstantSparsity(target_sparsity=0.5, begin_step=0, end_step=-1, frequency=100)"
    )


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(initial_sparsity=1.0), "initial_sparsity"),
        (dict(final_sparsity=-0.1), "final_sparsity"),
        (dict(final_sparsity=float("nan")), "final_sparsity"),
        (dict(end_step=0), "end_step"),
        (dict(begin_step=100, end_step=50), "end_step"),
        (dict(begin_step=-1), "begin_step"),
        (dict(frequency=0), "frequency"),
        (dict(power=0), "power"),
        (dict(power=-2), "power"),
    ],
)
def test_polynomial_bad_input_names_the_argument(kwargs, named):
    args = dict(initial_sparsity=0.5, final_sparsity=0.9, begin_step=0, end_step=100)
    with pytest.raises(ValueError, match=rf"^{named}: ") as err:
        PolynomialDecay(**{**args, **kwargs})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(end_step=0, begin_step=0), "end_step"),
        (dict(end_step=-2), "end_step"),
        (dict(frequency=0), "frequency"),
    ],
)
def test_constant_bad_input_names_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=rf"^{named}: "):
        ConstantSparsity(**{"target_sparsity": 0.5, **kwargs})


def test_bad_types():
    with pytest.raises(TypeError, match="^end_step: "):
        PolynomialDecay(0.5, 0.9, 0, 10.5)
    with pytest.raises(TypeError, match="^final_sparsity: "):
        PolynomialDecay(0.5, "0.9", 0, 10)
    with pytest.raises(TypeError, match="^step: "):
        PolynomialDecay(0.5, 0.9, 0, 10)(1.5)
