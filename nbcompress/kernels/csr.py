"""The public, validating CSR products, and the choice of kernel shared with ``bsr.py``.

The formats (:class:`CSRMatrix`, :class:`BSRMatrix`) live in
:mod:`nbcompress.kernels.formats` and are re-exported here. The jitted bodies in
``_numba.py``/``_panels.py`` trust their arguments; the functions here check shape,
dtype and contiguity first. The block-sparse products (:mod:`nbcompress.kernels.bsr`)
use the same dispatch: :func:`run_kernel`, :func:`fastest`, :func:`row_blocks` and the
padded-image scaffolding of the direct convolution (:func:`over_padded_images`).

With 64 or more columns three CSR kernels compete: packed column panels (16 wide, input
re-laid out first), 64-column tiles read in place from a row-major input, and the same
tiles over blocks of input rows (``kblocks``, see :mod:`nbcompress.kernels.layouts`).
At batch 1 a plain and an eight-row-padded SpMV compete. With more than one thread each
candidate also runs on one thread (its serial twin), since waking the pool can cost more
than the second core saves. Which is faster depends on the shape, the density, the caches
and the load, so the first call per (weight, columns, threads) times them and keeps the
fastest.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch

from nbcompress.kernels import _numba, _panels
from nbcompress.kernels.formats import (
    BSRMatrix,
    CSRMatrix,
    _describe,
    index_dtype,
    pack_bsr,
    pack_csr,
)
from nbcompress.kernels.layouts import block_rows, pad_rows, release, scratch, tap_offsets
from nbcompress.kernels.threads import get_threads, serial

__all__ = [
    "BSRMatrix",
    "CSRMatrix",
    "csr_matmul",
    "csr_matmul_t",
    "index_dtype",
    "pack_bsr",
    "pack_csr",
]

Matrix = CSRMatrix | BSRMatrix
#: Depth of kernel choices being made right now (one may run another's options).
_MEASURING = [0]
_COMPILED: set[tuple] = set()
_KERNELS: dict[tuple[str, bool], Callable[..., None]] = {}
_CHOICE: weakref.WeakKeyDictionary[Matrix, dict[tuple, str]] = weakref.WeakKeyDictionary()
TILE = 64  # columns per tile64 call unit
#: Suffix of a recorded kernel choice that runs on one thread (its serial twin).
SERIAL = " ×1"
#: Input rows per block for ``kblocks``: a 64-column slab of 256 rows is 64 KB, which
#: stays in L1/L2 beside the weight stream (160–384 measured alike here; unblocked
#: 0.8–1 MB slabs for K = 3072–4096 ran 1.2–1.35× slower at batch 64).
KBLOCK = 256
_BOUNDS: weakref.WeakKeyDictionary[Matrix, dict[int, np.ndarray]] = weakref.WeakKeyDictionary()


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
        raise TypeError(f"{arg}: expected a float32 array with {ndim} dims, got {_describe(x)}.")
    return x


def run_kernel(name: str, args: tuple, dtypes: tuple, n: int | None = None) -> None:
    """Run the jitted kernel ``name`` (its serial twin on one thread) on raw ``args``."""
    # One thread: the serial twin (no pool launch). Kept lean: small layers are dominated
    # by per-call overhead (numba's own thread count is only read when the pool is used;
    # the kernel lookup is a dict hit). The first call per signature compiles (with SLP
    # vectorization on, which only matters then) or loads from disk, and says once what
    # that cost. ``n``: the thread count, if the caller has it already.
    n = n or get_threads()
    parallel = n > 1
    if parallel and numba.get_num_threads() != n:
        numba.set_num_threads(n)
    kernel = _KERNELS.get((name, parallel))
    if kernel is None:
        twin = name if parallel else name + "_1"
        found = getattr(_panels, twin, None) or getattr(_numba, twin, None)
        kernel = _KERNELS[name, parallel] = found or getattr(_numba, name)
    key = (name, parallel, *dtypes)
    if key in _COMPILED:
        kernel(*args)
        return
    start = time.perf_counter()
    with _numba.slp_enabled():
        kernel(*args)
    _COMPILED.add(key)
    took = time.perf_counter() - start
    if took > 1.0:
        warnings.warn(
            f"nbcompress: sparse kernel {name} took {took:.1f} s to compile or load from "
            "numba's disk cache (once per session; later calls are fast).",
            stacklevel=3,
        )


def check_matrix(mat: object, kind: type, packer: str, other: str) -> None:
    """Raise a TypeError naming ``mat`` unless it is a ``kind`` (from ``packer``)."""
    if not isinstance(mat, kind):
        raise TypeError(
            f"mat: expected a {kind.__name__} (from {packer}), got {type(mat).__name__}; "
            f"a {'BSRMatrix' if kind is CSRMatrix else 'CSRMatrix'} goes to {other}."
        )


def check_cols(mat: Matrix, k: int, arg: str) -> None:
    """Raise a ValueError naming ``arg`` unless it has ``mat``'s number of input features."""
    if k != mat.shape[1]:
        raise ValueError(
            f"{arg}: has {k} input features but the sparse weight expects {mat.shape[1]} "
            f"(weight shape {mat.shape})."
        )


