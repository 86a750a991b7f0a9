"""A persistent tuning record: measured choices kept on disk per CPU, reused by later processes.

The kernel choice (:func:`~nbcompress.kernels.dispatch.fastest`) races its candidates on
first use. Without a record that race is repeated for every new input shape (a text
model with variable-length batches re-tuned on nearly every call) and in every new
process, and near ties flip from run to run. The record stores each measured choice under
a key that names what decides it, and every later use with the same key (in this process
or a later one) runs the recorded choice without measuring:

* the CPU: model name plus a hash of its feature set (:func:`cpu_key`; injectable, so a
  record taken on another CPU is never reused, and tests can pretend to be one);
* the family (``"kernel"`` for the kernel choice; other layers may keep their own, e.g.
  the engine's dense-vs-sparse decision per layer, through :func:`lookup` / :func:`remember`);
* the weight: storage pattern (CSR fp32 / int8, block shape), rows, columns, a density
  bucket (:func:`density_bucket`);
* the input's **shape bucket** (:func:`shape_bucket`: batch and column counts rounded up
  to a power of two), so that 70, 100 and 128 rows share one measurement;
* the thread count.

Near ties: each entry keeps its margin (how much slower the runner-up was). An entry is
never re-measured unless asked (``NBCOMPRESS_TUNING=refresh``), and then the recorded
choice is the incumbent: another candidate replaces it only with a clear gain, so choices
stay stable from run to run.

Where: ``$NBCOMPRESS_CACHE_DIR`` or ``~/.cache/nbcompress`` (``$XDG_CACHE_HOME``), one
JSON file per CPU key. Writes merge with what other processes wrote meanwhile (under an
advisory file lock where the OS has one) and replace the file atomically, so concurrent
processes never see half a file; an unreadable file is ignored with one line and rewritten.
``NBCOMPRESS_TUNING=off`` (or :func:`configure` with ``enabled=False``) turns the record
off: choices are then measured per (weight, exact shape, threads), in this process only.

Forward time (:func:`plan`): a race costs ~8 calls of every option, and a text model
meets a new shape bucket on many batches (its first pass was 3× slower than dense), so a
new bucket is never raced when it is first met: it runs the choice recorded for it, else
the nearest measured bucket's, else a prior, and is raced once only after enough calls
for the race to pay for itself (:func:`race_after`). ``sparsify_`` and ``speedup`` tune
ahead of time, at the shapes they are shown (:func:`eager`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The keys live in their own module; their names stay importable from here.
from nbcompress.kernels.tuning_keys import (  # noqa: E402, F401 - re-exported
    EXPECTED_GAIN,
    PRIOR,
    RACE_CALLS,
    bucket_distance,
    cpu_key,
    default_dir,
    density_bucket,
    eager,
    layer_key,
    matrix_key,
    nearest,
    plan_stats,
    pow2,
    race_after,
    shape_bucket,
)
from nbcompress.kernels.tuning_keys import plan as _plan

__all__ = [
    "Entry",
    "Record",
    "active",
    "clear",
    "configure",
    "cpu_key",
    "eager",
    "density_bucket",
    "layer_key",
    "lookup",
    "machine_busy",
    "matrix_key",
    "plan",
    "plan_stats",
    "race_after",
    "remember",
    "shape_bucket",
]

#: File format version; a file of another version is ignored and rewritten.
FORMAT = 1
#: Modes of ``NBCOMPRESS_TUNING``.
MODES = ("on", "off", "refresh")


@dataclass(frozen=True)
class Entry:
    """One recorded choice.

    Attributes:
        choice: The chosen option's name.
        margin: How much slower the runner-up was (0.03: 3%); below the choice's own
            margin the two were within noise and the incumbent was kept.
        busy: Measured while the machine was busy (:func:`machine_busy`): such a choice is
            used while it stays busy and measured again once it is quiet, and the quiet
            measurement replaces it (a race under load must not decide for good).
    """

    choice: str
    margin: float
    busy: bool = field(default_factory=lambda: machine_busy())


def machine_busy() -> bool:
    """Whether the 1-minute load average exceeds the CPU count (timings are then distorted)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:  # pragma: no cover - no load average on this OS
        return False


