"""The sparse modules' epilogue: which activations fuse, and the bias as the kernels take it.

``SparseLinear`` and ``SparseConv2d`` (``modules.py``) add their bias and apply a fused
activation (:meth:`~nbcompress.kernels.modules._SparseBase.fuse_activation_`) in the
kernels' epilogue (``_epilogue.py``): the CSR fp32 products on each thread's own rows as
they are stored, the other products in one vectorized pass over the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from nbcompress.kernels import _gomp
from nbcompress.kernels._epilogue import ACTIVATIONS, NO_BIAS, epilogue
from nbcompress.kernels.bsr import bsr_matmul
from nbcompress.kernels.csr import matmul_unchecked
from nbcompress.kernels.formats import BSRMatrix
from nbcompress.kernels.int8 import int8_matmul
from nbcompress.kernels.threads import get_threads

__all__ = [
    "activation_of",
    "bias_array",
    "finish",
    "linear_array",
    "linear_product",
    "wake_pool",
]

#: The formats of ``int8.py``'s kernels (bias and activation in their last pass).
_DYNAMIC = ("csr_int8_dynamic", "bsr_int8")


def activation_of(act: nn.Module) -> str | None:
    """The epilogue's name for ``act`` (``"relu"``, ``"gelu"``, ``"gelu_tanh"``), else None.

    Only these exact classes: a subclass may compute something else in its forward.
    """
    kind = type(act)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return None


def bias_array(module: nn.Module) -> np.ndarray:
    """``module``'s bias as a float32 array the kernels take (:data:`NO_BIAS`: none).

    The same array object on every call while the bias buffer is the same tensor (the
    parallel launches cache their words by the arrays' identities): a view of it, which
    sees in-place edits, or, for a bias that cannot be viewed so, a copy remade when
    its version changes.
    """
    tensor = module._buffers["bias"]
    if tensor is None:
        return NO_BIAS
    cached = module.__dict__.get("_bias_array")
    if cached is not None and cached[0] is tensor and cached[1] in (None, tensor._version):
        return cached[2]
    if tensor.dtype == torch.float32 and tensor.is_contiguous() and tensor.device.type == "cpu":
        array, version = tensor.detach().numpy(), None  # shares the buffer's memory
    else:
        array = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
        version = tensor._version
    module.__dict__["_bias_array"] = (tensor, version, array)
    return array


def wake_pool() -> None:
    """Wake the awake pool's parked workers now if this call's kernels may launch on it.

    Called first thing in a forward: the worker then wakes (~50–100 µs here, after a
    dense model or anything else longer than ``_pool.AWAKE_SECONDS``) while the layer's
    Python glue runs, rather than joining its kernel late.
    """
    threads = get_threads()
    if threads > 1:
        _gomp.prewake(threads)


def finish(rows: np.ndarray, bias: np.ndarray, act: int) -> None:
    """``rows[i, :] = act(rows[i, :] + bias[i])`` in place, for products without the epilogue."""
    if act or bias.size:
        epilogue(rows, bias, act)


def linear_product(module: Any, x2: torch.Tensor) -> np.ndarray:
    """``act(x2 @ W.T + b)`` for a SparseLinear ``module`` and a checked (N × in) batch.

    Returns:
        (N × out) float32, for N above 1 a transposed view of an (out × N) buffer.
    """
    return linear_array(module, x2.numpy())


def linear_array(module: Any, x2: np.ndarray) -> np.ndarray:
    """:func:`linear_product` of a float32 (N × in) array (any strides), as kernels return it.

    The one product of both the module's forward and a run of layers
    (:class:`~nbcompress.kernels.run.SparseRun`), which passes one layer's result to the
    next without a tensor between them.
    """
    mat = module.matrix()
    tensor = module._buffers["bias"]  # not module.bias: nn.Module.__getattr__ costs ~1 µs
    act = ACTIVATIONS[module.activation]
    if module.format in _DYNAMIC:  # these kernels add the bias and apply act themselves
        return int8_matmul(mat, x2, None if tensor is None else bias_array(module), act=act)
    bias = NO_BIAS if tensor is None else bias_array(module)
    if not isinstance(mat, BSRMatrix):
        return matmul_unchecked(mat, x2, bias, act)
    y = bsr_matmul(mat, x2)
    # y is (N × out), the transpose of a C-contiguous (out × N) buffer for N above 1.
    finish(y.T if y.shape[0] > 1 else y.reshape(-1, 1), bias, act)
    return y
