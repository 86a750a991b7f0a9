"""Vector intrinsics of the sparse int8 kernels (``_int8_kernels.py``), as LLVM IR.

The sparse int8 weights are laid out in slices of 16 rows (``int8.py``): one vector lane
per row, so a step of the nonzero loop is one gather of the 16 rows' inputs, and no
row needs a horizontal sum. Two kinds of step:

* batch 1, float32 input: :func:`gather` 16 inputs, :func:`wfma` them with 16 int8
  weights converted to float (one ``vgatherdps`` serves 16 nonzeros, 4 × 16 for a
  4 × 1 block: the four rows of a block share the gathered input);
* batch ≥ 2, uint8 input (``(K, 8)`` per chunk of 8 batch columns, so that one 64-bit
  word is one input row of 8 batch columns): :func:`quad` gathers 4 steps of 8 rows and
  interleaves them so that each int32 lane (row, batch column) holds its 4 input bytes,
  and :func:`dot4` adds the 4 products of each lane with its row's 4 int8 weights.
  With AVX512-VNNI that is one ``vpdpbusd`` per 16 lanes; without it (``vnni=False``,
  e.g. AVX2 CPUs) the same sums from ``vpmaddwd`` on bytes widened to 16 bits. Both
  are exact int32 sums (``vpdpbusd``, unlike ``vpmaddubsw``, does not saturate), so the
  two paths return bit-identical results.

Offsets are element offsets into 1-D C-contiguous arrays; nothing is bounds-checked.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

__all__ = [
    "dot4",
    "dot4_vnni",
    "f32x16",
    "fload",
    "fstore",
    "fzero",
    "gather",
    "hmax",
    "hmin",
    "i32x16",
    "istore",
    "izero",
    "quad",
    "vmax",
    "vmin",
    "wfma",
]

_F32 = ir.FloatType()
_I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (8, 16, 32, 64))
_F16V = ir.VectorType(_F32, 16)
_I16V = ir.VectorType(_I32, 16)


class _Vec(types.Type):
    def __init__(self, name: str) -> None:
        super().__init__(name=name)


#: 16 float32 lanes (one zmm register, or two ymm).
f32x16 = _Vec("f32x16")
#: 16 int32 lanes.
i32x16 = _Vec("i32x16")


@register_model(type(f32x16))
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # noqa: ANN001 - numba's data-model protocol
        super().__init__(dmm, fe_type, _F16V if fe_type is f32x16 else _I16V)


def _ptr(context, builder, aryty, ary, idx, idxty, vecty):  # noqa: ANN001, ANN202
    # Pointer to the vector of type ``vecty`` at ary[idx].
    i = context.cast(builder, idx, idxty, types.uint64)
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [i], inbounds=True), vecty.as_pointer())


def _vector_gep(builder, base, elt, offsets):  # noqa: ANN001, ANN202
    # ``base + offsets`` as a vector of pointers (llvmlite cannot type a vector GEP).
    gep = builder.gep(base, [offsets], inbounds=True, source_etype=elt)
    gep.type = ir.VectorType(base.type, offsets.type.count)
    return gep


def _gather(builder, ptrs, elt, count):  # noqa: ANN001, ANN202
    vec = ir.VectorType(elt, count)
    suffix = {32: "f32" if elt == _F32 else "i32", 64: "i64"}[elt.width if elt != _F32 else 32]
    fnty = ir.FunctionType(vec, [ptrs.type, _I32, ir.VectorType(ir.IntType(1), count), vec])
    name = f"llvm.masked.gather.v{count}{suffix}.v{count}p0"
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    mask = ir.Constant(ir.VectorType(ir.IntType(1), count), [1] * count)
    return builder.call(fn, [ptrs, ir.Constant(_I32, 8), mask, ir.Constant(vec, ir.Undefined)])


def _indices(context, builder, sig, args, pos, count):  # noqa: ANN001, ANN202
    # ``count`` indices at idx[pos] (unsigned), widened to int64 offsets.
    ity = context.get_data_type(sig.args[pos].dtype)
    ptr = _ptr(
        context,
        builder,
        sig.args[pos],
        args[pos],
        args[pos + 1],
        sig.args[pos + 1],
        ir.VectorType(ity, count),
    )
    return builder.zext(builder.load(ptr, align=1), ir.VectorType(_I64, count))


def _shuffle(builder, a, b, mask):  # noqa: ANN001, ANN202
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


@intrinsic
def fzero(typingctx):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """16 float32 zeros."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return ir.Constant(_F16V, [0.0] * 16)

    return f32x16(), codegen


