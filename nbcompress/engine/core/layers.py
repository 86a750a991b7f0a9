"""Which layers hold weights, which can be pruned, and selection by glob and type."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from nbcompress.engine.core.heads import OutputLayers, find_output_layers

__all__ = [
    "MULTI_WEIGHT_TYPES",
    "PRUNABLE_TYPES",
    "prunable_weights",
    "output_layer",
    "output_layers",
    "resolve_types",
    "select_layers",
    "weight_matrix_layers",
    "weighted_layers",
]

#: Layer types whose ``weight`` nbcompress prunes by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
)

#: Layers whose several weight matrices are all pruned (``prune_`` selects them by default):
#: MultiheadAttention's ``in_proj_weight`` (or q/k/v) and ``out_proj.weight``, and every
#: ``weight_ih_l*`` / ``weight_hh_l*`` (/ ``weight_hr_l*``) of LSTM, GRU and RNN.
MULTI_WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.RNNBase)

#: Layer types that may be pruned when asked for by type (e.g. ``types=["Embedding"]``).
OPT_IN_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

# Modules that own parameters of children they never call (MultiheadAttention uses
# out_proj's weight functionally), so they are reported as one row.
_ATOMIC = (nn.MultiheadAttention, nn.LSTM, nn.GRU, nn.RNN)


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Return qualified name → module for every layer that directly holds parameters.

    Children of modules that use their children's weights functionally (e.g. the
    ``out_proj`` of ``nn.MultiheadAttention``) are folded into their parent.
    """
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in skip):
            continue
        if isinstance(module, _ATOMIC):
            skip.append(name)
            found[name] = module
        elif any(True for _ in module.parameters(recurse=False)):
            found[name] = module
    return found


def prunable_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight matrix of a layer that pruning may zero, by attribute path.

    ``"weight"`` for Linear, Conv and Embedding layers (its computed value for a
    parametrized weight); MultiheadAttention's projections (``"in_proj_weight"`` or
    ``"q_proj_weight"``…, and ``"out_proj.weight"``, which the attention reads directly);
    an RNN's ``"weight_ih_l0"``, ``"weight_hh_l0"``, … Biases are never included; a norm
    layer's 1-D ``weight`` only when the layer itself is asked for (``types=``).

    Args:
        module: A layer (as listed by :func:`weighted_layers`).

    Returns:
        Attribute path → tensor; empty when the layer has no weight matrix.
    """
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        found = {n: getattr(module, n) for n in names if getattr(module, n, None) is not None}
        return {**found, "out_proj.weight": module.out_proj.weight}
    if isinstance(module, nn.RNNBase):
        return {n: getattr(module, n) for n in module._flat_weights_names if "weight" in n}
    w = getattr(module, "weight", None)
    return {"weight": w} if isinstance(w, torch.Tensor) else {}


def resolve_types(types: Iterable[str | type] | str | type | None) -> tuple[type, ...] | None:
    """Turn type names such as ``"Conv2d"`` into classes from ``torch.nn``."""
    if types is None:
        return None
    if isinstance(types, (str, type)):
        types = [types]
    if not isinstance(types, Iterable):
        raise TypeError(
            f"types: expected a layer type name or class, or a list of them such as "
            f"['Linear', 'Conv2d'], got {type(types).__name__} {types!r}."
        )
    types = list(types)
    if not types:
        raise ValueError("types: an empty list selects nothing; pass None for the default types.")
    resolved = []
    for t in types:
        if isinstance(t, type) and issubclass(t, nn.Module):
            resolved.append(t)
            continue
        cls = getattr(nn, str(t), None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(
                f"types: {t!r} is not a torch.nn layer type; use names such as "
                "'Linear', 'Conv2d' or 'Embedding'."
            )
        resolved.append(cls)
    return tuple(resolved)


def weight_matrix_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name → layer for every layer with a weight matrix (norms and bare biases left out)."""
    return {
        n: m
        for n, m in weighted_layers(model).items()
        if any(w.dim() >= 2 for w in prunable_weights(m).values())
    }


