"""Which eval-mode BatchNorms fold into the sparse convolution before them, and installing that.

An eval-mode ``nn.BatchNorm2d`` is a per-channel affine map of its input. Where its input
is a swapped convolution's output and nothing else reads that output, the
``SparseConv2d`` can compute both (:meth:`SparseConv2d.fold_batchnorm_`) and the
BatchNorm becomes ``nn.Identity``: one pass over each activation map fewer (0.1–0.5 ms
per resnet18 BatchNorm at batch 1). Who reads a convolution's output is read from a
``torch.fx`` symbolic trace; a model that does not trace folds nothing (never a wrong
result). A model in training mode, or a BatchNorm in it, is not folded: in training mode
a BatchNorm normalises each batch by that batch's own statistics (and updates its running
ones), which no fixed weight reproduces. Which variant runs is measured end to end
(:mod:`.variants`); :func:`install` puts a chosen fold in place inside the caller's
history transaction, the BatchNorm's replacement included, so that undo and a failure
part-way restore both.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from nbcompress.engine.core.history import Transaction
from nbcompress.engine.core.memory import twin
from nbcompress.kernels.dispatch import kernel_choices, set_choices
from nbcompress.kernels.modules import SparseConv2d

__all__ = ["ConvGraph", "Rewrite", "channels_last", "conv_graph", "folded", "install", "plan"]


@dataclass(frozen=True)
class ConvGraph:
    """What a symbolic trace says about a model's convolutions and BatchNorms.

    Attributes:
        pairs: Convolution name → the eval BatchNorm that alone reads its output (foldable).
        kept: Convolution name → why the BatchNorm reading its output cannot be folded.
        order: Called module names in execution order (empty: the model did not trace).
    """

    pairs: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    order: tuple[str, ...] = ()


class _Leaves(torch.fx.Tracer):
    """A tracer that calls every module without children, torch's or not, as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Modules without children are opaque calls; containers as ``torch.fx`` decides."""
        return next(iter(m.children()), None) is None or super().is_leaf_module(
            m, module_qualified_name
        )


def _trace(model: nn.Module) -> torch.fx.Graph | None:
    # The trace runs on a twin: a forward that writes attributes (a call counter, a cached
    # Proxy) changes the twin's module objects, never the user's.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the trace's own, about the model's code
            return _Leaves().trace(twin(model))
    except Exception:  # noqa: BLE001 - data-dependent control flow and friends do not trace
        return None


