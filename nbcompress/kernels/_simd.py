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
    "thread_num",
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


@intrinsic
def thread_num(typingctx, entry):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """Call libgomp's ``omp_get_thread_num()`` at address ``entry``: this thread's number."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        call = builder.inttoptr(args[0], ir.FunctionType(_I32, []).as_pointer())
        return builder.sext(builder.call(call, []), _I64)

    return types.int64(types.int64), codegen


# The spinning pool's protocol words (``_pool.py``): sequentially consistent, so that a job
# posted (its words written, then its state) is seen whole by the worker that claims it.
@intrinsic
def swap_if(typingctx, addr, expected, value):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """Atomically set the int64 at ``addr`` to ``value`` if it is ``expected``; return the old."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = builder.inttoptr(args[0], _I64.as_pointer())
        pair = builder.cmpxchg(ptr, args[1], args[2], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return types.int64(types.int64, types.int64, types.int64), codegen


@intrinsic
def load(typingctx, addr):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """The int64 at ``addr``, read atomically (never cached in a register across a loop)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = builder.inttoptr(args[0], _I64.as_pointer())
        return builder.atomic_rmw("add", ptr, ir.Constant(_I64, 0), "seq_cst")

    return types.int64(types.int64), codegen


@intrinsic
def store(typingctx, addr, value):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """Atomically write ``value`` to the int64 at ``addr``."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        ptr = builder.inttoptr(args[0], _I64.as_pointer())
        builder.atomic_rmw("xchg", ptr, args[1], "seq_cst")
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@intrinsic
def cycles(typingctx):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """The CPU's time-stamp counter (``llvm.readcyclecounter``)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fnty = ir.FunctionType(_I64, [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@intrinsic
def call_task(typingctx, fn, data):  # noqa: ANN001, ANN201 - numba intrinsic protocol
    """Call the ``void fn(void*)`` at address ``fn`` with the address ``data``."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fnty = ir.FunctionType(ir.VoidType(), [_I8P])
        task = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(task, [builder.inttoptr(args[1], _I8P)])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen
