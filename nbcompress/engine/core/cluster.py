"""Where evaluations run: an executor given, a dask scheduler address, or a local cluster.

:func:`resolve_executor` turns what a verb's ``executor=`` / ``workers=`` arguments say into
a :class:`concurrent.futures.Executor` for the length of a call (``None``: run in this
process). A local cluster binds to 127.0.0.1 only and is closed when the call ends.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import numbers
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

__all__ = ["OwnedPool", "check_workers", "parallelism", "process_pool", "resolve_executor"]

_DASK_EXTRA = 'pip install "nbcompress[dask]"'
# Seconds to wait for a scheduler address to answer before saying it does not.
_CONNECT_TIMEOUT = 3


def progress_line(text: str) -> None:
    """Print one line of plain-text progress to stdout, at once (not buffered).

    Progress is normal output: on stderr a notebook would show it in its error box.
    """
    print(text, flush=True)


def check_workers(workers: Any) -> int | None:
    """``workers`` as a whole number >= 1 (or ``None``), else one line naming it."""
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(
            f"workers: {workers!r} is not a whole number >= 1; pass the number of worker "
            "processes, e.g. workers=2 (1 runs in this process)."
        )
    return int(workers)


class OwnedPool(Executor):
    """A process pool this package started: rebuilt when one of its processes dies.

    Workers are started with ``forkserver`` (``spawn`` where unavailable), never ``fork``:
    forking a process that runs torch threads can deadlock the child.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        methods = multiprocessing.get_all_start_methods()
        self.method = "forkserver" if "forkserver" in methods else "spawn"
        self.pool = self._new()
        self.generation = 0  # rebuilds so far

    def _new(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context(self.method)
        if self.method == "forkserver":
            # The server imports torch once; each worker (and a rebuilt pool's) forks from it
            # in milliseconds instead of importing torch again (about 1.5 s).
            context.set_forkserver_preload(["torch", "nbcompress.engine.core.distribute"])
        return ProcessPoolExecutor(self.workers, mp_context=context)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Submit to the current pool."""
        return self.pool.submit(fn, *args, **kwargs)

    def rebuild(self) -> None:
        """Replace a broken pool with a fresh one (its processes start on first use)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new()
        self.generation += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the processes; without ``wait``, running evaluations are killed too."""
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if not wait:  # Ctrl-C: do not leave a long evaluation running in the background
            for process in processes:
                with contextlib.suppress(Exception):
                    process.terminate()


@contextlib.contextmanager
def process_pool(workers: int) -> Iterator[OwnedPool]:
    """A pool of ``workers`` processes for the block; killed on an error or Ctrl-C."""
    pool = OwnedPool(check_workers(workers) or 1)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _dask() -> Any:
    try:
        import distributed
    except ImportError:
        return None
    return distributed


def _environ_keeper() -> Callable[[], None]:
    """Restores this process's environment as it is now (call it after dask's nannies ran).

    They write ``OMP_NUM_THREADS=1`` and ``MALLOC_TRIM_THRESHOLD_`` into ``os.environ``
    itself to spawn a worker, where every process started later (a process pool, a
    compiler) would inherit them.
    """
    saved = dict(os.environ)

    def restore() -> None:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)

    return restore


def _start_cluster(distributed: Any, workers: int) -> Any:
    import dask

    # dask's default MALLOC_TRIM_THRESHOLD_=65536 makes glibc hand memory back after every
    # step: a fine-tuning evaluation then costs twice the CPU (measured, bench_scaleout.py).
    untrimmed = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    with dask.config.set(untrimmed):
        return distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            # The scheduler serves HTTP (health, metrics) even without a dashboard, by
            # default on 8787 of every interface: a free port on 127.0.0.1 lets notebooks
            # run side by side. No retries by the scheduler: a worker that dies is
            # reported and retried here, once.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0", "allowed_failures": 0},
            silence_logs=logging.CRITICAL,  # a death is reported here, in one line
        )


@contextlib.contextmanager
def _local_cluster(workers: int) -> Iterator[Executor]:
    """A dask LocalCluster of ``workers`` single-threaded processes on 127.0.0.1."""
    distributed = _dask()
    if distributed is None:
        progress_line(f"dask is not installed ({_DASK_EXTRA}): using a pool of {workers} processes")
        with process_pool(workers) as pool:
            yield pool
        return
    start, restore = time.perf_counter(), _environ_keeper()
    try:
        cluster = _start_cluster(distributed, workers)
    finally:
        restore()
    try:
        client = distributed.Client(cluster)
        progress_line(
            f"dask: started a local cluster of {workers} worker processes on 127.0.0.1 in "
            f"{time.perf_counter() - start:.1f} s (closed after this call)"
        )
        try:
            yield client.get_executor(pure=False)
        finally:
            client.close()
    finally:
        cluster.close()
        restore()  # a nanny that restarted a worker wrote them again


@contextlib.contextmanager
def _connect(address: str) -> Iterator[Executor]:
    """An executor on the dask scheduler at ``address`` (not closed: it is not ours)."""
    distributed = _dask()
    if distributed is None:
        raise ImportError(f"executor={address!r} needs dask: {_DASK_EXTRA}")
    try:
        client = distributed.Client(address, timeout=_CONNECT_TIMEOUT)
    except (OSError, ValueError, TimeoutError) as err:
        raise ValueError(
            f"executor: no dask scheduler answers at {address} ({type(err).__name__}); start "
            "one (dask scheduler) or pass workers=2 for a local cluster."
        ) from None
    try:
        yield client.get_executor(pure=False)
    finally:
        client.close()


@contextlib.contextmanager
def resolve_executor(
    executor: Executor | str | None, workers: int | None = None
) -> Iterator[Executor | None]:
    """The executor for one call, started and closed around it if it is ours.

    Args:
        executor: ``None`` (a local cluster if ``workers`` > 1, else this process), any
            :class:`concurrent.futures.Executor` or dask ``Client`` (used as given, not
            closed), or the address of a running dask scheduler such as
            ``"tcp://10.0.0.5:8786"``.
        workers: Worker processes of a local cluster (dask ``LocalCluster``, or a process
            pool when dask is not installed); 1 or ``None`` runs in this process.

    Yields:
        The executor, or ``None`` to run in this process.

    Raises:
        ValueError: ``workers`` is not a whole number >= 1, both arguments are given, or
            no scheduler answers at the address.
        TypeError: ``executor`` is neither an executor nor an address.
        ImportError: an address was given and dask is not installed.
    """
    count = check_workers(workers)
    if executor is None:
        if count is None or count == 1:
            yield None
            return
        with _local_cluster(count) as started:
            yield started
        return
    if count is not None:
        raise ValueError(
            "workers: pass either workers=N (a local cluster started for the call) or "
            "executor=, not both; the executor's own workers are used."
        )
    if isinstance(executor, Executor):
        yield executor
        return
    if callable(getattr(executor, "get_executor", None)):  # a dask Client
        yield executor.get_executor(pure=False)
        return
    if not isinstance(executor, str):
        raise TypeError(
            "executor: expected a concurrent.futures.Executor (e.g. a dask Client's "
            f"get_executor()) or a scheduler address such as 'tcp://host:8786', got "
            f"{type(executor).__name__}."
        )
    with _connect(executor) as connected:
        yield connected


def parallelism(executor: Executor | None) -> int:
    """How many evaluations ``executor`` runs at once (1 in this process)."""
    if executor is None:
        return 1
    if isinstance(executor, OwnedPool):
        return executor.workers
    client = getattr(executor, "_client", None)  # dask's ClientExecutor
    if client is not None:
        with contextlib.suppress(Exception):
            return max(1, sum(client.nthreads().values()))
        return 1
    return max(1, int(getattr(executor, "_max_workers", 1) or 1))
