"""Eight-lane float32 vectors for numba kernels, as LLVM ``<8 x float>`` values.

numba has no SIMD type, and LLVM's SLP vectorizer spilled or gathered when asked to pack
64 scalar accumulators into registers. These intrinsics state the vectors outright: a
value of type :data:`f32x8` lives in one ymm register, :func:`vfma` is one fused
multiply-add with a memory operand, so a kernel can keep an output tile of 8 × 8
columns in registers while it streams the nonzeros of a row (see ``tile64`` in
``_generated_kernels.py``). Indices are element offsets into 1-D C-contiguous arrays; nothing is
bounds-checked, as in the other jitted bodies.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

__all__ = [
    "as_ptr",
    "f32x8",
    "fetch_add",
    "gomp_parallel",
    "prefetch",
    "vadd",
    "vfma",
    "vfmav",
    "vload",
    "vstore",
    "vzero",
]

_VEC = ir.VectorType(ir.FloatType(), 8)
_I32 = ir.IntType(32)


class F32x8(types.Type):
    """numba type of an eight-lane float32 vector."""

    def __init__(self) -> None:
        super().__init__(name="f32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # noqa: ANN001 - numba's data-model protocol
        super().__init__(dmm, fe_type, _VEC)


def _vec_ptr(context, builder, aryty, ary, idx):  # noqa: ANN001, ANN202 - codegen helper
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [idx], inbounds=True), _VEC.as_pointer())


def _at(context, builder, sig, args, pos):  # noqa: ANN001, ANN202 - codegen helper
    # Pointer to the vector at ary[idx] for the intrinsic arguments ary, idx at ``pos``.
    i = context.cast(builder, args[pos + 1], sig.args[pos + 1], types.uint64)
    return _vec_ptr(context, builder, sig.args[pos], args[pos], i)


def _splat(builder, value):  # noqa: ANN001, ANN202 - codegen helper
    one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), value, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)
    return builder.shuffle_vector(one, ir.Constant(_VEC, ir.Undefined), mask)


def _fma(builder, value, vec, acc):  # noqa: ANN001, ANN202 - codegen helper
    # acc + value * vec in one fused multiply-add, the float32 value broadcast to 8 lanes.
    fnty = ir.FunctionType(_VEC, [_VEC] * 3)
    fma = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v8f32")
    return builder.call(fma, [_splat(builder, value), vec, acc])


@intrinsic
def vzero(typingctx):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """A vector of zeros."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return ir.Constant(_VEC, [0.0] * 8)

    return f32x8(), codegen


@intrinsic
def vload(typingctx, ary, idx):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``ary[idx : idx + 8]`` as a vector."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.load(_at(context, builder, sig, args, 0), align=4)

    return f32x8(ary, idx), codegen


@intrinsic
def vfma(typingctx, acc, value, ary, idx):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``acc + value * ary[idx : idx + 8]`` (``value`` is cast to float32, e.g. from int8)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        v = context.cast(builder, args[1], sig.args[1], types.float32)
        x = builder.load(_at(context, builder, sig, args, 2), align=4)
        return _fma(builder, v, x, args[0])

    return f32x8(acc, value, ary, idx), codegen


@intrinsic
def vfmav(typingctx, acc, value, vec):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``acc + value * vec`` for a vector already loaded (one load, several rows)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        a, v, x = args
        return _fma(builder, context.cast(builder, v, sig.args[1], types.float32), x, a)

    return f32x8(acc, value, vec), codegen


@intrinsic
def vadd(typingctx, a, b):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``a + b``."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.fadd(args[0], args[1])

    return f32x8(a, b), codegen


@intrinsic
def vstore(typingctx, ary, idx, acc, scale):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """``ary[idx : idx + 8] = acc * scale``."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        s = context.cast(builder, args[3], sig.args[3], types.float32)
        ptr = _at(context, builder, sig, args, 0)
        builder.store(builder.fmul(args[2], _splat(builder, s)), ptr, align=4)
        return context.get_dummy_value()

    return types.void(ary, idx, acc, scale), codegen


@intrinsic
def prefetch(typingctx, ary, idx):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """Ask the CPU to bring the cache line holding ``ary[idx]`` into L2 (never faults)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        arr, i = args
        i = context.cast(builder, i, sig.args[1], types.uint64)
        data = context.make_array(sig.args[0])(context, builder, arr).data
        ptr = builder.bitcast(builder.gep(data, [i]), ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, locality 2 (keep in L2: the next block is sized for L2), data cache
        args = [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)]
        builder.call(fn, args)
        return context.get_dummy_value()

    return types.void(ary, idx), codegen


# Raw addresses, for the task functions that torch's OpenMP threads run (``_gomp.py``): a
# task reads its arrays from a block of int64 words (addresses and sizes) and takes task
# numbers from a shared counter in that block.
_I8P = ir.IntType(8).as_pointer()
_I64 = ir.IntType(64)


@intrinsic
def as_ptr(typingctx, addr):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """The int64 address ``addr`` as a ``void*`` (for ``numba.carray``)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.inttoptr(args[0], _I8P)

    return types.voidptr(types.int64), codegen


@intrinsic
def fetch_add(typingctx, addr, value):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """Atomically add ``value`` to the int64 at address ``addr``; return the old value."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = builder.inttoptr(args[0], _I64.as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "monotonic")

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def gomp_parallel(typingctx, entry, fn, data, threads):  # noqa: ANN001, ANN201
    """Call libgomp's ``GOMP_parallel(fn, data, threads, 0)`` at address ``entry``.

    ``fn`` is the address of a ``void fn(void*)``; every thread of the team runs
    ``fn(data)`` and the call returns when all have.
    """

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fnty = ir.FunctionType(ir.VoidType(), [_I8P])
        gty = ir.FunctionType(ir.VoidType(), [fnty.as_pointer(), _I8P, _I32, _I32])
        call = builder.inttoptr(args[0], gty.as_pointer())
        task = builder.inttoptr(args[1], fnty.as_pointer())
        block = builder.inttoptr(args[2], _I8P)
        builder.call(call, [task, block, builder.trunc(args[3], _I32), ir.Constant(_I32, 0)])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen
