"""The keys of the tuning record: what of a weight and an input decides a measured choice.

Weight pattern, rows, columns and a density bucket (:func:`matrix_key`, :func:`layer_key`),
and the input's extents rounded up to powers of two (:func:`shape_bucket`), so that 70,
100 and 128 rows share one measurement; :func:`bucket_distance` says how far apart two
buckets are (a shape never measured takes the nearest measured bucket's choice). The CPU
(:func:`cpu_key`) and the record's folder (:func:`default_dir`). And the forward-time
choice made from those keys without a race (:func:`plan`: the nearest measured bucket's
choice, a race only once it can pay, :func:`race_after`). Used by
:mod:`~nbcompress.kernels.tuning`, which re-exports all of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nbcompress.kernels.tuning import Record

__all__ = [
    "bucket_distance",
    "cpu_key",
    "default_dir",
    "density_bucket",
    "eager",
    "layer_key",
    "matrix_key",
    "PRIOR",
    "nearest",
    "plan",
    "plan_stats",
    "pow2",
    "race_after",
    "shape_bucket",
]


def cpu_key() -> str:
    """This CPU's model name and a short hash of its feature set, e.g. ``rocketlake-1a2b3c4d``."""
    import llvmlite.binding as llvm  # numba's LLVM: what the kernels are compiled for

    features = llvm.get_host_cpu_features().flatten()
    digest = hashlib.sha1(f"{llvm.get_host_cpu_name()}|{features}".encode()).hexdigest()[:8]
    return f"{llvm.get_host_cpu_name()}-{digest}"


