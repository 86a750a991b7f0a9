"""The argument checks of the sparse modules (``modules.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["block_divides", "check_conv", "checked_tensor"]


def checked_tensor(name: str, x: Any) -> torch.Tensor:
    """``x`` as a float32 CPU tensor the kernels may view as numpy, or a clear error.

    Args:
        name: The module's class name, for the messages.
        x: The module's input.

    Returns:
        ``x``, detached if it requires gradients (then only under ``torch.no_grad``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input: {name} expects a torch.Tensor, got {type(x).__name__}.")
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} is inference-only and cannot compute gradients. Run it under "
            "torch.no_grad() / torch.inference_mode(), or restore the dense layer with "
            "nbcompress.undo_(model) (%undo model) before training."
        )
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(
            f"input: {name} computes in float32 on CPU; got {x.dtype} on {x.device}. "
            "Convert with x.float().cpu()."
        )
    return x.detach() if x.requires_grad else x  # only then does .numpy() need it


def block_divides(block: Any, rows: int, cols: int) -> bool:
    """Whether ``block`` is a pair of positive integers dividing ``rows`` and ``cols``."""
    try:
        r, c = (int(b) for b in block)
    except (TypeError, ValueError):
        return False
    return r > 0 and c > 0 and rows % r == 0 and cols % c == 0


def check_conv(conv: Any) -> None:
    """Raise unless ``conv`` is an ``nn.Conv2d`` that ``SparseConv2d`` can replace."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"module: expected nn.Conv2d, got {type(conv).__name__}.")
    if conv.padding == "same" or conv.padding_mode != "zeros":
        raise ValueError(
            "module: SparseConv2d supports numeric zero padding only (got padding="
            f"{conv.padding!r}, padding_mode={conv.padding_mode!r}); the layer is left dense."
        )
