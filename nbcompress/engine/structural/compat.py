"""Model-family fixes the structural core applies at fixed points around Torch-Pruning's graph.

:func:`prepare` runs in the child before the dependency graph is built (and in the parent,
for the customized pruners the plan is applied with); :meth:`Compat.patches` is active while
the graph is built and the groups are enumerated; :meth:`Compat.group_reason` says why a
group must keep its channels; :func:`after_apply` runs in the parent after a plan is applied.

Generic mechanisms (measured on torchvision's 80 classifiers, issue 13):

* **Group guard.** Torch-Pruning maps indices through reshapes with
  ``_FlattenIndexMapping``; on windowed reshapes the lists multiply until the process runs
  out of memory (Swin: 768 channels x 32 per step, 24 GB after 4 minutes). No index list can
  be longer than the largest dimension of any tensor of the model, so a longer one stops
  *that group*; so does any error while mapping one group's indices (ShuffleNetV2's split
  after a concat: ``IndexError``). The group keeps its channels, with the reason, and the
  rest of the model is still pruned.
* **Opaque modules.** A module whose inner ops the graph mis-reads is run under ``no_grad``
  during the trace and joined to its input by one autograd node, so the graph sees one op.
  With a customized pruner (Swin and MaxViT attention) it is shrunk as a whole; with a
  reason instead it is a *barrier*: every group reaching it keeps its channels.
* **Barrier functions and rewrites.** The same for a module-level function while the graph
  is built: a barrier (ShuffleNetV2's ``channel_shuffle``) or the same values in ops the
  graph reads correctly (Swin's patch merging).

Family-specific entries (each names why) are in :func:`_families`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Compat", "after_apply", "prepare"]

_REASON_ATTR = "nbcompress_reason"  # set on a Torch-Pruning group the guard stopped


class _Join(torch.autograd.Function):
    """``y`` (computed without autograd) joined to ``x`` by one backward node."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:  # noqa: ARG004
        return None, None


def _joined(fn: Callable[..., Any], barriers: dict, reason: str | None) -> Callable[..., Any]:
    """``fn`` run without autograd, its output joined to its first argument (the graph's view).

    With a reason, the joining node is recorded in ``barriers`` (groups reaching it stop).
    """

    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            return fn(x, *args, **kwargs)
        with torch.no_grad():
            y = fn(x, *args, **kwargs)
        if not isinstance(y, torch.Tensor):
            return y
        out = _Join.apply(x, y)
        if reason:
            barriers[out.grad_fn] = reason
        return out

    return run