def default_dir() -> Path:
    """``$NBCOMPRESS_CACHE_DIR``, else ``nbcompress`` under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    chosen = os.environ.get("NBCOMPRESS_CACHE_DIR")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nbcompress"


def pow2(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def density_bucket(density: float) -> int:
    """Density in percent, rounded to a step of 5 (90% sparse → 10)."""
    return int(round(float(density) * 20)) * 5


def matrix_key(mat: object) -> tuple:
    """What of a packed weight decides its kernels: pattern, dtype, rows, columns, density."""
    shape = mat.shape  # type: ignore[attr-defined]
    data = mat.data  # type: ignore[attr-defined]
    block = getattr(mat, "block", None)
    rows, cols = int(shape[0]), int(shape[1])
    nnz = int(np.prod(data.shape))
    pattern = f"bsr{block[0]}x{block[1]}" if block is not None else f"csr-{data.dtype.name}"
    return (pattern, mat.indices.dtype.name, rows, cols, density_bucket(nnz / max(1, rows * cols)))  # type: ignore[attr-defined]


def layer_key(weight: object, input_shape: tuple[int, ...], threads: int, *extra: object) -> tuple:
    """A key for a measured decision about one layer (e.g. ``sparsify_``'s dense vs sparse).

    Args:
        weight: The layer's weight (a CPU tensor without grad, or an array), out × anything.
        input_shape: The layer's input shape; bucketed by :func:`shape_bucket`.
        threads: The thread count the decision was measured at.
        extra: Whatever else decides it (layer type, allowed formats, the required gain).

    Returns:
        ``(rows, cols, density %, 4-row block fill %, *input bucket, *extra, threads)``.
    """
    w = np.asarray(weight)
    w = w.reshape(w.shape[0], -1)
    rows, cols = w.shape
    nz = w != 0
    nnz = int(nz.sum())
    fill = 0
    if rows % 4 == 0 and nnz:  # how well the nonzeros fill 4 × 1 blocks (bsr pays or not)
        blocks = int(nz.reshape(rows // 4, 4, cols).any(axis=1).sum())
        fill = density_bucket(nnz / (4 * blocks))
    dims = shape_bucket(("in", *input_shape))[1:]
    return (
        rows,
        cols,
        density_bucket(nnz / max(1, w.size)),
        fill,
        *dims,
        *map(str, extra),
        threads,
    )


def shape_bucket(key: tuple) -> tuple:
    """A kernel-choice key with its input extents rounded up to powers of two.

    ``("x", 100)`` → ``("x", 128)``; for ``("conv", N, C, H, W)`` the channels stay exact
    (they are the weight's) and N, H, W are rounded.
    """
    kind, *dims = key
    if kind == "conv" and len(dims) == 4:
        n, c, h, w = dims
        return (kind, pow2(n), c, pow2(h), pow2(w))
    return (kind, *(pow2(d) if isinstance(d, int) else d for d in dims))


def bucket_distance(a: tuple, b: tuple) -> float | None:
    """How many doublings apart two shape buckets are (``None``: not alike).

    Keys are ``(kind, *extents, *rest)``, as :func:`shape_bucket` takes them; they are
    alike when everything but the positive integer extents is equal (kind, geometry).
    """
    if len(a) != len(b) or a[0] != b[0]:
        return None
    far = 0.0
    for x, y in zip(a[1:], b[1:], strict=True):
        if isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0:
            far += abs(math.log2(pow2(x)) - math.log2(pow2(y)))
        elif x != y:
            return None
    return far


#: What a race is expected to gain over a predicted choice: the kernels of one product ran
#: within 5–30% of one another on MiniLM's shapes here (384/1536 wide, 32–3000 rows).
EXPECTED_GAIN = 0.1
#: Calls of each option in one kernel race (one warm-up and seven rounds: dispatch.choose).
RACE_CALLS = 8
#: Kind of product → the option predicted when nothing alike was measured (else the
#: incumbent). Linear's batched product: the tiles read the input transposed, a cheap copy
#: when it is the transposed output of the previous sparse layer, where the panels' pack
#: gathers across rows: on MiniLM (90%, 1 thread, 256 sentences) every layer on the panels
#: ran 0.91–0.97× dense end to end, on the tiles 1.07–1.1× (the FFN's second layer 1.8×
#: faster on the tiles than the panels).
PRIOR = {"x": "tiles"}


def race_after(options: int) -> int:
    """Calls of one shape bucket after which racing its ``options`` can pay for itself.

    A race costs about :data:`RACE_CALLS` calls of each option and can save at most about
    :data:`EXPECTED_GAIN` of each later call over the predicted choice. Racing once the
    bucket has run that many calls (a bucket used so often is expected to run as many
    again: the rent-or-buy rule) bounds what tuning costs in a session by what it saves.
    """
    return math.ceil(RACE_CALLS * options / EXPECTED_GAIN)


def nearest(bucket: tuple, measured: list[tuple[tuple, str, float]], names: tuple) -> tuple:
    """The choice of the measured bucket nearest ``bucket`` among ``names``, and how far.

    Args:
        bucket: A bucketed key ``(kind, *extents, threads)``.
        measured: ``(bucketed key, choice, penalty)``: the penalty is added to the distance.
        names: The options on offer; without a measured one alike, the kind's
            :data:`PRIOR` if offered, else the first (the incumbent).

    Returns:
        ``(choice, distance)``: 0 when measured for this very bucket, infinite for a prior.
    """
    prior = PRIOR.get(bucket[0])
    best: tuple[float, str] = (math.inf, prior if prior in names else names[0])
    for key, choice, penalty in measured:
        # The thread count (last) must match; the extents may differ.
        far = bucket_distance(bucket[:-1], key[:-1]) if key[-1] == bucket[-1] else None
        if far is not None and choice in names and far + penalty < best[0]:
            best = (far + penalty, choice)
    return best[1], best[0]


class _Local(threading.local):
    eager = False  # per Python thread: race new shape buckets at once (ahead of time)


_LOCAL = _Local()
_PLANS: weakref.WeakKeyDictionary[object, dict[tuple, list]] = weakref.WeakKeyDictionary()
_PLAN_STATS = {"predicted": 0, "deferred": 0}
_PLAN_LOCK = threading.Lock()


@contextlib.contextmanager
def eager(on: bool = True) -> Iterator[None]:
    """In this Python thread, race each new shape bucket on first use (tuning ahead of time).

    ``sparsify_`` and ``speedup`` tune so at the shapes they are shown; at forward time a
    new bucket runs a predicted choice instead (:func:`plan`). ``on=False``: predict
    inside an eager block too.
    """
    old, _LOCAL.eager = _LOCAL.eager, on
    try:
        yield
    finally:
        _LOCAL.eager = old


def plan(
    mat: object, key: tuple, names: tuple, known: dict, detail: tuple, record: Record | None
) -> str | None:
    """The option to run for a (weight, shape, threads) not chosen yet; ``None``: choose now.

    Never a race on a new shape bucket at forward time: a bucket measured for this weight
    (``known``) or recorded on disk takes that choice; any other takes the nearest
    measured bucket's choice (this weight's, or a recorded one of its pattern), else the
    incumbent. The bucket is raced once (``None``) only after :func:`race_after` calls,
    or at once under :func:`eager` or ``NBCOMPRESS_TUNING=refresh``.

    Args:
        mat: The packed weight.
        key: ``(kind, *input extents, threads)``, as the dispatcher keys its choices.
        names: The options offered, the incumbent first.
        known: The weight's choices in this process (the dispatcher's, key → name).
        detail: What else decides the choice (a conv's geometry), as in record keys.
        record: The tuning record in use (``None``: off).
    """
    if _LOCAL.eager or (record is not None and record.refresh):
        return None
    bucket = (*shape_bucket(key[:-1]), key[-1])
    with _PLAN_LOCK:
        plans = _PLANS.setdefault(mat, {})
        state = plans.get(bucket)
        # [choice, settled, how many choices the weight had, calls]; again when they changed.
        if state is None or state[2] != len(known) or state[0] not in (None, *names):
            state = plans[bucket] = [*_predict(mat, bucket, names, known, detail, record), 0]
        if state[1]:
            return state[0]  # measured (this process or on disk): no race
        state[3] += 1
        if state[3] > race_after(len(names)):
            _PLAN_STATS["deferred"] += 1
            return None  # raced now, once: the dispatcher keeps it for the bucket
        _PLAN_STATS["predicted"] += 1
        return state[0]


def _predict(
    mat: object, bucket: tuple, names: tuple, known: dict, detail: tuple, record: Record | None
) -> list:
    # [choice, settled (measured for this very bucket), len(known) it was computed from]
    near = [((*shape_bucket(k[:-1]), k[-1]), name, 0.0) for k, name in list(known.items())]
    if record is not None:
        head = (*matrix_key(mat), bucket[0])
        tail = tuple(f if isinstance(f, int) else str(f) for f in (*detail, bucket[-1]))
        for rest, entry in record.like("kernel", head):
            dims, end = rest[: len(rest) - len(tail)], rest[len(rest) - len(tail) :]
            if end != tail or record.stale("kernel", (*head, *rest)):
                continue
            if dims == bucket[1:-1] and entry.choice in names:
                return [None, True, len(known)]  # recorded: the dispatcher reuses it
            # Another weight of this pattern: behind this weight's own at equal distance.
            near.append(((bucket[0], *dims, bucket[-1]), entry.choice, 0.5))
    name, far = nearest(bucket, near, names)
    return [name, far == 0, len(known)]


def plan_stats() -> dict[str, int]:
    """Forward-time calls that ran a ``predicted`` choice, and races ``deferred`` until paid."""
    with _PLAN_LOCK:
        return dict(_PLAN_STATS)
