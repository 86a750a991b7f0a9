"""Quantizing a transposed batch to uint8: 8 batch columns per 256-bit vector.

The sparse int8 kernels' outputs are (M × N) arrays returned transposed (``int8.py``),
so the next layer's input ``x`` (N × K) arrives with ``x.T`` C-contiguous: a chunk of 8
batch columns is 8 contiguous floats per input row k, exactly the 8 bytes of the
kernels' input word k once quantized. :func:`quantize_t` finds each column's range and
rounds with 8-lane vectors; the operations are the scalar ones of
``_int8_kernels.quantize_u8`` lane by lane (no fast-math: no FMA, the same rounding), so
both layouts give the same bytes. Scalar loops over the 8 columns took 48 µs for a
3072 × 8 input inside a model call, where numba's loop vectorizer gave up.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

__all__ = ["codes_rows", "f32x8", "quantize_t", "range_rows", "scale_of"]

_F32 = ir.FloatType()
_V8 = ir.VectorType(_F32, 8)


class _Vec8(types.Type):
    def __init__(self) -> None:
        super().__init__(name="f32x8")


#: 8 float32 lanes (one ymm register).
f32x8 = _Vec8()


@register_model(_Vec8)
class _Vec8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # noqa: ANN001 - numba's data-model protocol
        super().__init__(dmm, fe_type, _V8)


def _ptr(context, builder, aryty, ary, idx, idxty, vecty):  # noqa: ANN001, ANN202
    i = context.cast(builder, idx, idxty, types.uint64)
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [i], inbounds=True), vecty.as_pointer())


@intrinsic
def load8(typingctx, ary, pos):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``ary[pos : pos + 8]`` (float32)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V8)
        return builder.load(ptr, align=4)

    return f32x8(ary, pos), codegen


@intrinsic
def zero8(typingctx):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """8 float32 zeros."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return ir.Constant(_V8, [0.0] * 8)

    return f32x8(), codegen


def _binary(name: str):  # noqa: ANN202 - builds the lane-wise min / max
    def op(typingctx, a, b):  # noqa: ANN001, ANN202
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fnty = ir.FunctionType(_V8, [_V8, _V8])
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.v8f32")
            return builder.call(fn, args)

        return f32x8(a, b), codegen

    op.__doc__ = f"Lane-wise {name} of two 8-lane vectors."
    return intrinsic(op)


min8, max8 = _binary("minnum"), _binary("maxnum")


@intrinsic
def store8(typingctx, ary, pos, v):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``ary[pos : pos + 8] = v`` (float32)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V8)
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()

    return types.void(ary, pos, v), codegen


