"""Remove whole attention heads and feed-forward neurons: a narrower transformer, same shapes out.

:func:`attention_plan` scores the heads of every supported attention layer and the hidden
neurons of every feed-forward pair (see :mod:`nbcompress.engine.structural.sites`) and picks
the lowest-scoring ones; :func:`apply_attention` removes them inside an open
:func:`~nbcompress.engine.core.history.transaction`, so that ``undo_`` restores the model
bit-exactly with the same parameter objects. ``num_heads``, ``head_dim`` and the model's
width (the residual stream) stay consistent: heads shrink the attention's inner width only.

* ``nn.MultiheadAttention`` cannot hold fewer heads than ``embed_dim // head_dim``, so it is
  replaced by a :class:`PrunedMultiheadAttention` with the same call signature;
* a Hugging Face BERT-style attention is sliced in place (``query``/``key``/``value`` rows,
  ``output.dense`` columns, ``num_attention_heads`` and ``all_head_size``);
* a feed-forward pair loses ``fc1`` rows (and bias entries) and ``fc2`` columns.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nbcompress.engine.core.history import Transaction
from nbcompress.engine.structural.mha import PrunedMultiheadAttention
from nbcompress.engine.structural.sites import (
    SUPPORTED,
    FfnSite,
    HeadSite,
    bert_parts,
    ffn_sites,
    head_sites,
    unsupported_attention,
)

__all__ = ["AttentionPlan", "SiteCut", "apply_attention", "attention_plan"]


@dataclass(frozen=True)
class SiteCut:
    """Heads of one attention layer, or neurons of one feed-forward pair, to remove.

    Attributes:
        site: The attention layer (:class:`HeadSite`) or feed-forward pair (:class:`FfnSite`).
        removed: Heads or neurons removed, sorted, in the site's current numbering.
    """

    site: HeadSite | FfnSite
    removed: tuple[int, ...]


@dataclass(frozen=True)
class AttentionPlan:
    """What :func:`apply_attention` removes: heads per attention layer, neurons per FFN.

    Attributes:
        heads: One entry per attention layer that loses heads.
        ffn: One entry per feed-forward pair that loses neurons.
        skipped: Attention-like modules of an unsupported type whose heads stay.
    """

    heads: tuple[SiteCut, ...] = ()
    ffn: tuple[SiteCut, ...] = ()
    skipped: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.heads or self.ffn)

    @property
    def removed_heads(self) -> int:
        """Heads removed over all attention layers."""
        return sum(len(c.removed) for c in self.heads)

    @property
    def removed_neurons(self) -> int:
        """FFN neurons removed over all feed-forward pairs."""
        return sum(len(c.removed) for c in self.ffn)

    def notes(self) -> list[str]:
        """One line per kind of removal, e.g. ``heads: 36 of 144 removed in 12 layers``."""
        lines = []
        if self.heads:
            total = sum(c.site.num_heads for c in self.heads)
            lines.append(f"heads: {self.removed_heads} of {total} removed in "
                         f"{len(self.heads)} attention layer(s)")  # fmt: skip
        if self.ffn:
            total = sum(c.site.width for c in self.ffn)
            lines.append(f"ffn: {self.removed_neurons} of {total} neurons removed in "
                         f"{len(self.ffn)} feed-forward block(s)")  # fmt: skip
        if self.skipped:
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            lines.append(f"heads: left alone in {len(self.skipped)} attention module(s) of an "
                         f"unsupported type: {', '.join(self.skipped[:3])}{more}")  # fmt: skip
        return lines


def _fraction(value: float | None, arg: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(
            f"{arg}: expected the fraction to remove per layer in [0, 1), such as 0.25, "
            f"got {value!r}."
        )
    return float(value)


def _lowest(scores: tuple[float, ...], count: int) -> tuple[int, ...]:
    """Indices of the ``count`` lowest scores (ties: lower index first), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return tuple(sorted(order[:count]))


def _ffn_count(width: int, fraction: float, round_to: int | None) -> int:
    """Neurons to remove: floor(fraction * width), kept count rounded down to ``round_to``."""
    keep = width - int(fraction * width + 1e-9)
    if round_to and fraction > 0 and width > round_to:
        keep = max(round_to, keep - keep % round_to)
    return width - max(1, keep)


def _selected(names: Sequence[str], patterns: list[str] | None) -> bool:
    """Whether ``layers=`` patterns match one of a site's module names (or an ancestor)."""
    if patterns is None:
        return True
    prefixes = {n.rsplit(".", k)[0] for n in names for k in range(n.count(".") + 1)}
    return any(n == p or fnmatch.fnmatchcase(n, p) for n in prefixes for p in patterns)


