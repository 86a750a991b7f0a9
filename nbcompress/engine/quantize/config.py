"""Quantization modes as small frozen configs (torchao style: dispatched by type, not by string)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MODES",
    "DynamicInt8Config",
    "HalfConfig",
    "QuantConfig",
    "StaticInt8Config",
    "WeightInt8Config",
    "resolve_mode",
]


@dataclass(frozen=True)
class QuantConfig:
    """Base of every mode config.

    Attributes:
        tolerance: Largest relative output error (max |q - f| / max |f|) a backend may show on
            a layer's real input before it is rejected as incorrect for that layer.
    """

    tolerance: float = 0.15

    @property
    def label(self) -> str:
        """Short name shown in reports."""
        raise NotImplementedError

    @property
    def bits(self) -> int:
        """Bits per stored weight value."""
        return 8


@dataclass(frozen=True)
class DynamicInt8Config(QuantConfig):
    """int8 weights, activations quantized on the fly (Linear, LSTM, GRU).

    Attributes:
        per_channel: One weight scale per output row (more accurate, 16 more bytes per row
            for torch.ao's float64 scale and int64 zero point) instead of one per tensor.
        min_cosine: Accuracy budget, checked end to end: the smallest mean cosine similarity
            of the quantized model's output rows to the float model's on the example input
            (for every floating output tensor, the worst one counting; a tensor with one
            value per example is compared across the batch).
            Below it, the layers with the largest measured error get int8 weights with
            float activations (weight-only), one at a time, until it holds; ``None``: no
            budget. Quantized activations are where int8 loses accuracy, and how much
            depends on the CPU (see :mod:`nbcompress.engine.quantize.cpu`).
    """

    per_channel: bool = True
    min_cosine: float | None = 0.995

    @property
    def label(self) -> str:  # noqa: D102
        return "int8 dynamic"


@dataclass(frozen=True)
class WeightInt8Config(QuantConfig):
    """Weight-only int8, one scale per output channel (Linear, Conv); activations stay float."""

    @property
    def label(self) -> str:  # noqa: D102
        return "int8 weight-only"


@dataclass(frozen=True)
class StaticInt8Config(QuantConfig):
    """Post-training static int8 with calibration and Conv+BN(+ReLU) fusion.

    Attributes:
        engine: torch quantized engine the weights are packed for.
        fuse: Fuse Conv+BN(+ReLU) and Linear+ReLU inside Sequential containers.
        max_batches: Calibration batches used at most.
        per_channel: ``"conv"`` (default): one weight scale per output channel for
            convolutions, whose channel ranges differ widely once BatchNorm is folded in,
            and one per tensor for Linear layers, as torch's dynamic default does; torch.ao
            stores 16 bytes (float64 scale, int64 zero point) per channel, which costs
            narrow Linear layers their 3.5× size win. ``True``: per channel everywhere;
            ``False``: per tensor everywhere.
    """

    engine: str = "x86"
    fuse: bool = True
    max_batches: int = 100
    per_channel: bool | str = "conv"

    @property
    def label(self) -> str:  # noqa: D102
        return "int8 static"


@dataclass(frozen=True)
class HalfConfig(QuantConfig):
    """float16 or bfloat16 weights (stored, or stored and computed)."""

    dtype: torch.dtype = torch.float16
    tolerance: float = 0.05

    @property
    def label(self) -> str:  # noqa: D102
        return "fp16" if self.dtype == torch.float16 else "bf16"

    @property
    def bits(self) -> int:  # noqa: D102
        return 16


#: Mode names accepted by ``quantize_(mode=...)`` and ``%quantize``.
MODES: dict[str, QuantConfig] = {
    "dynamic": DynamicInt8Config(),
    "weight": WeightInt8Config(),
    "static": StaticInt8Config(),
    "fp16": HalfConfig(dtype=torch.float16),
    "bf16": HalfConfig(dtype=torch.bfloat16),
}


def resolve_mode(mode: str | QuantConfig) -> QuantConfig:
    """Turn a mode name or config into a config; raise ``ValueError`` naming ``mode``."""
    if isinstance(mode, QuantConfig):
        return mode
    if isinstance(mode, str) and mode.lower() in MODES:
        return MODES[mode.lower()]
    raise ValueError(
        f"mode: unknown quantization mode {mode!r}; use one of {', '.join(MODES)} "
        "(or a config such as DynamicInt8Config())."
    )