@intrinsic
def quant8(typingctx, out, opos, v, inv, z):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``out[opos]`` (uint64) = the 8 bytes ``clip(rint(v · inv) + z, 0, 255)``.

    ``rint`` as ``_int8_kernels._rint``: ``(t + 1.5·2^23) − 1.5·2^23``, each a separate
    IEEE operation, as the scalar quantizer rounds.
    """

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        out_ary, opos_v, v, inv_v, z_v = args
        magic = ir.Constant(_V8, [12582912.0] * 8)
        t = builder.fmul(v, inv_v)
        t = builder.fsub(builder.fadd(t, magic), magic)
        t = builder.fadd(t, z_v)
        fnty = ir.FunctionType(_V8, [_V8, _V8])
        vmax = cgutils.get_or_insert_function(builder.module, fnty, "llvm.maxnum.v8f32")
        vmin = cgutils.get_or_insert_function(builder.module, fnty, "llvm.minnum.v8f32")
        t = builder.call(vmax, [t, ir.Constant(_V8, [0.0] * 8)])
        t = builder.call(vmin, [t, ir.Constant(_V8, [255.0] * 8)])
        # Through int32 lanes (one vcvttps2dq, then a pack): a direct float → u8 conversion
        # was scalarized, 8 conversions a row (t is already in 0 … 255: the same bytes).
        bytes8 = ir.VectorType(ir.IntType(8), 8)
        q = builder.trunc(builder.fptosi(t, ir.VectorType(ir.IntType(32), 8)), bytes8)
        ptr = _ptr(context, builder, sig.args[0], out_ary, opos_v, sig.args[1], bytes8)
        builder.store(q, ptr, align=1)
        return context.get_dummy_value()

    return types.void(out, opos, v, inv, z), codegen


_MAGIC = np.float32(12582912.0)
_FLAGS = {"boundscheck": False, "cache": True, "nogil": True}


@njit(**_FLAGS, inline="always")
def _chunk_range(src, stride, at, k0, k1):  # noqa: ANN001, ANN202
    # min(x, 0) and max(x, 0) over rows k0 … k1 − 1 of one chunk (src[at + k·stride], 8
    # lanes). Four independent chains: one waited ~4 cycles a row (min and max are exact,
    # so the order changes no bit: a piece's range combines with the others' exactly).
    lo = hi = lo1 = hi1 = lo2 = hi2 = lo3 = hi3 = zero8()
    k = k0
    while k + 4 <= k1:
        p = at + k * stride
        v0, v1 = load8(src, p), load8(src, p + stride)
        v2, v3 = load8(src, p + 2 * stride), load8(src, p + 3 * stride)
        lo, hi = min8(lo, v0), max8(hi, v0)
        lo1, hi1 = min8(lo1, v1), max8(hi1, v1)
        lo2, hi2 = min8(lo2, v2), max8(hi2, v2)
        lo3, hi3 = min8(lo3, v3), max8(hi3, v3)
        k += 4
    for r in range(k, k1):
        v = load8(src, at + r * stride)
        lo, hi = min8(lo, v), max8(hi, v)
    return min8(min8(lo, lo1), min8(lo2, lo3)), max8(max8(hi, hi1), max8(hi2, hi3))


@njit(**_FLAGS, inline="always")
def _chunk_codes(src, stride, at, k0, k1, inv, zf, b0, x8, o):  # noqa: ANN001, ANN202
    # Words o + k0 … o + k1 − 1 of x8: rows k0 … k1 − 1 of the chunk at src[at], quantized
    # with columns b0 … b0 + 7's 1/scale and zero points.
    iv = load8(inv, b0)
    zv = load8(zf, b0)
    for k in range(k0, k1):
        quant8(x8, o + k, load8(src, at + k * stride), iv, zv)


@njit(**_FLAGS, inline="always")
def scale_of(lo, hi):  # noqa: ANN001, ANN202
    """``(scale, zero point as float, 1/scale)`` of the range ``[lo, hi]`` (``lo ≤ 0 ≤ hi``)."""
    step = (hi - lo) / np.float32(255.0)
    if not step > np.float32(0.0):
        step = np.float32(1.0)
    r = (-lo / step + _MAGIC) - _MAGIC
    return step, min(max(r, np.float32(0.0)), np.float32(255.0)), np.float32(1.0) / step


@njit(**_FLAGS)
def quantize_t(xt, n, x8, scale, zf):  # noqa: D103
    # quantize_u8 for a (K × N) input (C-contiguous): word c·K + k of x8 (uint64) holds
    # q(xt[k, 8c + j]) in byte j, 0 past column N; scale and zf get N rounded up to 8.
    kdim = xt.shape[0]
    flat = xt.reshape(-1)
    nchunk = (n + 7) // 8
    # A last chunk narrower than 8, padded (allocated only then: zeroing K × 8 floats on
    # every call cost more than the rounding of a batch 8).
    part = np.zeros((kdim if n % 8 else 0, 8), dtype=np.float32)
    pflat = part.reshape(-1)
    lanes = np.empty(16, dtype=np.float32)
    inv = np.empty(8 * nchunk, dtype=np.float32)
    for c in range(nchunk):
        b0 = 8 * c
        src, stride, at = flat, n, b0
        if b0 + 8 > n:
            for k in range(kdim):
                for j in range(n - b0):
                    part[k, j] = xt[k, b0 + j]
            src, stride, at = pflat, 8, 0
        lo, hi = _chunk_range(src, stride, at, 0, kdim)
        store8(lanes, 0, lo)
        store8(lanes, 8, hi)
        for j in range(8):
            scale[b0 + j], zf[b0 + j], inv[b0 + j] = scale_of(lanes[j], lanes[8 + j])
        _chunk_codes(src, stride, at, 0, kdim, inv, zf, b0, x8, c * kdim)


@njit(**_FLAGS)
def range_rows(xt, k0, k1, lo, hi):  # noqa: D103
    # One thread's share of quantize_t's ranges: rows k0 … k1 − 1 of a (K × N) input, N a
    # multiple of 8, into lo and hi (N each).
    n = xt.shape[1]
    flat = xt.reshape(-1)
    for b0 in range(0, n, 8):
        a, z = _chunk_range(flat, n, b0, k0, k1)
        store8(lo, b0, a)
        store8(hi, b0, z)


@njit(**_FLAGS)
def codes_rows(xt, k0, k1, inv, zf, x8):  # noqa: D103
    # One thread's share of quantize_t's words: rows k0 … k1 − 1 (N a multiple of 8).
    kdim, n = xt.shape
    flat = xt.reshape(-1)
    for c in range(n // 8):
        _chunk_codes(flat, n, 8 * c, k0, k1, inv, zf, 8 * c, x8, c * kdim)
