"""How far a quantized run is from the float run: every floating tensor of any output.

A layer or model may return a tensor, a tuple (``nn.LSTM``: ``(output, (h, c))``), a dict
(sentence encoders) or a dataclass. Every comparison ``quantize_`` makes (a candidate's
error on its layer's input, the accuracy budget, the report's figures) goes through
:func:`~nbcompress.engine.core.outputs.compare_outputs` and
:func:`~nbcompress.engine.core.outputs.output_tensors`, so no tensor is hidden (an LSTM's
state is an output too) and a comparison of nothing is refused, never passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nbcompress.engine.core.outputs import compare_outputs, output_tensors

__all__ = ["OutputError", "check_batch", "output_cosine", "output_error", "rel_errors"]


def rel_errors(ref: Any, out: Any) -> tuple[float, float]:
    """Relative output errors ``(peak, rms)`` over every floating tensor of the outputs.

    ``peak`` is max |q - f| / max |f| (what the mode's tolerance bounds: int16 saturation
    on a CPU without VNNI shows as a few clipped outputs, peak errors up to 28% on MiniLM
    where the rms error was 10%); ``rms`` is ‖q - f‖ / ‖f‖ over all tensors together,
    which ranks the candidates since it is what moves the model's output cosine.

    Raises:
        ValueError: The outputs hold no floating tensor or differ in structure.
    """
    peak = compare_outputs(ref, out).relative
    num = den = 0.0
    for a, b in zip(output_tensors(ref), output_tensors(out), strict=True):
        a64 = a.detach().double()
        num += float((a64 - b.detach().double()).square().sum())
        den += float(a64.square().sum())
    return peak, math.sqrt(num) / max(math.sqrt(den), 1e-12)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean cosine of the example rows, or over the whole tensor when a row is one value.

    The cosine of one number is its sign: a one-column output (a regression score, a
    binary logit) is compared as one vector across the batch instead.
    """
    a, b = a.detach().double(), b.detach().double()
    if a.dim() >= 1 and a.shape[0] and a[0].numel() > 1:
        rows = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return float(torch.nn.functional.cosine_similarity(*rows).mean())
    if a.numel() > 1:
        return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))
    return None


def output_cosine(out: Any, ref: Any) -> float | None:
    """The worst output tensor's cosine similarity to the reference's (see :func:`_cosine`).

    ``None`` when no tensor has more than one value (a cosine would be a sign).
    """
    compare_outputs(ref, out)  # same structure, and something to compare
    found = [_cosine(b, a) for a, b in zip(output_tensors(out), output_tensors(ref), strict=True)]
    found = [c for c in found if c is not None]
    return min(found) if found else None


@dataclass(frozen=True)
class OutputError:
    """The report's figures: largest and mean absolute difference, worst cosine."""

    max_diff: float
    mean_diff: float
    cosine: float | None


def output_error(ref: Any, out: Any) -> OutputError:
    """Max and mean absolute difference over every element of every tensor, and cosine."""
    diff = compare_outputs(ref, out)
    total = sum(
        float((a.detach().double() - b.detach().double()).abs().sum())
        for a, b in zip(output_tensors(ref), output_tensors(out), strict=True)
    )
    return OutputError(diff.max_abs, total / max(diff.elements, 1), output_cosine(out, ref))


def check_batch(ref: Any, arg: str = "example_inputs") -> list[torch.Tensor]:
    """Detached copies of the float model's output tensors; refuse an empty batch.

    Copied because some models (sentence encoders) write their output into the input dict.

    Raises:
        ValueError: The output holds no floating tensor, or no element (a batch of 0).
    """
    if compare_outputs(ref, ref).elements == 0:
        raise ValueError(
            f"{arg}: the batch is empty (the model's output on it has no elements), so "
            "nothing can be compared or timed; pass a batch of at least one example."
        )
    return [t.detach().clone() for t in output_tensors(ref)]
