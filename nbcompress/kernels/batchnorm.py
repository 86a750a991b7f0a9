"""An eval-mode BatchNorm folded into the sparse layer before it (``SparseConv2d``).

BatchNorm in eval mode is a per-channel affine map, ``y_i = x_i · s_i + t_i`` with
``s_i = γ_i / sqrt(var_i + ε)`` and ``t_i = β_i − mean_i · s_i``; after a convolution it
folds into the convolution's output rows (weight row i times ``s_i``, bias
``b_i · s_i + t_i``), and one pass over the output goes (0.1–0.5 ms per resnet18
BatchNorm at batch 1 here).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nbcompress.kernels.formats import BSRMatrix, CSRMatrix

__all__ = ["affine_of", "scaled_rows"]


def affine_of(bn: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of an eval-mode ``nn.BatchNorm2d`` over ``channels`` (module docstring).

    Raises:
        TypeError: ``bn`` is not an ``nn.BatchNorm2d``.
        ValueError: ``bn`` is in training mode, has no running statistics or another
            number of features.
    """
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn: expected nn.BatchNorm2d, got {type(bn).__name__}.")
    if bn.training or bn.running_var is None or bn.running_mean is None:
        raise ValueError(
            "bn: only an eval-mode BatchNorm2d with running statistics folds (its output "
            "then depends on the input alone); call model.eval() first."
        )
    if bn.num_features != channels:
        raise ValueError(f"bn: has {bn.num_features} features, this layer {channels} outputs.")
    with torch.no_grad():
        scale = 1 / torch.sqrt(bn.running_var.float() + bn.eps)
        shift = -bn.running_mean.float() * scale
        if bn.affine:
            gamma = bn.weight.float()
            scale, shift = scale * gamma, shift * gamma + bn.bias.float()
    return scale, shift


def scaled_rows(mat: CSRMatrix | BSRMatrix, int8: bool, scale: np.ndarray) -> dict[str, np.ndarray]:
    """New arrays for ``mat`` with output row i times ``scale[i]``, the pattern unchanged.

    int8 values keep their integers (the per-row scales change); float32 values and
    blocks are multiplied.

    Returns:
        ``{"scale": …}`` or ``{"values": …}``: the buffer to replace.
    """
    if int8:
        return {"scale": (mat.scale * scale).astype(np.float32)}
    counts = np.diff(mat.indptr)
    if isinstance(mat, BSRMatrix):
        per_row = scale.reshape(-1, mat.block[0])[np.repeat(np.arange(counts.size), counts)]
        values = mat.data * per_row[:, :, None]
    else:
        values = mat.data * np.repeat(scale, counts)
    return {"values": np.ascontiguousarray(values, dtype=np.float32)}