@intrinsic
def izero(typingctx):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """16 int32 zeros."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return ir.Constant(_I16V, [0] * 16)

    return i32x16(), codegen


@intrinsic
def gather(typingctx, x, idx, pos):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``x[idx[pos : pos + 16]]``: 16 float32 inputs at 16 unsigned indices."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        offsets = _indices(context, builder, sig, args, 1, 16)
        base = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptrs = _vector_gep(builder, base, _F32, offsets)
        return _gather(builder, ptrs, _F32, 16)

    return f32x16(x, idx, pos), codegen


@intrinsic
def wfma(typingctx, acc, w, wpos, step, xg):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``acc + float(w[wpos + 4·l + step] for lane l) · xg``.

    ``w`` holds 64 int8 weights per group of 4 steps, lane-major (lane l's 4 steps
    contiguous); ``step`` (0–3) must be a compile-time constant for a byte shuffle.
    """
    if not isinstance(step, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        acc_v, w_ary, wpos_v, _, xg_v = args
        ptr = _ptr(
            context, builder, sig.args[1], w_ary, wpos_v, sig.args[2], ir.VectorType(_I8, 64)
        )
        block = builder.load(ptr, align=1)
        s = step.literal_value
        bytes16 = _shuffle(builder, block, block, [4 * lane + s for lane in range(16)])
        weights = builder.sitofp(bytes16, _F16V)
        fnty = ir.FunctionType(_F16V, [_F16V] * 3)
        fma = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")
        return builder.call(fma, [weights, xg_v, acc_v])

    return f32x16(acc, w, wpos, step, xg), codegen


@intrinsic
def fload(typingctx, ary, pos):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``ary[pos : pos + 16]`` (float32)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _F16V)
        return builder.load(ptr, align=4)

    return f32x16(ary, pos), codegen


def _minmax(name: str):  # noqa: ANN202 - builds the lane-wise min / max intrinsics
    def op(typingctx, a, b):  # noqa: ANN001, ANN202
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fnty = ir.FunctionType(_F16V, [_F16V, _F16V])
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.v16f32")
            return builder.call(fn, args)

        return f32x16(a, b), codegen

    op.__doc__ = f"Lane-wise {name} of two vectors."
    return intrinsic(op)


def _reduce(name: str):  # noqa: ANN202 - builds the horizontal min / max intrinsics
    def op(typingctx, a):  # noqa: ANN001, ANN202
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fnty = ir.FunctionType(_F32, [_F16V])
            fn = cgutils.get_or_insert_function(
                builder.module, fnty, f"llvm.vector.reduce.{name}.v16f32"
            )
            return builder.call(fn, args)

        return types.float32(a), codegen

    op.__doc__ = f"The {name} over the 16 lanes."
    return intrinsic(op)


vmin, vmax = _minmax("minnum"), _minmax("maxnum")
hmin, hmax = _reduce("fmin"), _reduce("fmax")


@intrinsic
def fstore(typingctx, out, pos, acc):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``out[pos : pos + 16] = acc``."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _F16V)
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()

    return types.void(out, pos, acc), codegen


@intrinsic
def istore(typingctx, out, pos, acc):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``out[pos : pos + 16] = acc`` (int32)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _I16V)
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()

    return types.void(out, pos, acc), codegen


# quad: for lane l of output vector q, row r = 2q + l // 8 and batch column b = l % 8;
# its 4 bytes are the 4 steps' inputs x[step][r][b] (gathered words are row-major 8 × 8).
_PAIR = [src for r in range(8) for b in range(8) for src in (8 * r + b, 64 + 8 * r + b)]
_QUAD = [src for i in range(64) for src in (2 * i, 2 * i + 1, 128 + 2 * i, 128 + 2 * i + 1)]


