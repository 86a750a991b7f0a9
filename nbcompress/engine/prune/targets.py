"""What a prune step changes: one target per weight tensor, and the share it leaves alone.

A layer's prunable weights are all its weight matrices (``prunable_weights``): a Linear's
``weight``, MultiheadAttention's projections, an LSTM's gate matrices. A tensor shared by
several layers (tied weights) is one target with one mask, however many layers use it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from nbcompress.engine.core.layers import (
    MULTI_WEIGHT_TYPES,
    OPT_IN_TYPES,
    PRUNABLE_TYPES,
    prunable_weights,
    weighted_layers,
)

__all__ = [
    "Target",
    "Use",
    "check_min_density",
    "check_seed",
    "collect",
    "not_pruned",
    "split_multi",
]


@dataclass(frozen=True)
class Use:
    """One layer's use of a weight: ``owner.<leaf>`` is the tensor in layer ``layer``."""

    layer: str
    owner: nn.Module
    leaf: str


@dataclass
class Target:
    """One weight tensor to prune, with every layer that uses it."""

    name: str  # "layer" for a layer's only weight, else "layer.path"
    module: nn.Module  # the layer (e.g. the MultiheadAttention for out_proj.weight)
    amount: float
    uses: list[Use] = field(default_factory=list)

    @property
    def first(self) -> Use:
        """The use whose module and attribute the mask is computed from."""
        return self.uses[0]

    def weight(self) -> torch.Tensor:
        """The current (effective) value of the weight."""
        return getattr(self.first.owner, self.first.leaf)

    @property
    def parametrized(self) -> bool:
        """Whether the weight is computed by ``torch.nn.utils.parametrize``."""
        return parametrize.is_parametrized(self.first.owner, self.first.leaf)


def _identity(owner: nn.Module, leaf: str) -> int:
    # What really holds the values: the Parameter, or a parametrization's originals.
    if parametrize.is_parametrized(owner, leaf):
        return id(owner.parametrizations[leaf])
    orig = getattr(owner, leaf + "_orig", None)  # a kept torch.nn.utils.prune mask
    return id(orig if isinstance(orig, torch.Tensor) else getattr(owner, leaf))


def collect(model: nn.Module, amounts: dict[str, float]) -> list[Target]:
    """One :class:`Target` per distinct weight tensor of the named layers.

    Raises:
        ValueError: A named layer has no weight matrix (names the layer and the fix).
    """
    by_id: dict[int, Target] = {}
    for layer, amount in amounts.items():
        module = model.get_submodule(layer)
        paths = prunable_weights(module)
        if not paths:
            raise ValueError(
                f"types: layer {layer!r} ({type(module).__name__}) has no weight matrix to "
                "prune; leave it out with layers=... or types=..."
            )
        for path in paths:
            prefix, _, leaf = path.rpartition(".")
            owner = module.get_submodule(prefix)
            key = _identity(owner, leaf)
            if key not in by_id:
                name = layer if len(paths) == 1 else f"{layer}.{path}" if layer else path
                by_id[key] = Target(name, module, amount)
            by_id[key].uses.append(Use(layer, owner, leaf))
    return list(by_id.values())


