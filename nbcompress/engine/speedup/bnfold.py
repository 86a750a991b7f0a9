"""What folds into a swapped layer (a BatchNorm, an activation after it), and installing that.

An eval-mode ``nn.BatchNorm2d`` is a per-channel affine map of its input. Where its input
is a swapped convolution's output and nothing else reads that output, the
``SparseConv2d`` can compute both (:meth:`SparseConv2d.fold_batchnorm_`) and the
BatchNorm becomes ``nn.Identity``: one pass over each activation map fewer (0.1–0.5 ms
per resnet18 BatchNorm at batch 1). Likewise an ``nn.ReLU`` or ``nn.GELU`` module that
alone reads a swapped layer's output (after its folded BatchNorm, if any) is applied by
the sparse kernels as they store each row (``fuse_activation_``): no pass of its own over
the output, and no torch operator between two sparse layers (under
``OMP_WAIT_POLICY=PASSIVE`` each one woke torch's sleeping workers, ~125 µs per GELU at
two threads here). Who reads a layer's output is read from a
``torch.fx`` symbolic trace; a model that does not trace folds nothing (never a wrong
result). A model in training mode, or a BatchNorm in it, is not folded: in training mode
a BatchNorm normalises each batch by that batch's own statistics (and updates its running
ones), which no fixed weight reproduces. Which variant runs is measured end to end
(:mod:`.variants`); :func:`install` puts a chosen fold in place inside the caller's
history transaction, the replaced modules' ``nn.Identity`` included, so that undo and a
failure part-way restore all of them.
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

__all__ = [
    "ACTIVATIONS",
    "ConvGraph",
    "Rewrite",
    "activated",
    "channels_last",
    "conv_graph",
    "folded",
    "install",
    "plan",
]

#: Activation modules the sparse kernels can apply as they store their output (exact types:
#: a subclass may compute something else).
ACTIVATIONS = (nn.ReLU, nn.GELU)


@dataclass(frozen=True)
class ConvGraph:
    """What a symbolic trace says about a model's swappable layers and what follows them.

    Attributes:
        pairs: Convolution name → the eval BatchNorm that alone reads its output (foldable).
        kept: Convolution name → why the BatchNorm reading its output cannot be folded.
        order: Called module names in execution order (empty: the model did not trace).
        acts: Linear or convolution name → the activation module that alone reads its
            output (the output of its BatchNorm in ``pairs``, if it has one).
    """

    pairs: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    order: tuple[str, ...] = ()
    acts: dict[str, str] = field(default_factory=dict)


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


def _worth_tracing(model: nn.Module) -> bool:
    """Whether ``model`` has a Conv2d and a BatchNorm, or a Linear/Conv2d and an activation."""
    kinds = {type(m) for m in model.modules()}
    layers = {nn.Conv2d, nn.Linear} & kinds
    bn = nn.Conv2d in kinds and any(issubclass(k, nn.BatchNorm2d) for k in kinds)
    return bn or bool(layers and kinds & set(ACTIVATIONS))


def conv_graph(model: nn.Module) -> ConvGraph:
    """Foldable conv → BatchNorm pairs and fusable activations of ``model``.

    A pair folds where the convolution is called once, its only reader is the BatchNorm,
    the BatchNorm reads nothing else, is called once, is an eval-mode ``nn.BatchNorm2d``
    with running statistics and no hooks, neither module is registered under two names,
    and no operation reads either one's tensors directly. An activation fuses on the same
    conditions (an ``nn.ReLU`` or ``nn.GELU`` without hooks), reading a Linear's or a
    convolution's output, or that of the convolution's foldable BatchNorm.

    Args:
        model: The model, in the training flags it will run with.

    Returns:
        The pairs, the refusals with their reason, the call order and the activations (all
        empty when the model has nothing to fold, or does not trace).
    """
    if not _worth_tracing(model):
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
    pairs, kept, acts = {}, {}, {}
    for node in calls:
        name = str(node.target)
        layer = model.get_submodule(name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        tail = node
        user = _sole_reader(node)
        bn = None if user is None else model.get_submodule(str(user.target))
        if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            shared = "it or the conv is called or registered twice, or its tensors read directly"
            why = _why_kept(model, bn) if {name, str(user.target)} <= usable else shared
            if why is not None:
                kept[name] = f"BatchNorm {user.target} not folded: {why}"
                continue
            pairs[name], tail = str(user.target), user
        act = _sole_reader(tail)
        if act is not None and name in usable and str(act.target) in usable:
            module = model.get_submodule(str(act.target))
            if type(module) in ACTIVATIONS and not (
                module._forward_hooks or module._forward_pre_hooks
            ):
                acts[name] = str(act.target)
    graph.__dict__.clear()  # the graph refers to the twin in cycles: free both now
    return ConvGraph(pairs, kept, tuple(str(n.target) for n in calls), acts)


def _sole_reader(node: torch.fx.Node) -> torch.fx.Node | None:
    """The module call that alone reads ``node``'s output as its only argument, if any."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op != "call_module" or user.args != (node,) or user.kwargs:
        return None
    return user


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


