"""The epilogue of the sparse fp32 kernels: bias add and activation on rows just computed.

Why. After a product the bias add on the (out × batch) result was a separate numpy pass
(27–44 µs per layer at batch 8: numpy iterates the transposed view's short inner axis),
run serially after the parallel kernel had finished, on data already evicted by the
weight's stream; and the GELU between two layers was torch's op (under
``OMP_WAIT_POLICY=PASSIVE`` it woke torch's sleeping workers, ~125 µs each). The generated
kernels (``tools/kernel_templates.py``) now call :func:`finish_row` on each output row
right after storing it (each thread on its own rows, in L1), and :func:`finish_vector`
after a batch-1 SpMV; :func:`epilogue` is the same pass for products without it fused.

The activations are branch-free polynomials so that LLVM vectorizes the loops (numba's
``math.erf`` calls libm per element, and there is no SVML here). ``erf`` is the rational
approximation Eigen uses for float32 (``x · P(x²) / Q(x²)`` on x clamped to [-4, 4]; erf(4)
is 1 − 1.5e-8): 6.5e-8 from the exact erf in float64 arithmetic, 4.2e-7 in float32
(rounding of the polynomials). GELU of x then differs from the exact one by at most
1.2e-6 on [-6, 6], as torch's own float32 ``gelu`` (1.1e-6). ``tanh`` likewise (Eigen's
float32 rational, clamped at ±7.9: 3.3e-7 in float32).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["ACTIVATIONS", "NO_BIAS", "epilogue", "finish_block", "finish_flat", "finish_vector"]

#: Activation name → the code the kernels take (0: none).
ACTIVATIONS: dict[str | None, int] = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}
#: The bias argument of a layer without bias (a fixed array: ``_gomp`` caches by identity;
#: writable, as a read-only array would be another numba signature of every kernel).
NO_BIAS = np.zeros(0, dtype=np.float32)

# error_model="numpy": numba's default checks every division for zero, which keeps LLVM
# from vectorizing the loops (0.25 → 1.7 ns per GELU here). No "contract" or "arcp" among
# the fast-math flags: with them the vector loop and its scalar remainder rounded
# differently (fused or not, reciprocal or division), so a value depended on where its
# row's columns started, and results on two threads differed from one in the last bit.
_JIT = {
    "fastmath": {"nnan", "ninf", "nsz"},
    "cache": True,
    "nogil": True,
    "boundscheck": False,
    "error_model": "numpy",
}


@njit(inline="always", **_JIT)
def _erf(x):  # noqa: ANN001, ANN202 - numba function
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(-2.72614225801306e-10)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return x * p / q


@njit(inline="always", **_JIT)
def _tanh(x):  # noqa: ANN001, ANN202 - numba function
    x = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


@njit(inline="always", **_JIT)
def _gelu(x):  # noqa: ANN001, ANN202 - numba function
    return np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(0.7071067811865476)))


@njit(inline="always", **_JIT)
def _gelu_tanh(x):  # noqa: ANN001, ANN202 - numba function
    inner = np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + _tanh(inner))


@njit(inline="always", **_JIT)
def finish_row(o, start, stop, bi, act):  # noqa: ANN001, ANN201 - numba function
    """``o[start:stop] = act(o[start:stop] + bi)``: one output row's columns."""
    # Inlined into the functions below (compiled with this module's flags: inlined into
    # the kernels themselves the division kept its zero check there, and nothing
    # vectorized), one loop per activation (the branch outside), unsigned indices (no
    # negative-index wraparound): each loop vectorizes. As a called function per row, a
    # row of 8 columns (a batch of 8) cost ~19 ns more than its GELUs.
    lo, hi = np.uint64(start), np.uint64(stop)
    if act == 0:
        for k in range(lo, hi):
            o[k] = o[k] + bi
    elif act == 1:
        for k in range(lo, hi):
            o[k] = max(o[k] + bi, np.float32(0.0))
    elif act == 2:
        for k in range(lo, hi):
            o[k] = _gelu(o[k] + bi)
    else:
        for k in range(lo, hi):
            o[k] = _gelu_tanh(o[k] + bi)


@njit(**_JIT)
def finish_block(out, r0, r1, c0, c1, bias, act):  # noqa: ANN001, ANN201 - numba function
    """``out[i, c0:c1] = act(out[i, c0:c1] + bias[i])`` for rows ``r0:r1`` of a 2-D result.

    ``bias`` empty: none. Called once per block of rows the caller just computed.
    """
    nb = bias.shape[0]
    for i in range(r0, r1):
        finish_row(out[i], c0, c1, bias[i] if nb else np.float32(0.0), act)


@njit(**_JIT)
def finish_flat(out, r0, r1, n, c0, width, bias, act):  # noqa: ANN001, ANN201 - numba function
    """:func:`finish_block` on a flattened (rows × ``n``) result, columns ``c0`` + ``width``."""
    nb = bias.shape[0]
    for i in range(r0, r1):
        q = i * n + c0
        finish_row(out, q, q + width, bias[i] if nb else np.float32(0.0), act)


@njit(**_JIT)
def finish_vector(out, bias, act):  # noqa: ANN001, ANN201 - numba function
    """``out = act(out + bias)`` elementwise (a batch-1 product; ``bias`` empty: none)."""
    if bias.shape[0]:
        for k in range(out.shape[0]):
            out[k] = out[k] + bias[k]
    if act:
        finish_row(out, 0, out.shape[0], np.float32(0.0), act)


@njit(**_JIT)
def epilogue(out, bias, act):  # noqa: ANN001, ANN201 - numba function
    """``out[i, :] = act(out[i, :] + bias[i])`` for a C-contiguous (out × N) result."""
    finish_block(out, 0, out.shape[0], 0, out.shape[1], bias, act)
