"""Model-family fixes the structural core applies at fixed points (minimal first version).

:func:`prepare` runs in the child before the dependency graph is built; :func:`after_apply`
runs in the parent after a plan is applied. This first version knows torchvision's
VisionTransformer (embedding width a multiple of the head count, ``hidden_dim`` refreshed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["Compat", "after_apply", "prepare"]


@dataclass
class Compat:
    """Per-model arguments and patches for Torch-Pruning's graph.

    Attributes:
        customized_pruners: ``{layer type or instance: tp.pruner.BasePruningFunc}``.
        unwrapped_parameters: ``[(parameter, pruning_dim)]`` not owned by a known layer.
        ignored_layers: Modules skipped during tracing.
        num_heads: ``{attention module: heads}``.
        round_to: A rounding hint for groups touching attention (e.g. ViT's head count).
    """

    customized_pruners: dict[Any, Any] = field(default_factory=dict)
    unwrapped_parameters: list[tuple[nn.Parameter, int]] = field(default_factory=list)
    ignored_layers: list[nn.Module] = field(default_factory=list)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    round_to: int | None = None

    @contextlib.contextmanager
    def patches(self) -> Iterator[None]:
        """Active while the graph is built and the groups enumerated (none yet)."""
        yield


def _vits(model: nn.Module) -> list[nn.Module]:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # torchvision is optional
        return []
    return [m for m in model.modules() if isinstance(m, VisionTransformer)]


def prepare(model: nn.Module) -> Compat:
    """The fixes for ``model``'s families (cheap, no side effects)."""
    compat = Compat()
    for vit in _vits(model):
        heads = {m: m.num_heads for m in vit.modules() if isinstance(m, nn.MultiheadAttention)}
        compat.num_heads.update(heads)
        if heads:
            compat.round_to = max(heads.values())
    return compat


def after_apply(model: nn.Module) -> list[str]:
    """Refresh widths that models store as attributes (torchvision ViT's ``hidden_dim``)."""
    notes = []
    for vit in _vits(model):
        width = vit.conv_proj.out_channels
        if vit.hidden_dim != width:
            notes.append(f"VisionTransformer.hidden_dim {vit.hidden_dim} -> {width}")
            vit.hidden_dim = width
    return notes
