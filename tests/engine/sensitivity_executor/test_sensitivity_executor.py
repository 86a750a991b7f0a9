"""sensitivity / refine / prune_to_ with executor=: the serial results, bit for bit.

One process pool of two workers serves the module (started once, ~4 s); the dask
LocalCluster path runs once, through ``%sensitivity --workers 2`` in the magic's tests.
Every metric is a closure (shipped by value) that depends on the model alone.
"""

from __future__ import annotations

import copy
import multiprocessing
import struct
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import nbcompress as nc
from nbcompress.engine.core import cluster
from nbcompress.engine.sensitivity.guard import EvaluationError, Fingerprint
from nbcompress.engine.sensitivity.staged import prune_to_
from tests.helpers import assert_same_state, cnn, mlp, snapshot

WHERE = "Evaluated on 2 worker(s)"


@pytest.fixture(scope="module")
def pool():
    context = multiprocessing.get_context("forkserver")
    # Workers fork from a server that imported torch once (not ~4 s of imports each), and
    # torch._dynamo, which a first optimizer step imports (~3 s).
    context.set_forkserver_preload(
        ["torch", "torch._dynamo", "nbcompress.engine.sensitivity.remote"]
    )
    with ProcessPoolExecutor(2, mp_context=context) as p:
        yield p


def closeness_to_dense(model, x):
    """Minus the mean squared distance to the dense output (higher is better), on ``x``."""
    with torch.no_grad():
        reference = model.eval()(x).detach()

    def closeness(m):
        with torch.no_grad():
            return -float(((m(x) - reference) ** 2).mean())

    return closeness


def mlp_setup():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(64, 16)
    return model, x, closeness_to_dense(model, x)


def cnn_setup():
    torch.manual_seed(0)
    model = cnn()
    x = torch.randn(16, 1, 8, 8)
    return model, x, closeness_to_dense(model, x)


def bits(values):
    """Curve values as their float64 bit patterns (NaN and -0.0 compared exactly)."""
    return [None if v is None else struct.pack("<d", v) for v in values]


def assert_identical(serial, remote):
    """Same points, values (bit for bit), order and notes; one more note saying where."""
    assert remote.layers == serial.layers and remote.ratios == serial.ratios
    assert list(remote.curves) == list(serial.curves)
    for name in serial.curves:
        assert bits(remote.curves[name]) == bits(serial.curves[name]), name
    assert remote.filled == serial.filled and remote.baseline == serial.baseline
    assert remote.evaluations == serial.evaluations and remote.complete == serial.complete
    assert remote.notes[:-1] == serial.notes and remote.notes[-1].startswith(WHERE)


def sweep_both(model, evaluate, pool, **options):
    """The serial and the pool's sweep, each with the callback's calls recorded."""
    model.train()  # measured in eval mode; the flags are put back afterwards
    before = Fingerprint.of(model)
    calls = {"serial": [], "pool": []}
    results = {}
    for where, executor in (("serial", None), ("pool", pool)):
        record = calls[where]
        results[where] = nc.sensitivity(
            model, evaluate, progress=False, executor=executor,
            callback=lambda r, layer, ratio, record=record: record.append((layer, ratio)),
            **options,
        )  # fmt: skip
    assert before.changed_in(model) == []  # the live model untouched, bit for bit
    assert all(m.training for m in model.modules())
    assert calls["pool"] == calls["serial"]  # callbacks in the serial order
    return results["serial"], results["pool"]


@pytest.mark.parametrize(
    ("setup", "options"),
    [
        (mlp_setup, dict(early_stop=0.001, include_output=True)),
        (cnn_setup, dict(early_stop=0.003, granularity="channel")),
        (cnn_setup, dict(early_stop=0.003, granularity="block", method="wanda", example=True)),
    ],
    ids=["mlp-element", "cnn-channel", "cnn-block-wanda"],
)
def test_sweep_on_a_process_pool_is_the_serial_sweep_with_early_stop(pool, setup, options):
    model, x, closeness = setup()
    if options.pop("example", False):
        options["example_inputs"] = x
    serial, remote = sweep_both(model, closeness, pool, **options)
    assert any("early stop" in n for n in serial.notes)  # the cut is exercised
    assert serial.evaluations < 1 + len(serial.layers) * len(serial.ratios)
    assert_identical(serial, remote)


def test_proxy_without_replay_and_wanda_calibrated_on_evaluate_batches(pool):
    model, x, closeness = mlp_setup()
    serial, remote = sweep_both(model, None, pool, example_inputs=x, ratios=[0.5, 0.9, 0.99])
    assert serial.proxy and remote.proxy
    assert_identical(serial, remote)
    # Calibration recorded from the batches evaluate feeds the model, then shipped.
    serial, remote = sweep_both(model, closeness, pool, method="wanda", ratios=[0.3, 0.8])
    assert serial.method == "wanda"
    assert_identical(serial, remote)