def _patterns(layers: str | Sequence[str] | None) -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]
    if isinstance(layers, Sequence) and all(isinstance(p, str) for p in layers) and layers:
        return list(layers)
    raise TypeError(
        "layers: expected a glob pattern or a list of them such as ['encoder.layers.*'], "
        f"got {layers!r}."
    )


def attention_plan(
    model: nn.Module,
    *,
    heads: float | None = None,
    ffn: float | None = None,
    importance: str = "l1",
    layers: str | Sequence[str] | None = None,
    round_to: int | None = None,
) -> AttentionPlan:
    """Choose the attention heads and FFN neurons to remove (lowest L1 first), per layer.

    Args:
        model: The model (not modified).
        heads: Fraction of heads removed in every attention layer (floor of
            ``fraction * num_heads``; at least one head is kept). ``None``: heads kept.
        ffn: Fraction of hidden neurons removed in every feed-forward block. ``None``: kept.
        importance: ``"l1"``: a head's q/k/v rows plus out-projection columns, a neuron's
            ``fc1`` row plus ``fc2`` column (deterministic; ties go to the lower index).
        layers: Glob pattern(s) on qualified names; a layer is included when a pattern
            matches one of its modules or an enclosing module. ``None``: all.
        round_to: Keep a multiple of this many FFN neurons per block (rounded down).

    Returns:
        The plan, in the model's current coordinates.

    Raises:
        ValueError: A fraction outside [0, 1), an unknown importance, or ``heads``/``ffn``
            given for a model with no supported attention (one line naming the argument).
    """
    heads, ffn = _fraction(heads, "heads"), _fraction(ffn, "ffn")
    if importance != "l1":
        raise ValueError(
            f"importance: attention heads and FFN neurons are scored by 'l1', got {importance!r}."
        )
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int)
                                 or round_to < 1):  # fmt: skip
        raise ValueError(f"round_to: expected a positive integer such as 8, got {round_to!r}.")
    patterns = _patterns(layers)
    if heads is None and ffn is None:
        return AttentionPlan()
    sites = _sites_or_refuse(model, heads, ffn)
    chosen = [s for s in sites if _selected([s.module], patterns)]
    _require(bool(chosen), heads, ffn, f"layers={layers!r} selects no attention layer")
    if heads is not None and any(s.module == "" and s.family == "torch" for s in chosen):
        raise ValueError(
            "heads: the model itself is an nn.MultiheadAttention, which cannot be replaced in "
            "place; wrap it in a module (e.g. nn.Sequential(attention)) and remove heads there."
        )
    head_cuts = []
    for s in chosen if heads else ():
        removed = _lowest(s.scores, min(int(heads * s.num_heads + 1e-9), s.num_heads - 1))
        if removed:
            head_cuts.append(SiteCut(s, removed))
    ffn_cuts = []
    for f in ffn_sites(model, sites) if ffn else ():
        if _selected([f.fc1, f.fc2], patterns):
            removed = _lowest(f.scores, _ffn_count(f.width, ffn, round_to))
            if removed:
                ffn_cuts.append(SiteCut(f, removed))
    skipped = tuple(unsupported_attention(model, sites)) if heads else ()
    return AttentionPlan(tuple(head_cuts), tuple(ffn_cuts), skipped)


def _sites_or_refuse(model: nn.Module, heads: float | None, ffn: float | None) -> list[HeadSite]:
    sites = head_sites(model)
    if not sites:
        others = unsupported_attention(model, [])
        kind = type(model.get_submodule(others[0])).__name__ if others else ""
        seen = f" (found {kind} at {others[0] or 'the model itself'})" if others else ""
        _require(False, heads, ffn, f"the model has no supported attention layer{seen}")
    return sites


def _require(ok: bool, heads: float | None, ffn: float | None, why: str) -> None:
    if not ok:
        arg = "heads" if heads is not None else "ffn"
        raise ValueError(
            f"{arg}: {why}; {arg}= supports {SUPPORTED}. Drop {arg}= (channels are removed "
            "with the amount) or pass layers= naming such layers."
        )


def _keep(width: int, removed: tuple[int, ...]) -> list[int]:
    gone = set(removed)
    if not gone <= set(range(width)) or len(gone) >= width:
        raise ValueError(f"plan: cannot remove {sorted(gone)} of {width}; re-plan on this model.")
    return [i for i in range(width) if i not in gone]


