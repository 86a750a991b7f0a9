"""What ``quantize_`` did, measured: sizes, latency, metric, output difference, per layer."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.report import (
    Table,
    TableReport,
    fmt_bytes,
    fmt_pct,
    fmt_ratio,
    fmt_time,
    footnote_repeats,
)
from nbcompress.engine.quantize.config import QuantConfig
from nbcompress.timing import Timing

__all__ = [
    "QuantizeReport",
    "fill_row",
    "new_row",
    "serialized_size",
    "sparsity",
    "weight_values",
]


class _ByteCounter:
    """A write-only file that keeps the count of bytes written, not the bytes."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.size += size
        return size

    def flush(self) -> None:
        """Nothing is buffered."""


@contextlib.contextmanager
def storage_quiet() -> Iterator[None]:
    """Silence torch's own "TypedStorage is deprecated" warning while we pickle or save.

    torch.ao's quantized modules pickle their packed weights through the old storage API,
    so measuring their size or checking they survive pickling would print torch's internal
    warning, with a source line, into the user's notebook as stderr.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="TypedStorage is deprecated", category=UserWarning
        )
        yield


def serialized_size(module: nn.Module | dict[str, nn.Module]) -> int:
    """Bytes of ``torch.save(module.state_dict())`` — the real size on disk.

    A dict of modules is saved as one file (so the file's fixed overhead counts once).
    Pruned int8 weights count as saved: bitmask-packed where that is smaller
    (:mod:`~nbcompress.engine.quantize.bitmask`), so a 50%-pruned int8 layer counts
    ~0.63 B per weight, not 1.
    The bytes are counted as ``torch.save`` writes them, never held: serialising a 100M-
    parameter model into memory would cost its whole size again.
    """
    out = _ByteCounter()
    with storage_quiet():
        if isinstance(module, dict):
            torch.save({k: m.state_dict() for k, m in module.items()}, out)
        else:
            torch.save(module.state_dict(), out)
    return out.size


def weight_values(module: nn.Module) -> torch.Tensor | None:
    """The (dequantized) weight a layer computes with, whatever the backend, if it has one."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight()
    if hasattr(module, "dense_weight"):  # nbcompress.kernels sparse modules
        return module.dense_weight()
    if hasattr(module, "inner"):
        module = module.inner
    w = getattr(module, "weight", None)
    if callable(w) and not isinstance(w, torch.Tensor):
        try:
            w = w()  # torch.ao quantized modules unpack their weight through a method
        except Exception:  # noqa: BLE001 - some packed modules cannot unpack
            return None
    if not isinstance(w, torch.Tensor) or w.is_meta:  # meta: a shape-only stand-in
        return None
    try:
        return w.detach().dequantize().float()
    except (RuntimeError, NotImplementedError, TypeError):
        return w.detach().float()


def sparsity(module: nn.Module) -> float | None:
    """Fraction of exact zeros in the layer's weight (``None`` if it has none readable)."""
    w = weight_values(module)
    # Counted, not averaged as floats: a float copy of a large weight is not needed.
    return None if w is None or w.numel() == 0 else int(torch.count_nonzero(w == 0)) / w.numel()


def new_row(name: str, layer: nn.Module) -> dict[str, Any]:
    """A selected layer's report row, as if kept float (:func:`fill_row` fills it in)."""
    return {
        "layer": name,
        "type": type(layer).__name__,
        "quantized as": "— (kept float)",
        "backend": None,
        "bits": None,
        "sparsity": sparsity(layer),
        "bytes before": serialized_size(layer),
        "bytes after": None,
        "smaller": None,
        "time float": None,
        "time quantized": None,
        "note": "",
    }


def fill_row(row: dict[str, Any], new: nn.Module, config: QuantConfig, backend: str) -> None:
    """Write a quantized layer's figures (mode, backend, bits, sizes) into its report row."""
    after, zeros = serialized_size(new), sparsity(new)
    row.update(
        {
            "quantized as": config.label,
            "backend": backend,
            "bits": config.bits,
            "sparsity": zeros if zeros is not None else row["sparsity"],
            "bytes after": after,
            "smaller": row["bytes before"] / after if after else None,
        }
    )


def _time(t: Timing | None) -> str:
    return fmt_time(None if t is None else t.median)


_COLUMNS = {
    "layer": None,
    "type": None,
    "quantized as": None,
    "backend": None,
    "bits": lambda b: "32" if b is None else str(b),
    "sparsity": fmt_pct,
    "bytes before": fmt_bytes,
    "bytes after": fmt_bytes,
    "smaller": fmt_ratio,
    "time float": _time,
    "time quantized": _time,
    "note": lambda s: s or "",
}


@dataclass(repr=False)
class QuantizeReport(TableReport):
    """Before/after figures of one ``quantize_`` call (all measured on this machine).

    Attributes:
        mode: The mode label, e.g. ``"int8 dynamic"``.
        rows: One dict per selected layer (quantized or kept float, with the reason).
        size_before: Serialized bytes of the whole model before.
        size_after: Serialized bytes after.
        latency_before: End-to-end time of the float model on the example input.
        latency_after: Same for the quantized model (interleaved with the float run).
        metric_before: ``evaluate(model)`` before, if an eval function was given.
        metric_after: ``evaluate(model)`` after.
        max_diff: Largest absolute output difference vs the float model on the example input.
        mean_diff: Mean absolute output difference.
        cosine: Cosine similarity to the float model's output: the mean over example rows
            of the worst output tensor (over the whole tensor when a row is one value);
            ``None`` when no output tensor has more than one value.
        layers_before: Serialized bytes of the quantized layers before (saved together).
        layers_after: Same after.
        float_share: Fraction of the model's parameters left in float (a note says which
            layers and why).
        notes: Caveats and summarised backend warnings.
    """

    mode: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    latency_before: Timing | None = None
    latency_after: Timing | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    max_diff: float | None = None
    mean_diff: float | None = None
    cosine: float | None = None
    layers_before: int = 0
    layers_after: int = 0
    float_share: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[str]:
        """Names of the layers that were quantized."""
        return [r["layer"] for r in self.rows if r.get("backend")]

    @property
    def skipped(self) -> dict[str, str]:
        """Layer name → reason it was kept in float."""
        return {r["layer"]: r["note"] for r in self.rows if not r.get("backend")}

    @property
    def speedup(self) -> float | None:
        """Measured latency before / after (> 1 is faster)."""
        if self.latency_before and self.latency_after:
            return self.latency_before.median / self.latency_after.median
        return None

    @property
    def layer_ratio(self) -> float | None:
        """Serialized bytes of the quantized layers before / after (one file each)."""
        return self.layers_before / self.layers_after if self.layers_after else None

    def _summary(self) -> list[str]:
        lines = [
            f"model size {fmt_bytes(self.size_before)} → {fmt_bytes(self.size_after)} "
            f"({fmt_ratio(self.size_before / max(self.size_after, 1))} smaller; quantized layers "
            f"{fmt_ratio(self.layer_ratio)})"
        ]
        if self.latency_before and self.latency_after:
            word = "faster" if self.speedup >= 1 else "SLOWER"
            lines.append(
                f"latency {self.latency_before} → {self.latency_after}: "
                f"{self.speedup:.2f}× ({word} than float, interleaved runs)"
            )
        if self.metric_before is not None:
            lines.append(f"metric {self.metric_before:.4g} → {self.metric_after:.4g}")
        if self.max_diff is not None:
            cosine = "n/a (one value)" if self.cosine is None else f"{self.cosine:.5f}"
            lines.append(
                f"output vs float: max |diff| {self.max_diff:.3g}, mean {self.mean_diff:.3g}, "
                f"cosine {cosine}"
            )
        return lines

    @property
    def title(self) -> str:
        """One-line heading."""
        n, k = len(self.quantized), len(self.rows)
        return f"quantize ({self.mode}): {n} of {k} selected layers quantized"

    def _table(self) -> Table:
        # A reason shared by many layers (dynamic int8 on every Conv) is shown once, counted.
        rows, repeated = footnote_repeats(self.rows, "note", notes=self.notes)
        return Table(rows, _COLUMNS, self.title, self._summary() + repeated + self.notes)
