"""Sensitivity evaluations on an executor's workers, with the serial procedure's results.

The model, the metric and the pruning settings (a :class:`~.measure.Measure`) are shipped
once per worker (:class:`~nbcompress.engine.core.distribute.Dispatch`); each worker prunes
its own copy of the model inside a trial, evaluates and restores it, exactly as the serial
procedure does on the live model, which is never touched. The notebook process keeps the
decisions: the sweep's points come back in any order and are recorded in the serial order
(:class:`PointFeeder`), so early stops, collapses, notes, progress lines and callbacks are
those of a serial sweep; the refinement asks for values the workers measured ahead
(:class:`Ahead`). Points measured ahead that the serial procedure would not have
evaluated (past an early stop, or moves after a kept one) are dropped, so the results are
identical to a serial run's: same points, same values, same order.

An ``evaluate`` must then depend on the model alone: a random number drawn without a seed
of its own, or a buffer (BatchNorm statistics) it updates and the next point reads, makes
the serial run depend on the order of the points, which workers do not share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Any

from nbcompress.engine.core.distribute import Dispatch, resolve_executor
from nbcompress.engine.sensitivity.guard import EvaluationError, Fingerprint, shown
from nbcompress.engine.sensitivity.measure import Measure

__all__ = [
    "Ahead",
    "PointFeeder",
    "measured_ahead",
    "measure_on_worker",
    "ran_on",
    "refuse_remote",
    "sweep_on_executor",
]


def refuse_remote(executor: Any, workers: Any, option: str) -> None:
    """Refuse ``option`` with an executor (one line): it runs serially only."""
    if executor is not None or (workers is not None and workers != 1):
        raise ValueError(
            f"executor: {option} runs serially (in this process); drop executor= / workers= "
            "(--executor / --workers) for it."
        )


def measure_on_worker(state: Measure, ratios: dict[str, float]) -> tuple[float, list, list]:
    """Worker side: the metric with ``ratios`` pruned on the worker's copy of the model.

    Returns:
        The value, the parameters ``evaluate`` trained (restored after the call), and the
        buffers it has changed on this copy so far (they are not restored).
    """
    if not hasattr(state, "buffers_before"):
        state.model.eval()  # as the serial procedure measures (it was shipped so; kept so)
        state.buffers_before = Fingerprint(state.model.named_buffers())
    trained: set[str] = set()
    value = state(ratios, trained)
    return value, sorted(trained), state.buffers_before.changed(state.model.named_buffers())


def ran_on(dispatch: Dispatch, extra: int, buffers: set[str]) -> str:
    """The note saying where a procedure's evaluations ran (and what that may change)."""
    name = type(dispatch.executor).__name__
    note = (
        f"Evaluated on {dispatch.workers} worker(s) ({name}), each pruning its own copy of the "
        "model; the points, values and order are those of a serial run."
    )
    if extra:
        note += f" {extra} evaluation(s) made ahead were not needed (dropped)."
    if buffers:
        note += (
            f" evaluate changed buffers on the workers ({shown(sorted(buffers))}): a serial "
            "run carries such changes from point to point, so its values may differ."
        )
    return note


def _value(out: Any, what: str, buffers: set[str]) -> tuple[float, list[str]]:
    """A worker's answer as (value, trained names); its error as the serial run raises it."""
    if isinstance(out, (EvaluationError, TypeError)):
        raise out
    if isinstance(out, BaseException):
        raise EvaluationError(
            f"executor: {what} failed on a worker ({type(out).__name__}: {out}); rerun without "
            "an executor to see where."
        ) from out
    value, trained, changed = out
    buffers.update(changed)
    return value, trained


def _batches(
    dispatch: Dispatch, items: list[dict[str, float]], labels: list[str]
) -> Iterator[tuple[int, Any]]:
    """``dispatch.run`` of the worker function; its own failures as an EvaluationError."""
    batch = dispatch.run(measure_on_worker, items, labels=labels)
    try:
        while True:
            try:
                yield next(batch)
            except StopIteration:
                return
            except RuntimeError as err:  # a worker died twice, or a task could not be sent
                raise EvaluationError(f"executor: {err}") from err
    finally:
        batch.close()  # cancels what is not finished