def _say(text: str) -> None:
    # Notices go to the notebook's normal output, never the stderr box.
    print(f"nbcompress: {text}", file=sys.stdout, flush=True)


class Record:
    """The recorded choices of one CPU: in memory, backed by one JSON file (or none).

    Thread-safe; safe under concurrent processes sharing the file.

    Args:
        path: The JSON file; ``None`` keeps the record in memory only.
        cpu: The CPU key stored in the file and checked on reading.
        refresh: Re-measure each key once in this process (the recorded choice competing
            as the incumbent) instead of reusing it.
    """

    def __init__(self, path: Path | None, cpu: str, refresh: bool = False) -> None:
        self.path, self.cpu, self.refresh = path, cpu, refresh
        self._entries: dict[str, Entry] | None = None
        self._lock = threading.Lock()
        self._writable = True
        self._measured: set[str] = set()  # keys measured in this process (refresh mode)

    def get(self, family: str, key: tuple) -> Entry | None:
        """The entry recorded for ``(family, key)``, if any."""
        entries = self._entries
        if entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = self._read(quiet=False)
                entries = self._entries
        return entries.get(_text(family, key))

    def like(self, family: str, head: tuple) -> list[tuple[tuple, Entry]]:
        """Every entry of ``family`` whose key starts with ``head``: (rest of its key, entry).

        Integer fields of the rest come back as ints (the shape buckets), others as text.
        """
        self.get(family, head)  # read the file once
        prefix = _text(family, head) + "|"
        found = []
        for text, entry in list((self._entries or {}).items()):
            if text.startswith(prefix):
                rest = text[len(prefix) :].split("|")
                found.append((tuple(int(f) if f.isdigit() else f for f in rest), entry))
        return found

    def stale(self, family: str, key: tuple) -> bool:
        """Whether ``(family, key)`` is to be measured again before its entry is reused.

        In refresh mode, and for an entry measured on a busy machine now that it is quiet
        (once per process: the new measurement replaces it).
        """
        text = _text(family, key)
        if text in self._measured:
            return False
        if self.refresh:
            return True
        entry = self.get(family, key)
        return entry is not None and entry.busy and not machine_busy()

    def put(self, family: str, key: tuple, entry: Entry, replace: bool = False) -> Entry:
        """Record ``entry``; returns the entry now recorded.

        Another process may have recorded this key meanwhile: its entry is kept (the first
        measurement wins, so that every process agrees) unless ``replace``.
        """
        text = _text(family, key)
        with self._lock:
            if self._entries is None:
                self._entries = self._read(quiet=False)
            self._entries[text] = entry
            self._measured.add(text)
            if self.path is not None and self._writable:
                self._merge_and_write(text, entry, replace)
            return self._entries[text]

    def clear(self) -> None:
        """Forget every entry, in memory and on disk."""
        with self._lock:
            self._entries = {}
            if self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def _read(self, quiet: bool) -> dict[str, Entry]:
        if self.path is None:
            return {}
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            if not quiet:
                _say(f"tuning record not readable ({type(err).__name__}); measuring afresh.")
            return {}
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT or data.get("cpu") != self.cpu:
                return {}
            return {
                k: Entry(str(v["choice"]), float(v["margin"]), bool(v.get("busy", False)))
                for k, v in data["entries"].items()
            }
        except (ValueError, TypeError, KeyError, AttributeError):
            if not quiet:
                _say(
                    f"tuning record {self.path.name} is damaged and was ignored; choices "
                    "are measured again and the record rewritten."
                )
            return {}

    def _merge_and_write(self, text: str, entry: Entry, replace: bool) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                merged = self._read(quiet=True)
                for k, v in self._entries.items():  # type: ignore[union-attr]
                    merged.setdefault(k, v)
                # The first measurement wins, except over one taken on a busy machine.
                if replace or (merged[text].busy and not entry.busy):
                    merged[text] = entry
                self._entries = merged
                self._write(merged)
        except OSError as err:
            self._writable = False
            _say(
                f"cannot write the tuning record ({type(err).__name__}); measured choices "
                "are kept for this session only."
            )

    def _write(self, entries: dict[str, Entry]) -> None:
        assert self.path is not None
        data = {
            "format": FORMAT,
            "cpu": self.cpu,
            "entries": {
                k: {"choice": e.choice, "margin": round(e.margin, 4)}
                | ({"busy": True} if e.busy else {})
                for k, e in entries.items()
            },
        }
        # A temporary file in the same directory, then an atomic rename: readers in other
        # processes see the old file or the new one, never a partial write.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Serializes read-merge-write between processes (no lost entries); without fcntl
    # (Windows) the atomic rename alone still keeps the file whole.
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _text(family: str, key: tuple) -> str:
    return "|".join([family, *map(str, key)])


