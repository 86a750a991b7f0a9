"""Measuring without holding memory: twins that share tensors, freed pages given back.

Issue 11 (F11) bounds every verb's peak extra memory by 1.5× the weights it changes.

- :func:`twin`: a deep copy of a 100M-parameter model costs its full size again; a twin
  costs only its module objects. Twins serve where a copy is needed only to be *run* or
  *read* (timing the float model against the quantized one, building a candidate from a
  layer), never to be edited in place: an in-place edit of a twin's tensor would edit
  the original.
- :func:`release_freed_memory`: ``sparsify_`` and ``quantize_`` build, check, time and
  free candidates one layer at a time. glibc keeps freed blocks below its dynamic mmap
  threshold (raised up to 32 MiB each time a larger block is freed) in its heap, where
  they stay resident; layer after layer that ratcheted the resident size up by about one
  layer's temporaries per layer (after ``sparsify_`` of 6 × Linear(4096, 4096): +449 MiB
  resident, +124 MiB once trimmed). Giving the freed pages back after each layer keeps
  the peak at one layer's temporaries.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import itertools
import sys
from collections.abc import Callable, Mapping

from torch import nn

__all__ = ["release_freed_memory", "twin"]


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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim``, or ``None`` where there is none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Give the C allocator's freed heap pages back to the operating system.

    Call between layers, after one layer's candidates are freed; never inside a timed
    region. Nothing alive is touched: only pages already freed leave the resident set.

    Returns:
        Whether the allocator could be asked (glibc); elsewhere this does nothing.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
