"""Unstructured and channel pruning in place, recorded in the history and undoable."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from torch.nn.utils import prune as torch_prune

from nbcompress.engine.core.history import transaction
from nbcompress.engine.core.layers import (
    MULTI_WEIGHT_TYPES,
    PRUNABLE_TYPES,
    output_layers,
    prunable_weights,
    select_layers,
    weighted_layers,
)
from nbcompress.engine.core.validation import check_amount, check_module
from nbcompress.engine.prune.apply import apply_mask, is_masked
from nbcompress.engine.prune.keep import remove_detach_hooks
from nbcompress.engine.prune.masks import GRANULARITIES
from nbcompress.engine.prune.step import METHODS, Plan, calibration, run_step
from nbcompress.engine.prune.targets import (
    Target,
    check_min_density,
    check_seed,
    collect,
    split_multi,
)

__all__ = [
    "DEFAULT_TYPES",
    "apply_mask",
    "check_ratios",
    "is_masked",
    "prune_",
    "prune_ratios_",
    "remove_masks_",
    "resolve_amounts",
]

_SCOPES = ("layer", "global")
#: Layers ``prune_`` selects when ``types`` is not given: Linear, Conv, ConvTranspose, and
#: the weight matrices of attention and recurrent layers.
DEFAULT_TYPES = (*PRUNABLE_TYPES, *MULTI_WEIGHT_TYPES)


def resolve_amounts(
    amount: float | Mapping[str, float], selected: dict[str, nn.Module]
) -> dict[str, float]:
    """Per-layer amounts: one number for every selected layer, or a name/glob → amount dict."""
    if not isinstance(amount, Mapping):
        value = check_amount(amount)
        return dict.fromkeys(selected, value)
    resolved: dict[str, float] = {}
    for pattern, value in amount.items():
        if not isinstance(pattern, str):
            raise TypeError(
                f"amount: keys are layer names or globs (str), got {type(pattern).__name__} "
                f"{pattern!r}; write {{{str(pattern)!r}: {value!r}}}."
            )
        value = check_amount(value, f"amount[{pattern!r}]")
        hits = [n for n in selected if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"amount: key {pattern!r} matches no selectable layer. Available: "
                f"{', '.join(selected)}."
            )
        resolved.update(dict.fromkeys(hits, value))
    return resolved


def _check_options(method: str, scope: str, granularity: str, reconstruct: Any = False) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: {method!r} is unknown; choose one of {sorted(METHODS)}.")
    if not isinstance(reconstruct, bool):
        raise TypeError(f"reconstruct: expected True or False, got {reconstruct!r}.")
    if method == "wanda" and scope == "global":
        raise ValueError(
            "scope: method='wanda' compares weights within each output row, and its scores are "
            "not comparable across layers; use scope='layer' (or method='l1' for global)."
        )
    if not isinstance(scope, str) or scope not in _SCOPES:
        raise ValueError(f"scope: {scope!r} is unknown; choose one of {_SCOPES}.")
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
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
    example_inputs: Any = None,
    reconstruct: bool = False,
    remove: bool = False,
    round_to: int | None = None,
) -> nn.Module:
    """Prune ``model`` in place and record the step for :func:`~nbcompress.undo_`.

    Args:
        model: The model to prune.
        amount: Fraction of weights that are zero afterwards in each selected layer
            (``scope="layer"``) or across all of them (``scope="global"``); or a dict of
            layer name/glob → fraction for per-layer amounts (exact per-layer ratios, such
            as a suggestion's, are applied with :func:`prune_ratios_`).
        method: ``"l1"`` (smallest magnitudes), ``"random"`` (the baseline) or
            ``"wanda"`` (``|W_ij| · ‖X_j‖₂`` over ``example_inputs``, compared within each
            output row, so every row loses the same share; Sun et al., ICLR 2024; layer
            scope only). Layers whose inputs cannot be measured (attention, recurrent,
            ConvTranspose) are scored by L1 and the step's detail says so.
        scope: ``"layer"`` — the amount applies to each layer; ``"global"`` — weights are
            ranked across layers, each keeping at least ``min_density``.
        layers: Glob pattern(s) on qualified names, e.g. ``"features.*"``.
        types: Layer types to prune (names or classes); default Linear, Conv and
            ConvTranspose layers and the weight matrices of MultiheadAttention (in/out
            projections) and LSTM/GRU/RNN (gate matrices). Embeddings are opt-in.
        granularity: ``"element"`` (unstructured), ``"block"`` (4 × 1 blocks: four
            consecutive output channels / neurons at one input position are removed
            together, which the block-sparse kernels run faster, see ``sparsify_``) or
            ``"channel"`` (whole output channels / neurons are zeroed with their bias;
            physical removal is a separate step); ``"row"``: whole rows of the embedding
            tables by L2 norm, stored compactly (see
            :func:`~nbcompress.engine.prune.embedding_rows.prune_embeddings_`).
        include_output: Also prune the final classifier/output layer (left alone by default).
        keep_masks: Attach masks so that fine-tuning keeps pruned weights at zero.
            State-dict keys then gain ``weight_orig``/``weight_mask`` until
            :func:`remove_masks_`. Attention and recurrent layers cannot keep masks:
            by default they are then left out (the report says so).
        min_density: Global scope only — minimum fraction of weights every layer keeps.
        seed: Seed of the random criterion.
        example_inputs: Calibration inputs for ``method="wanda"`` and ``reconstruct``: one
            input (tensor, tuple of positional arguments, dict of tensors), a list of such
            batches, or a ``DataLoader`` (a batch that is a tuple or list, such as
            ``(x, y)``, contributes its first element); or, for Wanda without
            reconstruction, ``ActivationStats`` collected earlier. Only sums of the
            activations are kept, never the activations of all batches.
        reconstruct: After choosing each mask, re-fit the layer's kept weights by least
            squares so its output on the calibration inputs changes least (SparseGPT's
            idea; Linear, Conv1d, Conv2d). Layers are processed in forward order, each
            measured with the earlier ones already pruned and re-fitted. Layers it cannot
            handle are only masked, with a note; with channel granularity nothing is re-fitted.
        remove: With ``granularity="channel"``: physically remove the channels (and every
            dimension coupled to them) instead of zeroing them — a smaller dense model;
            ``example_inputs`` is then required. Delegates to
            :func:`~nbcompress.engine.structural.remove.remove_` (``method`` ``"l1"`` or
            ``"wanda"`` is its importance; ``amount`` is the share of each coupled group).
        round_to: With ``remove``: keep channel counts that are multiples of this (e.g. 8).

    A weight shared by several layers is pruned once (one mask). A parametrized weight
    (``torch.nn.utils.parametrize``, ``weight_norm``) is set through its parametrization,
    or refused if the parametrization cannot hold the zeros. The history step's detail
    states the share of parameters left alone and why (``info["not_pruned"]``).

    Returns:
        The model, pruned in place.

    Raises:
        TypeError: ``model`` is not a module, ``amount``/``min_density``/``seed`` is not a
            number, or ``layers``/``types`` is not a name or list of names.
        ValueError: ``amount`` or ``min_density`` outside [0, 1), an unknown option, an
            empty ``layers``/``types`` list, or a layer pattern that matches nothing. The
            model is untouched in every case.
    """
    check_module(model)
    if granularity == "row":  # whole rows of embedding tables, stored compactly
        from nbcompress.engine.prune.embedding_rows import rows_from_prune

        return rows_from_prune(model, amount, locals())
    _check_options(method, scope, granularity, reconstruct)
    if remove or round_to is not None:
        return _remove(model, amount, remove, round_to, locals())
    min_density, seed = check_min_density(min_density), check_seed(seed)
    per_layer = isinstance(amount, Mapping)
    # A dict naming the output layer literally is explicit intent, like a literal pattern.
    selected, excluded = select_layers(
        model,
        layers,
        DEFAULT_TYPES if types is None else types,
        include_output=include_output or per_layer,
    )
    selected, skipped = split_multi(
        selected, keep_masks=keep_masks, granularity=granularity, explicit=types is not None
    )
    amounts = resolve_amounts(amount, selected)
    if per_layer and not include_output:
        # Every output layer a glob reached is left alone; one named literally is intent.
        heads = [n for n in output_layers(model).names if n in amounts and n not in amount]
        for name in heads:
            del amounts[name]
        excluded = ", ".join(heads) or excluded
        if not amounts:
            raise ValueError(
                f"amount: only the output layer {excluded!r} matched; name it literally."
            )
    if scope == "global" and per_layer:
        raise ValueError("scope: per-layer amounts (a dict) need scope='layer'.")
    targets = _targets(model, amounts, keep_masks)
    what = "per-layer amounts" if per_layer else f"{amounts[next(iter(amounts))]:.0%}"
    plan = Plan(method, scope, granularity, keep_masks, min_density, seed, reconstruct)
    run_step(
        model,
        targets,
        plan,
        f"{what} {_named(plan)} ({scope} scope)",
        dict(amounts=amounts, excluded_output=excluded, skipped=skipped),
        calibration(model, targets, plan, example_inputs),
    )
    return model


def _remove(model: nn.Module, amount: Any, remove: bool, round_to: Any, opts: dict) -> nn.Module:
    """``prune_(..., granularity="channel", remove=True)``: physical removal (one step)."""
    if not remove:
        raise ValueError("round_to: applies to physical removal only; pass remove=True too.")
    refused = {
        "granularity": (opts["granularity"] != "channel", "pass granularity='channel'"),
        "method": (opts["method"] not in ("l1", "wanda"), "use method='l1' or 'wanda'"),
        "scope": (opts["scope"] != "layer", "every coupled group loses the same share"),
        "keep_masks": (opts["keep_masks"], "removed channels leave no mask to keep"),
        "reconstruct": (opts["reconstruct"], "re-fitting is not done with removal"),
        "types": (opts["types"] is not None, "removal roots are every Conv and Linear"),
    }
    for arg, (bad, fix) in refused.items():
        if bad:
            raise ValueError(
                f"{arg}: {opts[arg]!r} does not go with remove=True (whole channels are "
                f"physically removed); {fix}."
            )
    from nbcompress.engine.structural.remove import remove_

    return remove_(
        model,
        amount,
        example_inputs=opts["example_inputs"],
        importance=opts["method"],
        round_to=round_to,
        layers=opts["layers"],
        include_output=opts["include_output"],
    )


def _named(plan: Plan) -> str:
    return f"{plan.method}{' + reconstruct' if plan.reconstruct else ''} {plan.granularity}"


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
    weights = {n: prunable_weights(m) for n, m in layers.items()}
    prunable = {n for n, w in weights.items() if w}
    # A quantized replacement keeps a ``weight`` (int8, or a meta placeholder of its shape)
    # that cannot be pruned.
    frozen = [n for n in ratios if n in prunable and not all(
        w.is_floating_point() and not w.is_meta for w in weights[n].values())]  # fmt: skip
    if frozen:
        kinds = ", ".join(f"{n!r} ({type(layers[n]).__name__})" for n in frozen)
        raise ValueError(
            f"ratios: layer(s) {kinds} are quantized, with no float weights left to prune; "
            "undo the quantization first (undo_(model) / %undo model) or leave them out."
        )
    unknown = [n for n in ratios if not isinstance(n, str) or n not in prunable]
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
    example_inputs: Any = None,
    reconstruct: bool = False,
) -> nn.Module:
    """Prune each named layer of ``model`` in place to its own ratio, as one undoable step.

    The one way to apply per-layer ratios (a suggestion, a refinement, an explorer
    setting): names are exact layer names, the output layer included when named, and
    layers at 0 are left alone.

    Args:
        model: The model to prune (recorded in its history; inside a ``trial`` or an outer
            ``transaction`` the edit joins it).
        ratios: Layer name → fraction of its weights that are zero afterwards, in [0, 1).
        method: ``"l1"`` (smallest magnitudes), ``"random"`` or ``"wanda"`` (needs
            ``example_inputs``), as in :func:`prune_`.
        granularity: ``"element"``, ``"block"`` or ``"channel"``, as in :func:`prune_`.
        keep_masks: Attach masks so that fine-tuning keeps pruned weights at zero.
        seed: Seed of the random criterion.
        example_inputs: Calibration inputs (or ``ActivationStats``), as in :func:`prune_`.
        reconstruct: Re-fit kept weights by least squares, as in :func:`prune_`.

    Returns:
        The model, pruned in place.

    Raises:
        TypeError: ``model`` is not a module, ``ratios`` is not a dict or holds a non-number.
        ValueError: An unknown layer name, a ratio outside [0, 1), an unknown option, or
            every ratio 0 (nothing to prune). The model is untouched in every case.
    """
    check_module(model)
    _check_options(method, "layer", granularity, reconstruct)
    seed = check_seed(seed)
    amounts = check_ratios(model, ratios)
    if not amounts:
        raise ValueError("ratios: every ratio is 0, so there is nothing to prune.")
    named = {n: model.get_submodule(n) for n in amounts}
    split_multi(named, keep_masks=keep_masks, granularity=granularity, explicit=True)
    targets = _targets(model, amounts, keep_masks)
    plan = Plan(method, "layer", granularity, keep_masks, 0.0, seed, reconstruct)
    run_step(
        model,
        targets,
        plan,
        f"per-layer amounts {_named(plan)} (layer scope)",
        dict(amounts=amounts, excluded_output=None, skipped={}),
        calibration(model, targets, plan, example_inputs),
    )
    return model


def _targets(model: nn.Module, amounts: dict[str, float], keep_masks: bool) -> list[Target]:
    targets = collect(model, amounts)
    if keep_masks:
        bad = [t.name for t in targets if t.parametrized]
        if bad:
            raise ValueError(
                f"keep_masks: the weight of {', '.join(bad[:3])} is parametrized "
                "(torch.nn.utils.parametrize), and a kept mask cannot be attached to it; prune "
                "it with keep_masks=False, or remove the parametrization first."
            )
    return targets


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
            remove_detach_hooks(module, "weight")
    return model
