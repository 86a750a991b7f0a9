"""Inference modules nbcompress builds itself: weight-only and dynamic int8, half precision.

They are ordinary ``nn.Module`` objects with their weights in buffers, so ``state_dict``,
``torch.save``, ``copy.deepcopy`` and ``pickle`` work and serialized sizes are real. A
pruned weight is serialized as a bitmask plus its nonzero values when that is smaller
(:mod:`~nbcompress.engine.quantize.bitmask`); in memory it stays dense.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.quantize.bitmask import BitmaskBuffers
from nbcompress.engine.quantize.cpu import int8_cpu

__all__ = [
    "OpaqueWeight",
    "HalfCompute",
    "HalfWeight",
    "Int8DynamicLinear",
    "Int8WeightOnly",
    "opaque_weight",
    "per_row_int8",
    "weight_kind",
]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class OpaqueWeight(torch.Tensor):
    """The shape and dtype of a weight stored in another form, without its values.

    torch's fused ``nn.TransformerEncoderLayer`` fast path (and ``nn.TransformerEncoder``'s
    nested-tensor path) reads ``linear1.weight`` and ``linear2.weight`` directly and would
    compute with them, bypassing the quantized module. A value-less (``meta``) tensor of
    this subclass keeps that attribute valid, and its ``__torch_function__`` (every Tensor
    subclass has one) makes torch decline the fast path ("some Tensor argument
    has_torch_function") and call the module, so the int8/half kernels really run. The
    values are :meth:`dequantized_weight`'s.
    """


def opaque_weight(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """An :class:`OpaqueWeight` of ``shape`` (float32, on the meta device: no memory)."""
    return torch.Tensor._make_subclass(OpaqueWeight, torch.empty(shape, device="meta"))


def weight_kind(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be rebuilt around a stored weight, or ``None`` if it can."""
    if type(layer) is nn.Linear:
        return None
    if type(layer) in _CONV:
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r} is not supported (only 'zeros')"
        return None
    return f"{type(layer).__name__} has no weight-only kernel (Linear and Conv1d/2d/3d do)"


def per_row_int8(w: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``w``, one scale per output row: ``(qweight, scale)``.

    ``scale = max|row| / top`` (1 for an all-zero row) and ``qweight = round(w / scale)``
    clamped to ``±top``, so exact zeros stay zero. Computed with one float temporary of
    ``w``'s size (the quotient, rounded and clamped in place) rather than four (``|w|``,
    the quotient, its rounding): on a 100M-parameter model that was 0.4 GiB per layer
    built, for every candidate.
    """
    rows = w.reshape(w.shape[0], -1)
    peak = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())  # max |w|, no |w| copy
    scale = torch.where(peak > 0, peak / top, torch.ones_like(peak))
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = (w / scale.reshape(shape)).round_().clamp_(-top, top).to(torch.int8)
    return q, scale


class _StoredWeight(nn.Module):
    """A Linear or Conv whose weight is stored compressed and expanded in ``forward``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.kind = "linear" if type(layer) is nn.Linear else type(layer).__name__
        self.conv_args: dict[str, Any] = {}
        if self.kind != "linear":
            self.conv_args = dict(
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
            )
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.weight_shape = tuple(layer.weight.shape)

    @property
    def weight(self) -> torch.Tensor:
        """Shape-only stand-in for the float weight (see :class:`OpaqueWeight`)."""
        return opaque_weight(self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the layer computes with."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        w = self.dequantized_weight()
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        return _CONV[getattr(nn, self.kind)](x, w, self.bias, **self.conv_args)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.kind}, weight {self.weight_shape}"


class Int8WeightOnly(BitmaskBuffers, _StoredWeight):
    """Weight-only int8 (symmetric, one scale per output channel; exact zeros stay zero).

    The weight is dequantized to float32 on every call and the float kernel runs, so
    the layer is ~4× smaller but not faster (smaller still on disk where it has zeros).
    """

    _bitmask_buffers = ("qweight",)

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        q, scale = per_row_int8(layer.weight.detach().float(), 127)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def dequantized_weight(self) -> torch.Tensor:  # noqa: D102
        shape = (-1,) + (1,) * (self.qweight.dim() - 1)
        return self.qweight.float() * self.scale.reshape(shape)


