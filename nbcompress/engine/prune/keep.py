"""Kept pruning masks that leave the model an ordinary, copyable module between calls.

``torch.nn.utils.prune`` recomputes ``weight = weight_orig * weight_mask`` in a forward
pre-hook and leaves that product on the module. After a forward pass with gradients the
product is a non-leaf tensor, and ``copy.deepcopy`` (which the ``%prune`` magic and many
training loops use) refuses non-leaf tensors (issue 11 F12). A forward hook therefore puts a
detached copy of the same values in its place once the forward pass is done: the autograd
graph of that pass already holds the product, so gradients still reach ``weight_orig``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DetachMaskedWeight", "add_detach_hook", "remove_detach_hooks"]


class DetachMaskedWeight:
    """Forward hook: after a call, ``module.<name>`` is a leaf tensor with the same values.

    A plain class (not a closure) so that models with kept masks pickle and deep-copy.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Replace a computed, graph-attached ``module.<name>`` by its detached values."""
        value = module.__dict__.get(self.name)
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            module.__dict__[self.name] = value.detach()


def add_detach_hook(module: nn.Module, name: str = "weight") -> None:
    """Install :class:`DetachMaskedWeight` for ``name`` on ``module`` (once)."""
    hooks = module._forward_hooks.values()
    if not any(isinstance(h, DetachMaskedWeight) and h.name == name for h in hooks):
        module.register_forward_hook(DetachMaskedWeight(name))
    value = module.__dict__.get(name)
    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
        module.__dict__[name] = value.detach()


def remove_detach_hooks(module: nn.Module, name: str = "weight") -> None:
    """Remove the hooks :func:`add_detach_hook` installed for ``name``."""
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, DetachMaskedWeight) and hook.name == name:
            del module._forward_hooks[key]
