"""Jitted sparse int8 kernels on the sliced layout of ``int8.py`` (raw arrays, no checks).

Layout (built by :func:`nbcompress.kernels.int8.sliced`): rows (or 4-row blocks, ``R``
= 4) sorted by length and cut into slices of 16, one vector lane per row; a slice's
nonzeros are padded to a multiple of 4 steps (padding: index 0, weight 0) and stored in
groups of 4 steps:

* ``idx[64·g + 16·s + l]``: the column (block column) of lane l at step s of group g;
* ``w[64·R·g + 64·i + 4·l + s]``: its int8 weight (row i of the block for ``R`` = 4);
* ``sptr[slice] … sptr[slice + 1]``: the slice's groups; ``perm[16·slice + l]``: lane l's
  row (block row), -1 for padding lanes.

``spmv_r{R}`` multiplies one float32 input vector (float accumulation, int8 weights
converted on the fly); ``spmm_r{R}_{path}`` a batch quantized to uint8 (exact int32
accumulation, ``path`` = ``vnni`` or ``portable``, bit-identical). ``scale`` is per output
row; ``rowsum`` (Σ of a row's int8 weights) removes the inputs' zero points; ``bias``
(zeros for none) is added in the same pass, where a separate add on the transposed
output cost 60 µs at batch 8 on 3072 outputs. ``act`` (a code of
:data:`~nbcompress.kernels._epilogue.ACTIVATIONS`, 0: none) is applied in that pass too,
by ``_epilogue.py``'s own functions on a few slices' values at once in a small buffer
(contiguous there, so the polynomials vectorize; the output rows are scattered).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from nbcompress.kernels._epilogue import finish_vector
from nbcompress.kernels._int8_quant import quantize_t
from nbcompress.kernels._int8_simd import (
    dot4,
    dot4_vnni,
    fload,
    fstore,
    fzero,
    gather,
    hmax,
    hmin,
    istore,
    izero,
    quad,
    vmax,
    vmin,
    wfma,
)

__all__ = [
    "FUSED",
    "SPMM",
    "quantize_into",
    "quantize_u8",
    "spmv_r1",
    "spmv_r4",
    "unpack",
]

# No fast-math: the vector steps are explicit intrinsics, and the float epilogue must round
# the same wherever LLVM inlines it (a serial call, or a task on another thread: see
# _int8_tasks.py), so that results never depend on the thread count. Contraction into an
# FMA alone may differ between two inlined copies of the same line.
_FLAGS = {"boundscheck": False, "cache": True, "nogil": True}
#: Slices whose batch values go through the activation in one call (at batch 64: 32 KB
#: element-wise, 128 KB in 4 × 1 blocks, in L2; a call per slice half cost ~40 ns, more
#: than its GELUs).
GROUP = 8


@njit(**_FLAGS)
def spmv_r1(sptr, idx, w, perm, scale, bias, x, out, s0, s1, act):  # noqa: D103
    tmp = np.empty(16, dtype=np.float32)
    vals = np.zeros((s1 - s0) * 16 if act else 0, dtype=np.float32)
    for s in range(s0, s1):
        acc = fzero()
        for g in range(sptr[s], sptr[s + 1]):
            p = g * 64
            acc = wfma(acc, w, p, 0, gather(x, idx, p))
            acc = wfma(acc, w, p, 1, gather(x, idx, p + 16))
            acc = wfma(acc, w, p, 2, gather(x, idx, p + 32))
            acc = wfma(acc, w, p, 3, gather(x, idx, p + 48))
        fstore(tmp, 0, acc)
        _put(tmp, vals, perm, s, s0, 1, scale, bias, out, act)
    if act:
        _activated(vals, perm, s0, s1, 1, out, act)


@njit(**_FLAGS)
def spmv_r4(sptr, idx, w, perm, scale, bias, x, out, s0, s1, act):  # noqa: D103
    tmp = np.empty(64, dtype=np.float32)
    vals = np.zeros((s1 - s0) * 64 if act else 0, dtype=np.float32)
    for s in range(s0, s1):
        a0 = a1 = a2 = a3 = fzero()
        for g in range(sptr[s], sptr[s + 1]):
            p, q = g * 64, g * 256
            xg = gather(x, idx, p + 0)
            a0 = wfma(a0, w, q, 0, xg)
            a1 = wfma(a1, w, q + 64, 0, xg)
            a2 = wfma(a2, w, q + 128, 0, xg)
            a3 = wfma(a3, w, q + 192, 0, xg)
            xg = gather(x, idx, p + 16)
            a0 = wfma(a0, w, q, 1, xg)
            a1 = wfma(a1, w, q + 64, 1, xg)
            a2 = wfma(a2, w, q + 128, 1, xg)
            a3 = wfma(a3, w, q + 192, 1, xg)
            xg = gather(x, idx, p + 32)
            a0 = wfma(a0, w, q, 2, xg)
            a1 = wfma(a1, w, q + 64, 2, xg)
            a2 = wfma(a2, w, q + 128, 2, xg)
            a3 = wfma(a3, w, q + 192, 2, xg)
            xg = gather(x, idx, p + 48)
            a0 = wfma(a0, w, q, 3, xg)
            a1 = wfma(a1, w, q + 64, 3, xg)
            a2 = wfma(a2, w, q + 128, 3, xg)
            a3 = wfma(a3, w, q + 192, 3, xg)
        fstore(tmp, 0, a0)
        fstore(tmp, 16, a1)
        fstore(tmp, 32, a2)
        fstore(tmp, 48, a3)
        _put(tmp, vals, perm, s, s0, 4, scale, bias, out, act)
    if act:
        _activated(vals, perm, s0, s1, 4, out, act)


@njit(**_FLAGS, inline="always")
def _put(tmp, vals, perm, s, s0, blk, scale, bias, out, act):  # noqa: D103
    # A batch-1 slice's sums (tmp[16·i + lane]: row i of lane's block) scaled and biased
    # into the output, or with act into vals (the call's slices one after another, 16·blk
    # values each): _activated then runs the activation over them in one vectorized call.
    for lane in range(16):
        br = perm[s * 16 + lane]
        if br >= 0:
            for i in range(blk):
                r, t = blk * br + i, 16 * i + lane
                dst, k = (vals, (s - s0) * 16 * blk + t) if act else (out, r)
                dst[k] = tmp[t] * scale[r] + bias[r]


@njit(**_FLAGS, inline="always")
def _activated(vals, perm, s0, s1, blk, out, act):  # noqa: D103
    finish_vector(vals, vals[:0], act)  # one call: ~40 ns a call, 0.5 ns a GELU here
    for s in range(s0, s1):
        for lane in range(16):
            br = perm[s * 16 + lane]
            if br >= 0:
                for i in range(blk):
                    out[blk * br + i] = vals[(s - s0) * 16 * blk + 16 * i + lane]


def _spmm(dot, blk):  # noqa: ANN001, ANN202 - builds one batch kernel
    # blk = 4: one gathered quad of inputs serves the block's 4 rows (16 accumulators), a
    # slice's two halves of 8 rows one after the other; blk = 1: both halves in one pass
    # (twice the independent work per step for the out-of-order core).
    # Slices s0 … s1 − 1 for batch chunks c0 … c1 − 1 (of 8 columns each).
    # With act, the values of GROUP slices (all chunks) go to vals, then through the
    # activation in one vectorized call (see _activated) and into the output.
    def spmm(sptr, idx, w, perm, scale, rowsum, bias, x8, xs, zp, n, out, s0, s1, c0, c1, act):
        kdim = x8.shape[0] // ((n + 7) // 8)
        tmp = np.empty(128 * blk, dtype=np.int32)
        nc = c1 - c0
        vals = np.zeros(GROUP * nc * 128 * blk if act else 0, dtype=np.float32)
        ends = (scale, rowsum, bias, xs, zp, out, vals, act)
        for g0 in range(s0, s1, GROUP):
            g1 = min(g0 + GROUP, s1)
            for s in range(g0, g1):
                for c in range(c0, c1):
                    base = c * kdim
                    v0 = ((s - g0) * nc + c - c0) * 128 * blk
                    for h in range(2 if blk == 4 else 1):
                        a0 = a1 = a2 = a3 = (izero(), izero(), izero(), izero())
                        for g in range(sptr[s], sptr[s + 1]):
                            d = quad(x8, idx, 64 * g + 8 * h, base)
                            p = 64 * blk * g + 32 * h
                            a0 = dot(a0, d, w, p)
                            if blk == 4:
                                a1 = dot(a1, d, w, p + 64)
                                a2 = dot(a2, d, w, p + 128)
                                a3 = dot(a3, d, w, p + 192)
                            else:
                                a1 = dot(a1, quad(x8, idx, 64 * g + 8, base), w, p + 32)
                        for q in range(4):
                            istore(tmp, 16 * q, a0[q])
                            istore(tmp, 64 + 16 * q, a1[q])
                            if blk == 4:
                                istore(tmp, 128 + 16 * q, a2[q])
                                istore(tmp, 192 + 16 * q, a3[q])
                        if blk == 4:
                            _store(tmp, perm, s, h, c, n, 4, v0 + 256 * h, ends)
                        else:  # tmp[64·h …]: half h, as _store reads block row i = h
                            _store(tmp, perm, s, 0, c, n, 1, v0, ends)
                            _store(tmp[64:], perm, s, 1, c, n, 1, v0 + 64, ends)
            if act:
                _batch_activated(vals, perm, g0, g1, c0, c1, n, blk, out, act)

    return njit(**_FLAGS)(spmm)


def _fused(spmm):  # noqa: ANN001, ANN202 - builds one quantize-then-multiply kernel
    # One call per layer: at batch 8 a layer is ~100 µs, and every Python step between
    # the kernels (allocations, a second dispatch) costs more when its objects left the
    # caches while the other layers ran.
    def run(sptr, idx, w, perm, scale, rowsum, bias, x, trans, out, act):
        n = x.shape[1] if trans else x.shape[0]
        kdim = x.shape[0] if trans else x.shape[1]
        nchunk = (n + 7) // 8
        buf = np.empty(nchunk * kdim + nchunk * 8, dtype=np.uint64)
        quantize_into(x, trans, buf)
        x8, xs, zp = unpack(buf, nchunk, kdim)
        nsl = sptr.shape[0] - 1
        spmm(sptr, idx, w, perm, scale, rowsum, bias, x8, xs, zp, n, out, 0, nsl, 0, nchunk, act)

    return njit(**_FLAGS)(run)


@njit(**_FLAGS, inline="always")
def unpack(buf, nchunk, kdim):  # noqa: D103
    # quantize_into's buffer: (words, float32 scales, int32 zero points).
    nw = nchunk * kdim
    tail = buf[nw:].view(np.float32)
    return buf[:nw], tail[: 8 * nchunk], tail[8 * nchunk :].view(np.int32)


@njit(**_FLAGS)
def quantize_into(x, trans, buf):  # noqa: D103
    # The batch quantized into one uint64 buffer (the parallel kernels' block carries one
    # input address per call): the (⌈N/8⌉·K) words of quantize_u8, then N8 float32 scales
    # and N8 int32 zero points (N8 = N rounded up to 8). x is (N × K), or (K × N) when
    # trans (the previous layer's output, see int8.py): same values, same bits.
    n = x.shape[1] if trans else x.shape[0]
    kdim = x.shape[0] if trans else x.shape[1]
    n8 = (n + 7) // 8 * 8
    x8, xs, zp = unpack(buf, n8 // 8, kdim)
    zf = np.empty(n8, dtype=np.float32)
    if trans:
        quantize_t(x, n, x8, xs, zf)
    else:
        xp = x
        if n8 != n:
            xp = np.zeros((n8, kdim), dtype=np.float32)
            xp[:n] = x
        quantize_u8(xp, x8, xs, zf)
    for b in range(n8):
        zp[b] = np.int32(zf[b])


@njit(**_FLAGS, inline="always")
def _store(tmp, perm, s, h, c, n, blk, vo, ends):  # noqa: D103
    # The slice half's 8 rows × 8 batch columns (× blk rows per block): tmp[64·i + 8·r + b],
    # into the (M × N) output, where a row's 8 batch columns are contiguous (one vector
    # store; into an (N × M) output they were 8 scalar stores a row apart); with act into
    # vals[vo + 64·i + 8·r + b] (a row's 8 columns alone stayed in the activation loop's
    # scalar remainder, and a call per half cost more than its GELUs).
    scale, rowsum, bias, xs, zp, out, vals, act = ends
    b0 = c * 8
    nb = min(8, n - b0)
    for r in range(8):
        br = perm[s * 16 + 8 * h + r]
        if br < 0:
            continue
        for i in range(blk):
            row = blk * br + i
            sr, rs, t, o = scale[row], rowsum[row], 64 * i + 8 * r, row * n + b0
            br_ = bias[row]
            dst, o = (vals, vo + t) if act else (out, o)  # no branch in the loop
            for b in range(nb):
                v = np.float32(tmp[t + b] - zp[b0 + b] * rs)
                dst[o + b] = v * (sr * xs[b0 + b]) + br_


@njit(**_FLAGS, inline="always")
def _batch_activated(vals, perm, g0, g1, c0, c1, n, blk, out, act):  # noqa: D103
    # The activation over slices g0 … g1 − 1 (chunks c0 … c1 − 1) in vals, then each row's
    # columns into the output.
    nc = c1 - c0
    used = vals[: (g1 - g0) * nc * 128 * blk]
    finish_vector(used, vals[:0], act)
    for s in range(g0, g1):
        for c in range(c0, c1):
            b0 = c * 8
            nb = min(8, n - b0)
            v0 = ((s - g0) * nc + c - c0) * 128 * blk
            for h in range(2):
                for r in range(8):
                    br = perm[s * 16 + 8 * h + r]
                    if br < 0:
                        continue
                    for i in range(blk):
                        t, o = v0 + 64 * blk * h + 64 * i + 8 * r, (blk * br + i) * n + b0
                        for b in range(nb):
                            out[o + b] = vals[t + b]


#: Batch kernels by (rows per block, path): ``vnni`` (vpdpbusd) or ``portable``.
spmm_r1_vnni, spmm_r1 = _spmm(dot4_vnni, 1), _spmm(dot4, 1)
spmm_r4_vnni, spmm_r4 = _spmm(dot4_vnni, 4), _spmm(dot4, 4)
SPMM = {
    (1, "vnni"): spmm_r1_vnni,
    (1, "portable"): spmm_r1,
    (4, "vnni"): spmm_r4_vnni,
    (4, "portable"): spmm_r4,
}


@njit(**_FLAGS)
def value_range(x, lo, hi):  # noqa: D103
    # min(x_b, 0) and max(x_b, 0) per row b, 16 lanes at a time (numba's min() does not
    # vectorize); exact in any order. Inputs must be finite.
    kdim = x.shape[1]
    flat = x.reshape(-1)
    for b in range(x.shape[0]):
        a = z = fzero()
        k = 0
        while k + 16 <= kdim:
            v = fload(flat, b * kdim + k)
            a = vmin(a, v)
            z = vmax(z, v)
            k += 16
        low, high = hmin(a), hmax(z)
        for j in range(k, kdim):
            low = min(low, x[b, j])
            high = max(high, x[b, j])
        lo[b] = low
        hi[b] = high


@njit(boundscheck=False, cache=True, nogil=True)
def quantize_u8(x, x8, scale, zf):  # noqa: D103
    # Per row b: scale = (max(x, 0) − min(x, 0)) / 255 (1 for a zero row), zero point
    # zf = clip(rint(−min / scale), 0, 255), q = clip(rint(x · (1/scale)) + zf, 0, 255);
    # then 8 rows at a time into one 64-bit word per input column (row b of the chunk in
    # byte b). x has a multiple of 8 rows; x8 is uint64 (chunks × K). No fastmath: the
    # reference must round the same way.
    n, kdim = x.shape
    inv = np.empty(n, dtype=np.float32)
    value_range(x, scale, inv)
    for b in range(n):
        lo = scale[b]
        step = (inv[b] - lo) / np.float32(255.0)
        if not step > np.float32(0.0):
            step = np.float32(1.0)
        scale[b] = step
        zf[b] = min(max(_rint(-lo / step), np.float32(0.0)), np.float32(255.0))
        inv[b] = np.float32(1.0) / step
    q = np.empty((8, kdim), dtype=np.uint8)  # one chunk, row-major (L1-sized)
    for c in range(n // 8):
        for j in range(8):
            inv_r, z_r, row, qj = inv[8 * c + j], zf[8 * c + j], x[8 * c + j], q[j]
            for k in range(kdim):
                qj[k] = _q(row[k], inv_r, z_r)
        o = c * kdim
        q0, q1, q2, q3, q4, q5, q6, q7 = q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]
        for k in range(kdim):
            lo = _u64(q0[k]) | _u64(q1[k]) << 8 | _u64(q2[k]) << 16 | _u64(q3[k]) << 24
            hi = _u64(q4[k]) | _u64(q5[k]) << 8 | _u64(q6[k]) << 16 | _u64(q7[k]) << 24
            x8[o + k] = lo | hi << 32


_MAGIC = np.float32(12582912.0)


@njit(cache=True, inline="always")
def _u64(v):  # noqa: D103
    return np.uint64(v)


@njit(boundscheck=False, cache=True, nogil=True, inline="always")
def _rint(v):  # noqa: D103
    # Round to nearest, ties to even, by the 1.5·2^23 trick (exact for |v| < 2^22, which
    # holds: |v| ≤ 255 here): LLVM vectorizes it, where np.rint stays a libm call.
    return (v + _MAGIC) - _MAGIC


@njit(boundscheck=False, cache=True, nogil=True, inline="always")
def _q(v, inv, z):  # noqa: D103
    q = _rint(v * inv) + z
    return np.uint8(min(max(q, np.float32(0.0)), np.float32(255.0)))


#: :data:`SPMM` after quantizing a C-contiguous float32 (N × K) input, in one call.
FUSED = {key: _fused(kernel) for key, kernel in SPMM.items()}