def conv_graph(model: nn.Module) -> ConvGraph:
    """Foldable conv → BatchNorm pairs of ``model`` (in its current training flags).

    A pair folds where the convolution is called once, its only reader is the BatchNorm,
    the BatchNorm reads nothing else, is called once, is an eval-mode ``nn.BatchNorm2d``
    with running statistics and no hooks, neither module is registered under two names,
    and no operation reads either one's tensors directly.

    Args:
        model: The model, in the training flags it will run with.

    Returns:
        The pairs, the refusals with their reason, and the call order (all empty when the
        model has no Conv2d followed by BatchNorm2d, or does not trace).
    """
    kinds = {type(m) for m in model.modules()}
    if nn.Conv2d not in kinds or not any(issubclass(k, nn.BatchNorm2d) for k in kinds):
        return ConvGraph()
    graph = _trace(model)
    if graph is None:
        return ConvGraph()
    calls = [n for n in graph.nodes if n.op == "call_module"]
    count = Counter(str(n.target) for n in calls)
    read = {str(n.target).rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    aliases = Counter(id(m) for m in model.modules(remove_duplicate=False))
    usable = {
        name for name, m in model.named_modules()
        if count[name] == 1 and name not in read and aliases[id(m)] == 1
    }  # fmt: skip
    pairs, kept = {}, {}
    for node in calls:
        conv = str(node.target)
        if not isinstance(model.get_submodule(conv), nn.Conv2d) or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        bn_name = str(user.target)
        bn = model.get_submodule(bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        shared = "it or the conv is called or registered twice, or its tensors read directly"
        why = _why_kept(model, bn) if {conv, bn_name} <= usable else shared
        if why is None:
            pairs[conv] = bn_name
        else:
            kept[conv] = f"BatchNorm {bn_name} not folded: {why}"
    graph.__dict__.clear()  # the graph refers to the twin in cycles: free both now
    return ConvGraph(pairs, kept, tuple(str(n.target) for n in calls))


def _why_kept(model: nn.Module, bn: nn.BatchNorm2d) -> str | None:
    if model.training or bn.training:
        return (
            "the model is in training mode, where a BatchNorm normalises by each batch's "
            "statistics (call model.eval() first to fold it)"
        )
    if bn.running_mean is None or bn.running_var is None:
        return "it keeps no running statistics (track_running_stats=False)"
    if type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{type(bn).__name__} has its own forward"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return "it has hooks, which would no longer run"
    return None


def _carried(old: SparseConv2d, new: SparseConv2d) -> SparseConv2d:
    """``new`` with ``old``'s kernel choices: the same pattern runs best on the same kernels."""
    set_choices(new.matrix(), kernel_choices(old.matrix()))
    return new


def folded(conv: SparseConv2d, bn: nn.BatchNorm2d) -> SparseConv2d:
    """A copy of ``conv`` computing ``bn(conv(x))``; ``conv`` and ``bn`` are not changed.

    The copy shares the pattern's arrays with ``conv`` (only the values and bias are new)
    and takes its kernel choices, so that nothing is raced again.
    """
    return _carried(conv, cast(SparseConv2d, twin(conv)).fold_batchnorm_(bn))


def channels_last(conv: SparseConv2d) -> SparseConv2d:
    """A copy of ``conv`` (every tensor shared) returning channels-last output."""
    copy = cast(SparseConv2d, twin(conv))
    copy.channels_last_output = True
    return _carried(conv, copy)


@dataclass(frozen=True)
class Rewrite:
    """What to install instead of a chosen sparse layer, and the BatchNorm it replaces.

    Attributes:
        module: The module to install in the layer's place.
        bn: Qualified name of the BatchNorm folded into ``module`` (``None``: none).
        bn_module: That BatchNorm, weakly: installing checks it is still the one there.
    """

    module: nn.Module
    bn: str | None
    bn_module: weakref.ref | None


#: The chosen replacement of a layer → what to install instead. Kept beside the analysis
#: until ``Analysis`` holds the rewrites itself; entries die with the replacement.
_PLANNED: weakref.WeakKeyDictionary[nn.Module, Rewrite] = weakref.WeakKeyDictionary()


def plan(replacement: nn.Module, module: nn.Module, bn: tuple[str, nn.Module] | None) -> None:
    """Have :func:`install` put ``module`` (and ``nn.Identity`` for ``bn``) for ``replacement``."""
    ref = None if bn is None else weakref.ref(bn[1])
    name = None if bn is None else bn[0]
    _PLANNED[replacement] = Rewrite(module, name, ref)


def planned(replacement: nn.Module) -> Rewrite | None:
    """The rewrite planned for ``replacement`` by the last analysis that chose one."""
    return _PLANNED.get(replacement)


def install(tx: Transaction, name: str, replacement: nn.Module) -> None:
    """Install ``replacement`` at ``name``, or the rewrite planned for it, in ``tx``.

    A folded layer is installed only if its BatchNorm is still the one analysed, in eval
    mode; then that BatchNorm becomes ``nn.Identity`` in the same transaction (a failure
    or undo restores both). Otherwise the layer's own (unfolded) replacement goes in.
    """
    rewrite = _PLANNED.get(replacement)
    if rewrite is None:
        tx.replace(name, replacement)
        return
    module = rewrite.module.train(replacement.training)
    if rewrite.bn is not None:
        bn = rewrite.bn_module() if rewrite.bn_module is not None else None
        try:
            there = tx.model.get_submodule(rewrite.bn)
        except AttributeError:
            there = None
        if bn is None or there is not bn or bn.training or tx.model.training:
            tx.replace(name, replacement)  # changed since the analysis: not folded
            return
        tx.replace(name, module)
        tx.replace(rewrite.bn, nn.Identity().train(False))
        return
    tx.replace(name, module)
