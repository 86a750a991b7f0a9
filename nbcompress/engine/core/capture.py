"""The inputs a user's function feeds the model, seen from a forward pre-hook.

A sweep calls ``evaluate(model)``, and that function runs the model on real data: the
batches it passes are the best example input and calibration data there is, and the user
never has to name them. :func:`captured_inputs` records copies of them (an evaluate may
reuse one input buffer for every batch) in the form
:func:`~nbcompress.engine.core.validation.as_inputs` gives, up to a byte budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["captured_inputs", "input_bytes"]

#: Enough batches for calibration statistics without holding a whole dataset.
MAX_BYTES = 64 * 2**20


def input_bytes(inputs: tuple) -> int:
    """Bytes of the tensors in an input tuple (mappings' values included)."""
    flat = [v for x in inputs for v in (x.values() if isinstance(x, Mapping) else (x,))]
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def _copied(value: Any) -> Any:
    """A detached copy of the tensors in ``value`` (mappings, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_copied(v) for v in value)
    return value


@contextlib.contextmanager
def captured_inputs(model: nn.Module, max_bytes: int = MAX_BYTES) -> Iterator[list[tuple]]:
    """Record the inputs of ``model``'s top-level calls inside the block.

    Args:
        model: The model whose calls are watched (nested calls of its submodules are not).
        max_bytes: Stop recording once the recorded tensors hold this many bytes (the
            first call is always kept).

    Yields:
        A list that fills with one input tuple per call (positional arguments, or a
        single mapping of keyword arguments; tensors copied); calls mixing both are
        skipped.
    """
    seen: list[tuple] = []
    held = [0]

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if seen and held[0] >= max_bytes:
            return
        if kwargs and args:
            return  # call_model cannot replay a mix of positional and keyword arguments
        inputs = (dict(kwargs),) if kwargs else tuple(args)
        if not inputs:
            return
        inputs = tuple(_copied(x) for x in inputs)
        seen.append(inputs)
        held[0] += input_bytes(inputs)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
