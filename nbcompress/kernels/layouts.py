"""Derived layouts of a CSR weight, each built once and cached for the weight's lifetime.

* :func:`block_rows`: nonzeros grouped by blocks of input rows, for the tile kernel's
  cache blocking.
* :func:`pad_rows`: every row padded with zeros to a multiple of 8 nonzeros, for the
  eight-accumulator SpMV (``csr_spmv8``).
* :func:`tap_offsets`: each nonzero of a convolution weight as the offset of its tap in
  the zero-padded image, for the direct convolution (stride 1, see below).

Blocked rows. A 64-column tile of the input is a K × 256-byte slab; the tile kernel (``tile64`` in
``_generated_kernels.py``) reads one 256-byte row of it per nonzero. For K = 3072–4096 the slab
(0.8–1 MB) no longer sits in this CPU's 1 MB L2 next to the weight stream. Splitting the
weight's columns (the input's rows) into blocks of ``kblk`` keeps one block's slab in
L2 while every output row takes its partial sum from that block; the partial sums wait in
the output between blocks (one load and one store of 64 floats per row and block).

The blocked copy keeps CSR's arrays, only reordered block-major: ``indptr`` has
``nkb · M + 1`` entries, segment ``kb · M + i`` holding row i's nonzeros whose column lies
in block kb, in column order.

Padded rows. The batch-1 kernel's cost per row (~60 cycles here: two mispredicted loop
exits, one of them the 0–3 leftover nonzeros, and the final sum) was a third of its time
on 3072 × 768 at 90% (77 nonzeros per row). Rows padded to a multiple of 8 with explicit
zeros (column 0, value 0: they add 0 · x[0]) need no leftover loop, and eight
accumulators halve the FMA dependency chains: 1.1–1.25× measured, for 3–5% more bytes at
90% (4.5 padding entries per row on average, more in relative terms for very short rows;
the measured choice in ``dispatch.py`` keeps the plain kernel where that loses).

Tap offsets. For stride 1, output pixel (y, x) reads the zero-padded image (Hp × Wp per
channel) at (c, y + i·dh, x + j·dw) for tap (c, i, j). Numbering the outputs with the
padded width, q = y·Wp + x, makes that read ``offset(c, i, j) + q`` with
offset = c·Hp·Wp + i·dh·Wp + j·dw: every nonzero of the (out × C·kh·kw) weight becomes
one constant offset, and the convolution is the tile kernel over the flat padded image
with these offsets as row indices and row stride 1. No unfold is built (for 128 × 56 × 56
at 3 × 3 it is 14 MB, kh·kw copies of the image); the kw taps of a row read the same
cache lines. The (kw − 1)·dw columns x ≥ Wo of every padded output row are computed and
dropped.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable

import numpy as np

from nbcompress.kernels.formats import BSRMatrix, CSRMatrix

__all__ = [
    "KBLOCK",
    "Blocked",
    "block_rows",
    "kblock",
    "pad_rows",
    "release",
    "SCRATCH_KEEP",
    "scratch",
    "scratch_keys",
    "tap_offsets",
]

Blocked = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # indptr, indices, data, nkb

_CACHE: weakref.WeakKeyDictionary[CSRMatrix | BSRMatrix, dict] = weakref.WeakKeyDictionary()
#: Nonzeros per row of the padded layout are a multiple of this.
PAD = 8
#: Input rows per block for the K-blocked tiles (``kblocks``): a 64-column slab of 256 rows
#: is 64 KB, which stays in L1/L2 beside the weight stream (160–384 measured alike here;
#: unblocked 0.8–1 MB slabs for K = 3072–4096 ran 1.2–1.35× slower at batch 64). Sized for
#: this CPU's caches but only a speed setting: any block size gives the same results.
KBLOCK = 256
#: Scratch buffers kept per weight, name and Python thread: the most recently used input
#: geometries (a model run at a few resolutions in turn reuses its buffers; one run at
#: ever new sizes does not hoard one per size).
SCRATCH_KEEP = 4


def kblock(k: int) -> int:
    """Input rows per block for the K-blocked tiles of a weight with ``k`` columns.

    ``k`` itself (one block) when ``k`` is at most :data:`KBLOCK`.
    """
    # Equal blocks of about KBLOCK rows (3072 → 12 × 256, 1152 → 5 × 231, not 4 + a stub).
    nkb = max(1, -(-k // KBLOCK))
    return -(-k // nkb)


def block_rows(mat: CSRMatrix | BSRMatrix, kblk: int) -> Blocked:
    """``mat``'s nonzeros grouped by blocks of ``kblk`` columns, then by row.

    Args:
        mat: The packed weight; block-sparse in R × 1 blocks (rows are then block rows).
        kblk: Columns per block (at least 1).

    Returns:
        ``(indptr, indices, data, nkb)``; for ``nkb == 1`` the matrix's own arrays.
    """
    m, k = mat.indptr.shape[0] - 1, mat.shape[1]
    nkb = max(1, -(-k // kblk))
    if nkb == 1:
        return mat.indptr, mat.indices, mat.data, 1
    cached = _CACHE.setdefault(mat, {})
    if ("k", kblk) not in cached:
        rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(mat.indptr))
        segment = (mat.indices // kblk).astype(np.int64) * m + rows
        order = np.argsort(segment, kind="stable")  # stable: columns stay sorted per row
        indptr = np.zeros(nkb * m + 1, dtype=np.int64)
        np.cumsum(np.bincount(segment, minlength=nkb * m), out=indptr[1:])
        cached["k", kblk] = (indptr, mat.indices[order], mat.data[order], nkb)
    return cached["k", kblk]


def pad_rows(mat: CSRMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mat`` with every row padded by explicit zeros to a multiple of :data:`PAD` entries.

    Args:
        mat: The packed weight.

    Returns:
        ``(indptr, indices, data)``; padding entries have column 0 and value 0.
    """
    cached = _CACHE.setdefault(mat, {})
    if "pad" not in cached:
        count = np.diff(mat.indptr)
        indptr = np.zeros_like(mat.indptr)
        np.cumsum(-(-count // PAD) * PAD, out=indptr[1:])
        rows = np.repeat(np.arange(mat.shape[0], dtype=np.int64), count)
        slot = indptr[rows] + np.arange(mat.nnz, dtype=np.int64) - mat.indptr[rows]
        indices = np.zeros(indptr[-1], dtype=mat.indices.dtype)
        data = np.zeros(indptr[-1], dtype=mat.data.dtype)
        indices[slot] = mat.indices
        data[slot] = mat.data
        cached["pad"] = (indptr, indices, data)
    return cached["pad"]


def tap_offsets(
    mat: CSRMatrix | BSRMatrix,
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    padded: tuple[int, int],
    kblk: int | None = None,
) -> np.ndarray:
    """Offsets of ``mat``'s nonzeros' taps in a zero-padded image (see the module docstring).

    Args:
        mat: The packed (out × C·kh·kw) weight, columns in ``F.unfold``'s order (a
            block-sparse one in 4 × 1 blocks: its block columns are columns).
        kernel: ``(kh, kw)``.
        dilation: ``(dh, dw)``.
        padded: ``(Hp, Wp)``, the padded image's height and width.
        kblk: Offsets in the order of ``block_rows(mat, kblk)`` (CSR only; blocks of whole
            channels when ``kblk`` is a multiple of kh·kw); ``None``: in ``mat``'s own order.

    Returns:
        One unsigned offset per nonzero (uint32, or uint64 for images over 2**32 floats).
    """
    key = ("taps", kernel, dilation, padded, kblk)
    cached = _CACHE.setdefault(mat, {})
    if key not in cached:
        (kh, kw), (dh, dw), (hp, wp) = kernel, dilation, padded
        indices = mat.indices if kblk is None else block_rows(mat, kblk)[1]
        col = indices.astype(np.int64)
        c, tap = np.divmod(col, kh * kw)
        i, j = np.divmod(tap, kw)
        offs = c * (hp * wp) + i * (dh * wp) + j * dw
        wide = mat.shape[1] // (kh * kw) * hp * wp >= 2**32
        cached[key] = offs.astype(np.uint64 if wide else np.uint32)
    return cached[key]


def scratch(
    mat: CSRMatrix | BSRMatrix, name: str, size: int, layout: Hashable = None
) -> np.ndarray:
    """A float32 buffer of ``size`` for ``mat``, this Python thread and ``layout``.

    The direct convolution pads every image into such a buffer: its border is written
    once (zeros, when the buffer is created) and only the interior changes, so the
    buffer is neither re-zeroed nor re-faulted in on every call (a third of a 64-channel
    56 × 56 layer's time here). That is only right while every call writes the same
    interior: ``layout`` must name everything that places it (the padded geometry), so
    that a call with another layout of the same length gets a buffer of its own, never
    one whose border holds another image's pixels.

    Buffers are per Python thread (concurrent calls never share one; a thread's buffers
    go with it) and the :data:`SCRATCH_KEEP` most recently used per ``name`` are kept.

    Args:
        mat: The packed weight the buffer serves.
        name: What the buffer is for (``"image"``, ``"out"``).
        size: Floats.
        layout: What besides ``size`` a reused buffer must agree on; ``None`` for a
            buffer every call overwrites whole.

    Returns:
        The buffer, zero-filled when new.
    """
    cached = _CACHE.setdefault(mat, {})
    local = cached.get(("scratch",))
    if local is None:
        local = cached.setdefault(("scratch",), threading.local())
    buffers = local.__dict__.setdefault("buffers", {})
    key = (name, size, layout)
    buf = buffers.pop(key, None)  # re-inserted below: the dict's order is recency
    if buf is None:
        buf = np.zeros(size, dtype=np.float32)
        same = [k for k in buffers if k[0] == name]
        for old in same[: max(0, len(same) - SCRATCH_KEEP + 1)]:
            del buffers[old]
    buffers[key] = buf
    return buf


def scratch_keys(mat: CSRMatrix | BSRMatrix) -> list[tuple]:
    """``(name, size, layout)`` of this Python thread's scratch buffers for ``mat``."""
    local = _CACHE.get(mat, {}).get(("scratch",))
    return list(getattr(local, "buffers", {}))


def release(mat: CSRMatrix | BSRMatrix, keep: set) -> None:
    """Drop ``mat``'s cached layouts other than ``keep`` (``"pad"``, ``("k", kblk)``, taps).

    Each layout is a full copy of the weight; one that lost the measured kernel choice
    would otherwise double or triple the memory a sparse layer holds at run time.
    """
    cached = _CACHE.get(mat, {})
    # "taps" keeps every geometry's offsets and the scratch buffers of the direct conv,
    # "blocks" every blocked layout (the channel-blocked direct conv's block size depends
    # on the geometry).
    kinds = {"taps": {"taps", "scratch"}, "blocks": {"k"}}
    kept = set().union(*(v for k, v in kinds.items() if k in keep))
    # list(): a snapshot, as other Python threads may add layouts meanwhile.
    for key in [k for k in list(cached) if k not in keep and k[0] not in kept]:
        cached.pop(key, None)
