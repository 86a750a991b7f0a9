"""What the sparse kernels cover: which layers may run sparse, and what the report leaves out.

``sparsify_`` and ``speedup`` list every Linear / Conv layer in their table, with the reason
a layer stays dense (no sparse kernel for its type, a fused fast path reading its weight, a
grouped convolution the kernel refuses). Parameters outside those layers (attention input
projections, recurrent gates, embeddings, norms) are summed by kind, so the report states
the share of the model it did not consider and why, instead of a silently partial result.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

from nbcompress.engine.core.layers import PRUNABLE_TYPES, weighted_layers
from nbcompress.kernels.modules import SparseConv2d, SparseLinear

__all__ = ["BUILDERS", "Uncovered", "dense_reason", "describe", "uncovered"]

#: Layer type → the sparse module that can replace it.
BUILDERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: SparseLinear,
    nn.Conv2d: SparseConv2d,
}

# Modules whose fused inference fast path reads these children's ``weight`` directly
# (torch's TransformerEncoderLayer in eval mode without gradients): a sparse module there,
# which has no dense ``weight``, would break that path.
_FAST_PATH_CHILDREN: dict[type[nn.Module], tuple[str, ...]] = {
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
}

_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)

# Why the parameters of a kind of module are not considered, most specific first.
_WHY: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (
        nn.MultiheadAttention,
        "in_proj_weight and out_proj are used functionally by multi_head_attention_forward: "
        "no sparse module can stand in",
    ),
    (nn.RNNBase, "gate weights run in torch's fused recurrent kernel: no sparse kernel"),
    ((nn.Embedding, nn.EmbeddingBag), "a lookup table, not a matrix product"),
    (_NORMS, "elementwise normalisation parameters"),
)


def dense_reason(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why layer ``name`` must stay dense before anything is measured, or ``None``.

    Args:
        model: The model holding the layer.
        name: The layer's qualified name.
        module: The layer.

    Returns:
        A reason for the report, or ``None`` if a sparse module may be tried.
    """
    if type(module) not in BUILDERS:
        return f"no sparse kernel for {type(module).__name__}; kept dense"
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    for kind, children in _FAST_PATH_CHILDREN.items():
        if isinstance(parent, kind) and child in children:
            return (
                f"its weight is read directly by {kind.__name__}'s fused fast path "
                "(eval, no grad); kept dense"
            )
    return None


@dataclass(frozen=True)
class Uncovered:
    """Parameters of one kind of module that were not considered, and why.

    Attributes:
        kind: Module type name, e.g. ``"MultiheadAttention"``.
        modules: How many such modules.
        params: Their parameters (shared tensors counted once).
        why: The reason.
    """

    kind: str
    modules: int
    params: int
    why: str


def _why(module: nn.Module, selectable: bool) -> str:
    if selectable:
        return "not selected (layers / types)"
    for kinds, why in _WHY:
        if isinstance(module, kinds):
            return why
    return f"no sparse kernel for {type(module).__name__}"


def uncovered(model: nn.Module, listed: dict[str, nn.Module]) -> tuple[list[Uncovered], int]:
    """The model's parameters outside the ``listed`` layers, grouped by kind and reason.

    Args:
        model: The model.
        listed: The layers in the table (their own parameters count as considered).

    Returns:
        ``(groups, total)``: groups largest first, and the model's parameter count.
    """
    seen = {id(p) for m in listed.values() for p in m.parameters(recurse=False)}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    groups: dict[tuple[str, str], list[int]] = {}
    for name, module in weighted_layers(model).items():
        if name in listed:
            continue
        atomic = isinstance(module, (nn.MultiheadAttention, nn.RNNBase))
        params = [p for p in module.parameters(recurse=atomic) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if not params:
            continue
        selectable = isinstance(module, PRUNABLE_TYPES)
        key = (type(module).__name__, _why(module, selectable))
        count = groups.setdefault(key, [0, 0])
        count[0] += 1
        count[1] += sum(p.numel() for p in params)
    # Parameters of modules not reached above (e.g. registered on a container) still count.
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        count = groups.setdefault(("other", "parameters outside any layer"), [0, 0])
        count[1] += sum(p.numel() for p in {id(p): p for p in rest}.values())
    found = [Uncovered(k, n, p, w) for (k, w), (n, p) in groups.items()]
    return sorted(found, key=lambda u: -u.params), total


def describe(groups: list[Uncovered], total: int) -> str | None:
    """One report line: the share of parameters not considered, by kind and reason."""
    missing = sum(g.params for g in groups)
    if not missing:
        return None
    parts = (
        f"{g.kind}{f' ×{g.modules}' if g.modules > 1 else ''} {g.params:,} ({g.why})"
        for g in itertools.islice(groups, 6)
    )
    more = f"; … {len(groups) - 6} more kinds" if len(groups) > 6 else ""
    return (
        f"not considered: {missing / total:.1%} of the model's {total:,} parameters — "
        + "; ".join(parts)
        + more
    )
