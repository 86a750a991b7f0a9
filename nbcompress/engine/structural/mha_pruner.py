"""Torch-Pruning support for :class:`PrunedMultiheadAttention` (channel removal after head removal).

Torch-Pruning knows ``nn.MultiheadAttention`` but not the module that head removal leaves,
so a later channel removal (``remove_`` on a model whose heads were removed) would treat its
projection weights as bare parameters. :func:`mha_pruner` returns a Torch-Pruning pruning
function for it: the model width (``embed_dim``, the residual stream) is one dimension for
the query input, the key/value inputs of self-attention and the output; the heads
(``num_heads`` × ``head_dim``) are left alone. Register it through the compat fixes:
``customized_pruners[PrunedMultiheadAttention] = mha_pruner()``. Torch-Pruning is imported
only when it is called.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from nbcompress.engine.structural.mha import PrunedMultiheadAttention

__all__ = ["mha_pruner", "shrink_embed_dim"]


def _select(param: nn.Parameter, keep: torch.Tensor, dim: int) -> nn.Parameter:
    new = nn.Parameter(param.detach().index_select(dim, keep.to(param.device)))
    new.requires_grad_(param.requires_grad)
    return new


def shrink_embed_dim(layer: PrunedMultiheadAttention, idxs: list[int]) -> PrunedMultiheadAttention:
    """Remove model-width channels ``idxs`` from ``layer`` in place (heads are kept).

    Query inputs and outputs always lose them; key and value inputs too when their width is
    the model width (self-attention), as Torch-Pruning's own ``nn.MultiheadAttention``
    pruner assumes.
    """
    gone = set(idxs)
    keep = torch.tensor([i for i in range(layer.embed_dim) if i not in gone], dtype=torch.long)
    inputs = [layer.q_proj]
    if layer.kdim == layer.embed_dim:
        inputs.append(layer.k_proj)
        layer.kdim = len(keep)
    if layer.vdim == layer.embed_dim:
        inputs.append(layer.v_proj)
        layer.vdim = len(keep)
    for linear in inputs:
        linear.weight = _select(linear.weight, keep, 1)
        linear.in_features = len(keep)
    out = layer.out_proj
    out.weight = _select(out.weight, keep, 0)
    if out.bias is not None:
        out.bias = _select(out.bias, keep, 0)
    out.out_features = len(keep)
    layer.embed_dim = len(keep)
    return layer


@functools.cache
def _pruner_class() -> type:
    from torch_pruning.pruner.function import BasePruningFunc

    class PrunedMultiheadAttentionPruner(BasePruningFunc):
        """Model-width channels of a PrunedMultiheadAttention (inputs and outputs coupled)."""

        TARGET_MODULES = PrunedMultiheadAttention

        def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
            return shrink_embed_dim(layer, list(idxs))

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.embed_dim

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.embed_dim

    return PrunedMultiheadAttentionPruner


def mha_pruner() -> Any:
    """A Torch-Pruning pruning function for :class:`PrunedMultiheadAttention` layers."""
    return _pruner_class()()
