"""The kernel registry, the measured kernel choice and the input checks of the products.

The jitted bodies (``_generated_kernels.py``, ``_numba.py``) trust their arguments; the
public products (:mod:`~nbcompress.kernels.csr`, :mod:`~nbcompress.kernels.bsr`,
:mod:`~nbcompress.kernels.conv`) check shape, dtype and contiguity with the functions
here, then run registered kernels.

Registry. Each kernel is a :class:`~nbcompress.kernels.registry.Kernel` of
:mod:`~nbcompress.kernels.registry` (re-exported here): its ``parallel=True`` build and
its serial twin.

Choice. Several kernels compute each product; which is faster depends on the shape, the
density, the caches and the load, so the candidates are timed with
:func:`nbcompress.timing.race` per (weight, shape bucket, threads) and the fastest is kept
(:func:`fastest`): ahead of time where ``sparsify_``/``speedup`` see the shapes, else once a
bucket has run often enough on a predicted choice for a race to pay for itself. With
more than one thread each candidate also runs on one thread (its serial twin), since
waking the pool can cost more than the second core saves. A choice
is recorded per weight pattern and input shape bucket (:mod:`~nbcompress.kernels.tuning`,
on disk per CPU), so later shapes in the bucket and later processes reuse it unmeasured.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch

from nbcompress.kernels import _gomp, _pool, tuning
from nbcompress.kernels.formats import BSRMatrix, CSRMatrix, describe
from nbcompress.kernels.layouts import kblock, release

# The registry lives in its own module; its names stay importable from here.
from nbcompress.kernels.registry import (  # noqa: F401 - re-exported
    BSR4_SPMV,
    BSR4_TILES,
    BSR_SPMM,
    CSR_COLS,
    KERNELS,
    PACK_COLS,
    PACK_IM2COL,
    PACK_ROWS,
    PANELS,
    SPMV,
    SPMV8,
    TILE,
    TILE64,
    TRANSPOSE,
    Kernel,
)
from nbcompress.kernels.threads import get_threads, serial
from nbcompress.timing import race

__all__ = [
    "BSR4_SPMV",
    "BSR4_TILES",
    "BSR_SPMM",
    "CSR_COLS",
    "KERNELS",
    "KERNEL_MARGIN",
    "PACK_COLS",
    "PACK_IM2COL",
    "PACK_ROWS",
    "PANELS",
    "SERIAL",
    "SPMV",
    "SPMV8",
    "TILE",
    "TILE64",
    "TRANSPOSE",
    "Kernel",
    "as_float32",
    "balanced_rows",
    "check_cols",
    "check_matrix",
    "checked_input",
    "choose",
    "fastest",
    "kernel_choices",
    "recorded_choice",
    "recorded_run",
    "release_unused",
    "row_blocks",
    "row_bounds",
    "set_choices",
    "tuning_stats",
    "warming",
]

Matrix = CSRMatrix | BSRMatrix
Options = dict[str, Callable[[], object]]
#: Suffix of a recorded kernel choice that runs on one thread (its serial twin).
SERIAL = " ×1"


class _Measuring(threading.local):
    depth = 0  # per Python thread: kernel choices being made (one may run another's)
    warming = False  # per Python thread: run every option once, choose nothing (warm-up)
    margin = 0.0  # the last race's margin of the winner over the runner-up


_MEASURING = _Measuring()
_CHOICE: weakref.WeakKeyDictionary[Matrix, dict[tuple, str]] = weakref.WeakKeyDictionary()
_BOUNDS: weakref.WeakKeyDictionary[Matrix, dict[int, np.ndarray]] = weakref.WeakKeyDictionary()
_STATS = {"races": 0, "seconds": 0.0, "reused": 0}
_STATS_LOCK = threading.Lock()


def as_float32(x: torch.Tensor | np.ndarray, ndim: tuple[int, ...], arg: str) -> np.ndarray:
    """``x`` as a float32 numpy array of one of the ``ndim`` ranks; named errors otherwise."""
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            raise RuntimeError(
                f"{arg}: requires grad, but the sparse kernels are inference-only. Run under "
                "torch.no_grad() / torch.inference_mode(), or undo the sparsification to train."
            )
        if x.device.type != "cpu":
            raise ValueError(f"{arg}: the sparse kernels run on CPU; got a {x.device} tensor.")
        x = x.numpy()  # requires_grad is False here, so no detach() (~1 µs per call)
    if not isinstance(x, np.ndarray) or x.ndim not in ndim or x.dtype != np.float32:
        raise TypeError(f"{arg}: expected a float32 array with {ndim} dims, got {describe(x)}.")
    return x


def check_matrix(mat: object, kind: type[CSRMatrix] | type[BSRMatrix]) -> None:
    """Raise a TypeError naming ``mat`` unless it is a ``kind``, and where the other goes."""
    if not isinstance(mat, kind):
        csr = kind is CSRMatrix
        packer, other = ("pack_csr", "bsr_matmul") if csr else ("pack_bsr", "csr_matmul")
        raise TypeError(
            f"mat: expected a {kind.__name__} (from {packer}), got {type(mat).__name__}; "
            f"a {'BSRMatrix' if csr else 'CSRMatrix'} goes to {other}."
        )


def check_cols(mat: Matrix, k: int, arg: str) -> None:
    """Raise a ValueError naming ``arg`` unless it has ``mat``'s number of input features."""
    if k != mat.shape[1]:
        raise ValueError(
            f"{arg}: has {k} input features but the sparse weight expects {mat.shape[1]} "
            f"(weight shape {mat.shape})."
        )


