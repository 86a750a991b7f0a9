"""The persistent tuning record: measured once per CPU, weight pattern and shape bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nbcompress.kernels import csr_matmul, dispatch, pack_csr, tuning
from nbcompress.timing import Race, summarise
from tests.helpers import child_env, child_json
from tests.kernels.reference import sparse_weight

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def record(tmp_path):
    """A record in a temporary directory, for a pretend CPU."""
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    return tuning.active()


@pytest.fixture
def races(monkeypatch):
    """Count the races the kernel choice runs; each picks the last option offered."""
    seen: list[list[str]] = []

    def pick(options):
        seen.append(list(options))
        for run in options.values():
            run()
        return list(options)[-1]

    monkeypatch.setattr(dispatch, "choose", pick)
    return seen


def _batch(rng, n: int, k: int = 300) -> np.ndarray:
    return rng.standard_normal((n, k)).astype(np.float32)


def test_shapes_in_one_bucket_are_measured_once(rng, record, races):
    w = sparse_weight(rng, 40, 300, 0.1)
    mat = pack_csr(w)
    for n in (70, 100, 128):  # one bucket: up to 128 rows
        x = _batch(rng, n)
        np.testing.assert_allclose(csr_matmul(mat, x), x @ w.T, rtol=1e-4, atol=1e-4)
    assert len(races) == 1
    chosen = set(dispatch.kernel_choices(mat).values())
    assert chosen == {races[0][-1]}  # every shape runs the one measured choice
    csr_matmul(mat, _batch(rng, 129))  # the next bucket is measured
    assert len(races) == 2


def test_another_weight_of_the_same_pattern_reuses_the_choice(rng, record, races):
    for seed in range(3):  # same shape and density bucket, other values
        w = sparse_weight(np.random.default_rng(seed), 40, 300, 0.1)
        csr_matmul(pack_csr(w), _batch(rng, 64))
    assert len(races) == 1
    csr_matmul(pack_csr(sparse_weight(rng, 40, 300, 0.5)), _batch(rng, 64))  # denser
    csr_matmul(pack_csr(sparse_weight(rng, 40, 300, 0.1), int8=True), _batch(rng, 64))
    assert len(races) == 3


def test_another_cpu_does_not_reuse_the_record(rng, tmp_path, races):
    w = sparse_weight(rng, 40, 300, 0.1)
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="cpu-a")
    csr_matmul(pack_csr(w), _batch(rng, 64))
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="cpu-b")
    csr_matmul(pack_csr(w), _batch(rng, 64))
    assert len(races) == 2
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="cpu-a")  # a fresh process on a
    csr_matmul(pack_csr(w), _batch(rng, 64))
    assert len(races) == 2
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "tuning-cpu-a.json",
        "tuning-cpu-b.json",
    ]


def test_a_damaged_record_is_ignored_with_one_line_and_rewritten(rng, tmp_path, races, capsys):
    (tmp_path / "tuning-test-cpu.json").write_text('{"format": 1, "entries": {"kern')
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    mat = pack_csr(sparse_weight(rng, 40, 300, 0.1))
    csr_matmul(mat, _batch(rng, 70))
    csr_matmul(mat, _batch(rng, 100))  # the same bucket: the damaged file is read once
    out, err = capsys.readouterr()
    assert err == "" and len(out.splitlines()) == 1
    assert "tuning record tuning-test-cpu.json is damaged" in out
    assert len(races) == 1
    data = json.loads((tmp_path / "tuning-test-cpu.json").read_text())
    assert [e["choice"] for e in data["entries"].values()] == [races[0][-1]]


def test_off_measures_every_shape_as_before(rng, races, monkeypatch):
    monkeypatch.setenv("NBCOMPRESS_TUNING", "off")
    tuning.configure()
    assert tuning.active() is None
    mat = pack_csr(sparse_weight(rng, 40, 300, 0.1))
    for n in (70, 100):
        csr_matmul(mat, _batch(rng, n))
    assert len(races) == 2


def test_an_unknown_mode_is_named_with_the_fix(monkeypatch):
    monkeypatch.setenv("NBCOMPRESS_TUNING", "of")
    with pytest.raises(ValueError, match="NBCOMPRESS_TUNING: 'of' is not one of on, off"):
        tuning.configure()


def test_clear_forgets_the_record(rng, record, races, tmp_path):
    w = sparse_weight(rng, 40, 300, 0.1)
    csr_matmul(pack_csr(w), _batch(rng, 64))
    assert (tmp_path / "tuning-test-cpu.json").exists()
    tuning.clear()
    assert not (tmp_path / "tuning-test-cpu.json").exists()
    csr_matmul(pack_csr(w), _batch(rng, 64))
    assert len(races) == 2


def _tied_race(options, **_):
    # Every option exactly as fast as the incumbent: a near tie by construction.
    names = tuple(options)
    for run in options.values():
        run()
    same = summarise([1.0] * 7)
    return Race(names, {n: same for n in names}, {n: (1.0,) * 7 for n in names})


def test_a_near_tie_keeps_the_recorded_choice_when_re_measured(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "race", _tied_race)
    mat = pack_csr(sparse_weight(rng, 40, 300, 0.1))
    key = (*tuning.matrix_key(mat), "x", 128, 1)
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    tuning.remember("kernel", key, "kblocks", 0.01)  # recorded earlier, not the incumbent
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu", refresh=True)
    csr_matmul(mat, _batch(rng, 100))  # re-measured: a tie, so the recorded one stays
    assert dispatch.kernel_choices(mat) == {("x", 100, 1): "kblocks"}
    entry = tuning.active().get("kernel", key)
    assert entry.choice == "kblocks" and entry.margin == 0.0
    # Without a recorded choice the same tie goes to the incumbent (the panels).
    tuning.configure(enabled=True, cache_dir=tmp_path / "fresh", cpu="test-cpu")
    other = pack_csr(sparse_weight(rng, 40, 300, 0.1))
    csr_matmul(other, _batch(rng, 100))
    assert dispatch.kernel_choices(other) == {("x", 100, 1): "panels"}


def test_the_margin_over_the_runner_up_is_recorded(rng, record, monkeypatch):
    def race(options, **_):
        names = tuple(options)
        for run in options.values():
            run()
        ratios = {n: (r,) * 7 for n, r in zip(names, (1.0, 0.5, 0.6), strict=True)}
        return Race(names, {n: summarise([1.0]) for n in names}, ratios)

    monkeypatch.setattr(dispatch, "race", race)
    mat = pack_csr(sparse_weight(rng, 40, 300, 0.1))
    csr_matmul(mat, _batch(rng, 64))
    entry = record.get("kernel", (*tuning.matrix_key(mat), "x", 64, 1))
    assert entry.choice == "tiles" and entry.margin == pytest.approx(0.2)


def test_buckets_round_extents_up_to_powers_of_two():
    assert tuning.shape_bucket(("x", 100)) == ("x", 128)
    assert tuning.shape_bucket(("v", 1)) == ("v", 1)
    assert tuning.shape_bucket(("conv", 3, 64, 56, 50)) == ("conv", 4, 64, 64, 64)
    assert tuning.density_bucket(0.1) == 10 and tuning.density_bucket(0.026) == 5


_CHILD = """
import json, numpy as np
from nbcompress.kernels import csr_matmul, dispatch, pack_csr, tuning
from tests.kernels.reference import sparse_weight
rng = np.random.default_rng(0)
mat = pack_csr(sparse_weight(rng, 40, 300, 0.1))
with tuning.eager():
    for n in (1, 64, 90, 200):
        csr_matmul(mat, rng.standard_normal((n, 300)).astype(np.float32))
