"""Structural copies of a module that share its tensors: measuring without copying weights.

A deep copy of a 100M-parameter model costs its full size again; a twin costs only its
module objects. Twins serve where a copy is needed only to be *run* or *read* (timing
the float model against the quantized one, building a candidate from a layer), never
to be edited in place: an in-place edit of a twin's tensor would edit the original.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping

from torch import nn

__all__ = ["twin"]


def twin(module: nn.Module, swaps: Mapping[str, nn.Module] | None = None) -> nn.Module:
    """A copy of ``module``'s structure sharing every parameter and buffer object.

    The modules (and their parameter/buffer dicts) are new, so assigning an attribute or
    swapping a submodule of the twin leaves the original alone; the tensors are the same
    objects, so the twin computes exactly what the original computes and costs none of
    its weight memory.

    Args:
        module: The module to mirror.
        swaps: Qualified name → module to install in the twin in that submodule's place.

    Returns:
        The twin.
    """
    tensors = itertools.chain(module.parameters(), module.buffers())
    memo = {id(t): t for t in tensors}
    double = copy.deepcopy(module, memo)
    for name, new in (swaps or {}).items():
        parent, _, child = name.rpartition(".")
        setattr(double.get_submodule(parent), child, new)
    return double
