"""Why each layer runs on the path it runs on, in a few words a reader can check in the table.

The ``chosen`` cell of a speedup report names the path and the measured reason, e.g.
``sparse fp32: 1.31× vs dense``, ``dense: best sparse 0.90×`` or ``dense: sparse fp32
1.03× is within noise``. Faster paths the choice may not take (sparse int8 without
``allow_int8``, torch's dense int8, which ``%quantize`` applies) are summarised once in
the notes rather than on every row.
"""

from __future__ import annotations

from nbcompress.engine.speedup.analysis import LayerResult
from nbcompress.engine.speedup.shapes import SKIP_SPARSITY
from nbcompress.engine.speedup.sparsify import MIN_SPARSITY

__all__ = ["PATHS", "choice", "passed_over", "some_of"]

#: Path key → the label of its table column.
PATHS = {
    "dense": "dense fp32",
    "csr": "sparse fp32",
    "csr_int8": "sparse int8",
    "bsr": "block-sparse",
    "torch_int8": "torch int8",
}


def _gain(res: LayerResult, path: str) -> float:
    return res.times["dense"].median / res.times[path].median


def _within(res: LayerResult, path: str) -> bool:
    return res.errors.get(path, float("inf")) <= res.tolerances.get(path, 0.0)


def choice(res: LayerResult, min_gain: float = 0.05) -> str:
    """The ``chosen`` cell: the path the layer runs on, and the measured reason in short.

    Args:
        res: The layer's measurements and decision.
        min_gain: The required relative speed-up the decision used.
    """
    if res.recorded is not None:
        return _recorded(res)
    if "dense" not in res.times:
        if res.key is None and len(res.reason) > 0 and res.sparsity < SKIP_SPARSITY:
            return f"dense: only {res.sparsity:.0%} zeros"  # far below break-even, not timed
        return "dense: not timed (see notes)"
    if res.chosen != "dense":
        return f"{PATHS[res.chosen]}: {_gain(res, res.chosen):.2f}× vs dense"
    if res.dropped:
        return "dense: model not faster end to end"
    ok = [p for p in res.allowed if _within(res, p)]
    if not ok:
        return "dense: sparse error > tolerance"
    if res.sparsity < MIN_SPARSITY:
        return f"dense: only {res.sparsity:.0%} zeros"
    best = min(ok, key=lambda p: res.times[p].median)
    gain = _gain(res, best)
    if gain < 1:
        return f"dense: best sparse {gain:.2f}×"
    if gain < 1 + min_gain:
        return f"dense: {PATHS[best]} {gain:.2f}×, within noise (±{min_gain:.0%})"
    # Faster by the median but not in 3 rounds of 4 (clear_win): a lucky stretch, not a win.
    return f"dense: {PATHS[best]} {gain:.2f}×, not in 3 of 4 rounds"


def _recorded(res: LayerResult) -> str:
    # Not timed in this run: the gain shown is the one measured when it was recorded.
    gain = 1 + res.recorded.margin  # type: ignore[union-attr]
    if res.chosen != "dense":
        return f"{PATHS[res.chosen]}: {gain:.2f}× vs dense (recorded)"
    if res.dropped:
        return "dense: model not faster end to end"
    if gain <= 0:
        return "dense: sparse error > tolerance (recorded)"
    return f"dense: best sparse {gain:.2f}× (recorded)"


def passed_over(layers: list[LayerResult]) -> list[str]:
    """Notes on faster paths the choice did not take, each once for the whole report."""
    int8_off, int8_bad, torch_faster = [], [], []
    for res in layers:
        if "dense" not in res.times:
            continue
        taken = res.times[res.chosen].median
        sparse8 = res.times.get("csr_int8")
        if sparse8 is not None and sparse8.median < taken:
            if "csr_int8" not in res.allowed:
                int8_off.append(f"{res.name} {_gain(res, 'csr_int8'):.2f}×")
            elif not _within(res, "csr_int8"):
                err, tol = res.errors["csr_int8"], res.tolerances["csr_int8"]
                int8_bad.append(f"{res.name} (error {err:.1e} > {tol:.1e})")
        torch8 = res.times.get("torch_int8")
        if torch8 is not None and torch8.median < taken:
            torch_faster.append(f"{res.name} {_gain(res, 'torch_int8'):.2f}×")
    notes = []
    if int8_off:
        notes.append(
            f"sparse int8 was fastest but not allowed on {some_of(int8_off)}: it changes "
            "results by rounding; allow it with --int8 (allow_int8=True)"
        )
    if int8_bad:
        notes.append(f"sparse int8 rejected, output outside tolerance: {some_of(int8_bad)}")
    if torch_faster:
        notes.append(
            f"torch int8 (dense, dynamic) is timed for comparison only; it was faster on "
            f"{some_of(torch_faster)}: %quantize model int8 (quantize_) applies it"
        )
    return notes


def some_of(items: list[str], shown: int = 3) -> str:
    """The first ``shown`` items, then how many there are in all."""
    more = f", … ({len(items)} layers)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
