"""Dispatch on a real dask LocalCluster of 2 worker processes (started once here, ~5 s)."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

from nbcompress.engine.core.distribute import Dispatch, resolve_executor
from tests.engine.distribute import distribute_helpers as h
from tests.helpers import bits, mlp

if os.environ.get("REQUIRE_DASK") != "1":  # CI (.ci/run) sets it: a missing dask fails there
    pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_executor():
    with resolve_executor(None, workers=2) as executor:
        yield executor


def _results(dispatch: Dispatch, fn, items) -> list:
    return [r for _, r in sorted(dispatch.run(fn, items), key=lambda p: p[0])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_local_cluster_listens_on_127_0_0_1_only(dask_executor) -> None:
    import psutil  # installed with distributed

    client = dask_executor._client
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2 and all(a.startswith("tcp://127.0.0.1:") for a in workers)
    me = psutil.Process()
    listening = [
        c.laddr
        for p in [me, *me.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}
    assert 8787 not in {a.port for a in listening}  # the scheduler's HTTP on a free port


def test_dask_settings_do_not_leak_into_this_process_or_slow_the_workers(dask_executor) -> None:
    # The nannies write these into os.environ to spawn workers; the cluster puts it back.
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    with Dispatch(dask_executor, None) as dispatch:
        # Trimming after every free doubles the CPU of a fine-tuning evaluation.
        assert _results(dispatch, h.environment, ["MALLOC_TRIM_THRESHOLD_"]) == [None]


def test_results_are_bit_identical_to_serial_and_the_state_ships_once(dask_executor) -> None:
    model, x = mlp(), torch.randn(16, 16)
    serial = _results(Dispatch(None, (model, x)), h.forward, range(6))
    with Dispatch(dask_executor, (model, x)) as dispatch:
        assert dispatch.workers == 2
        remote = _results(dispatch, h.forward, range(6))
        answers = _results(dispatch, h.where, range(10))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(serial, remote))
    loads: dict[int, set[int]] = {}
    for pid, count in answers:
        loads.setdefault(pid, set()).add(count)
    assert all(len(counts) == 1 for counts in loads.values())


def test_a_local_closure_travels_and_an_exception_comes_back(dask_executor) -> None:
    offset = torch.tensor(0.25)

    def evaluate(item: int) -> float:
        return float(item + offset)

    with Dispatch(dask_executor, evaluate) as dispatch:
        assert _results(dispatch, h.call_state, [1, 2]) == [1.25, 2.25]
    with Dispatch(dask_executor, None) as dispatch:
        failed = _results(dispatch, h.fail_on_two, range(3))[2]
    assert type(failed) is ValueError and str(failed) == "bad item 2"


def test_a_scheduler_address_or_a_client_is_accepted(dask_executor) -> None:
    client = dask_executor._client
    for given in (client.scheduler.address, client):
        with resolve_executor(given) as executor, Dispatch(executor, None) as dispatch:
            assert dispatch.workers == 2
            assert _results(dispatch, h.fail_on_two, [0, 1]) == [0, 1]
    assert client.status == "running"  # not ours: left open


def test_an_address_that_does_not_answer_is_one_line() -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    refused = pytest.raises(ValueError, match=f"^executor: no dask scheduler answers at {address}")
    with refused, contextlib.ExitStack() as stack:
        stack.enter_context(resolve_executor(address))


def test_a_dead_worker_is_reported_and_its_item_retried_once(dask_executor, tmp_path,
                                                              capsys) -> None:  # fmt: skip
    # Last in this module: the nanny restarts the worker in the background.
    with Dispatch(dask_executor, str(tmp_path)) as dispatch:
        assert _results(dispatch, h.die_once, range(6)) == [0, 10, 20, 30, 40, 50]
    assert (tmp_path / "died").exists()
    assert "evaluate: a worker died during item 2; retrying it once" in capsys.readouterr().out


def test_a_cancelled_task_counts_as_a_death_and_a_lost_payload_is_scattered_again() -> None:
    # dask cancels the tasks whose scattered payload died with its worker: they are retried
    # once, with the payload scattered again (a finished one is not sent twice).
    import concurrent.futures as cf
    import types

    from nbcompress.engine.core.distribute import Dispatch, _died

    assert _died(cf.CancelledError()) and not _died(ValueError("fn's own error"))
    sent: list[bytes] = []

    def scatter(payload: bytes, **_: object) -> types.SimpleNamespace:
        sent.append(payload)
        return types.SimpleNamespace(status="finished")

    dispatch = Dispatch(None, 1)
    dispatch.executor = types.SimpleNamespace(_client=types.SimpleNamespace(scatter=scatter))
    dispatch.payload, dispatch.shipped = b"state", types.SimpleNamespace(status="lost")
    dispatch.reship()
    assert sent == [b"state"] and dispatch.shipped.status == "finished"
    dispatch.reship()
    assert sent == [b"state"]
