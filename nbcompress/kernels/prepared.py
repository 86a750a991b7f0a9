"""Prepared float32 CSR products on the panels: one launch plan per weight and call.

Why. A sparse layer at batch 8 on 2 threads computes for ~110 µs, and each call found
every piece of its launch anew: the recorded choice through :func:`~.dispatch.fastest`
(a dict of options, a closure), the packer, the kernel's thread count, the pool lock, the
launch words (``_gomp.job``: encoder, partition, the words' key of eight arrays' ids),
whether ``_pool.py`` or torch's team runs it. In a model call, with the interpreter's data
cold after each kernel streamed its weight, that was ~35 µs a layer on 2 threads.

How. After a call through :func:`~.dispatch.fastest` whose choice is recorded, a
:class:`Prepared` is kept per (weight, batch, thread count, bias array, activation, input
layout): the steps the chosen option runs (panels of 16, then 8), each with its serial
kernel and arguments, or its task function, fixed words and pool. A later call with the
same recorded choice only allocates the output, packs (or points at) the input and
launches the same kernels on the same arguments, so its result is bit-identical to the
unprepared path. Kept on the weight weakly, like the choices: a weight rebuilt from
changed buffers (``SparseLinear.matrix()``) is a new object, a new recorded choice for
the key (``set_choices``, a race) makes the plan stale, and a new bias array is a new key;
a plan made before a ``fork`` is made again in the child.
Whether ``_pool.py`` runs a plan is decided when it is made (``NBCOMPRESS_OPENMP`` read
then), as for the int8 tasks.

Only batches below the tile kernels' 64 columns that are a multiple of 8 (whole panels,
no leftover columns) are prepared; other calls take the general path.
"""

from __future__ import annotations

import os
import weakref

import numpy as np

from nbcompress.kernels import _gomp, _pool, registry
from nbcompress.kernels._epilogue import NO_BIAS
from nbcompress.kernels.dispatch import PACK_COLS, PACK_ROWS, PANELS, SERIAL, recorded_choice
from nbcompress.kernels.formats import CSRMatrix
from nbcompress.kernels.registry import TILE, Kernel
from nbcompress.kernels.threads import POOL, get_threads

__all__ = ["Prepared", "prepare", "prepared"]

#: Plans kept per weight (different batches, biases, activations): beyond, all are dropped.
LIMIT = 16
_PLANS: weakref.WeakKeyDictionary[CSRMatrix, dict[tuple, Prepared]] = weakref.WeakKeyDictionary()
_NONE: dict = {}


class _Step:
    """One panel kernel's launch: columns ``start`` to ``start + npan · width``."""

    __slots__ = ("dtypes", "fn", "kernel", "key", "npan", "pool", "start", "tail", "whole")
    __slots__ += ("width", "words")

    def __init__(
        self, kernel: Kernel, cols: tuple[int, int, int], whole: bool, tail: tuple, dtypes: tuple
    ) -> None:
        self.kernel, self.whole, self.dtypes = kernel, whole, dtypes
        self.start, self.npan, self.width = cols
        self.tail = tail  # the kernel's arguments after the packed input and the output
        self.key = (kernel.name, False, *dtypes)  # the serial twin's first-call key
        self.fn = self.words = None
        self.pool = False


