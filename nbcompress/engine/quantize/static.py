"""Static int8 post-training quantization without touching the user's classes.

torch's eager workflow needs ``QuantStub``/``DeQuantStub`` in the model's code. Instead,
each maximal run of quantizable children of an ``nn.Sequential`` (Conv/Linear plus
BatchNorm, ReLU, pooling, Flatten, Dropout) becomes one :class:`StaticRegion` —
``QuantStub → fused copies → DeQuantStub`` — in the place of the run's first child, and
the rest of the run becomes ``nn.Identity``. Layers whose parent has its own ``forward``
get a region of their own. The originals are copied, never edited, so undo restores
them bit-exactly. A pruned layer's int8 weight is saved as a bitmask plus its nonzeros
where that is smaller (:mod:`~nbcompress.engine.quantize.bitmask`), in the state dict and
in pickles; in memory torch's packed weight is as dense as ever.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.memory import twin
from nbcompress.engine.core.validation import call_model
from nbcompress.engine.quantize.backends import quantized_engine, quiet
from nbcompress.engine.quantize.bitmask import pack_qtensors, unpack_qtensors
from nbcompress.engine.quantize.config import StaticInt8Config
from nbcompress.engine.quantize.modules import opaque_weight

__all__ = [
    "StaticRegion",
    "batch_inputs",
    "calibration_batches",
    "plan_regions",
    "quantize_static",
]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Modules that run on quantized tensors, so a region may continue through them.
_PASS_THROUGH = (
    nn.ReLU,
    nn.ReLU6,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
_CONV_BN = {nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


class StaticRegion(nn.Sequential):
    """``QuantStub → quantized layers → DeQuantStub`` standing in for a run of layers.

    Pickling (``pickle``, ``torch.save``) works around torch's quantized convolutions,
    whose ``__setstate__`` (torch 2.14) skips ``nn.Module.__init__``: an unpickled one has
    no ``_modules`` or hook dicts and fails on ``.eval()`` or its first call. Each one is
    pickled as a recipe instead (:func:`_rebuild_conv`): its class and torch's own
    ``__getstate__`` tuple (int8 weight with its scales and zero points, bias, geometry,
    output scale and zero point), rebuilt the way torch's ``__deepcopy__`` does. Quantized
    Linear layers are pickled as their class, size and state dict (:func:`_rebuild_linear`),
    so that their int8 weight can be packed too.
    """

    #: Shape of the weight of the layer the region stands in for (first weighted layer).
    weight_shape: tuple[int, ...] | None = None
    #: Shape of that layer's bias (``None``: no bias).
    bias_shape: tuple[int, ...] | None = None

    @property
    def weight(self) -> torch.Tensor:
        """Shape-only stand-in for the replaced layer's weight (torch's fused fast paths)."""
        if self.weight_shape is None:
            raise AttributeError("weight")
        return opaque_weight(self.weight_shape)

    @property
    def bias(self) -> torch.Tensor | None:
        """Shape-only stand-in for the replaced layer's bias."""
        return None if self.bias_shape is None else opaque_weight(self.bias_shape)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        state["_modules"] = {k: _recipe(m) for k, m in state["_modules"].items()}
        return state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The state dict, with the int8 weights of pruned layers bitmask-packed."""
        state = super().state_dict(*args, **kwargs)
        if args or kwargs.get("keep_vars"):
            return state  # torch's legacy positional call, or the live tensors asked for
        prefix = kwargs.get("prefix", "")
        for key in [k for k in state if k.startswith(prefix)]:
            state[key] = pack_qtensors(state[key])
        return state

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *rest: Any) -> None:
        # Runs before the layers load theirs: they find their weights unpacked.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[key] = unpack_qtensors(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *rest)


def _is_quantized_conv(module: Any) -> bool:
    import torch.ao.nn.quantized as nnq

    return isinstance(module, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d))


def _recipe(module: Any) -> Any:
    """What pickles in place of ``module``: a recipe for torch's quantized layers."""
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    if _is_quantized_conv(module):
        return _ConvRecipe(module)
    if isinstance(module, nnq.Linear) and not isinstance(module, nnqd.Linear):
        return _LinearRecipe(module)
    return module


