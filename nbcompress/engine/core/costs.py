"""Estimated costs of a layer: MACs from real shapes, bytes as dense / CSR / int8.

These are arithmetic estimates, not measurements, and every table labels them so.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["layer_bytes", "macs"]


def _first_tensor(x: object) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _linear(m: nn.Linear, inp: tuple, out: object) -> int:
    return _first_tensor(out).numel() * m.in_features


def _conv(m: nn.modules.conv._ConvNd, inp: tuple, out: object) -> int:
    per_output = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return _first_tensor(inp).numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)
    return _first_tensor(out).numel() * per_output


def _elementwise(m: nn.Module, inp: tuple, out: object) -> int:
    return _first_tensor(out).numel()


def _rnn(m: nn.RNNBase, inp: tuple, out: object) -> int:
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    x = _first_tensor(inp)
    steps = x.numel() // x.shape[-1]  # sequence length × batch
    dirs = 2 if m.bidirectional else 1
    total, width = 0, m.input_size
    for _ in range(m.num_layers):
        total += steps * dirs * gates * m.hidden_size * (width + m.hidden_size)
        width = m.hidden_size * dirs
    return total


def _mha(m: nn.MultiheadAttention, inp: tuple, out: object) -> int:
    q = _first_tensor(inp)
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
    """Multiply-accumulates of one call, estimated from the real input/output shapes."""
    for cls in type(module).__mro__:
        if cls in _MACS:
            try:
                return int(_MACS[cls](module, inputs, output))
            except (AttributeError, IndexError, TypeError):
                return None
    return None


def _index_bytes(cols: int) -> int:
    # Column indices are stored unsigned and as narrow as the width allows.
    return 2 if cols <= 65535 else 4


def layer_bytes(module: nn.Module, recurse: bool = False) -> dict[str, int]:
    """Estimated storage of a layer's parameters as dense fp32, as CSR fp32 and as int8.

    Matrices (2-D or more, viewed as ``rows × rest``) are stored sparse / quantized; vectors
    (biases, norms) stay fp32 in every format. CSR = values (4 B) + column indices (2 B if
    the row width fits in uint16, else 4 B) + row pointers (4 B each). Int8 = 1 B per
    weight + one fp32 scale per row.
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
        csr += nnz * (4 + _index_bytes(cols)) + (rows + 1) * 4
        int8 += p.numel() + rows * 4
    return {"dense": dense, "csr": csr, "int8": int8}
