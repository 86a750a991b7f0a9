"""Estimated costs of a layer: MACs from real shapes, bytes as dense / CSR / int8.

These are arithmetic estimates, not measurements, and every table labels them so.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from nbcompress.engine.core.validation import primary_output
from nbcompress.kernels.formats import index_dtype

__all__ = ["bitmask_size", "csr_bytes", "layer_bytes", "macs"]

# Shapes come from primary_output: the first tensor of a call's (nested) arguments or
# output, e.g. the sequence of an LSTM's ``(output, (h, c))``.


def _linear(m: nn.Linear, inp: tuple, out: object) -> int:
    return primary_output(out).numel() * m.in_features


def _conv(m: nn.modules.conv._ConvNd, inp: tuple, out: object) -> int:
    per_output = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return primary_output(inp).numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)
    return primary_output(out).numel() * per_output


def _elementwise(m: nn.Module, inp: tuple, out: object) -> int:
    return primary_output(out).numel()


def _rnn(m: nn.RNNBase, inp: tuple, out: object) -> int:
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    x = primary_output(inp)
    steps = x.numel() // x.shape[-1]  # sequence length × batch
    dirs = 2 if m.bidirectional else 1
    total, width = 0, m.input_size
    for _ in range(m.num_layers):
        total += steps * dirs * gates * m.hidden_size * (width + m.hidden_size)
        width = m.hidden_size * dirs
    return total


def _mha(m: nn.MultiheadAttention, inp: tuple, out: object) -> int:
    q = primary_output(inp)
    e = m.embed_dim
    tokens = q.numel() // e
    seq = q.shape[1] if m.batch_first else q.shape[0]
    projections = tokens * (3 * e * e + e * e)
    attention = 2 * tokens * seq * e
    return projections + attention


_MACS: dict[type, Callable[[nn.Module, tuple, object], int]] = {
    nn.Linear: _linear,
    nn.modules.conv._ConvNd: _conv,
    nn.modules.batchnorm._NormBase: _elementwise,
    nn.LayerNorm: _elementwise,
    nn.GroupNorm: _elementwise,
    nn.RNNBase: _rnn,
    nn.MultiheadAttention: _mha,
    nn.Embedding: lambda m, i, o: 0,
    nn.EmbeddingBag: lambda m, i, o: 0,
}


def macs(module: nn.Module, inputs: tuple, output: object) -> int | None:
    """Multiply-accumulates of one call, estimated from the real input/output shapes.

    A module that knows its own cost (an ``estimate_macs(inputs, output)`` method, such as
    a head-pruned attention layer) is asked first.
    """
    own = getattr(module, "estimate_macs", None)
    if callable(own):
        return int(own(inputs, output))
    for cls in type(module).__mro__:
        if cls in _MACS:
            try:
                return int(_MACS[cls](module, inputs, output))
            except (AttributeError, IndexError, TypeError):
                return None
    return None


def csr_bytes(rows: int, cols: int, nnz: int) -> int:
    """Bytes :func:`nbcompress.kernels.formats.pack_csr` stores for a float32 weight.

    Per nonzero a float32 value and a column index as narrow as
    :func:`~nbcompress.kernels.formats.index_dtype` makes it (2 B up to 65535 columns,
    else 4 B); per row an int64 row pointer (plus one) and a float32 scale (ones for
    float32 values: the int8 kernels share the layout).

    Args:
        rows: Output rows of the weight viewed as ``rows × cols``.
        cols: Its columns (input features, or input channels × kernel taps).
        nnz: Its nonzeros.
    """
    return nnz * (4 + index_dtype(cols).itemsize) + (rows + 1) * 8 + rows * 4


def bitmask_size(numel: int, nonzeros: int, itemsize: int = 1) -> int:
    """Bytes of the bitmask-packed form: one bit per element, then the nonzero elements."""
    return (numel + 7) // 8 + nonzeros * itemsize


def layer_bytes(module: nn.Module, recurse: bool = False) -> dict[str, int]:
    """Estimated storage of a layer's parameters as dense fp32, as CSR fp32 and as int8.

    Matrices (2-D or more, viewed as ``rows × rest``) are stored sparse / quantized; vectors
    (biases, norms) stay fp32 in every format. CSR is what the sparse modules pack
    (:func:`csr_bytes`). Int8 = 1 B per weight + one fp32 scale per row, or, when the
    weight has enough zeros, what nbcompress's int8 modules save instead: a bitmask
    (1 bit per weight) + 1 B per nonzero (``engine/quantize/bitmask.py``).
    """
    dense = csr = int8 = 0
    for p in module.parameters(recurse=recurse):
        fp32 = p.numel() * 4
        dense += fp32
        if p.dim() < 2:
            csr += fp32
            int8 += fp32
            continue
        rows = p.shape[0]
        cols = p.numel() // rows
        nnz = int(torch.count_nonzero(p.detach()))
        csr += csr_bytes(rows, cols, nnz)
        int8 += min(p.numel(), bitmask_size(p.numel(), nnz)) + rows * 4
    return {"dense": dense, "csr": csr, "int8": int8}
