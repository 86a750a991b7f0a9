"""The demo's final table: dense vs compressed accuracy, serialized size and latency.

Every figure is measured in the run that prints it: accuracy on the held-out test images,
size as the bytes ``torch.save`` writes for the state dict, latency as the median of
interleaved rounds (dense and compressed alternate, so both see the same machine load)
after warm-up, with the speed-up the median of the per-round ratios.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.report import Table, TableReport, fmt_bytes
from nbcompress.engine.quantize.report import serialized_size
from nbcompress.timing import Clock, Race, Timing, format_seconds, race

__all__ = ["NOISE", "NOISY_SPREAD", "FinalTable", "measure_final", "race_pair"]

#: A compressed model timed within this fraction of dense counts as "not slower".
NOISE = 0.05

#: A timing whose p90 exceeds this multiple of its p10 was taken on a busy machine.
NOISY_SPREAD = 3.0


@dataclass(repr=False)
class FinalTable(TableReport):
    """Dense vs compressed, measured; ``rows`` are accuracy, size and latency per batch.

    Attributes:
        accuracy: ``(dense, compressed)`` test accuracy.
        size: ``(dense, compressed)`` serialized bytes.
        latency: Batch size → ``(dense, compressed)`` timings.
        speedup: Batch size → median per-round dense / compressed time.
        test_images: Number of test images behind the accuracies.
        notes: Shown under the table.
    """

    accuracy: tuple[float, float]
    size: tuple[int, int]
    latency: dict[int, tuple[Timing, Timing]]
    speedup: dict[int, float]
    test_images: int
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy_change(self) -> float:
        """Compressed minus dense test accuracy, in points (negative: a loss)."""
        return 100 * (self.accuracy[1] - self.accuracy[0])

    @property
    def smaller(self) -> float:
        """Dense bytes / compressed bytes."""
        return self.size[0] / self.size[1]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per measured quantity (cells already formatted)."""
        (acc_d, acc_c), (size_d, size_c) = self.accuracy, self.size
        rows = [
            _row("test accuracy", f"{acc_d:.2%}", f"{acc_c:.2%}", _points(self.accuracy_change)),
            _row("size (torch.save)", fmt_bytes(size_d), fmt_bytes(size_c), _times(self.smaller)),
        ]
        for batch, (dense, compressed) in self.latency.items():
            gain = self.speedup[batch]
            rows.append(
                _row(
                    f"latency, batch {batch}",
                    format_seconds(dense.median),
                    format_seconds(compressed.median),
                    _speed(gain),
                )
            )
        return rows

    def _table(self) -> Table:
        title = "Dense vs compressed (every figure measured in this run)"
        return Table(self.rows, None, title, self.notes)


def _row(what: str, dense: str, compressed: str, change: str) -> dict[str, Any]:
    return {"": what, "dense": dense, "compressed": compressed, "change": change}


def _points(change: float) -> str:
    word = "lost" if change < 0 else "gained"
    return f"{abs(change):.1f} point{'s' if abs(change) != 1 else ''} {word}"


def _times(ratio: float) -> str:
    return f"{ratio:.2f}× smaller" if ratio >= 1 else f"{1 / ratio:.2f}× LARGER"


@torch.inference_mode()
def race_pair(
    dense: nn.Module,
    compressed: nn.Module,
    x: torch.Tensor,
    rounds: int,
    clock: Clock = time.perf_counter,
) -> Race:
    """Both models timed in interleaved rounds after warm-up (``dense`` the incumbent)."""
    candidates = {"dense": lambda: dense(x), "compressed": lambda: compressed(x)}
    return race(candidates, rounds=rounds, warmup=3, min_sample=2e-4, clock=clock)


def measure_final(
    dense: nn.Module,
    compressed: nn.Module,
    x_test: torch.Tensor,
    accuracy: tuple[float, float],
    batches: Sequence[int],
    rounds: int,
) -> FinalTable:
    """Size both models, and time them interleaved on the first ``batch`` test images."""
    size = (serialized_size(dense), serialized_size(compressed))
    latency, speedup, spread = {}, {}, []
    for batch in batches:
        times = race_pair(dense, compressed, x_test[:batch], rounds).times
        latency[batch] = dense_time, compressed_time = times["dense"], times["compressed"]
        # The ratio of the medians the table shows, so that its columns agree.
        speedup[batch] = dense_time.median / compressed_time.median
        spread.append(f"batch {batch}: dense {dense_time}, compressed {compressed_time}")
    noisy = [b for b, pair in latency.items() if any(t.p90 > NOISY_SPREAD * t.p10 for t in pair)]
    busy = (
        [
            f"Timings at batch {', '.join(map(str, noisy))} are noisy (p90 over "
            f"{NOISY_SPREAD:g}× p10): other processes took the cores mid-measurement, so these "
            "latencies and ratios are distorted; rerun on an idle machine to check them."
        ]
        if noisy
        else []
    )
    notes = [
        *busy,
        f"Accuracy on {len(x_test)} held-out test images; size = bytes torch.save writes for "
        f"the state dict; latency = median of {rounds} interleaved rounds after warm-up "
        f"({torch.get_num_threads()} torch thread(s)); p10–p90 spread:",
        *spread,
    ]
    return FinalTable(accuracy, size, latency, speedup, len(x_test), notes)


def _speed(gain: float) -> str:
    """``"2.43× faster"``, ``"0.79× (slower)"``, or within the noise band ``"1.00× (same)"``."""
    if abs(gain - 1) < NOISE:
        return f"{gain:.2f}× (same, within noise)"
    return f"{gain:.2f}× {'faster' if gain > 1 else '(slower)'}"