def _carried(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` with ``old``'s kernel choices: the same pattern runs best on the same kernels."""
    set_choices(new.matrix(), kernel_choices(old.matrix()))
    return new


def folded(conv: SparseConv2d, bn: nn.BatchNorm2d) -> SparseConv2d:
    """A copy of ``conv`` computing ``bn(conv(x))``; ``conv`` and ``bn`` are not changed.

    The copy shares the pattern's arrays with ``conv`` (only the values and bias are new)
    and takes its kernel choices, so that nothing is raced again.
    """
    return _carried(conv, cast(SparseConv2d, twin(conv)).fold_batchnorm_(bn))


def activated(layer: nn.Module, act: nn.Module) -> nn.Module | None:
    """A copy of sparse ``layer`` computing ``act(layer(x))``, or ``None`` if it cannot.

    ``None`` where the layer's class has no such epilogue (an ONNX Runtime or torch int8
    twin) or refuses this activation; ``layer`` and ``act`` are not changed.
    """
    if not callable(getattr(layer, "fuse_activation_", None)):
        return None
    copy = twin(layer)
    return _carried(layer, copy) if copy.fuse_activation_(act) else None


def channels_last(conv: SparseConv2d) -> SparseConv2d:
    """A copy of ``conv`` (every tensor shared) returning channels-last output."""
    copy = cast(SparseConv2d, twin(conv))
    copy.channels_last_output = True
    return _carried(conv, copy)


@dataclass(frozen=True)
class Rewrite:
    """What to install instead of a chosen sparse layer, and the modules it takes over.

    Attributes:
        module: The module to install in the layer's place.
        removed: (qualified name, the module, weakly) of each module folded into
            ``module`` (a BatchNorm, an activation), each to become ``nn.Identity``:
            installing checks every one is still the one there.
    """

    module: nn.Module
    removed: tuple[tuple[str, weakref.ref], ...] = ()


#: The chosen replacement of a layer → what to install instead. Kept beside the analysis
#: until ``Analysis`` holds the rewrites itself; entries die with the replacement.
_PLANNED: weakref.WeakKeyDictionary[nn.Module, Rewrite] = weakref.WeakKeyDictionary()


def plan(
    replacement: nn.Module, module: nn.Module, removed: tuple[tuple[str, nn.Module], ...] = ()
) -> None:
    """Have :func:`install` put ``module`` for ``replacement``, ``removed`` becoming Identity."""
    _PLANNED[replacement] = Rewrite(module, tuple((n, weakref.ref(m)) for n, m in removed))


def planned(replacement: nn.Module) -> Rewrite | None:
    """The rewrite planned for ``replacement`` by the last analysis that chose one."""
    return _PLANNED.get(replacement)


def install(tx: Transaction, name: str, replacement: nn.Module) -> None:
    """Install ``replacement`` at ``name``, or the rewrite planned for it, in ``tx``.

    A folded layer is installed only if every module folded into it is still the one
    analysed (a BatchNorm still in eval mode, in a model in eval mode); then each becomes
    ``nn.Identity`` in the same transaction (a failure or undo restores all). Otherwise
    the layer's own (unfolded) replacement goes in.
    """
    rewrite = _PLANNED.get(replacement)
    if rewrite is None:
        tx.replace(name, replacement)
        return
    module = rewrite.module.train(replacement.training)
    if rewrite.removed and (tx.model.training or not all(_still(tx, *r) for r in rewrite.removed)):
        tx.replace(name, replacement)  # changed since the analysis: not folded
        return
    tx.replace(name, module)
    for gone, _ in rewrite.removed:
        tx.replace(gone, nn.Identity().train(False))


def _still(tx: Transaction, name: str, ref: weakref.ref) -> bool:
    """Whether ``name`` is still the module analysed (a BatchNorm: still in eval mode)."""
    module = ref()
    try:
        there = tx.model.get_submodule(name)
    except AttributeError:
        return False
    return (
        module is not None
        and there is module
        and not (isinstance(module, nn.BatchNorm2d) and module.training)
    )