def checked_input(
    mat: object,
    kind: type[CSRMatrix] | type[BSRMatrix],
    x: torch.Tensor | np.ndarray,
    arg: str,
    ndim: tuple[int, ...] = (1, 2),
    axis: int = -1,
) -> np.ndarray:
    """``x`` as float32 numpy after checking ``mat`` (a ``kind``) and ``x`` (its features).

    Args:
        mat: The packed weight.
        kind: The format the product takes.
        x: The input.
        arg: ``x``'s name in error messages.
        ndim: Accepted ranks of ``x``.
        axis: ``x``'s axis of input features.
    """
    check_matrix(mat, kind)
    x = as_float32(x, ndim, arg)
    check_cols(mat, x.shape[axis], arg)
    return x


#: A candidate replaces the incumbent (the first option: the panels, the plain SpMV, the
#: unblocked tiles) only when its median paired time is at most 95% of the incumbent's.
#: A near tie is left to the incumbent so that noise of a few percent between seven
#: rounds does not flip the choice from run to run, and a kernel that needs a derived
#: layout (padded rows, input-row blocks: a copy of the weight each) is kept only for a
#: clear gain.
KERNEL_MARGIN = 0.05
_ROUNDS = 7


def choose(options: Options) -> str:
    """The name of the option to keep: the fastest if it beats the first by the margin."""
    # The one race rule of nbcompress.timing: each option once untimed (compile or load,
    # warm the caches), then seven rounds judged by the median per-round ratio to the
    # incumbent (race rotates the order every round; the measurement before timing.race
    # alternated it forward and backward: both give each option a mix of positions).
    # Choices nest, each settled in the warm-up call of the race around it: the block-
    # sparse conv's "unfold" option runs a product that makes its own choice (so the
    # outer rounds time the inner winner), and sparsify_'s race in the engine times whole
    # modules whose first call makes their kernel choices here (before it times them).
    result = race(options, rounds=_ROUNDS, warmup=1, min_sample=0.0)
    name = result.winner(KERNEL_MARGIN)
    others = [result.ratio(n) for n in result.names if n != name]
    # Kept for the tuning record: how far the runner-up was behind (negative when a
    # near tie was left to the incumbent).
    _MEASURING.margin = min(others) / max(result.ratio(name), 1e-300) - 1 if others else 0.0
    return name


