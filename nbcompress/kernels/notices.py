"""One short line about numba compilation per user call, on the notebook's normal output.

The first call of each kernel signature in a process compiles it (once per install) or
loads it from numba's disk cache (once per session). A user call (``sparsify_``,
``speedup``, a sparse module's forward) may need several kernels, so the time is
collected over the whole call and said once, at the end, on stdout::

    nbcompress: compiling sparse kernels, once per install: 4.1 s (7 kernels)

Entry points enter :data:`COMPILE_NOTICE` (``with COMPILE_NOTICE:``, or as a decorator);
nested entries only count, the outermost one prints. Collection is per Python thread, so a call in
one thread never reports another's compilations; a quiet session (the background
warm-up) collects without printing. Loads from the disk cache that took less than
:data:`THRESHOLD` in total print nothing.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from threading import get_ident

__all__ = [
    "COMPILE_NOTICE",
    "THRESHOLD",
    "CompileNotice",
    "Compiled",
    "cache_misses",
    "depth",
    "record",
    "session",
]

#: Seconds of compilation or loading in one call below which nothing is said.
THRESHOLD = 0.5


@dataclass
class Compiled:
    """Kernel signatures first run in one session.

    Attributes:
        seconds: Time spent compiling, loading or waiting for another thread's compilation.
        kernels: Signatures first run.
        compiled: Of those, how many numba compiled (not found in its disk cache).
    """

    seconds: float = 0.0
    kernels: int = 0
    compiled: int = 0

    def line(self) -> str:
        """The one line shown to the user."""
        what = (
            "compiling sparse kernels, once per install"
            if self.compiled
            else ("loading sparse kernels from numba's cache, once per session")
        )
        plural = "s" if self.kernels != 1 else ""
        return f"nbcompress: {what}: {self.seconds:.1f} s ({self.kernels} kernel{plural})"


# Per Python thread, keyed by its ident: session depth, what was collected, quiet or not.
# Plain dicts, not threading.local (whose attribute access cost a forward ~1.5 µs); an
# entry lives only while its thread is inside a session, so no dead thread leaves one.
_DEPTH: dict[int, int] = {}
_PENDING: dict[int, Compiled] = {}
_QUIET: set[int] = set()


class CompileNotice(contextlib.ContextDecorator):
    """Context manager (or decorator) collecting compile times; the outermost exit prints one line.

    Reusable and re-entrant (its state is per Python thread, not per object), so one
    instance serves every call: entering costs well under a microsecond.

    Args:
        quiet: Collect without printing (the background warm-up).
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __enter__(self) -> None:
        ident = get_ident()
        depth = _DEPTH.get(ident, 0)
        if not depth and self.quiet:
            _QUIET.add(ident)
        _DEPTH[ident] = depth + 1

    def __exit__(self, kind: object, err: object, tb: object) -> None:
        ident = get_ident()
        depth = _DEPTH[ident] - 1
        if depth:
            _DEPTH[ident] = depth
            return
        del _DEPTH[ident]
        pending = _PENDING.pop(ident, None)
        if ident in _QUIET:
            _QUIET.discard(ident)
        elif pending is not None and pending.seconds >= THRESHOLD:
            print(pending.line(), file=sys.stdout, flush=True)


#: The shared instance entry points enter.
COMPILE_NOTICE = CompileNotice()


def session() -> Compiled:
    """What this thread's open session has collected so far (a copy; zeros when none)."""
    pending = _PENDING.get(get_ident())
    return Compiled() if pending is None else Compiled(**vars(pending))


def depth() -> int:
    """How many sessions this Python thread is inside."""
    return _DEPTH.get(get_ident(), 0)


def record(seconds: float, compiled: bool) -> None:
    """Count one kernel signature's first run; outside any session, say it at once."""
    ident = get_ident()
    if ident in _DEPTH:
        pending = _PENDING.get(ident)
        if pending is None:
            pending = _PENDING[ident] = Compiled()
        pending.seconds += seconds
        pending.kernels += 1
        pending.compiled += int(compiled)
    elif seconds >= THRESHOLD:
        print(Compiled(seconds, 1, int(compiled)).line(), file=sys.stdout, flush=True)


def cache_misses(kernel: object) -> int:
    """Signatures numba compiled for ``kernel`` so far (not loaded from its disk cache)."""
    stats = getattr(kernel, "stats", None)
    misses = getattr(stats, "cache_misses", None)
    return sum(misses.values()) if misses is not None else 0
