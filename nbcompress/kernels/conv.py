"""Sparse convolution of N images, CSR or 4 × 1 block-sparse, by the fastest of its kernels.

Every convolution can run as GEMM over the unfolded input (C·kh·kw × Ho·Wo): a CSR weight
unfolds straight into the packed column panels or, image by image, into a matrix the
tiles read in place; a block-sparse weight multiplies each unfolded image. Any
convolution can also run directly on the zero-padded image, each nonzero a tap offset
(below): one tile kernel call per image, no unfold, and
over blocks of whole channels (``direct_kb``) when a tile's windows outgrow L1. A strided
one runs on the image split into stride phases (:func:`phase_offsets`), where its tap
offsets are constant as for stride 1. Which runs is measured on first use per input
shape (:func:`~.dispatch.fastest`).

The padded images (and the block-sparse kernel's uncropped output) go to scratch buffers
shared by all layers of the same layout (:func:`shared_scratch`): a model runs its layers
one after the other, and a shared buffer is still in cache when the next layer fills it.

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
from collections.abc import Callable, Hashable
from typing import NamedTuple

import numpy as np

from nbcompress.kernels._epilogue import NO_BIAS
from nbcompress.kernels.bsr import BSR_PANEL, bsr_matmul_t_unchecked
from nbcompress.kernels.csr import packer, panels_then_rest, run_tiles, tile_kinds
from nbcompress.kernels.dispatch import (
    BSR4_TILES,
    PACK_IM2COL,
    TILE,
    TILE64,
    balanced_rows,
    fastest,
    recorded_choice,
)
from nbcompress.kernels.formats import BSRMatrix, CSRMatrix
from nbcompress.kernels.layouts import SCRATCH_KEEP, block_rows
from nbcompress.kernels.threads import get_threads

__all__ = [
    "CHANNEL_BLOCK_BYTES",
    "OUT_CHUNK_BYTES",
    "SHARED_KEEP",
    "Phases",
    "bsr_conv_unchecked",
    "channel_block",
    "conv_unchecked",
    "over_padded_images",
    "phase_offsets",
    "phases",
    "shared_scratch",
    "shared_scratch_keys",
]

Geometry = tuple[int, ...]  # kh, kw, sh, sw, ph, pw, dh, dw, wo
#: Bytes of L1 data cache one tile's windows of a channel block may take (24 KB of the
#: 32 KB L1d of the CPUs measured). Only a speed setting: any value from 1 byte up gives
#: the same results (blocks of one channel up to one block), as tests/kernels checks.
CHANNEL_BLOCK_BYTES = 24576
#: Bytes of one chunk of direct-conv results (M × rows·Wq floats, cropped while in L2).
#: It bounds the scratch a large image needs beside its output; on resnet18 (batch 1)
#: 128 KB–512 KB chunks and none measured within noise of each other end to end. Only a
#: speed and memory setting: any value gives the same results (down to one row a chunk).
OUT_CHUNK_BYTES = 262144
#: Columns per tile of the block-sparse direct convolution (the widest 4 × 1 tile kernel).
BSR_DIRECT_WIDTH = next(iter(BSR4_TILES))
_OFFSETS: weakref.WeakKeyDictionary[CSRMatrix | BSRMatrix, dict] = weakref.WeakKeyDictionary()
#: Scratch buffers of the direct convolution kept per Python thread and name: the most
#: recently used layouts, shared by every layer (a resnet18 has seven image layouts).
SHARED_KEEP = 12


class _Shared(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple, np.ndarray] = {}


_SHARED = _Shared()


def shared_scratch(name: str, size: int, layout: Hashable = None) -> np.ndarray:
    """A float32 buffer of ``size`` for ``name`` and ``layout``, shared by all layers.

    Zero-filled when new, per Python thread (concurrent calls never share one), and
    ``layout`` names everything that places a buffer's interior: the border is written
    once and only the interior changes, so a call with another layout of the same length
    gets a buffer of its own. One buffer serves every layer of the same layout: in a
    model the layers run one after the other, so a shared buffer is still in cache when
    the next layer writes it
    (with one buffer per layer, a resnet18's 20 layers streamed 20 of them from L3).

    Args:
        name: What the buffer is for (``"image"``, ``"out"``).
        size: Floats.
        layout: What besides ``size`` a reused buffer must agree on; ``None`` for a
            buffer every call overwrites whole.

    Returns:
        The buffer.
    """
    buffers = _SHARED.buffers
    key = (name, size, layout)
    buf = buffers.pop(key, None)  # re-inserted below: the dict's order is recency
    if buf is None:
        buf = np.zeros(size, dtype=np.float32)
        same = [k for k in buffers if k[0] == name]
        for old in same[: max(0, len(same) - SHARED_KEEP + 1)]:
            del buffers[old]
    buffers[key] = buf
    return buf


def shared_scratch_keys() -> list[tuple]:
    """``(name, size, layout)`` of this Python thread's shared scratch buffers, oldest first."""
    return list(_SHARED.buffers)


def conv_unchecked(
    mat: CSRMatrix, images: np.ndarray, geom: Geometry, out: np.ndarray, unfold: Callable
) -> None:
    """Sparse conv of N images (N × C × H × W) into ``out`` (N × M × Ho·Wo).

    The kernels compete (see the module docstring): unfolding straight into packed
    panels, each image unfolded (C·kh·kw × Ho·Wo) and read in place by the tiles, or
    the direct convolution.

    Args:
        mat: The packed (out × C·kh·kw) weight.
        images: C-contiguous float32 images.
        geom: ``(kh, kw, sh, sw, ph, pw, dh, dw, wo)``.
        out: C-contiguous float32 result.
        unfold: ``unfold(i)`` returns image i unfolded (C·kh·kw × Ho·Wo, C-contiguous);
            called only for the tiles, one image at a time so that a large batch is never
            unfolded whole (the unfold is kh·kw times the input).
    """
    geom = tuple(int(g) for g in geom)

    def panels() -> None:
        for img, o in zip(images, out, strict=True):
            panels_then_rest(mat, packer(PACK_IM2COL, img, geom, rows=mat.shape[1]), o)

    def tiles(kblk: int | None) -> None:
        for i, o in enumerate(out):
            run_tiles(mat, unfold(i), o, kblk)

    options: dict[str, Callable[[], object]] = {"panels": panels}
    if out.shape[2] >= TILE:
        options |= {name: (lambda k=kblk: tiles(k)) for name, kblk in tile_kinds(mat).items()}
    options |= _direct_options(mat, images, geom, out)
    fastest(mat, ("conv", *images.shape), options, geom[:8])  # geometry: for the record
    _release_offsets(mat, images.shape, geom)


def bsr_conv_unchecked(
    mat: BSRMatrix, images: np.ndarray, geom: Geometry, out: np.ndarray, unfold: Callable
) -> None:
    """Block-sparse conv of N images into ``out``; arguments as :func:`conv_unchecked`.

    Each image unfolded and multiplied, or (4 × 1 blocks) the direct convolution on the
    zero-padded image, whichever measured faster.
    """
    geom = tuple(int(g) for g in geom)

    def unfolded() -> None:
        for i, o in enumerate(out):
            bsr_matmul_t_unchecked(mat, unfold(i), o)

    options: dict[str, Callable[[], object]] = {"unfold": unfolded}
    if mat.block == (4, 1):
        options |= _direct_options(mat, images, geom, out)
    fastest(mat, ("conv", *images.shape), options, geom[:8])
    _release_offsets(mat, images.shape, geom)


def _release_offsets(mat: CSRMatrix | BSRMatrix, shape: tuple, geom: Geometry) -> None:
    # The tap offsets are a copy of the weight's indices per geometry: drop this
    # geometry's once the measured choice for this shape is not the direct convolution.
    cached = _OFFSETS.get(mat)
    if not cached:
        return
    name = recorded_choice(mat, ("conv", *shape), get_threads())
    if name is not None and not name.startswith("direct"):
        for key in [k for k in list(cached) if k[0] == geom[:8] and k[3] == shape[2:]]:
            cached.pop(key, None)


def _direct_options(
    mat: CSRMatrix | BSRMatrix, images: np.ndarray, geom: Geometry, out: np.ndarray
) -> dict[str, Callable[[], object]]:
    # Any stride: a strided convolution runs on the image split into stride phases
    # (see phase_offsets), where its tap offsets are constant as for stride 1.
    options: dict[str, Callable[[], object]] = {
        "direct": lambda: _direct_conv(mat, images, geom, out)
    }
    kblk = channel_block(images.shape[1], geom)
    if kblk < mat.shape[1]:
        options["direct_kb"] = lambda: _direct_conv(mat, images, geom, out, kblk)
    return options


def channel_block(channels: int, geom: Geometry) -> int:
    """Weight columns per block of whole channels for the channel-blocked direct conv."""
    # Whole channels per block such that one 64-pixel tile's windows of a block (kh rows
    # of 64 + (kw − 1)·dw floats per channel) fit CHANNEL_BLOCK_BYTES: 128 → 256 at 3 × 3
    # ran its kernel 1.4× faster in blocks of 16–32 channels than unblocked, 8 was slower.
    kh, kw, dw = geom[0], geom[1], geom[7]
    per = max(1, CHANNEL_BLOCK_BYTES // (kh * (TILE + (kw - 1) * dw) * 4))
    nblk = -(-channels // per)
    return -(-channels // nblk) * kh * kw


def _direct_conv(
    mat: CSRMatrix | BSRMatrix,
    images: np.ndarray,
    geom: Geometry,
    out: np.ndarray,
    kblk: int | None = None,
) -> None:
    # A tile kernel over each zero-padded image, tap offsets as row indices, row stride 1
    # (see layouts.py): tile64 for CSR, the 4 × 1 block tiles for BSR. With ``kblk``, over
    # blocks of whole channels (partial sums wait in the output). No prefetch: successive
    # tiles read neighbouring lines of each image row, which the hardware prefetchers
    # follow.
    indptr, _, data, nkb = block_rows(mat, kblk or max(1, mat.shape[1]))
    if isinstance(mat, CSRMatrix):
        kernel, width, dtype = TILE64, TILE, mat.data.dtype.char
        weight: tuple = (data, mat.scale)
        tail: tuple = (nkb, 0, NO_BIAS, 0)  # no prefetch, no epilogue
    else:
        kernel, width, dtype = BSR4_TILES[BSR_DIRECT_WIDTH], BSR_DIRECT_WIDTH, "bsr"
        weight, tail = (data.reshape(-1),), (BSR_PANEL, nkb, 0)

    def run(offs: np.ndarray, padded: np.ndarray, flat: np.ndarray, ntile: int, cols, bounds):
        args = (indptr, offs, *weight, padded, 1, cols * width, flat, 0, ntile, bounds)
        kernel.run((*args, *tail), (dtype, offs.dtype.char))

    over_padded_images(mat, images, geom, out, width, kblk, run)


class Phases(NamedTuple):
    """How a direct convolution lays out its zero-padded input (see :func:`phase_offsets`).

    Attributes:
        sh: Row stride (row phases).
        sw: Column stride (column phases).
        hq: Rows of each phase plane.
        wq: Columns of each phase plane (output rows are numbered with this width).
        ho: Output rows.
    """

    sh: int
    sw: int
    hq: int
    wq: int
    ho: int


def phases(h: int, w: int, geom: Geometry, width: int) -> Phases:
    """The phase planes of an ``h`` × ``w`` image for a direct conv in tiles of ``width``."""
    kh, _, sh, sw, ph, pw, dh, _, _ = geom
    hp, wp = h + 2 * ph, w + 2 * pw
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wq = -(-wp // sw)
    # Plane width rounded up to a multiple of 4: 128 × 56 × 56 at 3 × 3 ran 1.3× slower
    # with rows of 58 floats than with 60 (or 62–96) here, the extra columns are zeros.
    # Not where that adds over a quarter of the tiles (7 × 7 images: rows of 9, 63
    # outputs in one 64-column tile; rows of 12 need two).
    wq4 = -(-wq // 4) * 4
    if 4 * -(-ho * wq4 // width) <= 5 * -(-ho * wq // width):
        wq = wq4
    return Phases(sh, sw, -(-hp // sh), wq, ho)


def phase_offsets(
    mat: CSRMatrix | BSRMatrix, geom: Geometry, lay: Phases, kblk: int | None, hw: tuple
) -> np.ndarray:
    """Offsets of ``mat``'s nonzeros' taps in the phase planes of a zero-padded image.

    Stride ``(sh, sw)`` splits the padded image (C × Hp × Wp) into sh·sw phase planes per
    channel, plane (c, a, b) holding rows ≡ a (mod sh) and columns ≡ b (mod sw), each
    Hq × Wq. Output pixel (y, x) reads padded (sh·y + dh·i, sw·x + dw·j) for tap
    (c, i, j), which is plane (c, dh·i mod sh, dw·j mod sw) at (y + dh·i // sh,
    x + dw·j // sw): numbering outputs q = y·Wq + x makes every read ``offset + q``
    with one constant offset per nonzero, as the module docstring describes for
    stride 1 (where there is one plane per channel).

    Args:
        mat: The packed (out × C·kh·kw) weight (4 × 1 block-sparse: block columns).
        geom: ``(kh, kw, sh, sw, ph, pw, dh, dw, wo)``.
        lay: The plane layout (:func:`phases`).
        kblk: Offsets in the order of ``block_rows(mat, kblk)``; ``None``: ``mat``'s own.
        hw: The input's ``(H, W)`` (the offsets are kept per input size).

    Returns:
        One unsigned offset per nonzero (uint32, or uint64 for inputs over 2**32 floats).
    """
    key = (geom[:8], lay, kblk, hw)
    cached = _OFFSETS.setdefault(mat, {})
    if key not in cached:
        kh, kw, sh, sw, _, _, dh, dw, _ = geom
        indices = mat.indices if kblk is None else block_rows(mat, kblk)[1]
        c, tap = np.divmod(indices.astype(np.int64), kh * kw)
        i, j = np.divmod(tap, kw)
        (ri, a), (cj, b) = np.divmod(i * dh, sh), np.divmod(j * dw, sw)
        plane = lay.hq * lay.wq
        offs = ((c * sh + a) * sw + b) * plane + ri * lay.wq + cj
        wide = mat.shape[1] // (kh * kw) * sh * sw * plane >= 2**32
        if len(cached) >= SCRATCH_KEEP:  # the most recent geometries, as the buffers
            cached.pop(next(iter(list(cached))), None)
        cached[key] = offs.astype(np.uint64 if wide else np.uint32)
    return cached[key]


def _fill(planes: np.ndarray, img: np.ndarray, geom: Geometry) -> None:
    # planes: C × sh × sw × Hq × Wq; padded row R = r + ph lies in phase R mod sh at row
    # R // sh (columns alike). Only the interior is written: the border stays zero.
    _, _, sh, sw, ph, pw = geom[:6]
    h, w = img.shape[1:]
    for a in range(sh):
        y0 = max(0, -(-(ph - a) // sh))
        r0 = a + sh * y0 - ph
        if r0 >= h:
            continue
        for b in range(sw):
            x0 = max(0, -(-(pw - b) // sw))
            c0 = b + sw * x0 - pw
            if c0 >= w:
                continue
            src = img[:, r0::sh, c0::sw]
            planes[:, a, b, y0 : y0 + src.shape[1], x0 : x0 + src.shape[2]] = src


def over_padded_images(
    mat: CSRMatrix | BSRMatrix,
    images: np.ndarray,
    geom: Geometry,
    out: np.ndarray,
    width: int,
    kblk: int | None,
    run: Callable[..., None],
) -> None:
    """Zero-pad each image into cached phase planes, ``run`` a direct-conv kernel, crop.

    Output rows are numbered with the plane width (:func:`phase_offsets`), in tiles of
    ``width`` columns; ``run(offsets, padded, out_flat, ntile, stride, bounds)`` computes
    ``ntile`` tiles of them from the start of ``padded`` into rows of ``stride`` tiles.
    """
    kw, dw, wo = geom[1], geom[7], geom[8]
    m = mat.shape[0]
    c, h, w = images.shape[1:]
    lay = phases(h, w, geom, width)
    offs = phase_offsets(mat, geom, lay, kblk, (h, w))
    # Output rows in chunks whose (M × rows·Wq) results fit OUT_CHUNK_BYTES, cropped
    # chunk by chunk while they are in cache (the stem's 64 × 112 × 116 results are
    # 3.3 MB). A chunk's last tile reads up to width − 1 + (kw − 1)·dw // sw floats past
    # its rows (the planes' end, for the last chunk). Cached per layout: only the
    # interior is written below, so the border stays zero only while every call with
    # this buffer writes the same interior (c, h, w at the same padding and strides into
    # planes of hq × wq); other layouts of the same length get buffers of their own.
    rows = max(1, min(lay.ho, OUT_CHUNK_BYTES // (4 * m * lay.wq)))
    ntile = -(-rows * lay.wq // width)
    nplane = c * lay.sh * lay.sw * lay.hq * lay.wq
    size = nplane + width + (kw - 1) * dw // lay.sw
    padded = shared_scratch("image", size, (c, h, w, geom[:8], lay))
    planes = padded[:nplane].reshape(c, lay.sh, lay.sw, lay.hq, lay.wq)
    flat = shared_scratch("out", m * ntile * width).reshape(m, -1)
    bounds = balanced_rows(mat)
    for img, o in zip(images, out, strict=True):
        _fill(planes, img, geom)
        o = o.reshape(m, lay.ho, wo)
        for y0 in range(0, lay.ho, rows):
            y1 = min(lay.ho, y0 + rows)
            part = -(-(y1 - y0) * lay.wq // width)
            # The kernel numbers this chunk's outputs from 0: the planes from row y0 on.
            run(offs, padded[y0 * lay.wq :], flat.reshape(-1), part, ntile, bounds)
            done = flat[:, : (y1 - y0) * lay.wq].reshape(m, y1 - y0, lay.wq)
            o[:, y0:y1] = done[:, :, :wo]
