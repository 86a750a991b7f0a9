"""Applying a keep-mask to one weight: plain, kept for fine-tuning, or parametrized."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from nbcompress.engine.core.history import Transaction
from nbcompress.engine.prune.keep import add_detach_hook
from nbcompress.engine.prune.masks import output_major

__all__ = ["apply_mask", "is_masked", "live_weight", "set_parametrized", "zero_channel_bias"]


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """True if ``module.<name>`` is reparametrised by a kept pruning mask."""
    return hasattr(module, name + "_orig") and hasattr(module, name + "_mask")


def live_weight(module: nn.Module, path: str = "weight") -> torch.Tensor:
    """The weight at ``path`` as the next forward pass computes it, gradients flowing.

    Under a kept mask the attribute holds a detached copy of ``<name>_orig`` · ``<name>_mask``
    left by the last forward pass (see :mod:`nbcompress.engine.prune.keep`), so the product
    is recomputed from the parameter; otherwise the attribute itself. ``path`` may name a
    submodule's weight (``"out_proj.weight"``).
    """
    owner_path, _, name = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if is_masked(owner, name):
        return getattr(owner, name + "_orig") * getattr(owner, name + "_mask")
    return getattr(owner, name)


@torch.no_grad()
def apply_mask(
    tx: Transaction,
    module: nn.Module,
    mask: torch.Tensor,
    *,
    keep_masks: bool,
    name: str = "weight",
) -> None:
    """Zero ``module.<name>`` where ``mask`` is False, saving what changes in ``tx`` first.

    Without ``keep_masks`` the zeros are written into the weight and the module stays a
    plain module. With it, a ``torch.nn.utils.prune`` mask is attached so that fine-tuning
    cannot revive pruned weights (their gradients are zero and the mask is re-applied on
    every forward). A parametrized weight is set through its parametrization, so that the
    values it is computed from change.
    """
    tx.save(module)
    if parametrize.is_parametrized(module, name):
        set_parametrized(tx, module, name, mask)
        return
    if is_masked(module, name):
        # Already masked for fine-tuning: tighten the kept mask, keep the regime.
        kept, orig = getattr(module, name + "_mask"), getattr(module, name + "_orig")
        tx.save_tensor(kept)
        tx.save_tensor(orig, pin=True)
        # masked_fill_, not mul_: a bool mask would be promoted to a float copy first.
        kept.masked_fill_(~mask, 0)
        orig.masked_fill_(~mask, 0)
        setattr(module, name, orig * kept)
        add_detach_hook(module, name)
        return
    weight = getattr(module, name)
    tx.save_tensor(weight, pin=keep_masks)
    weight.masked_fill_(~mask, 0)
    if keep_masks:
        torch_prune.custom_from_mask(module, name, mask)
        add_detach_hook(module, name)


def set_parametrized(
    tx: Transaction, module: nn.Module, name: str, mask: torch.Tensor, layer: str | None = None
) -> None:
    """Prune a parametrized ``module.<name>`` by setting its masked value (``right_inverse``).

    The computed weight is a temporary, so zeroing it changes nothing. Setting it changes
    what really holds the values (a weight norm's ``g`` and ``v``); the result is checked,
    and a parametrization that cannot hold the zeros is refused with one line naming
    ``layer`` (default: the module's type).
    """
    tx.save(module, recurse=True)
    who = repr(layer) if layer is not None else type(module).__name__
    kinds = ", ".join(type(p).__name__ for p in module.parametrizations[name])
    target = getattr(module, name) * mask
    try:
        setattr(module, name, target)
    except Exception as err:  # noqa: BLE001 - any parametrization may refuse
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(_parametrized_refusal(who, name, kinds, first)) from err
    now = getattr(module, name)
    if bool((now[~mask] != 0).any()) or not torch.allclose(now, target, rtol=1e-4, atol=1e-6):
        raise ValueError(
            _parametrized_refusal(who, name, kinds, "it cannot represent the pruned weight")
        )


def _parametrized_refusal(who: str, name: str, kinds: str, why: str) -> str:
    return (
        f"layers: the {name} of {who} is parametrized ({kinds}) and "
        f"cannot be pruned: {why}. Remove the parametrization first "
        "(torch.nn.utils.parametrize.remove_parametrizations) or leave the layer out (layers=)."
    )


def zero_channel_bias(tx: Transaction, module: nn.Module, mask: torch.Tensor) -> None:
    """Zero the bias of every output channel ``mask`` removes entirely.

    A removed channel must output nothing, as it would after physical removal.
    """
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        alive = output_major(mask, module).reshape(bias.shape[0], -1).any(1)
        tx.save_tensor(bias)
        with torch.no_grad():
            bias.mul_(alive.to(bias.dtype))
