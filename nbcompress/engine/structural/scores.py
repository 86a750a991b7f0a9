"""Importance of a coupled group's root channels: group-aware L1, or Wanda (|W| · ‖X‖).

Runs in the child process, on Torch-Pruning groups (a coupled group is scored as one:
every member's score is added onto the root channel it follows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["IMPORTANCES", "input_norms", "l1_scores", "wanda_scores"]


def l1_scores(group: Any, width: int, norms: dict[nn.Module, torch.Tensor]) -> torch.Tensor:
    """Group L1: mean over the members of the L1 norm of each channel's weights."""
    import torch_pruning as tp

    imp = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="mean")
    scores = imp(group)
    if not isinstance(scores, torch.Tensor) or scores.numel() != width:
        return torch.zeros(width)
    return scores.float()


def input_norms(model: nn.Module, run: Callable[[], Any]) -> dict[nn.Module, torch.Tensor]:
    """Per input channel, the L2 norm of every Conv/Linear's input over one forward ``run``."""
    sums: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, _out: Any) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not x.is_floating_point():
            return
        x = x.detach().float()
        if isinstance(module, nn.Linear):
            sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        else:
            sq = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1)
        sums[module] = sums.get(module, 0) + sq

    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {m: s.sqrt() for m, s in sums.items()}


def _wanda_item(layer: nn.Module, is_out: bool, norm: torch.Tensor) -> torch.Tensor | None:
    """Wanda contribution of every channel of one Conv/Linear dimension."""
    if getattr(layer, "transposed", False):
        return None
    w = layer.weight.detach().float().abs()
    a = w.reshape(w.shape[0], w.shape[1], -1).sum(2)  # (out, in per group)
    groups = getattr(layer, "groups", 1)
    out_n, in_g = a.shape
    if norm.numel() != in_g * groups:
        return None
    norm_g = norm.view(groups, in_g)
    if is_out:
        rows = norm_g[torch.arange(out_n) // (out_n // groups)]
        return (a * rows).sum(1)
    cols = a.view(groups, out_n // groups, in_g).sum(1).reshape(-1)
    return cols * norm


def wanda_scores(group: Any, width: int, norms: dict[nn.Module, torch.Tensor]) -> torch.Tensor:
    """Wanda over the group: Σ |W| · ‖X‖ over its Conv/Linear members' channels."""
    import torch_pruning as tp

    graph_fns = tp.pruner.function
    outs = {graph_fns.prune_conv_out_channels, graph_fns.prune_linear_out_channels}
    ins = {graph_fns.prune_conv_in_channels, graph_fns.prune_linear_in_channels}
    scores = torch.zeros(width)
    for item in group:
        dep, idxs = item.dep, item.idxs
        layer = dep.target.module
        fn = dep.handler
        if layer not in norms or (fn not in outs and fn not in ins):
            continue
        contrib = _wanda_item(layer, fn in outs, norms[layer])
        if contrib is None or max(idxs, default=-1) >= contrib.numel():
            continue
        roots = [r for r in item.root_idxs]
        if any(r is None for r in roots):
            continue
        scores.index_add_(0, torch.tensor(roots), contrib[torch.tensor(list(idxs))])
    return scores


#: importance name → scoring function (group, width, activation norms) → scores.
IMPORTANCES: dict[str, Callable[[Any, int, dict], torch.Tensor]] = {
    "l1": l1_scores,
    "wanda": wanda_scores,
}