_STATE: dict[str, object] = {"record": None, "configured": False}
_CONFIGURE = threading.RLock()


def configure(
    *,
    enabled: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    cpu: str | None = None,
    refresh: bool | None = None,
) -> None:
    """Set where and whether choices are recorded; unset arguments come from the environment.

    Args:
        enabled: Record and reuse choices (default: unless ``NBCOMPRESS_TUNING=off``).
        cache_dir: Directory of the record (default ``$NBCOMPRESS_CACHE_DIR`` or
            ``~/.cache/nbcompress``).
        cpu: The CPU key (default :func:`cpu_key`); another value never reuses this CPU's
            choices.
        refresh: Re-measure every key once in this process, the recorded choice as the
            incumbent (default: ``NBCOMPRESS_TUNING=refresh``).
    """
    mode = os.environ.get("NBCOMPRESS_TUNING", "on").strip().lower() or "on"
    if mode not in MODES:
        raise ValueError(
            f"NBCOMPRESS_TUNING: {mode!r} is not one of {', '.join(MODES)}; unset it or "
            "use 'off' to measure kernel choices afresh in every process."
        )
    on = mode != "off" if enabled is None else bool(enabled)
    record = None
    if on:
        key = cpu or cpu_key()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        folder = Path(cache_dir) if cache_dir is not None else default_dir()
        fresh = mode == "refresh" if refresh is None else bool(refresh)
        record = Record(folder / f"tuning-{safe}.json", key, fresh)
    with _CONFIGURE:
        _STATE["record"], _STATE["configured"] = record, True


def active() -> Record | None:
    """The record in use, or ``None`` when tuning records are off."""
    if not _STATE["configured"]:
        with _CONFIGURE:  # one record per process, even when threads start at once
            if not _STATE["configured"]:
                configure()
    return _STATE["record"]  # type: ignore[return-value]


def clear() -> None:
    """Forget every recorded choice of this CPU (the file is removed); later uses re-measure."""
    record = active()
    if record is not None:
        record.clear()


def lookup(family: str, key: tuple) -> Entry | None:
    """The recorded entry for ``(family, key)`` on this CPU, or ``None`` (also when off).

    For measured decisions outside the kernels, e.g. the engine's per-layer dense-vs-sparse
    race: key it by :func:`matrix_key`-like facts, :func:`shape_bucket` and the threads.
    """
    record = active()
    if record is None or record.stale(family, key):
        return None
    return record.get(family, key)


def remember(family: str, key: tuple, choice: str, margin: float) -> Entry | None:
    """Record ``choice`` for ``(family, key)``; returns the entry now recorded (None: off)."""
    record = active()
    if record is None:
        return None
    return record.put(family, key, Entry(choice, float(margin)), replace=record.refresh)


def plan(mat: object, key: tuple, names: tuple, known: dict, detail: tuple = ()) -> str | None:
    """:func:`~nbcompress.kernels.tuning_keys.plan` with the record in use (forward-time choice)."""
    return _plan(mat, key, names, known, detail, active())