class _ConvRecipe:
    """Pickles a torch quantized convolution as ``_rebuild_conv(class, state)``."""

    def __init__(self, conv: nn.Module) -> None:
        self.conv = conv

    def __reduce__(self) -> tuple:
        state = pack_qtensors(self.conv.__getstate__(), pickled=True)
        return _rebuild_conv, (type(self.conv), state)


class _LinearRecipe:
    """Pickles a torch quantized Linear as ``_rebuild_linear(class, sizes, state dict)``."""

    def __init__(self, linear: nn.Module) -> None:
        self.linear = linear

    def __reduce__(self) -> tuple:
        m = self.linear
        state = m.state_dict()  # keeps its _metadata: the layout version torch loads by
        for key in state:
            state[key] = pack_qtensors(state[key], pickled=True)
        return _rebuild_linear, (type(m), m.in_features, m.out_features, m.training, state)


def _rebuild_linear(cls: type, n_in: int, n_out: int, training: bool, state: dict) -> nn.Module:
    """Rebuild a quantized Linear from its sizes and state dict (weights unpickled dense)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation, already reported
        linear = cls(n_in, n_out)
        linear.load_state_dict(state)
    return linear.train(training)


def _rebuild_conv(cls: type, state: tuple) -> nn.Module:
    """Rebuild a quantized convolution from its ``__getstate__`` tuple (as deepcopy does)."""
    conv = cls.__new__(cls)
    nn.Module.__init__(conv)
    conv.__setstate__(state)  # repacks the int8 weight for this machine's engine
    return conv


@dataclass
class Region:
    """A run of sibling layers quantized together.

    Attributes:
        names: Qualified names of the run's modules, in order.
        fused: Names fused into the layer before them (e.g. a BatchNorm into its Conv).
        module: The region once built.
    """

    names: list[str]
    fused: dict[str, list[str]] = field(default_factory=dict)
    module: StaticRegion | None = None


def calibration_batches(data: Any, max_batches: int) -> list[tuple]:
    """Normalise calibration data (tensor, DataLoader or iterable) to input tuples.

    A batch that is a tuple or list (``(x, y)`` from a DataLoader) contributes its first
    element as the model input.
    """
    fix = (
        "Pass calibrate=<tensor of inputs, DataLoader or iterable of batches> (in a notebook "
        "--calibrate NAME), e.g. a few hundred training inputs."
    )
    if data is None:
        raise ValueError(f"calibrate: static mode needs calibration data. {fix}")
    if isinstance(data, torch.Tensor):
        items: Iterable[Any] = data.split(64) if data.dim() else []
    elif isinstance(data, (str, bytes, dict, nn.Module)) or not hasattr(data, "__iter__"):
        raise TypeError(f"calibrate: cannot iterate a {type(data).__name__}. {fix}")
    else:
        items = data
    batches = []
    for item in items:
        batch = batch_inputs(item, fix)
        if _empty(batch):
            raise ValueError(f"calibrate: batch {len(batches)} is empty (no examples). {fix}")
        batches.append(batch)
        if len(batches) >= max_batches:
            break
    if not batches:
        raise ValueError(f"calibrate: the calibration data is empty. {fix}")
    return batches


def batch_inputs(item: Any, fix: str = "") -> tuple:
    """The model's positional inputs for one calibration batch.

    A tensor is one input; a mapping of tensors (a tokenizer's ``BatchEncoding``) is passed
    as one positional argument, as ``model(features)`` takes it; a tuple or list
    (``(x, y)`` from a DataLoader) contributes its first element.
    """
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, torch.Tensor) or (
        isinstance(item, Mapping) and any(isinstance(v, torch.Tensor) for v in item.values())
    ):
        return (item,)
    raise TypeError(
        f"calibrate: a batch is a {type(item).__name__}, not a tensor or a mapping of "
        f"tensors. {fix}".rstrip()
    )


def _empty(batch: tuple) -> bool:
    tensors = [v for x in batch for v in (x.values() if isinstance(x, Mapping) else (x,))]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.numel() == 0 for t in tensors)


def _child_name(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def plan_regions(model: nn.Module, selected: dict[str, nn.Module]) -> list[Region]:
    """Group the selected layers into regions (runs inside Sequentials, else one each)."""
    regions: list[Region] = []
    done: set[str] = set()
    for name in selected:
        if name in done:
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        if not isinstance(parent, nn.Sequential):
            regions.append(Region([name]))
            done.add(name)
            continue
        run: list[str] = []
        for child, module in parent.named_children():
            qual = _child_name(parent_name, child)
            if qual in selected or (run and type(module) in _PASS_THROUGH):
                run.append(qual)
                continue
            if run:
                regions.append(Region(run))
            run = []
        if run:
            regions.append(Region(run))
        done.update(n for r in regions for n in r.names)
    return regions


def _fusion_groups(mods: list[nn.Module]) -> list[list[int]]:
    """Index groups torch can fuse: Conv+BN(+ReLU), Conv+ReLU, Linear+ReLU."""
    groups, i = [], 0
    while i < len(mods):
        kind, nxt = type(mods[i]), [type(m) for m in mods[i + 1 : i + 3]]
        group = [i]
        if kind in _CONV_BN and nxt[:1] == [_CONV_BN[kind]]:
            group.append(i + 1)
            if nxt[1:2] == [nn.ReLU]:
                group.append(i + 2)
        elif kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) and nxt[:1] == [nn.ReLU]:
            group.append(i + 1)
        if len(group) > 1:
            groups.append(group)
        i = group[-1] + 1
    return groups


def _build(model: nn.Module, region: Region, config: StaticInt8Config) -> StaticRegion:
    from torch.ao.quantization import (
        DeQuantStub,
        QuantStub,
        fuse_modules,
        get_default_qconfig,
        prepare,
    )

    # Twins share the float tensors (no copy of the weights): fusing builds new modules,
    # preparing adds observers and hooks to the twins only, converting reads the weights.
    mods = [twin(model.get_submodule(n)).eval() for n in region.names]
    seq = StaticRegion(QuantStub(), *mods, DeQuantStub()).eval()
    first = next((m for m in mods if isinstance(m, _WEIGHTED)), None)
    if first is not None:
        seq.weight_shape = tuple(first.weight.shape)
        seq.bias_shape = None if first.bias is None else tuple(first.bias.shape)
    groups = _fusion_groups(mods) if config.fuse else []
    if groups:
        fuse_modules(seq, [[str(i + 1) for i in g] for g in groups], inplace=True)
        for g in groups:
            region.fused[region.names[g[0]]] = [region.names[i] for i in g[1:]]
    seq.qconfig = get_default_qconfig(config.engine)
    _per_tensor_where_asked(seq, config.per_channel)
    with quantized_engine(config.engine):
        prepare(seq, inplace=True)
    return seq


def _per_tensor_where_asked(seq: nn.Module, per_channel: bool | str) -> None:
    """Give Linear layers (or every layer) one weight scale per tensor, as configured."""
    from torch.ao.nn.intrinsic import LinearReLU
    from torch.ao.quantization import QConfig, default_weight_observer

    if per_channel is True:
        return
    per_tensor = QConfig(activation=seq.qconfig.activation, weight=default_weight_observer)
    if per_channel is False:
        seq.qconfig = per_tensor
        return
    for module in seq.modules():
        # A fused Linear+ReLU is converted as one module, so it carries the qconfig.
        if isinstance(module, (nn.Linear, LinearReLU)):
            module.qconfig = per_tensor


def quantize_static(
    model: nn.Module,
    tx: Any,
    selected: dict[str, nn.Module],
    batches: list[tuple],
    config: StaticInt8Config,
    seen: dict[str, int],
) -> tuple[list[Region], dict[str, nn.Module]]:
    """Swap in observed regions, calibrate, convert; return regions and layer → new module.

    Runs inside the caller's transaction, so an error anywhere rolls everything back.
    """
    from torch.ao.quantization import convert

    regions = plan_regions(model, selected)
    with quiet(seen):
        for region in regions:
            region.module = _build(model, region, config)
            tx.replace(region.names[0], region.module)
            for name in region.names[1:]:
                tx.replace(name, nn.Identity())
        with torch.no_grad():
            for batch in batches:
                call_model(model, batch)
        with quantized_engine(config.engine):
            for region in regions:
                convert(region.module, inplace=True)
    new = {}
    for region in regions:
        for i, name in enumerate(region.names):
            if name in selected:
                new[name] = region.module[i + 1]
    return regions, new
