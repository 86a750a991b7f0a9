"""Run a function in a forked child process, bounded in time and memory.

Torch-Pruning's graph build and index propagation run in pure Python and cannot be
interrupted from inside; on some models (Swin, MaxViT) they grow memory by ~70-100 MB/s
until the machine kills the process, which in a notebook kills the user's kernel. Running
them in a forked child (which sees the model copy-on-write, no pickling) under an
address-space limit, a parent-side RSS poll and a timeout turns every such failure into one
``ValueError`` line, with the parent's model untouched.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import numbers
import os
import resource
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from nbcompress.engine.core.report import fmt_bytes

__all__ = ["check_bounds", "run_bounded"]

_POLL = 0.05  # seconds between RSS checks of the child


def _status_kb(pid: int | str, key: str) -> int | None:
    """A ``/proc/<pid>/status`` field in kB (``VmRSS``, ``VmSize``), if readable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    where = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    at = f" (in {os.path.basename(where[0].filename)}:{where[0].lineno})" if where else ""
    return f"{type(err).__name__}{': ' + first[:300] if first else ''}{at}"


def _child_main(fn: Callable, args: tuple, memory: int, conn: Any) -> None:
    """Child side: one thread, an address-space ceiling, the result or the error sent back."""
    import torch

    # Measured: after the parent used torch's OpenMP pool, a forked child hangs in the
    # first parallel op unless it goes single-threaded first.
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    vm = (_status_kb("self", "VmSize") or 0) * 1024
    # A lower hard limit may already be set: the parent's RSS poll still bounds us.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (vm + memory, vm + memory))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn(*args)
        conn.send(("ok", result))
    except MemoryError:
        conn.send(("memory", ""))
    except BaseException as err:  # noqa: BLE001 - every failure goes back as one line
        # torch's allocator reports the address-space ceiling as a RuntimeError.
        out_of_memory = "can't allocate memory" in str(err) or "out of memory" in str(err)
        conn.send(("memory", "") if out_of_memory else ("error", _one_line(err)))
    finally:
        conn.close()


def _wait(proc: Any, conn: Any, timeout: float, memory: int, base_kb: int) -> tuple[str, Any]:
    """Parent side: wait for a message, killing the child on timeout or RSS above budget."""
    deadline = time.monotonic() + timeout
    limit_kb = base_kb + memory // 1024
    while True:
        if conn.poll(max(0.0, min(_POLL, deadline - time.monotonic()))):
            try:
                return conn.recv()
            except (EOFError, OSError):
                return ("died", proc.exitcode)
        if not proc.is_alive() and not conn.poll(0):
            return ("died", proc.exitcode)
        rss = _status_kb(proc.pid, "VmRSS")
        if rss is not None and rss > limit_kb:
            return ("memory", "")
        if time.monotonic() > deadline:
            return ("timeout", "")


def check_bounds(timeout: Any, memory: Any) -> None:
    """Refuse a ``timeout`` or ``memory`` that is not a positive number (one line each)."""
    for arg, value, example in (
        ("timeout", timeout, "120 (seconds)"),
        ("memory", memory, "4 << 30 (4 GiB, in bytes)"),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{arg}: expected a number such as {example}, got {value!r}.")
        if not value > 0 or (arg == "memory" and not math.isfinite(value)):
            finite = "finite " if arg == "memory" else ""
            raise ValueError(
                f"{arg}: expected a {finite}number > 0 such as {example}, got {value!r}."
            )


def run_bounded(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 120.0,
    memory: int = 4 << 30,
    label: str = "the dependency graph build",
    fix: str = "Restrict the work with layers= (--layers) or leave modules out with ignore= "
    "(--ignore)",
) -> Any:
    """Run ``fn(*args)`` in a forked child and return its (picklable) result.

    The child runs single-threaded with ``RLIMIT_AS`` = its current virtual size +
    ``memory``; the parent also polls the child's resident memory and kills it above its
    starting size + ``memory``, and kills it after ``timeout`` seconds. Ctrl-C in the
    parent kills the child and is re-raised. The parent's objects are never changed: the
    child works on a copy-on-write image of them.

    Args:
        fn: Function run in the child (it may use anything the parent holds).
        *args: Its arguments (inherited by the fork, not pickled).
        timeout: Seconds before the child is killed.
        memory: Bytes of extra memory the child may use.
        label: What the child does, for messages.
        fix: What the user can do when it fails (one sentence without the final period).

    Returns:
        ``fn``'s result, sent back through a pipe.

    Raises:
        TypeError: ``timeout`` or ``memory`` is not a number.
        ValueError: ``timeout`` or ``memory`` is not positive, or one line naming what
            happened (an error in ``fn``, memory, time, a crash) and the fix.
    """
    check_bounds(timeout, memory)
    if "fork" not in multiprocessing.get_all_start_methods():
        # No fork (Windows): the model's classes may live in __main__, which a spawned
        # child cannot import; run here, unbounded, rather than not at all.
        warnings.warn(
            f"{label}: this platform cannot fork, so it runs in this process without the "
            "time and memory bounds.",
            stacklevel=2,
        )
        return fn(*args)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    base_kb = _status_kb("self", "VmRSS") or 0
    proc = ctx.Process(target=_child_main, args=(fn, args, int(memory), send), daemon=True)
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns on fork with threads alive (a Jupyter kernel has some):
            # the child only runs torch single-threaded and Python, never those threads.
            warnings.simplefilter("ignore", DeprecationWarning)
            proc.start()
        send.close()  # the child holds the sending end; EOF tells us it died
        status, payload = _wait(proc, recv, timeout, int(memory), base_kb)
    finally:
        # Also on Ctrl-C: the child must not outlive the call.
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    if status == "died":
        payload = proc.exitcode  # read after join(): before, it may still be None
    if status == "ok":
        return payload
    if status == "error":
        raise ValueError(f"{label} failed: {payload}. {fix}.")
    if status == "memory":
        raise ValueError(
            f"{label} needed more than {fmt_bytes(memory)} of extra memory and was stopped "
            f"(the model is untouched). {fix}, or allow more with memory=."
        )
    if status == "timeout":
        raise ValueError(
            f"{label} did not finish within {timeout:g} s and was stopped (the model is "
            f"untouched). {fix}, or allow more time with timeout=."
        )
    raise ValueError(
        f"{label} crashed (child exit code {payload}; the model is untouched). {fix}, or "
        "allow more memory with memory=."
    )
