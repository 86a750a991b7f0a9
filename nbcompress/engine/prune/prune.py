"""Unstructured and channel pruning in place, recorded in the history and undoable."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from nbcompress.engine.core.history import Transaction, transaction
from nbcompress.engine.core.layers import output_layer, select_layers, weighted_layers
from nbcompress.engine.core.validation import check_amount, check_module
from nbcompress.engine.prune.masks import CRITERIA, GRANULARITIES, global_masks, layer_mask

__all__ = [
    "apply_mask",
    "check_ratios",
    "is_masked",
    "prune_",
    "prune_ratios_",
    "remove_masks_",
    "resolve_amounts",
]

_SCOPES = ("layer", "global")


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """True if ``module.<name>`` is reparametrised by a kept pruning mask."""
    return hasattr(module, name + "_orig") and hasattr(module, name + "_mask")


@torch.no_grad()
def apply_mask(tx: Transaction, module: nn.Module, mask: torch.Tensor, *, keep_masks: bool) -> None:
    """Zero the weights of ``module`` where ``mask`` is False, saving them in ``tx`` first.

    Without ``keep_masks`` the zeros are written into the weight and the module stays a
    plain module. With it, a ``torch.nn.utils.prune`` mask is attached so that fine-tuning
    cannot revive pruned weights (their gradients are zero and the mask is re-applied on
    every forward).
    """
    tx.save(module)
    if is_masked(module):
        # Already masked for fine-tuning: tighten the kept mask, keep the regime.
        tx.save_tensor(module.weight_mask)
        tx.save_tensor(module.weight_orig, pin=True)
        module.weight_mask.mul_(mask.to(module.weight_mask.dtype))
        module.weight_orig.mul_(mask)
        module.weight = module.weight_orig * module.weight_mask
        return
    if keep_masks:
        tx.save_tensor(module.weight, pin=True)
        module.weight.mul_(mask)
        torch_prune.custom_from_mask(module, "weight", mask)
    else:
        tx.save_tensor(module.weight)
        module.weight.mul_(mask)


def _zero_channel_bias(tx: Transaction, module: nn.Module, mask: torch.Tensor) -> None:
    # A removed channel must output nothing, as it would after physical removal.
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        alive = mask.reshape(mask.shape[0], -1).any(1)
        tx.save_tensor(bias)
        with torch.no_grad():
            bias.mul_(alive.to(bias.dtype))


def resolve_amounts(
    amount: float | Mapping[str, float], selected: dict[str, nn.Module]
) -> dict[str, float]:
    """Per-layer amounts: one number for every selected layer, or a name/glob → amount dict."""
    if not isinstance(amount, Mapping):
        value = check_amount(amount)
        return dict.fromkeys(selected, value)
    resolved: dict[str, float] = {}
    for pattern, value in amount.items():
        value = check_amount(value, f"amount[{pattern!r}]")
        hits = [n for n in selected if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"amount: key {pattern!r} matches no selectable layer. Available: "
                f"{', '.join(selected)}."
            )
        resolved.update(dict.fromkeys(hits, value))
    return resolved


def _check_options(method: str, scope: str, granularity: str) -> None:
    if method not in CRITERIA:
        raise ValueError(f"method: {method!r} is unknown; choose one of {sorted(CRITERIA)}.")
    if scope not in _SCOPES:
        raise ValueError(f"scope: {scope!r} is unknown; choose one of {_SCOPES}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: {granularity!r} is unknown; choose one of {GRANULARITIES}.")


def prune_(
    model: nn.Module,
    amount: float | Mapping[str, float],
    *,
    method: str = "l1",
    scope: str = "layer",
    layers: str | Sequence[str] | None = None,
    types: Iterable[str | type] | str | type | None = None,
    granularity: str = "element",
    include_output: bool = False,
    keep_masks: bool = False,
    min_density: float = 0.05,
    seed: int = 0,
) -> nn.Module:
    """Prune ``model`` in place and record the step for :func:`~nbcompress.undo_`.

    Args:
        model: The model to prune.
        amount: Fraction of weights that are zero afterwards in each selected layer
            (``scope="layer"``) or across all of them (``scope="global"``); or a dict of
            layer name/glob → fraction for per-layer amounts (exact per-layer ratios, such
            as a suggestion's, are applied with :func:`prune_ratios_`).
        method: ``"l1"`` (smallest magnitudes) or ``"random"`` (the baseline).
        scope: ``"layer"`` — the amount applies to each layer; ``"global"`` — weights are
            ranked across layers, each keeping at least ``min_density``.
        layers: Glob pattern(s) on qualified names, e.g. ``"features.*"``.
        types: Layer types to prune (names or classes); default Linear and Conv layers.
        granularity: ``"element"`` (unstructured), ``"block"`` (4 × 1 blocks: four
            consecutive output channels / neurons at one input position are removed
            together, which the block-sparse kernels run faster, see ``sparsify_``) or
            ``"channel"`` (whole output channels / neurons are zeroed with their bias;
            physical removal is a separate step).
        include_output: Also prune the final classifier/output layer (left alone by default).
        keep_masks: Attach masks so that fine-tuning keeps pruned weights at zero.
            State-dict keys then gain ``weight_orig``/``weight_mask`` until
            :func:`remove_masks_`.
        min_density: Global scope only — minimum fraction of weights every layer keeps.
        seed: Seed of the random criterion.

    Returns:
        The model, pruned in place.

    Raises:
        TypeError: ``model`` is not a module or ``amount`` is not a number.
        ValueError: ``amount`` outside [0, 1), unknown option, or a layer pattern that
            matches nothing. The model is untouched in every case.
    """
    check_module(model)
    _check_options(method, scope, granularity)
    per_layer = isinstance(amount, Mapping)
    # A dict naming the output layer literally is explicit intent, like a literal pattern.
    selected, excluded = select_layers(
        model, layers, types, include_output=include_output or per_layer
    )
    amounts = resolve_amounts(amount, selected)
    if per_layer and not include_output:
        out = output_layer(model, weighted_layers(model))
        if out in amounts and out not in amount:
            del amounts[out]
            excluded = out
        if not amounts:
            raise ValueError(f"amount: only the output layer {out!r} matched; name it literally.")
    gen = torch.Generator().manual_seed(seed)
    if scope == "global":
        if isinstance(amount, Mapping):
            raise ValueError("scope: per-layer amounts (a dict) need scope='layer'.")
        weights = {n: selected[n].weight for n in amounts}
        masks = global_masks(
            weights,
            amounts[next(iter(amounts))],
            method=method,
            granularity=granularity,
            min_density=min_density,
            gen=gen,
        )
    else:
        masks = {
            n: layer_mask(selected[n].weight, a, method=method, granularity=granularity, gen=gen)
            for n, a in amounts.items()
        }
    detail = _describe(amount, method, scope, granularity, len(masks), excluded)
    info = dict(amounts=amounts, method=method, scope=scope, granularity=granularity)
    _apply_masks(model, masks, detail, info, excluded=excluded, keep_masks=keep_masks)
    return model


def check_ratios(model: nn.Module, ratios: Any) -> dict[str, float]:
    """Validate per-layer ratios for ``model``; return the non-zero ones as floats.

    Args:
        model: The model the ratios are for.
        ratios: Layer name (exact, as in ``model.named_modules()``) → fraction in [0, 1).

    Returns:
        Layer name → ratio for every layer with a ratio above 0, in the given order.

    Raises:
        TypeError: ``ratios`` is not a dict, or a ratio is not a number.
        ValueError: A name that is not a weighted layer of ``model``, or a ratio outside [0, 1).
    """
    if not isinstance(ratios, Mapping):
        raise TypeError(
            f"ratios: expected a dict layer name → fraction such as {{'fc1': 0.5}}, got "
            f"{type(ratios).__name__}."
        )
    layers = weighted_layers(model)
    prunable = {
        n for n, m in layers.items() if isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    unknown = [n for n in ratios if n not in prunable]
    if unknown:
        raise ValueError(
            f"ratios: {', '.join(map(repr, unknown))} is not a layer with a weight in this "
            f"model; use names from model.named_modules(), e.g. {', '.join(sorted(prunable)[:5])}."
        )
    checked = {n: check_amount(r, f"ratios[{n!r}]") for n, r in ratios.items()}
    return {n: r for n, r in checked.items() if r > 0}


def prune_ratios_(
    model: nn.Module,
    ratios: Mapping[str, float],
    *,
    method: str = "l1",
    granularity: str = "element",
    keep_masks: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Prune each named layer of ``model`` in place to its own ratio, as one undoable step.

    The one way to apply per-layer ratios (a suggestion, a refinement, an explorer
    setting): names are exact layer names, the output layer included when named, and
    layers at 0 are left alone.

    Args:
        model: The model to prune (recorded in its history; inside a ``trial`` or an outer
            ``transaction`` the edit joins it).
        ratios: Layer name → fraction of its weights that are zero afterwards, in [0, 1).
        method: ``"l1"`` (smallest magnitudes) or ``"random"``.
        granularity: ``"element"``, ``"block"`` or ``"channel"``, as in :func:`prune_`.
        keep_masks: Attach masks so that fine-tuning keeps pruned weights at zero.
        seed: Seed of the random criterion.

    Returns:
        The model, pruned in place.

    Raises:
        TypeError: ``model`` is not a module, ``ratios`` is not a dict or holds a non-number.
        ValueError: An unknown layer name, a ratio outside [0, 1), an unknown option, or
            every ratio 0 (nothing to prune). The model is untouched in every case.
    """
    check_module(model)
    _check_options(method, "layer", granularity)
    amounts = check_ratios(model, ratios)
    if not amounts:
        raise ValueError("ratios: every ratio is 0, so there is nothing to prune.")
    gen = torch.Generator().manual_seed(seed)
    masks = {
        n: layer_mask(
            model.get_submodule(n).weight, a, method=method, granularity=granularity, gen=gen
        )
        for n, a in amounts.items()
    }
    detail = _describe(amounts, method, "layer", granularity, len(masks), None)
    info = dict(amounts=amounts, method=method, scope="layer", granularity=granularity)
    _apply_masks(model, masks, detail, info, excluded=None, keep_masks=keep_masks)
    return model


def _apply_masks(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    detail: str,
    info: dict[str, Any],
    *,
    excluded: str | None,
    keep_masks: bool,
) -> None:
    """Apply ``masks`` to the named layers in one transaction, recording ``info``."""
    with transaction(model, "prune", detail) as tx:
        if keep_masks:
            # Fine-tuning follows and changes every parameter: keep full copies so that
            # undo returns to the model as it was before this step, not a mix.
            for tensor in [*model.parameters(), *model.buffers()]:
                tx.save_tensor(tensor, pin=True)
        for name, mask in masks.items():
            module = model.get_submodule(name)
            apply_mask(tx, module, mask, keep_masks=keep_masks)
            if info["granularity"] == "channel":
                _zero_channel_bias(tx, module, mask)
        tx.info.update(info, excluded_output=excluded, keep_masks=keep_masks)


def _describe(amount, method, scope, granularity, n, excluded) -> str:
    what = "per-layer amounts" if isinstance(amount, Mapping) else f"{amount:.0%}"
    text = f"{what} {method} {granularity} ({scope} scope) on {n} layer(s)"
    return text + (f"; output layer {excluded} left alone" if excluded else "")


def remove_masks_(model: nn.Module) -> nn.Module:
    """Make kept pruning masks permanent: plain ``weight`` parameters again, no hooks.

    Args:
        model: A model pruned with ``keep_masks=True`` (and perhaps fine-tuned).

    Returns:
        The model; recorded in the history (undo brings the masks back).
    """
    check_module(model)
    masked = [m for m in model.modules() if is_masked(m)]
    if not masked:
        raise ValueError("model: has no kept pruning masks to remove.")
    with transaction(
        model, "remove-masks", f"made masks permanent on {len(masked)} layer(s)"
    ) as tx:
        for module in masked:
            tx.save(module)
            torch_prune.remove(module, "weight")
    return model
