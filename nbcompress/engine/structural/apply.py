"""Apply a removal plan to the live model with Torch-Pruning's per-layer functions.

No dependency graph is built in the parent: every ``(module, handler)`` of the plan is
shrunk once, with its indices in original coordinates. Torch-Pruning replaces parameters
and buffers by new objects (it never resizes them in place), so saving each touched
module's dicts with ``tx.save`` first makes undo bit-exact, parameter identity included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.history import Transaction
from nbcompress.engine.structural import compat as compat_mod
from nbcompress.engine.structural.plan import Plan

__all__ = ["apply_plan", "plan_modules"]


def plan_modules(plan: Plan) -> list[str]:
    """Names of the modules a plan touches (owners of bare parameters included), in order."""
    return list(dict.fromkeys(module for module, _ in sorted(plan)))


def _pruner(module: nn.Module, compat: Any) -> Any:
    """The Torch-Pruning function object for ``module`` (customized ones first)."""
    from torch_pruning import ops
    from torch_pruning.pruner.function import PrunerBox

    custom = compat.customized_pruners
    found = custom.get(module) if module in custom else custom.get(type(module))
    if found is None:
        found = PrunerBox.get(ops.module2type(module))
    if found is None:
        raise ValueError(
            f"{type(module).__name__} has no Torch-Pruning pruner; leave it out with ignore=."
        )
    return found


def _prune_param(owner: nn.Module, handler: str, idxs: list[int]) -> None:
    from torch_pruning.pruner.function import ParameterPruner

    _, attr, dim = handler.split(":")
    old = getattr(owner, attr)
    new = ParameterPruner(pruning_dim=int(dim)).prune_out_channels(old, idxs)
    new.requires_grad_(old.requires_grad)
    setattr(owner, attr, new)


def _shrink(model: nn.Module, module: str, handler: str, idxs: list[int], compat: Any) -> None:
    mod = model.get_submodule(module)
    if handler.startswith("param:"):
        _prune_param(mod, handler, idxs)
        return
    pruner = _pruner(mod, compat)
    fn = pruner.prune_out_channels if handler in ("out", "depthwise_out") else None
    fn = fn or pruner.prune_in_channels
    fn(mod, idxs)


def _attrs(module: nn.Module) -> dict[str, Any]:
    """A shallow copy of a module's attributes (dict contents copied too)."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(module).items()}


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an odd __eq__: treat as changed (saving is harmless)
        return False


def _after_apply(model: nn.Module, tx: Transaction) -> list[str]:
    """Run the compat fixes, saving first every module they change (for exact undo)."""
    before = {m: _attrs(m) for m in model.modules()}
    notes = compat_mod.after_apply(model)
    for mod, old in before.items():
        now = _attrs(mod)
        if _same(now, old):
            continue
        # Put the old attributes back for a moment so that the snapshot holds them.
        vars(mod).clear()
        vars(mod).update(old)
        tx.save(mod)
        vars(mod).clear()
        vars(mod).update(now)
    return notes


def apply_plan(model: nn.Module, plan: Plan, tx: Transaction) -> list[str]:
    """Shrink the live model as ``plan`` says, inside the open transaction ``tx``.

    Every touched module is saved with ``tx.save`` first; each parameter keeps its
    ``requires_grad``; the compat fixes run afterwards (e.g. ViT's ``hidden_dim``).

    Args:
        model: The model (the one the plan was computed on, unchanged since).
        plan: ``(module, handler)`` → original indices to remove.
        tx: The open transaction of the step.

    Returns:
        Notes for the step's report.
    """
    compat = compat_mod.prepare(model)
    owners = {m for m, h in plan if h.startswith("param:")}
    layers = {m for m, h in plan if not h.startswith("param:")}
    for name in plan_modules(plan):
        # Layer pruners also shrink sub-layers (MultiheadAttention's out_proj); the owner
        # of a bare parameter (possibly the whole model) only loses that parameter.
        tx.save(model.get_submodule(name), recurse=name in layers or name not in owners)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        for (module, handler), idxs in sorted(plan.items()):
            _shrink(model, module, handler, sorted(idxs), compat)
    for n, p in model.named_parameters():
        if n in flags and p.requires_grad != flags[n]:
            p.requires_grad_(flags[n])  # Torch-Pruning's new Parameters all require grad
    return _after_apply(model, tx)