def csr_matmul_t(mat: CSRMatrix, xt: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Compute ``W @ xt`` for ``xt`` of shape (in × N); returns (out × N).

    Columns are processed in register-blocked panels of 16 (then 8, then one at a time),
    each packed contiguously, so a panel of ``xt`` is reused by every row while it sits
    in cache; this is the tiling used for conv-as-GEMM inputs with thousands of columns.

    Args:
        mat: The packed weight.
        xt: float32 input, features along the first axis (made C-contiguous if needed).
        out: Optional C-contiguous float32 (out × N) result buffer.

    Returns:
        The (out × N) product, ``out`` if given.
    """
    check_matrix(mat, CSRMatrix, "pack_csr", "bsr_matmul")
    xt = np.ascontiguousarray(as_float32(xt, (2,), "xt"))
    check_cols(mat, xt.shape[0], "xt")
    m, n = mat.shape[0], xt.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous float32 array of shape {(m, n)}.")
    return matmul_t_unchecked(mat, xt, out)


def matmul_t_unchecked(mat: CSRMatrix, xt: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`csr_matmul_t` for callers that validated already (the modules)."""
    if not out.size:
        return out

    def panels() -> None:
        _panels_then_rest(mat, _packer("pack_cols", xt, rows=xt.shape[0]), out)

    if xt.shape[1] < TILE:
        panels()
    else:
        fastest(mat, ("t", xt.shape[1]), {"panels": panels, **_tile_options(mat, lambda: xt, out)})
    return out


def _tile_options(
    mat: CSRMatrix, xt: Callable[[], np.ndarray], out: np.ndarray
) -> dict[str, Callable[[], None]]:
    """The tile kernels for ``out = W @ xt()``, by name (see :func:`_tile_kinds`)."""
    return {
        name: (lambda kblk=kblk: _tiles(mat, xt(), out, kblk))
        for name, kblk in _tile_kinds(mat).items()
    }


def _tile_kinds(mat: CSRMatrix) -> dict[str, int | None]:
    """Tile variants worth timing: whole columns, and K-blocked when K spans blocks."""
    kinds: dict[str, int | None] = {"tiles": None}
    if mat.shape[1] > KBLOCK:
        kinds["kblocks"] = kblock(mat.shape[1])
    return kinds


def kblock(k: int) -> int:
    """Input rows per block for the K-blocked tiles of a weight with ``k`` columns."""
    # Equal blocks of about KBLOCK rows (3072 → 12 × 256, 1152 → 5 × 231, not 4 + a stub).
    nkb = -(-k // KBLOCK)
    return -(-k // nkb)


def fastest(mat: Matrix, key: tuple, options: dict[str, Callable[[], object]]) -> None:
    """Run the option measured fastest for ``(mat, key, threads)``, measuring on first use.

    With more than one thread each option's serial twin competes too (named with the
    suffix :data:`SERIAL`): waking the worker pool can cost more than the second core
    saves (at batch 1 it doubled the time here). Every option computes the same ``out``,
    so whichever ran last left the right result.
    """
    chosen = _CHOICE.setdefault(mat, {})
    key = (*key, get_threads())
    name = chosen.get(key)
    if name is not None:
        _call(options, name)
        return
    if key[-1] > 1:
        options = {**options, **{n + SERIAL: _on_one_thread(run) for n, run in options.items()}}
    _MEASURING[0] += 1
    try:
        if len(options) == 1:
            name = next(iter(options))
            options[name]()
        else:
            name = _measure(options)
    finally:
        _MEASURING[0] -= 1
    chosen[key] = name
    if not _MEASURING[0]:  # an inner choice (the conv's unfold product) must not drop the
        _release_unused(mat)  # layouts the outer options still being timed built


def _call(options: dict[str, Callable[[], object]], name: str) -> None:
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


def _measure(options: dict[str, Callable[[], object]]) -> str:
    """The fastest option's name; the first (the incumbent) unless another wins by 5%.

    Options are timed back to back in seven rounds, in alternating order (the second run
    finds the input in cache); each is judged by the median over rounds of its time
    relative to the incumbent. Paired ratios hold up when another process takes a core
    mid-measurement; the minimum of raw times picked the slower kernel for 3 of 16
    shapes in one run here.
    """
    for run in options.values():
        run()  # compile or load, warm the caches
    names = list(options)
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(7):
        times = {}
        for name in names if r % 2 else names[::-1]:
            start = time.perf_counter()
            options[name]()
            times[name] = time.perf_counter() - start
        for name in names:
            ratios[name].append(times[name] / times[names[0]])
    score = {name: float(np.median(ratios[name])) for name in names}
    fastest = min(score, key=score.__getitem__)
    return fastest if score[fastest] < 0.95 else names[0]


def _release_unused(mat: Matrix) -> None:
    # Keep only the derived layouts (layouts.py) that some recorded choice still runs on.
    used = {n.removesuffix(SERIAL) for n in _CHOICE.get(mat, {}).values()}
    keep: set = {"pad"} if "spmv8" in used else set()
    if used & {"kblocks", "bsr4_kb"}:
        keep.add(("k", kblock(mat.shape[1])))
    if "direct" in used:
        keep.add("taps")
    if "direct_kb" in used:
        keep |= {"taps", "blocks"}
    release(mat, keep)


def recorded_choice(mat: Matrix, key: tuple, threads: int) -> str | None:
    """The kernel :func:`fastest` recorded for ``(mat, key)`` at ``threads``, if any.

    For batch-1 hot paths: looking it up directly skips building the option callables
    that a call through :func:`fastest` needs (14 instead of 6 µs on a tiny layer).
    """
    return _CHOICE.get(mat, {}).get((*key, threads))


def kernel_choices(mat: Matrix) -> dict[tuple, str]:
    """Kernels chosen so far for ``mat``: ``(kind, columns, threads) -> name``."""
    return dict(_CHOICE.get(mat, {}))


def row_blocks(mat: Matrix, parts: int) -> np.ndarray:
    """Row bounds splitting ``mat`` into ``parts`` of about equal nonzeros (cached)."""
    # Cached per weight: computing them (~60 µs) was 5% of a batch-64 product.
    cached = _BOUNDS.setdefault(mat, {})
    if parts not in cached:
        cached[parts] = _row_bounds(mat.indptr, parts)
    return cached[parts]


def _row_bounds(indptr: np.ndarray, parts: int) -> np.ndarray:
    # Row blocks holding about equal numbers of nonzeros (not equal numbers of rows), so
    # that threads given one block each finish together.
    m = indptr.shape[0] - 1
    cuts = np.searchsorted(indptr, np.linspace(0, indptr[-1], parts + 1)[1:-1])
    return np.unique(np.concatenate(([0], np.clip(cuts, 0, m), [m]))).astype(np.int64)


def _tiles(mat: CSRMatrix, xt: np.ndarray, out: np.ndarray, kblk: int | None = None) -> None:
    # 64-column tiles read straight from the row-major K × N input (no re-layout): one
    # tile of every row is finished while that K × 64 slab of the input sits in L2 (or,
    # with ``kblk``, one block of kblk input rows at a time, see layouts.py). The last
    # N mod 64 columns go through the panels.
    n = xt.shape[1]
    ntile = n // TILE
    threads = get_threads()
    bounds = row_blocks(mat, 1 if threads == 1 else 4 * threads)
    indptr, indices, data, nkb = block_rows(mat, kblk or max(1, mat.shape[1]))
    args = (indptr, indices, data, mat.scale, xt.reshape(-1), n, n, out.reshape(-1), 0, ntile)
    # Prefetch the next block (see _generate.py) only when the slab is not contiguous: one
    # tile's K × 64 slab (Linear's transposed batch of 64) the hardware prefetchers follow,
    # and there the extra instructions cost ~5%; 128–3136 columns: 1.0–1.3× faster.
    pfk = kblk if nkb > 1 and n > TILE else 0
    run_kernel("tile64", (*args, bounds, nkb, pfk), (mat.data.dtype.char, mat.indices.dtype.char))
    if ntile * TILE < n:
        pack = _packer("pack_cols", xt, rows=xt.shape[0])
        _panels_then_rest(mat, pack, out, done=ntile * TILE)


Packer = Callable[[int, int, int], np.ndarray]


def _packer(name: str, src: np.ndarray, *extra: Any, rows: int) -> Packer:
    """``(start, npan, width) -> (npan·rows × width)`` panels of ``src`` via kernel ``name``."""

    def pack(start: int, npan: int, width: int) -> np.ndarray:
        xp = np.empty((npan * rows, width), dtype=np.float32)
        run_kernel(name, (src, *extra, start, npan, width, xp), ())
        return xp

    return pack


def _panels_then_rest(mat: CSRMatrix, pack: Packer, out: np.ndarray, done: int = 0) -> None:
    # Automatic tiling: whole panels of 16 (then 8) columns from ``done`` on, each packed
    # contiguously so that one panel of the input (K × 16 floats) stays in L1/L2 while
    # every row of the weight streams past it; the last < 8 columns go one at a time.
    m, n = out.shape
    dtypes = (mat.data.dtype.char, mat.indices.dtype.char)
    csr = (mat.indptr, mat.indices, mat.data, mat.scale)
    rb = max(16, -(-m // 8))
    for width in (16, 8):
        npan = (n - done) // width
        if npan:
            run_kernel(
                f"panel{width}", (*csr, pack(done, npan, width), out, done, npan, rb), dtypes
            )
            done += npan * width
    if done < n:
        # One "panel" of the leftover width is exactly those columns in K × rest layout.
        rest = np.empty((m, n - done), dtype=np.float32)
        run_kernel("csr_cols", (*csr, pack(done, 1, n - done), rest, 0), dtypes)
        out[:, done:] = rest


def conv_unchecked(
    mat: CSRMatrix, images: np.ndarray, geom: tuple, out: np.ndarray, unfold: Callable
) -> None:
    """Sparse conv of N images (N × C × H × W) into ``out`` (N × M × Ho·Wo).

    The kernels compete (see the module docstring): unfolding straight into packed
    panels, or each image unfolded (C·kh·kw × Ho·Wo) and read in place by the tiles.

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
            _panels_then_rest(mat, _packer("pack_im2col", img, geom, rows=mat.shape[1]), o)

    def tiles(kblk: int | None) -> None:
        for i, o in enumerate(out):
            _tiles(mat, unfold(i), o, kblk)

    options: dict[str, Callable[[], object]] = {"panels": panels}
    if out.shape[2] >= TILE:
        options |= {name: (lambda k=kblk: tiles(k)) for name, kblk in _tile_kinds(mat).items()}
    if geom[2] == geom[3] == 1:  # stride 1: the tap offsets are constant (layouts.py)
        options["direct"] = lambda: _direct_conv(mat, images, geom, out)
        kblk = channel_block(images.shape[1], geom)
        if kblk < mat.shape[1]:
            options["direct_kb"] = lambda: _direct_conv(mat, images, geom, out, kblk)
    fastest(mat, ("conv", *images.shape), options)


def channel_block(channels: int, geom: tuple) -> int:
    """Weight columns per block of whole channels for the channel-blocked direct conv."""
    # Whole channels per block such that one 64-pixel tile's windows of a block (kh rows
    # of 64 + (kw − 1)·dw floats per channel) fit ~24 KB of L1: 128 → 256 at 3 × 3 ran
    # its kernel 1.4× faster in blocks of 16–32 channels than unblocked, 8 was slower.
    kh, kw, dw = geom[0], geom[1], geom[7]
    per = max(1, 24576 // (kh * (TILE + (kw - 1) * dw) * 4))
    nblk = -(-channels // per)
    return -(-channels // nblk) * kh * kw


def _direct_conv(
    mat: CSRMatrix, images: np.ndarray, geom: tuple, out: np.ndarray, kblk: int | None = None
) -> None:
    # The tile kernel over each zero-padded image, tap offsets as row indices, row stride 1
    # (see layouts.py). With ``kblk``, over blocks of whole channels (partial sums wait in
    # the output).
    indptr, _, data, nkb = block_rows(mat, kblk or max(1, mat.shape[1]))

    def run(offs: np.ndarray, padded: np.ndarray, flat: np.ndarray, ntile: int, bounds) -> None:
        args = (indptr, offs, data, mat.scale, padded, 1, ntile * TILE, flat, 0, ntile, bounds)
        # No prefetch: successive tiles read neighbouring lines of each image row, which
        # the hardware prefetchers follow.
        run_kernel("tile64", (*args, nkb, 0), (mat.data.dtype.char, offs.dtype.char))

    over_padded_images(mat, images, geom, out, TILE, kblk, run)


def over_padded_images(
    mat: Matrix,
    images: np.ndarray,
    geom: tuple,
    out: np.ndarray,
    width: int,
    kblk: int | None,
    run: Callable[..., None],
) -> None:
    """Zero-pad each image into a cached buffer, ``run`` a direct-conv kernel, crop.

    Output rows are numbered with the padded width (``layouts.py``), in tiles of ``width``
    columns; ``run(offsets, padded, out_flat, ntile, bounds)`` computes them.
    """
    kh, kw, _, _, ph, pw, dh, dw, wo = geom
    c, h, w = images.shape[1:]
    # Padded width rounded up to a multiple of 4: 128 × 56 × 56 at 3 × 3 ran 1.3× slower
    # with rows of 58 floats than with 60 (or 62–96) here, the extra columns are zeros.
    hp, wp = h + 2 * ph, -(-(w + 2 * pw) // 4) * 4
    ho = hp - dh * (kh - 1)
    length = ho * wp
    ntile = -(-length // width)
    offs = tap_offsets(mat, (kh, kw), (dh, dw), (hp, wp), kblk)
    # The last tile reads up to ntile·width − length + (kw − 1)·dw floats past the image.
    # Cached: only the interior is written below, so the zero border stays zero.
    padded = scratch(mat, "image", c * hp * wp + ntile * width - length + (kw - 1) * dw)
    plane = padded[: c * hp * wp].reshape(c, hp, wp)
    flat = scratch(mat, "out", mat.shape[0] * ntile * width).reshape(mat.shape[0], -1)
    threads = get_threads()
    bounds = row_blocks(mat, 1 if threads == 1 else 4 * threads)
    for img, o in zip(images, out, strict=True):
        plane[:, ph : ph + h, pw : pw + w] = img
        run(offs, padded, flat.reshape(-1), ntile, bounds)
        o.reshape(-1, ho, wo)[:] = flat[:, :length].reshape(-1, ho, wp)[:, :, :wo]


def csr_matmul(mat: CSRMatrix, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Compute ``x @ W.T`` for ``x`` of shape (in,) or (batch × in).

    Args:
        mat: The packed weight.
        x: float32 input; any strides (a batch is transposed once into panels).

    Returns:
        (out,) for 1-D input; for 2-D input a (batch × out) array, which is a transposed
        view of a C-contiguous (out × batch) buffer (feeding it to the next sparse layer
        then needs no copy).
    """
    check_matrix(mat, CSRMatrix, "pack_csr", "bsr_matmul")
    x = as_float32(x, (1, 2), "x")
    check_cols(mat, x.shape[-1], "x")
    return matmul_unchecked(mat, x)


def matmul_unchecked(mat: CSRMatrix, x: np.ndarray) -> np.ndarray:
    """:func:`csr_matmul` for callers that validated already (the modules)."""
    if x.ndim == 1 or x.shape[0] == 1:
        xv = np.ascontiguousarray(x.reshape(-1))
        out = np.empty(mat.shape[0], dtype=np.float32)
        if mat.shape[0]:
            _spmv(mat, xv, out)
        return out if x.ndim == 1 else out.reshape(1, -1)
    out = np.empty((mat.shape[0], x.shape[0]), dtype=np.float32)
    if not out.size:
        return out.T

    def panels() -> None:
        xc = np.ascontiguousarray(x)
        _panels_then_rest(mat, _packer("pack_rows", xc, rows=x.shape[1]), out)

    if x.shape[0] < TILE:
        fastest(mat, ("x", x.shape[0]), {"panels": panels})  # pool or one thread
    else:
        # The tiles read x transposed (in × batch): one copy, small next to the product.
        options = _tile_options(mat, lambda: transposed(x), out)
        fastest(mat, ("x", x.shape[0]), {"panels": panels, **options})
    return out.T


def _spmv(mat: CSRMatrix, xv: np.ndarray, out: np.ndarray) -> None:
    # Plain CSR, or rows padded to eight (see layouts.py), each on the pool or on one
    # thread, whichever measured faster for this weight (the recorded choice first).
    n = get_threads()
    dtypes = (mat.data.dtype.char, mat.indices.dtype.char)

    def run(kind: str, threads: int | None = None) -> None:
        arrays = pad_rows(mat) if kind == "spmv8" else (mat.indptr, mat.indices, mat.data)
        run_kernel(f"csr_{kind}", (*arrays, mat.scale, xv, out), dtypes, threads)

    choice = recorded_choice(mat, ("v", 1), n)
    if choice is None:
        fastest(mat, ("v", 1), {"spmv": lambda: run("spmv"), "spmv8": lambda: run("spmv8")})
    elif choice.endswith(SERIAL):
        run(choice.removesuffix(SERIAL), 1)
    else:
        run(choice, n)


def transposed(x: np.ndarray) -> np.ndarray:
    """``x`` (N × K, any strides) as a C-contiguous K × N copy (a serial numba kernel)."""
    xt = np.empty((x.shape[1], x.shape[0]), dtype=np.float32)
    run_kernel("transpose", (x, xt), (), 1)  # a serial kernel: no pool to size
    return xt