def split_multi(
    selected: dict[str, nn.Module], *, keep_masks: bool, granularity: str, explicit: bool
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Leave out attention / recurrent layers where masks or channels do not apply to them.

    Their weights are read directly by the layer (MultiheadAttention reads
    ``out_proj.weight`` without calling ``out_proj``; an RNN reads a flat weight list), so a
    kept mask's forward hook would never run; and an output "channel" of a gate matrix is
    not a unit that can be removed on its own. Asked for explicitly (``types=``), that is an
    error; by default those layers are left out and the report says why.

    Returns:
        The layers to prune, and layer name → reason for those left out.
    """
    reason = "keep_masks" if keep_masks else "channel" if granularity == "channel" else None
    multi = [n for n, m in selected.items() if isinstance(m, MULTI_WEIGHT_TYPES)]
    if not reason or not multi:
        return selected, {}
    why = (
        "kept masks unsupported: it reads its weights directly"
        if reason == "keep_masks"
        else "no output channels in its gate matrices"
    )
    if explicit or len(multi) == len(selected):
        kinds = sorted({type(selected[n]).__name__ for n in multi})
        fix = "keep_masks=False" if reason == "keep_masks" else "granularity='element'"
        raise ValueError(
            f"{'keep_masks' if reason == 'keep_masks' else 'granularity'}: "
            f"{', '.join(kinds)} layer(s) {', '.join(map(repr, multi[:3]))} cannot be pruned "
            f"this way ({why}); use {fix} for them, or leave them out of types=/layers=."
        )
    return {n: m for n, m in selected.items() if n not in multi}, dict.fromkeys(multi, why)


def check_min_density(value: Any) -> float:
    """``min_density`` as a float in [0, 1), else one line naming it and the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"min_density: expected a fraction in [0, 1) such as 0.05 (the share of weights "
            f"every layer keeps), got {type(value).__name__} {value!r}."
        )
    try:
        number = float(value)
        shown = number
    except OverflowError:  # 10**400: outside the range as well
        number, shown = math.inf, value
    if math.isnan(number) or not 0 <= number < 1:
        raise ValueError(
            f"min_density: {shown!r} is outside [0, 1); it is the share of weights every layer "
            "keeps under global scope, e.g. 0.05 (0 lets a layer be pruned entirely)."
        )
    return number


def check_seed(value: Any) -> int:
    """``seed`` as an int in [0, 2**63), else one line naming it and the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"seed: expected a whole number such as 0 (the random criterion's seed), got "
            f"{type(value).__name__} {value!r}."
        )
    if not 0 <= int(value) < 2**63:
        raise ValueError(f"seed: {value!r} is outside [0, 2**63); pass a seed such as 0.")
    return int(value)


def _categories(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """Parameter id → (layer name, layer, parameter name) for parameters of a layer."""
    found: dict[int, tuple[str, nn.Module, str]] = {}
    for name, layer in weighted_layers(model).items():
        recurse = isinstance(layer, MULTI_WEIGHT_TYPES) or parametrize.is_parametrized(layer)
        for pname, p in layer.named_parameters(recurse=recurse):
            found.setdefault(id(p), (name, layer, pname))
    return found


def _reason(owner, p, excluded, skipped) -> str:
    if owner is None:
        return "biases/norms" if p.dim() < 2 else "other parameters"
    layer, module, pname = owner
    if p.dim() < 2 or "bias" in pname:
        return "biases/norms"
    # ``excluded`` names every output layer left alone, comma-separated (see select_layers).
    if excluded and (layer or "(the model itself)") in excluded.split(", "):
        return f"output layer {layer or '(the model itself)'} (include_output=True)"
    if layer in skipped:
        return f"{type(module).__name__} ({skipped[layer]})"
    if isinstance(module, OPT_IN_TYPES):
        return "embeddings (opt-in: types=['Embedding'])"
    if isinstance(module, (*PRUNABLE_TYPES, *MULTI_WEIGHT_TYPES)):
        return "layers not selected"
    return f"{type(module).__name__} (not a prunable type)"


def not_pruned(
    model: nn.Module, targets: list[Target], excluded: str | None, skipped: dict[str, str]
) -> tuple[str, dict[str, float]]:
    """The share of the model's parameters a step left alone, and why, as one line.

    Returns:
        ``("12% of parameters not pruned: embeddings (opt-in…) 11%, biases/norms 1%", shares)``
        (an empty text when every parameter was pruned).
    """
    pruned: set[int] = set()
    for t in targets:
        for use in t.uses:
            if parametrize.is_parametrized(use.owner, use.leaf):
                pruned.update(id(p) for p in use.owner.parametrizations[use.leaf].parameters())
            orig = getattr(use.owner, use.leaf + "_orig", None)
            pruned.add(id(orig if isinstance(orig, torch.Tensor) else t.weight()))
    owners = _categories(model)
    total, counts = 0, {}
    for p in model.parameters():
        total += p.numel()
        if id(p) not in pruned:
            why = _reason(owners.get(id(p)), p, excluded, skipped)
            counts[why] = counts.get(why, 0) + p.numel()
    shares = {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    if not shares:
        return "", shares
    parts = ", ".join(f"{k} {v:.0%}" if v >= 0.005 else f"{k} <1%" for k, v in shares.items())
    return f"{sum(shares.values()):.0%} of parameters not pruned: {parts}", shares