@intrinsic
def quad(typingctx, x8, idx, pos, base):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """4 steps of 8 rows: uint8 inputs as 4 × 16 int32 lanes of 4 bytes (see module doc).

    ``x8`` is the (K, 8) uint8 input chunk viewed as uint64 (one word per input row);
    step s of row r reads word ``idx[pos + 16·s + r] + base``.
    """
    tup = types.UniTuple(i32x16, 4)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        x_ary, idx_ary, pos_v, base_v = args
        data = context.make_array(sig.args[0])(context, builder, x_ary).data
        b64 = context.cast(builder, base_v, sig.args[3], types.uint64)
        splat = _shuffle(
            builder,
            builder.insert_element(
                ir.Constant(ir.VectorType(_I64, 8), ir.Undefined), b64, ir.Constant(_I32, 0)
            ),
            ir.Constant(ir.VectorType(_I64, 8), ir.Undefined),
            [0] * 8,
        )
        p0 = context.cast(builder, pos_v, sig.args[2], types.uint64)
        words = []
        for s in range(4):
            p = builder.add(p0, ir.Constant(_I64, 16 * s))
            ity = context.get_data_type(sig.args[1].dtype)
            raw = context.make_array(sig.args[1])(context, builder, idx_ary).data
            iptr = builder.bitcast(
                builder.gep(raw, [p], inbounds=True), ir.VectorType(ity, 8).as_pointer()
            )
            offsets = builder.add(
                builder.zext(builder.load(iptr, align=1), ir.VectorType(_I64, 8)), splat
            )
            ptrs = _vector_gep(builder, data, _I64, offsets)
            g = _gather(builder, ptrs, _I64, 8)
            words.append(builder.bitcast(g, ir.VectorType(_I8, 64)))
        a = _shuffle(builder, words[0], words[1], _PAIR)
        b = _shuffle(builder, words[2], words[3], _PAIR)
        d = _shuffle(builder, a, b, _QUAD)
        parts = [
            builder.bitcast(_shuffle(builder, d, d, list(range(64 * q, 64 * q + 64))), _I16V)
            for q in range(4)
        ]
        return context.make_tuple(builder, tup, parts)

    return tup(x8, idx, pos, base), codegen


def _dpbusd_vnni(builder, acc, u8, s8):  # noqa: ANN001, ANN202
    fnty = ir.FunctionType(_I16V, [_I16V] * 3)
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, u8, s8])


def _dpbusd_portable(builder, acc, u8, s8):  # noqa: ANN001, ANN202
    # acc + Σ_4 u8·s8 per int32 lane, exactly, with AVX2's vpmaddwd (any x86-64 CPU with
    # AVX2, e.g. an AMD EPYC without VNNI): the even and the odd bytes widened to 16 bits
    # (u8 zero-, s8 sign-extended), then two pair sums each; every product and pair sum
    # fits (2 · 255 · 128 < 2^31), so nothing saturates, unlike vpmaddubsw.
    w32 = ir.VectorType(_I16, 32)
    a, w = builder.bitcast(u8, w32), builder.bitcast(s8, w32)
    eight = ir.Constant(w32, [8] * 32)
    a_even = builder.and_(a, ir.Constant(w32, [0xFF] * 32))
    a_odd = builder.lshr(a, eight)
    w_even = builder.ashr(builder.shl(w, eight), eight)
    w_odd = builder.ashr(w, eight)
    fnty = ir.FunctionType(ir.VectorType(_I32, 8), [ir.VectorType(_I16, 16)] * 2)
    pmadd = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.wd")
    halves = []
    for h in range(2):
        lanes = list(range(16 * h, 16 * h + 16))
        even = builder.call(
            pmadd,
            [_shuffle(builder, a_even, a_even, lanes), _shuffle(builder, w_even, w_even, lanes)],
        )
        odd = builder.call(
            pmadd, [_shuffle(builder, a_odd, a_odd, lanes), _shuffle(builder, w_odd, w_odd, lanes)]
        )
        halves.append(builder.add(even, odd))
    return builder.add(acc, _shuffle(builder, halves[0], halves[1], list(range(16))))


def _dot4(vnni: bool):  # noqa: ANN202 - builds one of the two intrinsics below
    dpbusd = _dpbusd_vnni if vnni else _dpbusd_portable

    def dot4(typingctx, accs, d, w, wpos):  # noqa: ANN001, ANN202
        tup = types.UniTuple(i32x16, 4)

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            acc_t, d_t, w_ary, wpos_v = args
            ptr = _ptr(
                context, builder, sig.args[2], w_ary, wpos_v, sig.args[3], ir.VectorType(_I32, 8)
            )
            rows = builder.load(ptr, align=1)  # 8 rows' 4 weights, one int32 each
            out = []
            for q in range(4):
                wq = _shuffle(builder, rows, rows, [2 * q + lane // 8 for lane in range(16)])
                acc = builder.extract_value(acc_t, q)
                out.append(dpbusd(builder, acc, builder.extract_value(d_t, q), wq))
            return context.make_tuple(builder, tup, out)

        return tup(accs, d, w, wpos), codegen

    how = "vpdpbusd" if vnni else "AVX2 vpmaddwd"
    dot4.__doc__ = (
        "``accs[q] + Σ_4 d[q] · w``: lane l of vector q adds row (2q + l // 8)'s 4 int8 "
        f"weights ``w[wpos + 4·row …]`` times its 4 uint8 inputs ({how})."
    )
    return intrinsic(dot4)


#: The exact int32 dot step with AVX512-VNNI (``vpdpbusd``), and without (same sums).
dot4_vnni = _dot4(True)
dot4 = _dot4(False)
