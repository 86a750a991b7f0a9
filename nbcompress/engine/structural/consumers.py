"""The layers that removal cuts the inputs of (*consumers*), and what their inputs carry.

:func:`find_consumers` lists, for a removal plan, every module whose input channels go
(and how removing them can be made exact); :func:`recorder` measures the removed channels
at its input during a forward; :func:`classify` sorts them into constant (foldable or
not) and varying. Used by :mod:`nbcompress.engine.structural.fold`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from nbcompress.engine.structural.plan import Plan

__all__ = [
    "NORMS",
    "Consumer",
    "channel_dim",
    "classify",
    "find_consumers",
    "first_tensor",
    "recorder",
]

_RTOL = 1e-5  # a channel is constant when its spread is below this share of the input's peak
_PER_CHANNEL = (_BatchNorm, _InstanceNorm, nn.PReLU)  # removing a channel touches no other
NORMS = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_SAME_IN_OUT = (*NORMS, nn.MultiheadAttention)


@dataclass
class Consumer:
    """A module whose input channels are cut, and what was seen there."""

    name: str
    module: nn.Module
    kind: str  # "fold" (Linear, unpadded conv) | "zero" (removal = zeroing) | "norm" | "other"
    idxs: list[int]
    why: str = ""  # for "zero": why a constant cannot be folded exactly
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    total: torch.Tensor | None = None
    count: int = 0  # values seen per channel
    scale: float = 0.0  # largest |value| of the whole input
    fold: dict[int, float] = field(default_factory=dict)
    stuck: list[int] = field(default_factory=list)  # constant, non-zero, not foldable
    varying: list[int] = field(default_factory=list)


def channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    """The dimension of ``x`` that holds the channels ``module`` reads (conv: 1, else last)."""
    if isinstance(module, _ConvNd):
        return x.dim() - len(module.kernel_size) - 1
    return x.dim() - 1


def _zero_padded(conv: _ConvNd) -> bool:
    """Whether the convolution reads padding zeros (its borders then see no constant)."""
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding repeats the constant itself
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(
            d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)
        )
    return any(conv.padding)


def _kind(module: nn.Module) -> tuple[str, str]:
    """How removing this module's input channels can be made exact, and why not if not."""
    if isinstance(module, (nn.Linear, _ConvNd)):
        if "bias_orig" in module._parameters or parametrize.is_parametrized(module, "bias"):
            return "zero", "its bias is masked or parametrized"
        if isinstance(module, _ConvNd) and module.transposed:
            return "zero", "it is a transposed convolution (its output borders differ)"
        if isinstance(module, _ConvNd) and _zero_padded(module):
            k = "×".join(map(str, module.kernel_size))
            return "zero", f"its {k} kernel is zero-padded (the borders see the padding zeros)"
        return "fold", ""
    if isinstance(module, NORMS) and len(module.normalized_shape) == 1:
        # A subclass with its own forward (ConvNeXt's LayerNorm2d permutes channels-first
        # input) normalises another dimension than the last: not measured, only named.
        own = type(module).forward is next(t.forward for t in NORMS if isinstance(module, t))
        return ("norm", "") if own else ("other", "")
    if isinstance(module, nn.MultiheadAttention):
        return "zero", "nbcompress does not fold into attention's input projections"
    return "other", ""


def find_consumers(model: nn.Module, plan: Plan) -> list[Consumer]:
    """Modules whose inputs are cut ("in"), and those whose inputs and outputs are one dimension.

    LayerNorm and ``nn.MultiheadAttention`` lose their input channels with their output
    channels, which plans list under ``"out"``.
    """
    cut: dict[str, set[int]] = {}
    for (name, handler), idxs in plan.items():
        module = model.get_submodule(name)
        if handler == "in" or (handler == "out" and isinstance(module, _SAME_IN_OUT)):
            cut.setdefault(name, set()).update(idxs)
    found = []
    for name, idxs in cut.items():
        module = model.get_submodule(name)
        if isinstance(module, _PER_CHANNEL) or not idxs:
            continue  # a per-channel layer: the removed channels touch no kept one
        kind, why = _kind(module)
        found.append(Consumer(name, module, kind, sorted(idxs), why))
    return found


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor a forward is called with (positional, then keyword)."""
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def recorder(c: Consumer) -> Any:
    """A forward pre-hook that accumulates min, max and sum of ``c``'s removed channels."""

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = first_tensor(args, kwargs)
        if x is None or not x.is_floating_point():
            return
        dim = channel_dim(module, x)
        idx = torch.tensor(c.idxs, device=x.device)
        sel = x.detach().index_select(dim, idx).movedim(dim, 0).reshape(len(c.idxs), -1)
        sel = sel.double()
        lo, hi, total = sel.min(1).values, sel.max(1).values, sel.sum(1)
        if c.count == 0:
            c.lo, c.hi, c.total = lo, hi, total
        else:
            c.lo, c.hi, c.total = torch.minimum(c.lo, lo), torch.maximum(c.hi, hi), c.total + total
        c.count += sel.shape[1]
        c.scale = max(c.scale, float(x.detach().abs().max()))

    return record


def _affected_outputs_removed(c: Consumer, plan: Plan, channel: int) -> bool:
    """Whether every output that input ``channel`` feeds is removed too (depthwise convs)."""
    if not isinstance(c.module, _ConvNd) or c.module.groups == 1:
        return False
    removed = plan.get((c.name, "out"), frozenset()) | plan.get((c.name, "depthwise_out"), set())
    per_in = c.module.in_channels // c.module.groups
    per_out = c.module.out_channels // c.module.groups
    group = channel // per_in
    return all(o in removed for o in range(group * per_out, (group + 1) * per_out))


def classify(c: Consumer, plan: Plan) -> None:
    """Split the consumer's removed channels into folded, stuck (constant) and varying."""
    if c.kind == "norm" or c.count == 0:
        return
    tol = _RTOL * c.scale
    spread = (c.hi - c.lo).tolist()
    means = (c.total / c.count).tolist()
    for channel, width, value in zip(c.idxs, spread, means, strict=True):
        if _affected_outputs_removed(c, plan, channel):
            continue
        constant = c.count >= 2 and width <= tol
        if not constant:
            c.varying.append(channel)
        elif c.kind == "fold" and value != 0.0:
            c.fold[channel] = value
        elif abs(value) > tol:
            c.stuck.append(channel)