def test_reconstruct_and_an_evaluate_that_fine_tunes(pool):
    model, x, closeness = mlp_setup()
    serial, remote = sweep_both(
        model, closeness, pool, reconstruct=True, example_inputs=x, ratios=[0.5, 0.9]
    )
    assert_identical(serial, remote)
    target = torch.randn(64, 4)

    def tuned(m):  # one SGD step, then the loss: trained parameters are put back each call
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loss = ((m(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            return -float(((m(x) - target) ** 2).mean())

    serial, remote = sweep_both(model, tuned, pool, ratios=[0.5, 0.9])
    assert any("evaluate trained" in n for n in serial.notes)
    assert_identical(serial, remote)


def test_evaluate_raising_on_a_worker_is_the_serial_evaluation_error(pool):
    model, x, closeness = mlp_setup()
    saved = snapshot(model)

    def fragile(m):
        if float((m[2].weight == 0).float().mean()) > 0.5:  # layer 2 pruned past half
            raise RuntimeError("out of validation data")
        return closeness(m)

    errors = {}
    for where, executor in (("serial", None), ("pool", pool)):
        with pytest.raises(EvaluationError, match="out of validation data") as info:
            nc.sensitivity(model, fragile, progress=False, executor=executor)
        errors[where] = info.value
    assert_same_state(model, saved)
    serial, remote = errors["serial"], errors["pool"]
    assert str(remote) == str(serial) and "layer 2 pruned at 0.6" in str(serial)
    assert bits(remote.result.curves["0"]) == bits(serial.result.curves["0"])
    assert remote.result.curves["2"] == serial.result.curves["2"]
    assert remote.result.complete is serial.result.complete is False


def test_ctrl_c_keeps_the_serial_partial_result(pool):
    model, x, closeness = mlp_setup()
    results = {}
    for where, executor in (("serial", None), ("pool", pool)):
        seen = []

        def stop(result, layer, ratio, seen=seen):
            seen.append(layer)
            if len(seen) == 15:
                raise KeyboardInterrupt

        results[where] = nc.sensitivity(
            model, closeness, progress=False, executor=executor, callback=stop
        )
    serial, remote = results["serial"], results["pool"]
    assert not serial.complete and serial.notes[-1].startswith("Interrupted after 16")  # 1 + 15
    assert_identical(serial, remote)
    # The pool is still usable after the cancelled evaluations.
    again = nc.sensitivity(model, closeness, progress=False, executor=pool, ratios=[0.5])
    assert again.complete


def test_options_that_run_serially_and_bad_executors_are_refused_in_one_line(pool):
    model, x, closeness = cnn_setup()
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"^executor: remove=True .* runs serially"):
        nc.sensitivity(model, closeness, remove=True, granularity="channel",
                       example_inputs=x, executor=pool)  # fmt: skip
    with pytest.raises(ValueError, match="^workers: 0 is not a whole number"):
        nc.sensitivity(model, closeness, workers=0)
    with pytest.raises(TypeError, match="^executor: expected a concurrent.futures.Executor"):
        nc.sensitivity(model, closeness, executor=42)
    with pytest.raises(ValueError, match="^workers: pass either workers=N"):
        nc.sensitivity(model, closeness, executor=pool, workers=2)
    assert_same_state(model, saved)


def test_workers_starts_a_pool_for_the_call_without_dask(monkeypatch):
    monkeypatch.setattr(cluster, "_dask", lambda: None)  # dask "not installed": a process pool
    model, x, closeness = mlp_setup()
    serial = nc.sensitivity(model, closeness, progress=False, ratios=[0.5, 0.9])
    remote = nc.sensitivity(model, closeness, progress=False, ratios=[0.5, 0.9], workers=2)
    assert_identical(serial, remote)
    assert "(OwnedPool)" in remote.notes[-1]


def test_refine_on_a_pool_is_the_serial_search(pool):
    model, x, closeness = mlp_setup()
    saved = snapshot(model)
    serial, remote = [
        nc.refine(model, closeness, 0.7, budget=25, executor=executor) for executor in (None, pool)
    ]
    assert_same_state(model, saved)
    assert len(serial.steps) > len(serial.candidates)  # some move was kept
    assert remote.ratios == serial.ratios and remote.measured == serial.measured
    assert remote.steps == serial.steps and remote.evaluations == serial.evaluations
    assert remote.candidates == serial.candidates
    assert remote.notes[:-1] == serial.notes and remote.notes[-1].startswith(WHERE)


def test_staged_pruning_on_a_pool_prunes_as_the_serial_stages(pool):
    model, x, closeness = mlp_setup()
    twin = copy.deepcopy(model)
    options = dict(stages=2, ratios=[0.2, 0.4, 0.6, 0.8, 0.9], refine=10, progress=False)
    serial = prune_to_(model, closeness, 0.7, **options)
    remote = prune_to_(twin, closeness, 0.7, executor=pool, **options)
    assert remote.rows == serial.rows and remote.evaluations == serial.evaluations
    assert_same_state(twin, snapshot(model))  # the same weights pruned, bit for bit
    nc.undo_(twin)
    nc.undo_(model)
    assert_same_state(twin, snapshot(model))


def test_suggest_checks_and_refines_on_a_pool_as_serially(pool):
    model, x, closeness = mlp_setup()
    result = nc.sensitivity(model, closeness, progress=False, ratios=[0.3, 0.6, 0.9])
    serial = result.suggest(0.6, evaluate=closeness, refine=8)
    remote = result.suggest(0.6, evaluate=closeness, refine=8, executor=pool)
    assert remote.ratios == serial.ratios and remote.measured == serial.measured
    assert remote.refinement.steps == serial.refinement.steps
    assert [n for n in remote.notes if not n.startswith(WHERE)] == serial.notes
    assert any(n.startswith(WHERE) for n in remote.notes)