def _layer_like(model: nn.Module, weighted: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Weight layers, plus modules standing in for one (quantized, sparse replacements).

    A module with ``in_features``/``out_features`` or ``in_channels``/``out_channels`` that
    contains no weight layer of its own (a quantized or sparse Linear/Conv) is a layer too:
    the model's output may come from it once it replaced the original head.
    """
    found = dict(weighted)
    # Ancestors of weight layers (containers): a shaped module among them holds a weight layer.
    ancestors = {n.rsplit(".", i)[0] for n in weighted for i in range(1, n.count(".") + 1)}
    ancestors.update({""} if weighted else set())
    for name, module in model.named_modules():
        if name in found or not name or name in ancestors:
            continue
        parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        if parents & weighted.keys():
            continue  # a weight layer's own parts (MultiheadAttention's out_proj) are not
        shaped = all(hasattr(module, a) for a in ("in_features", "out_features")) or all(
            hasattr(module, a) for a in ("in_channels", "out_channels")
        )
        if shaped:
            found[name] = module
    return {n: m for n, m in model.named_modules() if n in found}


def output_layers(model: nn.Module, inputs: tuple | None = None) -> OutputLayers:
    """The model's output layer(s): weight layers whose output reaches the model's output.

    Found from a symbolic trace, else from a forward pass when an input is given or was
    seen by an earlier command, else guessed as the last prunable layer in registration
    order (``.guessed``); see :mod:`nbcompress.engine.core.heads`. Quantized and sparse
    replacements of a layer count as layers (they may be the head now).
    """
    weighted = weight_matrix_layers(model)
    prunable = [n for n, m in weighted.items() if isinstance(m, PRUNABLE_TYPES)]
    return find_output_layers(
        model, _layer_like(model, weighted), inputs, guess=prunable[-1] if prunable else None
    )


def output_layer(model: nn.Module, candidates: dict[str, nn.Module] | None = None) -> str | None:
    """Name of the model's (first) output layer, if it is among ``candidates``.

    See :func:`output_layers`; ``candidates`` (default every weight layer) only filters.
    """
    names = [n for n in output_layers(model).names if candidates is None or n in candidates]
    return names[0] if names else None


def select_layers(
    model: nn.Module,
    layers: str | Sequence[str] | None = None,
    types: Iterable[str | type] | str | type | None = None,
    *,
    include_output: bool = False,
) -> tuple[dict[str, nn.Module], str | None]:
    """Choose the layers an operation applies to.

    Args:
        model: The model.
        layers: Glob pattern(s) on qualified names, e.g. ``"features.*"``. ``None`` = all.
        types: Layer types (classes or names). ``None`` = Linear and Conv layers.
        include_output: Also select the final classifier/output layer, which is left
            alone by default because pruning it costs the most accuracy per weight.

    Returns:
        ``(selected, excluded_output)``: name → module, and the name(s) of the output
        layer(s) left out, comma-separated (``None`` if none was); see
        :func:`output_layers`.

    Raises:
        ValueError: A pattern matches no layer (the message lists the available names),
            or the selection ends up empty.
    """
    if layers is not None and not isinstance(layers, str):
        given = list(layers) if isinstance(layers, Iterable) else None
        if given is None or not all(isinstance(p, str) for p in given):
            raise TypeError(
                "layers: expected a glob pattern or a list of them such as ['features.*'], "
                f"got {type(layers).__name__} {layers!r}."
            )
        layers = given
        if not layers:
            raise ValueError("layers: an empty list selects nothing; pass None for every layer.")
    wanted = resolve_types(types) or PRUNABLE_TYPES
    candidates = {n: m for n, m in weighted_layers(model).items() if isinstance(m, wanted)}
    if not candidates:
        kinds = ", ".join(t.__name__ for t in wanted)
        raise ValueError(f"types: the model has no layer of type {kinds}.")
    selected = dict(candidates)
    patterns = [] if layers is None else [layers] if isinstance(layers, str) else list(layers)
    if patterns:
        selected = {}
        for pattern in patterns:
            hits = {n: m for n, m in candidates.items() if fnmatch.fnmatchcase(n, pattern)}
            if not hits:
                raise ValueError(
                    f"layers: pattern {pattern!r} matches no layer. Available: "
                    f"{_listing(candidates)}."
                )
            selected.update(hits)
    literal = {p for p in patterns if not any(c in p for c in "*?[")}
    heads = () if include_output else output_layers(model).names
    # Naming the output layer literally (no wildcard) is taken as intent.
    left = [n for n in heads if n in selected and n not in literal]
    for name in left:
        del selected[name]
    # The whole model may be its own output layer (a bare nn.Linear): its name is "".
    excluded = ", ".join(n or "(the model itself)" for n in left) or None
    if not selected:
        raise ValueError(
            "layers: the selection is empty (only the output layer "
            f"{excluded!r} matched, and it is left alone by default). Pass "
            "include_output=True (--include-output) to prune it."
        )
    return selected, excluded


def _listing(candidates: dict[str, nn.Module], limit: int = 12) -> str:
    # Many layers: list them as glob patterns, numbered blocks folded into "*" (MiniLM's
    # 37 names read as 7 patterns one can paste), so the message stays a short line.
    names = list(candidates)
    if len(names) <= limit:
        return ", ".join(names)
    folded: dict[str, int] = {}
    for name in names:
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)
        folded[pattern] = folded.get(pattern, 0) + 1
    shown = [p if n == 1 else f"{p} ({n})" for p, n in folded.items()]
    more = f", … ({len(shown) - limit} more patterns)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more + f" — {len(names)} layers in all"