def fastest(mat: Matrix, key: tuple, options: Options, detail: tuple = ()) -> None:
    """Run the option measured fastest for ``(mat, key, threads)``, measuring on first use.

    With more than one thread each option's serial twin competes too (named with the
    suffix :data:`SERIAL`): waking the worker pool can cost more than the second core
    saves (at batch 1 it doubled the time here). A single option is run, not timed.
    A choice recorded for the same weight pattern and shape bucket (in this process or
    an earlier one, :mod:`~nbcompress.kernels.tuning`) is reused without measuring. At
    forward time a new bucket is never raced at once: it runs the nearest measured
    bucket's choice until a race can pay for itself (:func:`tuning.plan`); ``sparsify_``
    and ``speedup`` race the shapes they are shown ahead of time (``tuning.eager``).

    Args:
        mat: The packed weight.
        key: ``(kind, *input extents)``; the thread count is appended.
        options: Name → zero-argument callable; the first is the incumbent.
        detail: What else decides the choice for the tuning record (a conv's geometry).
    """
    chosen = _CHOICE.get(mat) or _CHOICE.setdefault(mat, {})  # setdefault: a weakref a call
    key = (*key, get_threads())
    name = chosen.get(key)
    if name is not None:
        _call(options, name)
        return
    if key[-1] > 1:
        options = {**options, **{n + SERIAL: _on_one_thread(run) for n, run in options.items()}}
    if _MEASURING.warming:  # compile or load every option's kernels; nothing is chosen
        for run in options.values():
            run()
        return
    if not _MEASURING.depth and len(options) > 1:
        # A shape bucket not chosen yet runs a predicted choice (the nearest measured
        # bucket's) until racing it can pay for itself (tuning.plan); None: choose now.
        planned = tuning.plan(mat, key, tuple(options), chosen, detail)
        if planned is not None:
            _call(options, planned)
            return
    depth = _MEASURING.depth
    _MEASURING.depth = depth + 1
    try:
        name = next(iter(options)) if len(options) == 1 else _tuned(mat, key, detail, options)
        # With several options they share one output, left by whichever ran last: run the
        # chosen one again so that this call returns bit for bit what later calls return
        # (kernels sum in different orders).
        options[name]()
    finally:
        _MEASURING.depth = depth
    chosen[key] = name
    if not depth:  # an inner choice (the conv's unfold product) must not drop the
        release_unused(mat)  # layouts the outer options still being timed built


def _tuned(mat: Matrix, key: tuple, detail: tuple, options: Options) -> str:
    """The choice recorded for ``key``'s shape bucket, else measured now (and recorded)."""
    record = tuning.active()
    if record is None:
        return _raced(options)
    rkey = (*tuning.matrix_key(mat), *tuning.shape_bucket(key[:-1]), *detail, key[-1])
    entry = record.get("kernel", rkey)
    if entry is not None and entry.choice in options:
        if not record.stale("kernel", rkey):
            with _STATS_LOCK:
                _STATS["reused"] += 1
            return entry.choice
        # Re-measured on request: the recorded choice is the incumbent, kept on near ties.
        options = {entry.choice: options[entry.choice], **options}
    name = _raced(options)
    record.put("kernel", rkey, tuning.Entry(name, _MEASURING.margin), replace=record.refresh)
    return name


def _raced(options: Options) -> str:
    start = time.perf_counter()
    with _pool.held_awake():  # as inside a model call, where the layers wake the pool
        name = choose(options)
    with _STATS_LOCK:
        _STATS["races"] += 1
        _STATS["seconds"] += time.perf_counter() - start
    return name


def tuning_stats() -> dict[str, float]:
    """Kernel choices in this process: ``races`` run, their ``seconds``, choices ``reused``."""
    with _STATS_LOCK:
        return dict(_STATS)


@contextlib.contextmanager
def warming() -> Iterator[None]:
    """In this Python thread, run every kernel option once and choose (or record) nothing."""
    old = _MEASURING.warming
    _MEASURING.warming = True
    try:
        yield
    finally:
        _MEASURING.warming = old


