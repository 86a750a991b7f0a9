"""The forward-time kernel choice: a new shape bucket is predicted, raced only once it pays."""

from __future__ import annotations

import numpy as np
import pytest

from nbcompress.kernels import csr_matmul, dispatch, pack_csr, tuning
from tests.kernels.reference import sparse_weight

NAMES = ("panels", "tiles", "kblocks")


@pytest.fixture
def mat():
    return pack_csr(sparse_weight(np.random.default_rng(0), 40, 300, 0.1))


@pytest.fixture(autouse=True)
def _forward_time():
    """As at forward time: predictions, not races (the kernel tests' conftest is eager)."""
    with tuning.eager(False):
        yield


def test_a_new_bucket_takes_the_nearest_measured_buckets_choice(mat):
    known = {("x", 64, 1): "tiles", ("x", 2048, 1): "kblocks"}
    assert tuning.plan(mat, ("x", 200, 1), NAMES, known) == "tiles"  # 256: 2 doublings
    assert tuning.plan(mat, ("x", 1500, 1), NAMES, known) == "kblocks"  # 2048: its own
    # Another thread count or product is not alike: the kind's prior, else the incumbent.
    assert tuning.plan(mat, ("x", 200, 2), NAMES, known) == tuning.PRIOR["x"]
    assert tuning.plan(mat, ("t", 200, 1), NAMES, known) == "panels"
    # A choice that is not on offer (the tiles need 64 columns) is not predicted.
    assert tuning.plan(mat, ("x", 200, 1), ("panels", "kblocks"), known) == "kblocks"


def test_a_bucket_is_raced_once_only_after_enough_calls_to_pay_for_it(mat):
    known: dict = {}
    after = tuning.race_after(len(NAMES))
    # The rent-or-buy bound: the race (RACE_CALLS calls of each option) costs no more than
    # the expected gain over the calls the bucket has already run.
    assert after * tuning.EXPECTED_GAIN >= tuning.RACE_CALLS * len(NAMES)
    runs = [tuning.plan(mat, ("t", 90 + i % 30, 1), NAMES, known) for i in range(after)]
    assert runs == ["panels"] * after  # shapes 90–119: one bucket, one count
    assert tuning.plan(mat, ("t", 100, 1), NAMES, known) is None  # now raced, once
    known[("t", 100, 1)] = "kblocks"  # the dispatcher keeps the race's choice
    later = [tuning.plan(mat, ("t", n, 1), NAMES, known) for n in (65, 100, 128)]
    assert later == ["kblocks"] * 3  # the bucket is settled: never raced again


def test_eager_and_refresh_choose_now(mat, tmp_path):
    with tuning.eager():
        assert tuning.plan(mat, ("x", 100, 1), NAMES, {}) is None
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu", refresh=True)
    assert tuning.plan(mat, ("x", 100, 1), NAMES, {}) is None


def test_the_record_settles_its_bucket_and_predicts_for_others(mat, tmp_path):
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    # Recorded for another weight of the same pattern (shape and density bucket) at 64 rows.
    tuning.remember("kernel", (*tuning.matrix_key(mat), "x", 64, 1), "tiles", 0.2)
    assert tuning.plan(mat, ("x", 50, 1), NAMES, {}) is None  # recorded: dispatcher reuses
    assert tuning.plan(mat, ("x", 300, 1), NAMES, {}) == "tiles"  # the nearest recorded
    # This weight's own measurement wins over a pattern's at the same distance.
    own = {("x", 1024, 1): "kblocks"}
    assert tuning.plan(mat, ("x", 600, 1), NAMES, own) == "kblocks"
    other = pack_csr(sparse_weight(np.random.default_rng(1), 40, 300, 0.5))  # denser
    assert tuning.plan(other, ("x", 300, 1), NAMES, {}) == tuning.PRIOR["x"]


def test_bucket_distance_counts_doublings_of_alike_keys():
    assert tuning.bucket_distance(("x", 64), ("x", 256)) == 2
    assert tuning.bucket_distance(("conv", 1, 64, 56, 56), ("conv", 2, 64, 28, 28)) == 3
    assert tuning.bucket_distance(("x", 64), ("t", 64)) is None
    assert (
        tuning.bucket_distance(("conv", 1, 64, 8, 8, "3x3"), ("conv", 1, 64, 8, 8, "1x1")) is None
    )


def test_forward_calls_at_new_shapes_do_not_race(mat, monkeypatch):
    races: list = []

    def pick(options):
        races.append(list(options))
        for run in options.values():
            run()
        return "kblocks"

    monkeypatch.setattr(dispatch, "choose", pick)
    w = mat.to_dense()
    rng = np.random.default_rng(0)
    with tuning.eager():
        csr_matmul(mat, rng.standard_normal((64, 300)).astype(np.float32))
    assert len(races) == 1
    for n in (100, 300, 700):  # new buckets at forward time: the nearest choice, no race
        x = rng.standard_normal((n, 300)).astype(np.float32)
        np.testing.assert_allclose(csr_matmul(mat, x), x @ w.T, rtol=1e-4, atol=1e-4)
    assert len(races) == 1
    assert tuning.plan_stats()["predicted"] >= 3