class HalfWeight(BitmaskBuffers, _StoredWeight):
    """Weight stored in float16/bfloat16 (half the bytes), computed in float32."""

    _bitmask_buffers = ("hweight",)

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__(layer)
        self.register_buffer("hweight", layer.weight.detach().to(dtype))

    def dequantized_weight(self) -> torch.Tensor:  # noqa: D102
        return self.hweight.float()


class HalfCompute(nn.Module):
    """Runs a copy of the layer in float16/bfloat16; casts inputs in and outputs back."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.inner = copy.deepcopy(layer).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Shape-only stand-in for the float weight (see :class:`OpaqueWeight`)."""
        inner = self.inner.weight  # an AttributeError for layers without one (LSTM)
        return opaque_weight(inner.shape)

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias (in the half dtype), read by torch's fused fast paths."""
        return getattr(self.inner, "bias", None)

    def forward(self, *args: Any) -> Any:  # noqa: D102
        # The first floating input's dtype (ids of an embedding table are no guide).
        floats = (a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        back = next(floats, torch.float32)
        out = self.inner(*[_cast(a, self.dtype) for a in args])
        return _cast(out, back)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class Int8DynamicLinear(BitmaskBuffers):
    """Dynamic int8 Linear on torch's fbgemm/oneDNN kernel, stored compactly.

    torch.ao's module serializes a float64 scale and an int64 zero point per output row;
    here the weight is symmetric int8 with one float32 scale per row (zero point 0, so
    exact zeros stay zero), and the kernel's packed form is rebuilt after loading.

    Activations keep their full 8 bits: where the CPU lacks VNNI
    (:func:`~nbcompress.engine.quantize.cpu.int8_cpu`) the weights get 7 bits (±63) so
    that fbgemm's int16 pair sums cannot saturate: on MiniLM here that kept the embedding
    cosine at 0.993, where torch.ao's 7-bit activations gave 0.979. (8-bit weights loaded
    on such a CPU, e.g. saved on a VNNI machine, fall back to 7-bit activations instead.)

    A pruned weight is saved as a bitmask plus its nonzeros when smaller; the packed
    kernel weight is never saved, and rebuilt on the first call after loading or copying.
    """

    _bitmask_buffers = ("qweight",)
    _transient = ("_packed",)

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        q, scale = per_row_int8(layer.weight.detach().float(), int8_cpu().weight_max)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self._packed: Any = None
        self._pack()

    def _pack(self) -> tuple[Any, bool]:
        """Pack the weight for the kernel and decide the activation range, for this CPU.

        Weights wider than 7 bits (packed where the CPU had VNNI, or loaded from such a
        model) get 7-bit activations on a CPU without VNNI, as torch.ao does: less accurate,
        but the int16 pair sums cannot saturate.
        """
        rows = self.qweight.shape[0]
        with warnings.catch_warnings():
            # Quantized tensors warn of their deprecation on creation; reported by quantize_.
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                self.qweight, self.scale.double(), torch.zeros(rows, dtype=torch.long), 0
            )
            bias = None if self.bias is None else self.bias.detach()
            packed = torch.ops.quantized.linear_prepack(qw, bias)
        wide = int(self.qweight.abs().max()) > 63 if self.qweight.numel() else False
        self._packed = (packed, wide and not int8_cpu().vnni)
        return self._packed

    @property
    def weight(self) -> torch.Tensor:
        """Shape-only stand-in for the float weight (see :class:`OpaqueWeight`)."""
        return opaque_weight(self.qweight.shape)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the kernel computes with."""
        return self.qweight.float() * self.scale[:, None]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None  # buffers changed: repack on the next call

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        packed, reduce_range = self._packed if self._packed is not None else self._pack()
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)

    def extra_repr(self) -> str:  # noqa: D102
        bits = 8 if self.qweight.numel() and int(self.qweight.abs().max()) > 63 else 7
        return f"{self.qweight.shape[1]}→{self.qweight.shape[0]}, int{bits} per-row, dynamic"