class PointFeeder:
    """The sweep's points on an executor, handed to the sweep in its serial order.

    Every point the sweep may evaluate is sent at once in the serial order; the sweep asks
    for its points one after another (``value_of``), waiting until that one is back. When
    it asks for a point while earlier ones are still out (the sweep stopped a layer early),
    those are not needed: if more are out than the workers can be running, the rest is
    cancelled and the points from the asked one on are sent again.

    Args:
        dispatch: The shipped :class:`~.measure.Measure`.
        points: ``(layer, i, ratio)`` of every point to evaluate, in the serial order.
    """

    def __init__(self, dispatch: Dispatch, points: list[tuple[str, int, float]]) -> None:
        self.dispatch = dispatch
        self.order = [(n, i) for n, i, _ in points]
        self.position = {key: k for k, key in enumerate(self.order)}
        self.ratios = {(n, i): r for n, i, r in points}
        self.received: dict[tuple[str, int], Any] = {}
        self.used: set[tuple[str, int]] = set()
        self.out: list[tuple[str, int]] = []  # sent in the current batch, in its order
        self.batch: Iterator[tuple[int, Any]] | None = None
        self.trained: set[str] = set()
        self.buffers: set[str] = set()

    def value_of(self, layer: str, i: int, ratio: float) -> float:
        """The metric of the sweep's point ``i`` of ``layer`` (waits for it)."""
        key = (layer, i)
        at = self.position[key]
        if key not in self.received:
            behind = [k for k in self.out if self.position[k] < at and k not in self.received]
            if len(behind) > self.dispatch.workers:
                self._send(key)  # not yet running: cancelled, and not sent again
        while key not in self.received:
            if self.batch is None:
                self._send(key)
            try:
                index, out = next(self.batch)
            except StopIteration:
                self.batch = None
                continue
            self.received[self.out[index]] = out
        self.used.add(key)
        value, trained = _value(self.received[key], f"the point {layer} at {ratio:g}", self.buffers)
        self.trained.update(trained)
        return value

    def _send(self, key: tuple[str, int]) -> None:
        self.close_batch()
        self.out = [k for k in self.order[self.position[key] :] if k not in self.received]
        items = [{n: self.ratios[(n, i)]} for n, i in self.out]
        labels = [f"layer {n} at ratio {self.ratios[(n, i)]:g}" for n, i in self.out]
        self.batch = _batches(self.dispatch, items, labels)

    def close_batch(self) -> None:
        """Cancel the evaluations still out (the sweep is over, or restarts the batch)."""
        if self.batch is not None:
            self.batch.close()
            self.batch = None

    @property
    def extra(self) -> int:
        """Points evaluated that the serial sweep did not need."""
        return len(set(self.received) - self.used)


def sweep_on_executor(run: Any, executor: Executor, progress: Any) -> None:
    """Run a sweep (``sweep._Run``) with its points evaluated on ``executor``'s workers.

    The points are recorded in the serial order as they come back (:class:`PointFeeder`);
    a note says where they ran.
    """
    res = run.result
    points = [
        (n, i, r) for n in res.layers for i, r in enumerate(res.ratios) if run.evaluated(n, r)
    ]
    with Dispatch(executor, run.measure, what="evaluate") as dispatch:
        feeder = PointFeeder(dispatch, points)
        try:
            run.sweep(progress, feeder.value_of)
        finally:
            feeder.close_batch()
            run.trained |= feeder.trained
    run.last_notes.append(ran_on(dispatch, feeder.extra, feeder.buffers))


def _outcome(out: Any, what: str, buffers: set[str]) -> float | BaseException:
    """A worker's value, or the error the serial procedure would raise (not raised here)."""
    try:
        return _value(out, what, buffers)[0]
    except (EvaluationError, TypeError) as err:
        return err


class Ahead:
    """Allocations measured ahead on the workers, kept until a serial search asks for them.

    Args:
        dispatch: The shipped :class:`~.measure.Measure`.
        what: What an allocation is, for an error (``"an allocation measured ahead"``).

    Attributes:
        values: Key → value (or the error the serial search raises when it asks for it).
    """

    def __init__(self, dispatch: Dispatch, what: str) -> None:
        self.dispatch, self.what = dispatch, what
        self.values: dict[Any, float | BaseException] = {}
        self.sent = self.used = 0
        self.buffers: set[str] = set()

    def fetch(self, allocations: dict[Any, dict[str, float]]) -> None:
        """Measure these allocations (key → layer → fraction) at once on the workers."""
        todo = {k: a for k, a in allocations.items() if k not in self.values}
        labels = [self.what] * len(todo)
        found: dict[int, Any] = dict(_batches(self.dispatch, list(todo.values()), labels))
        for index, key in enumerate(todo):
            self.values[key] = _outcome(found[index], self.what, self.buffers)
        self.sent += len(todo)

    def fetch_moves(
        self, search: Any, pairs: list[tuple[int, int]], move: float, left: int
    ) -> None:
        """Measure the next moves a refine search (``refine._Search``) tries if none improves.

        At most one per worker, and no more than the ``left`` evaluations of its budget.
        """
        wanted: dict[tuple[int, ...], dict[str, float]] = {}
        for src, dst in pairs:
            if len(wanted) >= min(self.dispatch.workers, left):
                break
            moved = search.moved(search.best, src, dst, move)
            if moved is not None and moved not in search.cache:
                wanted[moved] = search.pruned(moved)
        self.fetch(wanted)

    def take(self, key: Any) -> float | None:
        """The value measured ahead for ``key`` (``None`` if none); raises its error."""
        if key not in self.values:
            return None
        out = self.values.pop(key)
        self.used += 1
        if isinstance(out, BaseException):
            raise out
        return out

    def note(self) -> str:
        """Where the allocations were measured (:func:`ran_on`)."""
        return ran_on(self.dispatch, self.sent - self.used, self.buffers)


@contextlib.contextmanager
def measured_ahead(
    executor: Executor | str | None, workers: int | None, measure: Measure, notes: list[str]
) -> Iterator[Ahead | None]:
    """An :class:`Ahead` for the block (``None``: no executor); a cluster of ours closes after.

    Args:
        executor: As :func:`~nbcompress.engine.core.distribute.resolve_executor` takes it.
        workers: Processes of a local cluster for the block (1 or ``None``: none).
        measure: What is shipped to the workers (in eval mode, as it is measured).
        notes: The procedure's notes: the note saying where it ran is added at the end.
    """
    with resolve_executor(executor, workers) as pool:
        if pool is None:
            yield None
            return
        with Dispatch(pool, measure, what="evaluate") as dispatch:
            ahead = Ahead(dispatch, "an allocation measured ahead")
            yield ahead
        notes.append(ahead.note())
