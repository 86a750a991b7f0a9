"""Comparing two runs of a model: every tensor of any output structure, never nothing.

Models return tensors, tuples (``nn.LSTM``: output and state), dicts (sentence encoders,
Hugging Face ``ModelOutput``) and dataclasses. A check of "same output within tolerance"
must look at every floating tensor in there, and must refuse to pass when it found none:
a check that compares nothing cannot fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OutputDifference", "compare_outputs", "output_tensors"]


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in ``out``, depth first, in a stable order.

    Tensors, sequences, mappings (by insertion order) and dataclasses are walked; integer
    tensors (token ids, masks a sentence encoder passes through) are not outputs to compare.
    """
    return list(_walk(out, depth=0))


def _walk(out: Any, depth: int) -> Iterator[torch.Tensor]:
    if depth > 32:  # a self-referencing structure: stop rather than recurse forever
        return
    if isinstance(out, torch.Tensor):
        if out.is_floating_point() or out.is_complex():
            yield out
    elif isinstance(out, Mapping):
        for value in out.values():
            yield from _walk(value, depth + 1)
    elif isinstance(out, (tuple, list)):
        for value in out:
            yield from _walk(value, depth + 1)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            yield from _walk(getattr(out, f.name), depth + 1)


@dataclass(frozen=True)
class OutputDifference:
    """How far one run's outputs are from a reference run's, over every tensor.

    Attributes:
        max_abs: Largest absolute difference over all elements of all tensors.
        peak: Largest absolute reference value (the scale ``max_abs`` is judged against).
        tensors: How many tensors were compared (at least one).
        elements: How many elements were compared (may be 0 for an empty batch).
    """

    max_abs: float
    peak: float
    tensors: int
    elements: int

    @property
    def relative(self) -> float:
        """``max_abs`` relative to ``peak`` (0 when both are 0)."""
        return self.max_abs / self.peak if self.peak > 0 else (0.0 if self.max_abs == 0 else 1.0)


def compare_outputs(reference: Any, output: Any, arg: str = "model") -> OutputDifference:
    """Compare two runs' outputs tensor by tensor; refuse a comparison of nothing.

    Args:
        reference: The output of the reference run (e.g. the dense or float model).
        output: The output of the run being checked, with the same structure.
        arg: The argument named in errors (the model whose output it is).

    Returns:
        The largest difference and the reference's scale over every floating tensor.

    Raises:
        ValueError: The outputs hold no floating tensor, or differ in structure or shapes.
    """
    refs, outs = output_tensors(reference), output_tensors(output)
    if not refs:
        raise ValueError(
            f"{arg}: its output holds no floating-point tensor ({type(reference).__name__}), "
            "so there is nothing to compare; return the tensors (logits, embeddings)."
        )
    shapes = [tuple(t.shape) for t in refs], [tuple(t.shape) for t in outs]
    if shapes[0] != shapes[1]:
        raise ValueError(
            f"{arg}: the two runs returned differently shaped outputs ({shapes[0][:4]} vs "
            f"{shapes[1][:4]}); they cannot be compared."
        )
    max_abs = peak = 0.0
    elements = 0
    for a, b in zip(refs, outs, strict=True):
        if a.numel():
            a64, b64 = a.detach().double(), b.detach().double()
            max_abs = max(max_abs, float((a64 - b64).abs().max()))
            peak = max(peak, float(a64.abs().max()))
        elements += a.numel()
    return OutputDifference(max_abs, peak, len(refs), elements)
