"""Per-tensor weight scales for ORT int8 Linears, where measured no less accurate than per-row.

ONNX Runtime's ``DynamicQuantizeMatMul`` runs faster with one weight scale per matrix than
with one per output row: measured here on BERT-FFN ×2 as one graph (1 thread, batch 8,
load ~1.4) 662–667 µs against 701–713 µs (batch 1: 531–541 against 540–559 µs). Per-row
scales lose less of a weight whose rows differ in range, so :func:`per_tensor_steps`
decides layer by layer on the layer's real input (the float run's, on the captured
example): a layer takes per-tensor scales only where its output's rms error against the
float layer is no larger than with per-row scales; the caller then checks the whole
graph once more (:func:`~nbcompress.engine.quantize.ort_chain.fuse_chains`). Without
VNNI both candidates have 7-bit weights (``int8_cpu().weight_max``), so the comparison
is between equals. :data:`ENV_SCALES` ``=0`` keeps per-row scales everywhere.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from nbcompress.engine.quantize.measure import rel_errors
from nbcompress.engine.quantize.ort_int8 import OrtInt8Linear, per_tensor

__all__ = ["ENV_SCALES", "graph_errors", "per_tensor_steps", "scale_errors"]

#: Environment variable keeping per-row weight scales everywhere (``0``); on by default.
ENV_SCALES = "NBCOMPRESS_ORT_PER_TENSOR"


def scale_errors(
    layer: nn.Module, row: nn.Module, tensor: nn.Module, x: torch.Tensor
) -> tuple[float, float]:
    """Rms relative output errors ``(per-row, per-tensor)`` against the float ``layer`` on ``x``.

    The one measurement the choice rests on (tests replace it to take either branch).
    """
    with torch.inference_mode():
        ref = layer(x)
        return rel_errors(ref, row(x))[1], rel_errors(ref, tensor(x))[1]


def graph_errors(ref: Any, out: Any) -> tuple[float, float]:
    """``(peak, rms)`` relative errors of a whole graph's output (tests replace it)."""
    return rel_errors(ref, out)


def per_tensor_steps(
    floats: list[nn.Module], steps: list[nn.Module], x: torch.Tensor
) -> list[nn.Module] | None:
    """``steps`` with per-tensor Linears where each measured no less accurate on its input.

    Args:
        floats: The run as float modules (Linears and activations), in order.
        steps: The same run as a chain's steps (per-row ``OrtInt8Linear`` for each Linear).
        x: The run's input; layer ``i``'s input is the float run's output before it.

    Returns:
        The new steps (unchanged ones are the same objects), or ``None`` when no layer
        changed (or :data:`ENV_SCALES` is ``0``).
    """
    if os.environ.get(ENV_SCALES, "").strip() == "0":
        return None
    out: list[nn.Module] = []
    changed = False
    for float_step, step in zip(floats, steps, strict=True):
        if _candidate(float_step, step):
            # Built outside inference mode: its buffers must stay ordinary tensors.
            tensor = OrtInt8Linear(float_step, per_tensor=True)
            row_error, tensor_error = scale_errors(float_step, step, tensor, x)
            if tensor_error <= row_error:
                step, changed = tensor, True
        out.append(step)
        with torch.inference_mode():
            x = float_step(x)
    return out if changed else None


def _candidate(float_step: Any, step: Any) -> bool:
    """A float Linear whose int8 step has per-row scales (several rows of different scale)."""
    return (
        type(float_step) is nn.Linear
        and isinstance(step, OrtInt8Linear)
        and not per_tensor(step.scale)
    )
