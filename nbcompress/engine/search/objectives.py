"""What a trial can be judged on besides ``evaluate``'s metric: stored size and latency.

Both are measured on the pruned model inside the trial (before it is restored), so they
hold for the allocation exactly as it was applied:

- ``size``: bytes of every parameter, with each searched weight stored as CSR where that
  is smaller than dense (what :func:`~nbcompress.sparsify_` packs; the others stay dense
  fp32) — the figure that falls when a search prunes large layers rather than small ones.
- ``latency``: the measured end-to-end time of one call on ``example_inputs`` after the
  decision :func:`~nbcompress.sparsify_` would make (sparse kernels only where they
  measured faster and the whole model is faster; the dense time otherwise), median of
  interleaved rounds. Never a FLOP estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from nbcompress.engine.core.costs import csr_bytes
from nbcompress.engine.core.layers import prunable_weights

__all__ = ["DIRECTIONS", "MEASURED", "OBJECTIVES", "measure_extras", "stored_bytes"]

#: Everything a search may optimise, and whether larger or smaller is better.
DIRECTIONS = {
    "metric": "maximize",
    "sparsity": "maximize",
    "size": "minimize",
    "latency": "minimize",
}
OBJECTIVES = tuple(DIRECTIONS)
#: Objectives measured on the pruned model in the trial (sparsity follows from the ratios).
MEASURED = ("size", "latency")
#: Timed rounds of the latency objective (each round times dense and sparse once).
LATENCY_REPEATS = 7


def stored_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes of the model's parameters with the named layers' weights as CSR where smaller.

    Args:
        model: The (pruned) model.
        names: Layers whose prunable weights may be stored sparse (the searched ones).

    Returns:
        Dense bytes of every parameter (shared tensors once), less what CSR saves on the
        named layers' weights.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for name in names:
        for w in prunable_weights(model.get_submodule(name)).values():
            dense = w.numel() * w.element_size()
            rows = w.shape[0]
            sparse = csr_bytes(rows, w.numel() // rows, int(w.detach().count_nonzero()))
            total -= max(0, dense - sparse)
    return total


def _latency(model: nn.Module, example_inputs: Any) -> float:
    """Seconds per call as :func:`~nbcompress.sparsify_` would leave the model (median)."""
    from nbcompress.engine.speedup.sparsify import analyse

    analysis = analyse(model, example_inputs, repeats=LATENCY_REPEATS)
    timing = analysis.compressed if analysis.chosen else analysis.dense
    return float(timing.median)


def measure_extras(
    model: nn.Module, wanted: Sequence[str], names: Sequence[str], example_inputs: Any
) -> dict[str, float]:
    """The ``size``/``latency`` objectives of the model as pruned now (others ignored).

    Args:
        model: The pruned model (measurement changes nothing in it).
        wanted: Objective names; only those in :data:`MEASURED` are measured.
        names: The searched layers.
        example_inputs: A batch shaped like real input (required for ``latency``).

    Returns:
        Objective name → value (bytes; seconds).
    """
    found: dict[str, float] = {}
    if "size" in wanted:
        found["size"] = float(stored_bytes(model, names))
    if "latency" in wanted:
        found["latency"] = _latency(model, example_inputs)
    return found
