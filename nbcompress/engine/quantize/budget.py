"""The end-to-end accuracy budget of ``quantize_``: per-layer choices, checked as a whole.

Each layer's backend is chosen on that layer's own error; small errors add up through a
deep model (37 int8 layers took MiniLM's embedding cosine to 0.979 on a CPU without
VNNI). So after the per-layer choice the model's output on the example input is compared
with the float model's, and while the mean cosine of the output rows (of the worst output
tensor; see :func:`~nbcompress.engine.quantize.measure.output_cosine`) is below the mode's
``min_cosine``, the quantized layer with the largest measured error gets int8 weights with
float activations instead (weight-only: 4× smaller still, ~5× more accurate here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from nbcompress.engine.core.validation import run_forward
from nbcompress.engine.quantize.backends import backends_for, quiet
from nbcompress.engine.quantize.config import WeightInt8Config
from nbcompress.engine.quantize.measure import output_cosine
from nbcompress.engine.quantize.modules import Int8WeightOnly, weight_kind
from nbcompress.engine.quantize.report import fill_row

if TYPE_CHECKING:
    from nbcompress.engine.quantize.modes import Job

__all__ = ["FALLBACK", "keep_within_budget", "output_cosine"]

#: The backend the budget falls back to (int8 weights, float activations).
FALLBACK = "nbcompress-dequant"


def _may_fall_back(job: Job) -> bool:
    return any(b.name == FALLBACK for b in backends_for(WeightInt8Config(), job.family))


def keep_within_budget(job: Job, tx: Any) -> None:
    """Move the least accurate layers to weight-only int8 until the budget holds.

    Runs inside the caller's transaction after the per-layer choice; notes what it did.
    Layers are taken in order of their measured rms error on their real input (largest
    first), one per forward pass of the example input.
    """
    budget = getattr(job.config, "min_cosine", None)
    if budget is None or job.inputs is None or job.reference is None or not job.new:
        return
    with torch.no_grad(), quiet(job.warnings):
        cosine = output_cosine(run_forward(job.model, job.inputs), job.reference)
        if cosine is None or cosine >= budget:
            return  # None: no output tensor with more than one value to take a cosine of
        before, moved = cosine, []
        order = sorted(job.errors, key=job.errors.get, reverse=True)
        order = [n for n in order if n in job.new and weight_kind(job.selected[n]) is None]
        rows = {row["layer"]: row for row in job.rows}
        for name in order if _may_fall_back(job) else []:
            if cosine >= budget:
                break
            module = Int8WeightOnly(job.selected[name])
            tx.replace(name, module)
            job.new[name] = module
            fill_row(rows[name], module, job.config, FALLBACK)
            rows[name]["time quantized"] = None  # the raced candidate's time no longer applies
            rows[name]["note"] = "int8 weights, float activations (accuracy budget)"
            moved.append(name)
            cosine = output_cosine(run_forward(job.model, job.inputs), job.reference) or 1.0
    job.notes.append(
        f"Accuracy budget: output cosine {before:.4f} on the example input was below "
        f"min_cosine {budget}; {len(moved)} layer(s) with the largest error moved to int8 "
        f"weights with float activations → {cosine:.4f}."
        + ("" if cosine >= budget else " Still below: no more accurate backend allowed here.")
    )