class Prepared:
    """The launches of one recorded panel choice for one weight and call shape.

    Attributes:
        name: The recorded choice it runs (a plan for another is stale).
        threads: Threads it runs on (1 for a serial-twin choice).
    """

    __slots__ = ("bias", "csr", "fold", "k", "m", "name", "pack", "pid", "steps", "threads")

    def __init__(
        self,
        mat: CSRMatrix,
        x: np.ndarray,
        out: np.ndarray,
        bias: np.ndarray,
        act: int,
        name: str,
        threads: int,
    ) -> None:
        self.name = name
        self.pid = os.getpid()  # a forked child has neither libgomp's team nor our workers
        self.threads = 1 if name.endswith(SERIAL) else threads
        self.bias = bias  # held: its id in the key is never another array's
        self.m, self.k = mat.shape
        n = x.shape[0]
        self.fold = x.flags.f_contiguous  # x.T is the K × N input (see csr._row_packer)
        self.pack = PACK_COLS if self.fold else PACK_ROWS
        dtypes = (mat.data.dtype.char, mat.indices.dtype.char)
        csr = self.csr = (mat.indptr, mat.indices, mat.data, mat.scale)
        rb = max(16, -(-self.m // 8))
        self.steps = []
        done = 0
        for width, kernel in PANELS.items():
            npan = (n - done) // width
            if not npan:
                continue
            whole = self.fold and (done, npan, width) == (0, 1, n)
            step = _Step(kernel, (done, npan, width), whole, (done, npan, rb, bias, act), dtypes)
            self.steps.append(step)
            if self.threads > 1:
                xp = np.empty((npan * self.k, width), dtype=np.float32)  # its shape only
                found = _gomp.job(kernel.name, (*csr, xp, out, done, npan, rb, bias, act), threads)
                if found is not None:
                    step.fn = registry.callback(found[0])
                    step.words = found[1].words
                    step.pool = _gomp._own_pool(threads)
            done += npan * width
        self.steps = tuple(self.steps)

    def run(self, x: np.ndarray, out: np.ndarray) -> None:
        """``out = act(W @ x.T + bias)`` for the batch ``x`` (N × K) into ``out`` (M × N)."""
        src = x.T if self.fold else np.ascontiguousarray(x)
        csr = self.csr
        for step in self.steps:
            if step.whole:
                xp = src
            else:
                xp = np.empty((step.npan * self.k, step.width), dtype=np.float32)
                self.pack.serial(src, step.start, step.npan, step.width, xp)
            if self.threads == 1:
                registry._invoke(step.kernel.serial, (*csr, xp, out, *step.tail), step.key)
            elif step.fn is None:  # numba's parallel build (no task function here)
                step.kernel.run((*csr, xp, out, *step.tail), step.dtypes, self.threads)
            elif POOL.acquire(blocking=False):
                try:
                    if step.pool:
                        _pool.launch(step.fn, step.words, xp, out, self.threads)
                    else:
                        entry = _gomp._STATE["entry"]
                        _gomp._run(entry, step.fn, step.words, xp, out, self.threads)
                finally:
                    POOL.release()
            else:  # another Python thread holds the pool: the serial twin, as Kernel.run does
                registry._invoke(step.kernel.serial, (*csr, xp, out, *step.tail), step.key)


def _key(x: np.ndarray, threads: int, bias: np.ndarray, act: int) -> tuple:
    return (x.shape[0], threads, id(bias), act, x.flags.f_contiguous)


def prepared(
    mat: CSRMatrix, x: np.ndarray, bias: np.ndarray = NO_BIAS, act: int = 0
) -> Prepared | None:
    """The plan kept for this call, if it runs today's recorded choice.

    Args:
        mat: The packed weight.
        x: float32 batch (N × K).
        bias: The bias array (by identity).
        act: Activation code.

    Returns:
        The plan, or ``None`` (none kept, or a stale one: the caller takes the general path).
    """
    plans = _PLANS.get(mat, _NONE)
    if not plans:
        return None
    threads = get_threads()
    plan = plans.get(_key(x, threads, bias, act))
    if plan is None or recorded_choice(mat, ("x", x.shape[0]), threads) != plan.name:
        return None
    if plan.pid != os.getpid():  # made before a fork: made again (_gomp.available())
        return None
    return plan


def prepare(mat: CSRMatrix, x: np.ndarray, out: np.ndarray, bias: np.ndarray, act: int) -> None:
    """Keep a plan for this call if its choice is recorded and the call is on whole panels.

    Call after the product ran through :func:`~.dispatch.fastest` (its kernels compiled).
    """
    n = x.shape[0]
    if n >= TILE or n % 8 or mat.data.dtype != np.float32 or not out.flags.c_contiguous:
        return
    threads = get_threads()
    name = recorded_choice(mat, ("x", n), threads)
    if name is None or name.removesuffix(SERIAL) != "panels":
        return
    plans = _PLANS.get(mat)
    if plans is None:
        plans = _PLANS.setdefault(mat, {})
    if len(plans) >= LIMIT:
        plans.clear()
    plans[_key(x, threads, bias, act)] = Prepared(mat, x, out, bias, act, name, threads)