def _call(options: Options, name: str) -> None:
    if name.endswith(SERIAL):
        with serial():
            options[name.removesuffix(SERIAL)]()
    else:
        options[name]()


def _on_one_thread(run: Callable[[], object]) -> Callable[[], None]:
    def one() -> None:
        with serial():
            run()

    return one


def release_unused(mat: Matrix) -> None:
    """Drop the derived layouts (``layouts.py``) that no recorded choice for ``mat`` runs on."""
    # list(): a snapshot, as other Python threads may record choices meanwhile.
    used = {n.removesuffix(SERIAL) for n in list(_CHOICE.get(mat, {}).values())}
    keep: set = {"pad"} if "spmv8" in used else set()
    if used & {"kblocks", "bsr4_kb"}:
        keep.add(("k", kblock(mat.shape[1])))
    if "direct_kb" in used:  # the direct conv's tap offsets live in conv.py
        keep.add("blocks")
    release(mat, keep)


def recorded_choice(mat: Matrix, key: tuple, threads: int) -> str | None:
    """The kernel :func:`fastest` recorded for ``(mat, key)`` at ``threads``, if any.

    For batch-1 hot paths: looking it up directly skips building the option callables
    that a call through :func:`fastest` needs (14 instead of 6 µs on a tiny layer).
    """
    return _CHOICE.get(mat, {}).get((*key, threads))


def recorded_run(mat: Matrix, key: tuple) -> tuple[str, int] | None:
    """The recorded option for ``(mat, key)`` at today's thread count, and its threads.

    Returns:
        ``(option name without the serial suffix, threads to run it on)``, or ``None``
        before the first choice.
    """
    n = get_threads()
    choice = recorded_choice(mat, key, n)
    if choice is None:
        return None
    if choice.endswith(SERIAL):
        return choice.removesuffix(SERIAL), 1
    return choice, n


def kernel_choices(mat: Matrix) -> dict[tuple, str]:
    """Kernels chosen so far for ``mat``: ``(kind, columns, threads) -> name``."""
    return dict(_CHOICE.get(mat, {}))


def set_choices(mat: Matrix, choices: dict[tuple, str]) -> None:
    """Replace the recorded choices for ``mat``, e.g. to time or test one kernel alone.

    Args:
        mat: The packed weight.
        choices: ``(kind, *shape, threads) -> option name``, as :func:`kernel_choices`.
    """
    _CHOICE[mat] = dict(choices)


def row_blocks(mat: Matrix, parts: int) -> np.ndarray:
    """Row bounds splitting ``mat`` into ``parts`` of about equal nonzeros (cached)."""
    # Cached per weight: computing them (~60 µs) was 5% of a batch-64 product.
    cached = _BOUNDS.setdefault(mat, {})
    if parts not in cached:
        cached[parts] = row_bounds(mat.indptr, parts)
    return cached[parts]


def balanced_rows(mat: Matrix) -> np.ndarray:
    """Row blocks for the tile kernels: one, or one part per thread (``_gomp.partition``).

    A part per thread of about equal nonzeros, cut into a few blocks, so that on torch's
    threads each thread reads the same rows of the weight on every call (``_gomp.py``).
    """
    threads = get_threads()
    if threads == 1:
        return row_blocks(mat, 1)
    cached = _BOUNDS.setdefault(mat, {})
    if -threads not in cached:  # negative keys: partitions, positive: row_blocks
        cached[-threads] = _gomp.partition(mat.indptr, threads)
    return cached[-threads]


def row_bounds(indptr: np.ndarray, parts: int) -> np.ndarray:
    """Row bounds (from 0 to the row count) of blocks holding about equal nonzeros.

    Equal nonzeros, not equal rows, so that threads given one block each finish together.
    """
    m = indptr.shape[0] - 1
    cuts = np.searchsorted(indptr, np.linspace(0, indptr[-1], parts + 1)[1:-1])
    return np.unique(np.concatenate(([0], np.clip(cuts, 0, m), [m]))).astype(np.int64)
