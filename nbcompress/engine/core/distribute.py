"""Evaluations of one state (a model, its data, ``evaluate``) spread over an executor.

:class:`Dispatch` runs ``fn(state, item)`` for many items. Without an executor it runs them
here, in order, on the live state. With one, the state is pickled once (cloudpickle, so
that classes and functions defined in a notebook travel by value) and sent once per worker
process, not once per item: each task carries a token, a worker keeps the states it has
unpickled by token, and a worker that lacks the token answers "missing" and gets the item
again with the state. Only the first ``workers`` tasks carry it (on dask, a reference to
the bytes, which are scattered to every worker once).

A worker process that dies is reported in one line and its item retried once; what ``fn``
raises on a worker comes back as the same exception, yielded with the item's index.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from nbcompress.engine.core.cluster import (
    OwnedPool,
    check_workers,
    parallelism,
    process_pool,
    progress_line,
    resolve_executor,
)

__all__ = [
    "Dispatch",
    "check_workers",
    "process_pool",
    "resolve_executor",
    "shipped_states",
]

T = TypeVar("T")
R = TypeVar("R")

_MISSING = "missing"  # a worker's answer; fn's results travel inside tuples
_ABSENT = object()
# Worker side: token -> [payload, states not in use]; the few most recent tokens only.
_CACHE: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()
_KEEP_TOKENS = 4
_LOCK = threading.Lock()
_LOADED = {"count": 0}
# Exceptions (by class name) that mean a dask worker process died or was cut off.
_DASK_DEATHS = ("KilledWorker", "CommClosedError", "StreamClosedError")


def shipped_states() -> int:
    """How many shipped states this process has unpickled (once per worker and state)."""
    return _LOADED["count"]


def _dumps(state: Any, what: str) -> bytes:
    try:
        import cloudpickle
    except ImportError:  # stdlib pickle: functions and classes must be importable by name
        cloudpickle = pickle
    try:
        return cloudpickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 - any pickling failure, said in one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TypeError(
            f"{what}: the model and data cannot be sent to the workers ({first}); define the "
            "function at module level or install cloudpickle, or run without an executor."
        ) from None


def _checkout(token: str, payload: bytes | None) -> Any:
    """A state of ``token`` for this task alone (threads of one worker never share one)."""
    with _LOCK:
        entry = _CACHE.get(token)
        if entry is None:
            if payload is None:
                return _ABSENT
            entry = _CACHE[token] = [payload, []]
            while len(_CACHE) > _KEEP_TOKENS:  # forget the oldest states (a finished call's)
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(token)
        if entry[1]:
            return entry[1].pop()
        _LOADED["count"] += 1
    return pickle.loads(entry[0])


def _checkin(token: str, state: Any) -> None:
    with _LOCK:
        if token in _CACHE:
            _CACHE[token][1].append(state)


def _forget(token: str) -> None:
    with _LOCK:
        _CACHE.pop(token, None)


def _portable(err: Exception) -> Exception:
    """``err`` if it pickles (to travel back), else a RuntimeError with its message."""
    try:
        pickle.dumps(err)
    except Exception:  # noqa: BLE001 - e.g. an exception holding a lock or a generator
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def run_task(token: str, payload: bytes | None, fn: Callable, item: Any, client: int,
             attempt: int = 0) -> Any:  # fmt: skip
    """Worker side: ``("ok", fn(state, item))``, ``("raised", error)`` or ``"missing"``.

    ``attempt`` only makes a retried task differ from the first one (dask keys pure tasks
    by their arguments).
    """
    del attempt
    state = _checkout(token, payload)
    if state is _ABSENT:
        return _MISSING
    if os.getpid() != client:  # a worker process: one torch thread per evaluation
        import torch

        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
    try:
        value = fn(state, item)
    except Exception as err:  # noqa: BLE001 - returned, not raised: it is fn's answer
        return ("raised", _portable(err))  # the state may be half-changed: not reused
    _checkin(token, state)
    return ("ok", value)


def _died(err: BaseException) -> bool:
    # CancelledError: futures this module cancels are never read, so a cancelled one was
    # cancelled by dask, which does so when the worker holding its scattered payload died.
    if isinstance(err, cf.BrokenExecutor | cf.CancelledError):
        return True
    return any(c.__name__ in _DASK_DEATHS for c in type(err).__mro__)


class Dispatch:
    """Evaluations of one shipped state, on an executor or in this process.

    Args:
        executor: Where to run (``None``: here, in order, on the live ``state``).
        state: What every call gets as its first argument (a model, data, ``evaluate``).
        what: Name of the user's function, for messages (``"evaluate"``).

    Attributes:
        workers: Evaluations that run at once: 1 here, a process pool's size, or the sum
            of the threads of a dask cluster's workers.
    """

    def __init__(self, executor: Executor | None, state: Any, *, what: str = "evaluate") -> None:
        self.executor, self.state, self.what = executor, state, what
        self.workers = parallelism(executor)
        self.token = uuid.uuid4().hex
        self.payload = None if executor is None else _dumps(state, what)
        self.shipped: Any = self.payload  # what a task carries to stand for the payload
        client = getattr(executor, "_client", None)
        if client is not None:
            # dask: the bytes go to every worker once, and tasks carry a reference (a task
            # carrying megabytes would make the graph large, and dask warns on every send).
            self.shipped = client.scatter(self.payload, broadcast=True, hash=False)
        self._local: Any = None  # an unpickled copy, if a broken pool leaves us alone
        self._closed = False

    def reship(self) -> None:
        """Scatter the payload again if dask lost it (its worker died, no copy survived)."""
        client = getattr(self.executor, "_client", None)
        if client is not None and getattr(self.shipped, "status", "finished") != "finished":
            self.shipped = client.scatter(self.payload, broadcast=True, hash=False)

    def run(
        self,
        fn: Callable[[Any, T], R],
        items: Sequence[T],
        *,
        labels: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, R | Exception]]:
        """Yield ``(index, fn(state, item))`` as each finishes (the exception if ``fn`` raised).

        ``fn`` must be importable (a module-level function). Closing the iterator (or a
        Ctrl-C) cancels the evaluations not yet finished. ``labels`` name the items in
        messages (``"trial 7"``; default ``"item <index>"``).

        Raises:
            RuntimeError: a worker died twice during the same item, or an evaluation could
                not be sent or received.
        """
        items = list(items)
        if self.executor is None:
            for index, item in enumerate(items):
                try:
                    result: Any = fn(self.state, item)
                except Exception as err:  # noqa: BLE001 - yielded, as from a worker
                    result = err
                yield index, result
            return
        yield from _Run(self, fn, items, labels)

    def run_here(self, fn: Callable, item: Any) -> Any:
        """One item in this process on a copy of the state (when the pool is gone)."""
        if self._local is None:
            self._local = pickle.loads(self.payload)
        try:
            return ("ok", fn(self._local, item))
        except Exception as err:  # noqa: BLE001 - fn's answer, as from a worker
            self._local = None
            return ("raised", err)

    def close(self) -> None:
        """Forget the state on the dask workers (a process pool keeps a few, then drops)."""
        if self._closed:
            return
        self._closed = True
        client = getattr(self.executor, "_client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.run(_forget, self.token)
        self.payload = self.shipped = self._local = None

    def __enter__(self) -> Dispatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Run:
    """One :meth:`Dispatch.run` over an executor: a window of tasks, retries, results."""

    def __init__(self, dispatch: Dispatch, fn: Callable, items: list,
                 labels: Sequence[str] | None) -> None:  # fmt: skip
        self.d, self.fn, self.items = dispatch, fn, items
        self.labels = list(labels) if labels is not None else None
        self.pending: dict[cf.Future, tuple[int, int]] = {}
        self.deaths: collections.Counter[int] = collections.Counter()
        self.sent_payloads = 0
        self.here = False  # a pool we do not own broke: the rest runs in this process
        # A process pool fails every queued task when one process dies: keep only what
        # runs in flight, so that only those are blamed. dask fails the task alone.
        executor = dispatch.executor
        pool = isinstance(executor, OwnedPool | cf.ProcessPoolExecutor)
        self.window = dispatch.workers * (1 if pool else 2)

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels else f"item {index}"

    def submit(self, index: int, payload: bool = False) -> None:
        d = self.d
        ship = payload or self.sent_payloads < d.workers
        self.sent_payloads += ship
        generation = getattr(d.executor, "generation", 0)
        if self.here:
            future: cf.Future = cf.Future()
            future.set_result(d.run_here(self.fn, self.items[index]))
        else:
            args = (d.token, d.shipped if ship else None, self.fn, self.items[index])
            future = d.executor.submit(run_task, *args, os.getpid(), self.deaths[index])
        self.pending[future] = (index, generation)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        queue = collections.deque(range(len(self.items)))
        try:
            while queue or self.pending:
                while queue and len(self.pending) < self.window:
                    self.submit(queue.popleft())
                done, _ = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: self.pending[f][0]):
                    index, generation = self.pending.pop(future)
                    outcome = self.outcome(future, index, generation)
                    if outcome is not None:
                        yield index, outcome[1]
        finally:
            for future in self.pending:
                future.cancel()

    def outcome(self, future: cf.Future, index: int, generation: int) -> Any:
        """The task's ``(tag, value)``, or ``None`` after sending it again."""
        try:
            outcome = future.result()
        except Exception as err:  # noqa: BLE001 - the worker, not fn (fn's errors are values)
            if not _died(err):
                raise RuntimeError(
                    f"{self.d.what}: {self.label(index)} could not be run on the executor "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
                ) from err
            self.retry(index, generation, err)
            return None
        if isinstance(outcome, str) and outcome == _MISSING:
            self.submit(index, payload=True)
            return None
        return outcome

    def retry(self, index: int, generation: int, err: BaseException) -> None:
        self.deaths[index] += 1
        if self.deaths[index] > 1:
            raise RuntimeError(
                f"{self.d.what}: a worker died twice during {self.label(index)} "
                f"({type(err).__name__}); run it without an executor to see why."
            )
        progress_line(f"{self.d.what}: a worker died during {self.label(index)}; retrying it once")
        executor = self.d.executor
        if isinstance(err, cf.BrokenExecutor):
            if isinstance(executor, OwnedPool):
                if generation == executor.generation:  # once per breakage
                    executor.rebuild()
            else:
                self.here = True
        self.d.reship()
        self.submit(index, payload=True)
