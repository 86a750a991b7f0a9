"""A pool that stays awake between layers, for where torch's OpenMP workers sleep at once.

Why. ``_gomp.py`` runs the parallel kernels on torch's OpenMP threads, which costs ~2 µs a
layer while those threads spin after each region (libgomp's default: a few ms). Where
torch's runtime was started with ``OMP_WAIT_POLICY=PASSIVE`` (as bench_runtimes does, and
users who run several processes), its workers sleep right after every region and each
region pays a futex wake and a sleeping barrier: ~75 µs here, which at batch 8 cost more
than the second core saved (a 768 × 3072 layer at 90% takes ~150 µs on one thread). There
(measured once per process, ``_gomp.workers_sleep``) this pool runs the same task
functions instead. Never where torch's workers spin: a spinning worker of torch's and one
of ours on the same core took turns by the scheduler's time slices (2-thread batch 8:
0.56 → 1.0 ms).

How. One worker thread per extra core, each in a ``nogil`` numba loop that waits for a
job on its own 64-byte slot (words: state 0 idle / 1 posted / 2 running, task function,
block, quit, parked, held awake). A launch gives every worker its own copy of the block's words
(word 4: the worker's number, see ``kernel_templates.py``; word 0: the caller's block,
whose task counters all share), posts them, runs its own share and the leftovers on the
calling thread, then takes back every job no worker claimed (a late worker never makes
the caller wait; one that claimed its job is running tasks and finishes soon). A worker
spins, yielding the core to any other runnable thread (torch's among them) at every turn,
for :data:`AWAKE_SECONDS` after its last job, then parks on an event until the next
launch wakes it (that launch runs mostly on the caller).

Only in the process that started the workers (threads do not survive ``fork``).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
import time

import numpy as np
from numba import njit

from nbcompress.kernels._simd import call_task, cycles, load, store, swap_if, thread_num

__all__ = ["AWAKE_SECONDS", "held_awake", "launch", "ready", "stop", "wake"]

#: How long a worker spins after its last job before it parks: longer than the gaps
#: between the sparse layers of one model call (Python glue, a GELU: up to ~0.3 ms here).
AWAKE_SECONDS = 5e-4
_WORDS = 8  # per slot: one cache line
_LOCK = threading.Lock()
_STATE: dict[str, object] = {"pid": 0, "workers": 0}


@njit(nogil=True, cache=True)
def _now() -> int:  # pragma: no cover - numba function
    return cycles()


@njit(nogil=True, cache=True)
def _serve(slot, budget, relax):  # noqa: ANN001, ANN202 - numba function
    """Run the jobs posted on ``slot``; 0 when told to quit, 1 when idle for ``budget``."""
    last = cycles()
    while True:
        if load(slot) == 1 and swap_if(slot, 1, 2) == 1:
            call_task(load(slot + 8), load(slot + 16))
            store(slot, 0)
            last = cycles()
            continue
        if load(slot + 24):
            return 0
        if cycles() - last > budget and not load(slot + 40):  # word 5: held awake
            store(slot + 32, 1)
            if load(slot) != 1:  # a job posted after the last look is still taken
                return 1
            store(slot + 32, 0)
        thread_num(relax)  # sched_yield(): any other runnable thread goes first


@njit(nogil=True, cache=True)
def _launch(slots, fn, words, inp, out, threads):  # noqa: ANN001, ANN202 - numba function
    blk = words.copy()
    base = blk.ctypes.data
    blk[0] = base
    blk[4] = 0
    blk[13] = inp.ctypes.data  # every task function's input and output words
    blk[15] = out.ctypes.data
    n = blk.shape[0]
    copies = np.empty((threads - 1, n), np.int64)
    first = slots.ctypes.data
    for i in range(threads - 1):
        copies[i, :] = blk
        copies[i, 4] = i + 1
        slot = first + i * 64
        store(slot + 8, fn)
        store(slot + 16, copies.ctypes.data + i * n * 8)
        store(slot, 1)
    call_task(fn, base)
    for i in range(threads - 1):
        slot = first + i * 64
        if swap_if(slot, 1, 0) != 1:  # claimed: its worker is running tasks
            while load(slot) != 0:
                pass
    # Both read here, after every worker is done: numba frees an array after its last use,
    # and the block (last read when copied) and the copies went back to the allocator while
    # the workers still ran on them; a task's own allocation (an activation's buffer) could
    # take that memory, and a worker crashed (SIGSEGV, now and then; 3 threads on 2 cores).
    return blk[0] + copies.sum()


def _rate() -> float:
    """Time-stamp counter ticks per second."""
    c0, t0 = _now(), time.perf_counter()
    time.sleep(0.005)
    return (_now() - c0) / (time.perf_counter() - t0)


def _work(slots: np.ndarray, i: int, wake: threading.Event, budget: int, relax: int) -> None:
    # ``slots`` is an argument so that this thread's frame keeps the words alive.
    slot = slots.ctypes.data + i * 64
    while _serve(slot, budget, relax):
        wake.wait()
        wake.clear()
        slots[i, 4] = 0


def ready(threads: int) -> bool:
    """Start workers for ``threads`` (the caller is one) in this process; False if it cannot."""
    if _STATE["pid"] == os.getpid() and _STATE["workers"] >= threads - 1:
        return True
    with _LOCK:
        pid = os.getpid()
        if _STATE["pid"] not in (0, pid):
            return False  # a forked child: the parent's workers are not here
        if _STATE["pid"] == 0:
            relax = ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value
            if not relax:
                return False
            _STATE.update(pid=pid, relax=relax, budget=int(_rate() * AWAKE_SECONDS), events=[])
            _STATE["slots"] = np.zeros((64, _WORDS), dtype=np.int64)
            atexit.register(stop)
        slots, events = _STATE["slots"], _STATE["events"]
        while len(events) < min(threads - 1, slots.shape[0]):
            i, wake = len(events), threading.Event()
            args = (slots, i, wake, _STATE["budget"], _STATE["relax"])
            threading.Thread(target=_work, args=args, name=f"nbcompress-{i}", daemon=True).start()
            events.append(wake)
        _STATE["workers"] = len(events)
        return _STATE["workers"] >= threads - 1


def launch(fn: int, words: np.ndarray, inp: np.ndarray, out: np.ndarray, threads: int) -> None:
    """Run task function ``fn`` on the block ``words`` on the caller and ``threads - 1`` workers.

    The caller checked :func:`ready` and holds the registry's pool lock (one launch at a time).
    """
    # A parked worker woken now joins while the caller runs its share (wake's scalar
    # reads: a numpy slice and any() cost ~2.5 µs a layer in a model call).
    wake(threads)
    _launch(_STATE["slots"], fn, words, inp, out, threads)


def wake(threads: int) -> None:
    """Wake the parked workers a launch on ``threads`` threads will post to, without waiting.

    A layer calls this before its Python glue, so that a worker parked since the last
    model call (a wake-up took ~50–100 µs here) is awake by the time its kernel launches
    instead of joining late. The caller checked :func:`ready`.
    """
    slots, events = _STATE["slots"], _STATE["events"]
    for i in range(threads - 1):
        if slots[i, 4]:
            events[i].set()


class _HeldAwake:
    # While a kernel choice is raced, the workers do not park: a serial candidate or two
    # between two parallel ones outlast AWAKE_SECONDS, and each parallel round then paid
    # a wake-up that no model call pays (its layers wake the pool before their glue), so
    # serial twins won races at 2 threads that they lost inside the model.
    # The words it raised, if any: a pool started inside the block was not raised, and
    # lowering its words would leave them at -1 (its workers would never park).
    _held: np.ndarray | None = None

    def __enter__(self) -> None:
        if _STATE["pid"] == os.getpid():
            self._held = _STATE["slots"]
            self._held[:, 5] += 1

    def __exit__(self, *exc: object) -> None:
        if self._held is not None:
            self._held[:, 5] -= 1


def held_awake() -> _HeldAwake:
    """Keep this process's workers from parking inside the ``with`` block (nestable)."""
    return _HeldAwake()


def stop() -> None:
    """Tell this process's workers to quit (at exit; a later :func:`ready` cannot restart)."""
    if _STATE["pid"] == os.getpid():
        slots = _STATE["slots"]
        slots[:, 3] = 1
        for wake in _STATE["events"]:
            wake.set()