def _shrink(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep ``keep`` along ``dim`` of ``linear``'s weight (0: outputs, with the bias)."""
    w = linear.weight
    linear.weight = nn.Parameter(w.detach().index_select(dim, keep), requires_grad=w.requires_grad)
    if dim == 0:
        linear.out_features = len(keep)
        if linear.bias is not None:
            b = linear.bias
            linear.bias = nn.Parameter(b.detach()[keep], requires_grad=b.requires_grad)
    else:
        linear.in_features = len(keep)


#: ``nn.Module``'s hook tables (ordered dicts keyed by handle id), and its per-hook flags.
_HOOK_TABLES = (
    "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
    "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)  # fmt: skip
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")  # fmt: skip


def _carry_hooks(old: nn.Module, new: nn.Module) -> int:
    """Register ``old``'s own hooks on ``new`` (same functions, order, flags); return how many.

    The replacement is a fresh module: without this a user's forward hook on the attention
    layer would silently stop firing. ``old`` keeps its hooks (undo puts it back as it was).
    """
    carried = 0
    for table in (*_HOOK_TABLES, *_HOOK_FLAGS):
        source, target = getattr(old, table, None), getattr(new, table, None)
        if source and target is not None:
            target.update(source)
            carried += len(source) if table in _HOOK_TABLES else 0
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook
    return carried


def _apply_torch_heads(model: nn.Module, cut: SiteCut, tx: Transaction) -> int:
    """Replace one ``nn.MultiheadAttention``; return the number of its hooks carried over."""
    mha = model.get_submodule(cut.site.module)
    keep = _keep(mha.num_heads, cut.removed)
    new = PrunedMultiheadAttention.from_module(mha, keep)
    carried = _carry_hooks(mha, new)
    tx.replace(cut.site.module, new)
    # nn.TransformerEncoder would turn padded batches into nested tensors for the fused
    # path, which the replacement does not take: keep its inputs ordinary tensors.
    for name, m in model.named_modules():
        inside = cut.site.module.startswith(_prefix(name))
        if (
            isinstance(m, nn.TransformerEncoder)
            and inside
            and getattr(m, "use_nested_tensor", False)
        ):
            tx.save(m)
            m.use_nested_tensor = False
    return carried


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _apply_bert_heads(model: nn.Module, cut: SiteCut, tx: Transaction) -> None:
    sa, qkv, out = bert_parts(model.get_submodule(cut.site.module))
    keep = _keep(sa.num_attention_heads, cut.removed)
    d = sa.attention_head_size
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep]).to(out.weight.device)
    for m in (sa, *qkv, out):
        tx.save(m)
    for lin in qkv:
        _shrink(lin, rows, 0)
    _shrink(out, rows, 1)
    sa.num_attention_heads = len(keep)
    sa.all_head_size = len(keep) * d


def _apply_ffn(model: nn.Module, cut: SiteCut, tx: Transaction) -> None:
    fc1, fc2 = model.get_submodule(cut.site.fc1), model.get_submodule(cut.site.fc2)
    keep = torch.tensor(_keep(fc1.out_features, cut.removed), device=fc1.weight.device)
    tx.save(fc1)
    tx.save(fc2)
    _shrink(fc1, keep, 0)
    _shrink(fc2, keep, 1)


def apply_attention(model: nn.Module, plan: AttentionPlan, tx: Transaction) -> list[str]:
    """Remove the heads and FFN neurons of ``plan`` from ``model`` inside the open ``tx``.

    Every module changed is saved through ``tx`` first (replaced attention modules are kept
    whole), so rolling back or undoing the step restores the original objects bit-exactly.

    Args:
        model: The model the plan was made on (same coordinates).
        plan: From :func:`attention_plan`.
        tx: The open transaction of ``model`` (``transaction(model, "remove")``).

    Returns:
        Notes for the report (what was removed, which modules were replaced).
    """
    carried = 0
    for cut in plan.heads:
        if cut.site.family == "torch":
            carried += _apply_torch_heads(model, cut, tx)
        else:
            _apply_bert_heads(model, cut, tx)
    for cut in plan.ffn:
        _apply_ffn(model, cut, tx)
    notes = plan.notes()
    if any(c.site.family == "torch" for c in plan.heads):
        notes.append("nn.MultiheadAttention layers with heads removed were replaced by "
                     "PrunedMultiheadAttention (same call signature)")  # fmt: skip
    if carried:
        notes.append(
            f"{carried} hook(s) of the replaced attention layer(s) were carried over to the "
            "replacements (same functions, same order); a handle returned before removes its "
            "hook from the original module only, which undo puts back"
        )
    return notes