@functools.cache
def _attention_pruner_class(qkv: str, proj: str, heads: str, head_dim: str | None) -> type:
    """A Torch-Pruning pruner for attention whose in and out are the residual stream.

    ``qkv`` and ``proj`` name the module's fused q/k/v projection and output projection,
    ``heads`` its head count; ``head_dim`` (if given) names a stored head size that the
    forward reshapes by, refreshed here with the width (the module is saved for undo as a
    whole, so undo restores it too).
    """
    import torch_pruning as tp

    class WindowAttentionPruner(tp.pruner.BasePruningFunc):
        """Shrinks the q/k/v projection (inputs, q/k/v rows alike) and the output projection.

        The attention's functional forward reshapes by its input width, so q, k, v and the
        projection must follow the residual width; the head count stays (the core removes
        channels in multiples of it).
        """

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            fused, out = getattr(layer, qkv), getattr(layer, proj)
            width = fused.in_features
            idxs = sorted(int(i) for i in idxs)
            rows = idxs + [i + width for i in idxs] + [i + 2 * width for i in idxs]
            tp.prune_linear_in_channels(fused, idxs)
            tp.prune_linear_out_channels(fused, rows)
            tp.prune_linear_in_channels(out, idxs)
            tp.prune_linear_out_channels(out, idxs)
            if head_dim is not None:
                setattr(layer, head_dim, fused.out_features // 3 // getattr(layer, heads))
            return layer

        prune_in_channels = prune_out_channels  # in and out are one dimension

        def get_out_channels(self, layer: nn.Module) -> int:
            return getattr(layer, proj).out_features

        def get_in_channels(self, layer: nn.Module) -> int:
            return getattr(layer, qkv).in_features

    return WindowAttentionPruner


@dataclass
class Compat:
    """Per-model arguments and patches for Torch-Pruning's graph.

    Attributes:
        customized_pruners: ``{layer type or instance: tp.pruner.BasePruningFunc}``.
        unwrapped_parameters: ``[(parameter, pruning_dim)]`` not owned by a known layer.
        ignored_layers: Modules skipped during tracing.
        num_heads: ``{attention module: heads}``: groups through it shrink by multiples.
        round_to: A rounding hint for groups touching attention (e.g. ViT's head count).
        opaque: ``{module: reason or None}`` run as one op during the trace; ``None`` means
            a customized pruner shrinks it, a reason makes it a barrier.
        barrier_functions: ``[(module object, function name, reason)]`` made barriers
            during the trace (ShuffleNetV2's ``channel_shuffle``).
        rewrites: ``[(module object, function name, replacement)]`` during the trace: the
            same values, in ops the graph reads correctly.
        index_limit: Longest index list a group may carry (0 = no limit); a group whose
            mapping fails anyway keeps its channels, with a reason.
    """

    customized_pruners: dict[Any, Any] = field(default_factory=dict)
    unwrapped_parameters: list[tuple[nn.Parameter, int]] = field(default_factory=list)
    ignored_layers: list[nn.Module] = field(default_factory=list)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    round_to: int | None = None
    opaque: dict[nn.Module, str | None] = field(default_factory=dict)
    barrier_functions: list[tuple[Any, str, str]] = field(default_factory=list)
    rewrites: list[tuple[Any, str, Callable[..., Any]]] = field(default_factory=list)
    index_limit: int = 0
    _barriers: dict[Any, str] = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def patches(self) -> Iterator[None]:
        """Active while the graph is built and the groups enumerated (restores everything)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(_group_guard(self.index_limit))
            stack.enter_context(_index_mappings_once())
            for module, reason in self.opaque.items():
                stack.enter_context(self._opaque(module, reason))
            barriers = [
                (owner, name, _joined(getattr(owner, name), self._barriers, reason))
                for owner, name, reason in self.barrier_functions
            ]
            for owner, name, replacement in barriers + self.rewrites:
                stack.enter_context(self._replaced(owner, name, replacement))
            yield

    def group_reason(self, group: Any) -> str | None:
        """Why a Torch-Pruning group must keep its channels (``None``: it may lose some)."""
        stopped = getattr(group, _REASON_ATTR, None)
        if stopped:
            return stopped
        for item in group:
            reason = self._barriers.get(getattr(item.dep.target, "grad_fn", None))
            if reason:
                return reason
        return None

    @contextlib.contextmanager
    def _opaque(self, module: nn.Module, reason: str | None) -> Iterator[None]:
        had = "forward" in vars(module)
        old = vars(module).get("forward")
        module.forward = _joined(type(module).forward.__get__(module), self._barriers, reason)
        try:
            yield
        finally:
            if had:
                module.forward = old
            else:
                del module.forward

    @staticmethod
    @contextlib.contextmanager
    def _replaced(owner: Any, name: str, new: Any) -> Iterator[None]:
        old = getattr(owner, name)
        setattr(owner, name, new)
        try:
            yield
        finally:
            setattr(owner, name, old)


class _IndexListTooLong(Exception):
    """A mapped index list longer than any tensor dimension: the mapping is wrong."""


@contextlib.contextmanager
def _group_guard(limit: int) -> Iterator[None]:
    """Stop a group whose mapped index list outgrows ``limit`` (only that group)."""
    from torch_pruning.dependency import graph, index_mapping

    mapping = index_mapping._FlattenIndexMapping
    call, get_group = mapping.__call__, graph.DependencyGraph.get_pruning_group

    def guarded_call(self: Any, idxs: Any) -> Any:
        if limit and not self.reverse and len(idxs) * self._stride > limit:
            raise _IndexListTooLong(
                f"a reshape maps {len(idxs)} channels to {len(idxs) * self._stride} indices "
                f"(more than any tensor dimension, {limit}): the reshape is not a flatten"
            )
        return call(self, idxs)

    def guarded_group(dg: Any, module: Any, pruning_fn: Any, idxs: Any) -> Any:
        try:
            return get_group(dg, module, pruning_fn, idxs)
        except _IndexListTooLong as err:
            reason = f"{err}; it keeps its channels"
        except Exception as err:  # noqa: BLE001 - a mapping the graph got wrong: this group only
            reason = f"the graph could not map its indices ({type(err).__name__}: {err})"
        group = _root_only(dg, module, pruning_fn, idxs)
        setattr(group, _REASON_ATTR, reason)
        return group

    mapping.__call__ = guarded_call
    graph.DependencyGraph.get_pruning_group = guarded_group
    try:
        yield
    finally:
        mapping.__call__ = call
        graph.DependencyGraph.get_pruning_group = get_group


@contextlib.contextmanager
def _index_mappings_once() -> Iterator[None]:
    """Compute a graph's index mappings once, not again for every group.

    ``get_pruning_group`` re-derives every mapping of the whole graph before each group
    (69 of 104 s of densenet121's enumeration, profiled); the child never prunes, so the
    mappings ``build_dependency`` computed stay valid.
    """
    from torch_pruning.dependency import index_mapping

    update, graphs = index_mapping.update_index_mapping, []

    def once(graph: Any) -> None:
        if not any(g is graph for g in graphs):
            update(graph)
            graphs.append(graph)

    index_mapping.update_index_mapping = once
    try:
        yield
    finally:
        index_mapping.update_index_mapping = update


def _root_only(dg: Any, module: Any, pruning_fn: Any, idxs: Any) -> Any:
    """A Torch-Pruning group holding just the root (for a group the guard stopped)."""
    from torch_pruning import _helpers
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group

    node = dg.module2node[module]
    group = Group()
    group.add_dep(Dependency(pruning_fn, pruning_fn, source=node, target=node), list(idxs))
    group[0] = _helpers.GroupItem(group[0].dep, list(idxs))
    group[0].root_idxs = list(idxs)
    group._DG = dg
    return group


def _largest_dim(model: nn.Module) -> int:
    dims = [max(t.shape) for t in [*model.parameters(), *model.buffers()] if t.dim()]
    return max(dims, default=0)


def _types(module_path: str, *names: str) -> tuple[type, ...]:
    """Classes by name from an optional module (torchvision may be absent or older)."""
    try:
        mod = __import__(module_path, fromlist=list(names))
    except ImportError:
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


def _vit(model: nn.Module, compat: Compat) -> None:
    # torchvision ViT: the residual width must stay a multiple of the head count (MHA
    # reshapes by it), and ``hidden_dim`` is stored and reused by ``_process_input``.
    vits = _types("torchvision.models.vision_transformer", "VisionTransformer")
    for vit in (m for m in model.modules() if vits and isinstance(m, vits)):
        heads = {m: m.num_heads for m in vit.modules() if isinstance(m, nn.MultiheadAttention)}
        compat.num_heads.update(heads)
        if heads:
            compat.round_to = max(heads.values())


def _fused_attention(
    model: nn.Module, compat: Compat, kinds: tuple[type, ...], names: tuple
) -> bool:
    """Register attention modules run as one op and shrunk with the residual stream.

    ``names`` = (fused q/k/v projection, output projection, head-count attribute, stored
    head-size attribute or None). Returns whether the model has any.
    """
    qkv, proj, heads, head_dim = names
    pruner = None
    for mod in (m for m in model.modules() if kinds and isinstance(m, kinds)):
        pruner = pruner or _attention_pruner_class(qkv, proj, heads, head_dim)()
        compat.customized_pruners[type(mod)] = pruner
        compat.opaque[mod] = None
        compat.num_heads[mod] = getattr(mod, heads)
    return pruner is not None


def _swin(model: nn.Module, compat: Compat) -> None:
    # torchvision Swin / Swin-V2: the window attention calls F.linear on qkv/proj weights
    # (the graph never sees those layers) and reshapes windows (index lists explode): run it
    # as one op shrunk by a pruner that keeps q/k/v and the projection at the residual width.
    path = "torchvision.models.swin_transformer"
    kinds = _types(path, "ShiftedWindowAttention", "ShiftedWindowAttentionV2")
    if _fused_attention(model, compat, kinds, ("qkv", "proj", "num_heads", None)):
        # Patch merging slices H and W of an (N, H, W, C) tensor; the graph takes a 4-D
        # slice on dim 1 for a channel slice and halves the channel indices.
        import torchvision.models.swin_transformer as swin

        merge_pad = swin._patch_merging_pad
        compat.rewrites.append((swin, "_patch_merging_pad", _merge_pad_as_concat(merge_pad)))


def _merge_pad_as_concat(merge_pad: Callable[..., Any]) -> Callable[..., Any]:
    """Swin's patch merging as the graph should see it: four copies of the input's channels."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return merge_pad(x)
        with torch.no_grad():
            y = merge_pad(x)
        width = x.shape[-1]
        parts = [_Join.apply(x, y[..., k * width : (k + 1) * width]) for k in range(4)]
        return torch.cat(parts, -1)

    return run


def _maxvit(model: nn.Module, compat: Compat) -> None:
    # torchvision MaxViT: the attention's head split (stored n_heads x head_dim) is read by
    # the graph as reshapes of the residual stream: run it as one op, shrink to_qkv/merge with
    # the stream (in multiples of the head count), head_dim refreshed by the same pruner.
    kinds = _types("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention")
    _fused_attention(model, compat, kinds, ("to_qkv", "merge", "n_heads", "head_dim"))


def _shufflenet(model: nn.Module, compat: Compat) -> None:
    # torchvision ShuffleNetV2: channel_shuffle (view-transpose-view) is read by the graph as
    # a reshape with a zero stride (ZeroDivisionError) or as a pass-through, which would pair
    # the wrong channels: groups crossing it keep their channels, branch-internal ones don't.
    kinds = _types("torchvision.models.shufflenetv2", "InvertedResidual")
    if kinds and any(isinstance(m, kinds) for m in model.modules()):
        import torchvision.models.shufflenetv2 as shufflenet

        reason = "crosses a channel shuffle (ShuffleNetV2), whose channel order is not modelled"
        compat.barrier_functions.append((shufflenet, "channel_shuffle", reason))


def _families() -> list[Callable[[nn.Module, Compat], None]]:
    return [_vit, _swin, _maxvit, _shufflenet]


def prepare(model: nn.Module) -> Compat:
    """The fixes for ``model``'s families (cheap; the model is not changed)."""
    compat = Compat(index_limit=2 * _largest_dim(model))
    for fix in _families():
        fix(model, compat)
    return compat


def after_apply(model: nn.Module) -> list[str]:
    """Refresh widths that models store as attributes; return notes for the report.

    torchvision ViT's ``hidden_dim`` (reused by its input reshape) follows ``conv_proj``.
    (Widths stored on a module the plan shrinks, such as MaxViT attention's ``head_dim``,
    are refreshed by its pruner instead.)
    """
    notes = []
    vits = _types("torchvision.models.vision_transformer", "VisionTransformer")
    for vit in (m for m in model.modules() if vits and isinstance(m, vits)):
        width = vit.conv_proj.out_channels
        if vit.hidden_dim != width:
            notes.append(f"VisionTransformer.hidden_dim {vit.hidden_dim} -> {width}")
            vit.hidden_dim = width
    return notes