stats = dispatch.tuning_stats()
print(json.dumps({"races": stats["races"], "reused": stats["reused"],
                  "choices": sorted(map(str, dispatch.kernel_choices(mat).items()))}))
"""


def _child(cache: Path) -> dict:
    env = child_env(NBCOMPRESS_CACHE_DIR=str(cache), NBCOMPRESS_TUNING="on")
    return child_json(["-c", _CHILD], env)


def test_a_new_process_reuses_the_recorded_choices(tmp_path):
    first, second = _child(tmp_path), _child(tmp_path)
    assert first["races"] == 4 and first["reused"] == 0  # batch 1; buckets 64, 128, 256
    assert second["races"] == 0 and second["reused"] == 4
    assert second["choices"] == first["choices"]


_WRITER = """
import sys
from nbcompress.kernels import tuning
tuning.configure(enabled=True, cache_dir=sys.argv[1], cpu="test-cpu")
for i in range(20):
    tuning.remember("test", (sys.argv[2], i), "a", 0.1)
"""


def test_processes_writing_at_once_lose_no_entry(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), f"p{p}"], cwd=ROOT, env=env)
        for p in range(4)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    record = tuning.active()
    assert all(record.get("test", (f"p{p}", i)) for p in range(4) for i in range(20))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_layer_key_names_pattern_block_fill_and_input_bucket():
    w = np.zeros((8, 6), dtype=np.float32)
    w[0:4, 1] = 1.0  # one full 4 × 1 block: 4 of 48 nonzero, block fill 100%
    assert tuning.layer_key(w, (2, 37, 6), 2, "Linear") == (8, 6, 10, 100, 2, 64, 8, "Linear", 2)
    w[4, 2] = 1.0  # a second block holding one nonzero: fill 5 / 8
    assert tuning.layer_key(w, (3, 6), 1)[2:4] == (10, 60)


def test_a_choice_measured_under_load_is_measured_again_once_the_machine_is_quiet(
    rng, record, races, monkeypatch, tmp_path
):
    w = sparse_weight(rng, 40, 300, 0.1)
    monkeypatch.setattr(tuning, "machine_busy", lambda: True)
    csr_matmul(pack_csr(w), _batch(rng, 64))
    assert len(races) == 1
    csr_matmul(pack_csr(w), _batch(rng, 64))  # still busy: the busy choice is used
    assert len(races) == 1
    saved = json.loads(next(tmp_path.glob("tuning-*.json")).read_text())
    assert all(e.get("busy") for e in saved["entries"].values())

    # A later process on a quiet machine measures it again, and its choice replaces it.
    monkeypatch.setattr(tuning, "machine_busy", lambda: False)
    tuning.configure(enabled=True, cache_dir=tmp_path, cpu="test-cpu")
    csr_matmul(pack_csr(w), _batch(rng, 64))
    assert len(races) == 2
    csr_matmul(pack_csr(w), _batch(rng, 64))  # once per process
    assert len(races) == 2
    saved = json.loads(next(tmp_path.glob("tuning-*.json")).read_text())
    assert not any(e.get("busy") for e in saved["entries"].values())


def test_a_quiet_choice_is_kept_when_the_machine_is_busy_later(rng, record, races, monkeypatch):
    w = sparse_weight(rng, 40, 300, 0.1)
    monkeypatch.setattr(tuning, "machine_busy", lambda: False)
    csr_matmul(pack_csr(w), _batch(rng, 64))
    monkeypatch.setattr(tuning, "machine_busy", lambda: True)
    tuning.configure(enabled=True, cache_dir=record.path.parent, cpu="test-cpu")
    csr_matmul(pack_csr(w), _batch(rng, 64))
    assert len(races) == 1
