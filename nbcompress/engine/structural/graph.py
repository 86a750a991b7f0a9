"""Coupled channel groups of a model, from Torch-Pruning's dependency graph (built in a child).

The graph build follows ``grad_fn`` (every parameter must require grad), runs the forward
that calls the most modules (a training-only auxiliary head must be seen: see
:mod:`~nbcompress.engine.structural.modes`) and can run away in memory on some models, so
it only ever runs in a bounded child process
(:func:`~nbcompress.engine.structural.child.run_bounded`); what comes back is a list of
plain, picklable :class:`~nbcompress.engine.structural.plan.Group` records.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import traceback
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.layers import output_layers, select_layers
from nbcompress.engine.core.snapshot import checksum
from nbcompress.engine.core.validation import as_inputs, call_model, check_module
from nbcompress.engine.structural import compat as compat_mod
from nbcompress.engine.structural.child import check_bounds, run_bounded
from nbcompress.engine.structural.modes import build_flags, returned_layers, set_flags
from nbcompress.engine.structural.plan import Group, GroupItem
from nbcompress.engine.structural.scores import IMPORTANCES, input_norms

__all__ = ["channel_groups", "clear_cache"]

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[Group]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Options:
    layers: tuple[str, ...] | None
    ignore: tuple[str, ...]
    include_output: bool
    importance: str


def _patterns(value: str | Sequence[str] | None, arg: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise TypeError(
            f"{arg}: expected a glob pattern or a list of them such as ['features.*'], "
            f"got {type(value).__name__} {value!r}."
        )
    return tuple(value)


def _check_ignore(model: nn.Module, ignore: tuple[str, ...]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for pattern in ignore:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            more = f", … ({len(names)} in all)" if len(names) > 20 else ""
            shown = ", ".join(names[:20]) + more
            raise ValueError(f"ignore: pattern {pattern!r} matches no module. Available: {shown}.")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # A pattern naming a module also covers its submodules.
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _item(dg: Any, dep: Any, idxs: Sequence[int], root_idxs: Sequence[int]) -> GroupItem | None:
    """A Torch-Pruning group item as a plain record (``None`` for ops holding no tensor)."""
    from torch_pruning import ops

    target = dep.target
    roots = tuple(int(r) for r in root_idxs)
    if target.type == ops.OPTYPE.PARAMETER:
        owner, _, attr = dg._param_to_name[target.module].rpartition(".")
        handler = f"param:{attr}:{target.pruning_dim}"
        return GroupItem(owner, handler, tuple(int(i) for i in idxs), roots)
    module = target.module
    pruner = getattr(dep.handler, "__self__", None)
    if not isinstance(module, nn.Module) or module not in dg._module2name:
        return None
    if pruner is None or isinstance(pruner, ops.DummyPruner):
        return None
    # Pruners whose input and output are one dimension (norms, depthwise convs, attention)
    # are shrunk once, as "out".
    same = type(pruner).prune_in_channels is type(pruner).prune_out_channels
    handler = "out" if same or dg.is_out_channel_pruning_fn(dep.handler) else "in"
    return GroupItem(dg._module2name[module], handler, tuple(int(i) for i in idxs), roots)


def _blocks_and_step(model: nn.Module, items: Sequence[GroupItem], width: int, compat: Any):
    """Equal-width blocks (grouped convs, GroupNorm) and the removal step (attention heads)."""
    blocks, step, reason = 1, 1, None
    for item in items:
        mod = model.get_submodule(item.module)
        heads = compat.num_heads.get(mod) or getattr(mod, "num_heads", None)
        if isinstance(mod, nn.MultiheadAttention) or mod in compat.num_heads:
            step = math.lcm(step, int(heads), compat.round_to or 1)
        g = mod.num_groups if isinstance(mod, nn.GroupNorm) else 1
        if isinstance(mod, nn.modules.conv._ConvNd):
            depthwise = mod.groups == mod.in_channels == mod.out_channels
            g = 1 if depthwise else mod.groups
        if g > 1:
            if list(item.idxs) != list(range(width)) or item.root_idxs != item.idxs:
                reason = f"{item.module}: channel groups (groups={g}) behind a concat or reshape"
            blocks = math.lcm(blocks, g)
    if width % blocks:
        reason = reason or f"{width} channels do not split into {blocks} equal blocks"
    return blocks, step, reason


def _reason(group_items: Sequence[GroupItem], root: str, width: int, ctx: dict) -> str | None:
    """Why a group must keep its channels (``None`` if it may lose some)."""
    opts: _Options = ctx["options"]
    if opts.layers is not None and not _matches(root, opts.layers):
        return "not selected by layers="
    for item in group_items:
        if item.handler == "out" and item.module in ctx["heads"]:
            return f"keeps the outputs of the output layer {item.module or '(model)'}"
        if opts.ignore and _matches(item.module, opts.ignore):
            return f"touches {item.module}, left alone by ignore="
    if width < 2:
        return "has a single channel"
    return None


def _convert(dg: Any, group: Any, root: str, width: int, ctx: dict) -> Group:
    items = [_item(dg, it.dep, it.idxs, it.root_idxs) for it in group]
    items = [i for i in items if i is not None]
    blocks, step, reason = _blocks_and_step(ctx["model"], items, width, ctx["compat"])
    # Compat may stop a group it knows the graph gets wrong (channel shuffle, windows).
    stopped = getattr(ctx["compat"], "group_reason", None)
    reason = _reason(items, root, width, ctx) or (stopped(group) if stopped else None) or reason
    scores = IMPORTANCES[ctx["options"].importance](group, width, ctx["norms"])
    return Group(
        root=root,
        width=width,
        items=tuple(items),
        scores=tuple(float(s) for s in scores.tolist()),
        step=step,
        reason=reason,
        blocks=blocks,
    )


def _groups_in_child(model: nn.Module, inputs: tuple, options: _Options) -> list[Group]:
    """Child side: build the graph once and list every Conv/Linear-rooted group.

    The child holds a copy-on-write image of the model, so it may change it freely: every
    parameter requires grad (Torch-Pruning follows ``grad_fn``: frozen layers would be
    invisible) and the training flags are those of
    :func:`~nbcompress.engine.structural.modes.build_flags` (BatchNorm statistics and
    dropout in a training forward are harmless here).
    """
    import torch_pruning as tp

    for p in model.parameters():
        p.requires_grad_(True)
    flags = build_flags(model, lambda: call_model(model, inputs))
    set_flags(flags)
    compat = compat_mod.prepare(model)
    heads = set()
    if not options.include_output:
        heads = set(output_layers(model, inputs).names)
        if any(flags.values()):
            heads |= returned_layers(model, lambda: call_model(model, inputs))
    norms = {}
    if options.importance == "wanda":
        norms = input_norms(model, lambda: call_model(model, inputs))
    ctx = {"model": model, "compat": compat, "options": options, "heads": heads, "norms": norms}

    def forward(m: nn.Module, x: tuple) -> Any:
        set_flags(flags)  # Torch-Pruning's trace calls model.eval() first
        return call_model(m, x)  # exactly one forward

    with compat.patches(), torch.enable_grad():
        try:
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                forward_fn=forward,
                customized_pruners=compat.customized_pruners or None,
                unwrapped_parameters=compat.unwrapped_parameters or None,
                ignored_layers=compat.ignored_layers or None,
                verbose=False,
            )
        except Exception as err:
            raise _explained(err) from err
        with _mappings_frozen():
            groups = _enumerate(dg, compat, options, ctx)
    return groups


def _explained(err: Exception) -> Exception:
    """Name the construct when Torch-Pruning fails inside its index mappings."""
    frames = traceback.extract_tb(err.__traceback__)
    if frames and frames[-1].filename.endswith("index_mapping.py"):
        return RuntimeError(
            "a reshape, concat or split that the dependency graph cannot map (such as a "
            f"channel shuffle or windowed attention; {type(err).__name__}: {err} in "
            f"{frames[-1].name})"
        )
    return err


@contextlib.contextmanager
def _mappings_frozen() -> Iterator[None]:
    """Skip Torch-Pruning's index-mapping refresh per group: nothing is pruned in the child.

    ``get_pruning_group`` recomputes every concat/reshape mapping of the whole graph each
    time (measured: 45 of 48 s on densenet201); the graph build already computed them.
    """
    from torch_pruning.dependency import graph as tp_graph

    module = tp_graph.index_mapping
    refresh = module.update_index_mapping
    module.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        module.update_index_mapping = refresh


def _enumerate(dg: Any, compat: Any, options: _Options, ctx: dict) -> list[Group]:
    """Every Conv/Linear-rooted group of the built graph, converted and scored."""
    groups: list[Group] = []
    visited: set[int] = set()
    ignored = {id(m) for m in compat.ignored_layers}
    roots = (nn.modules.conv._ConvNd, nn.Linear)
    for module in list(dg.module2node):
        if not isinstance(module, roots) or id(module) in visited or id(module) in ignored:
            continue
        name = dg._module2name.get(module)
        if name is None or (options.layers is not None and not _matches(name, options.layers)):
            continue
        pruner = dg.get_pruner_of_module(module)
        width = pruner.get_out_channels(module) if pruner is not None else None
        if not width:
            continue
        group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(width)))
        for it in group:
            if dg.is_out_channel_pruning_fn(it.dep.handler):
                visited.add(id(it.dep.target.module))
        groups.append(_convert(dg, group, name, width, ctx))
    return groups


def _describe(x: Any) -> Any:
    """A hashable identity of one input: shapes, dtypes and values (checksums)."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, checksum(x))
    if isinstance(x, Mapping):
        return tuple((k, _describe(v)) for k, v in x.items())
    if isinstance(x, (tuple, list)):
        return tuple(_describe(v) for v in x)
    return (type(x).__name__, id(x))


_PLAIN = (bool, int, float, str, type(None))


def _plain(obj: Any, where: str) -> list[tuple]:
    """``obj``'s attributes that are plain values (or tuples/lists of them), with ``where``."""
    out = []
    for key, value in vars(obj).items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        if all(isinstance(v, _PLAIN) for v in items):
            out.append((where, key, type(value).__name__, repr(value)))
    return out


def _attributes(model: nn.Module) -> tuple:
    """Every module's plain Python attributes and training flag, as one hashable value.

    A forward may branch on them (``if self.skip: x = x + h``, ``if self.training``): a
    graph built before such an attribute changed can mis-wire the model, so they are part
    of the cache key. Plain values only (numbers, strings, ``None``, tuples/lists of them),
    also one level into other objects that modules hold (a Hugging Face ``config``); an
    attribute that changes on every forward (a call counter) costs a rebuild, never a
    stale graph.
    """
    out: list[tuple] = []
    held: dict[int, Any] = {}
    for name, module in model.named_modules():
        out += _plain(module, name)
        for value in vars(module).values():
            if hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor)):
                held.setdefault(id(value), (f"{name}.<{type(value).__name__}>", value))
    for where, value in held.values():
        with contextlib.suppress(TypeError):
            out += _plain(value, where)
    return tuple(out)


def _cache_key(model: nn.Module, inputs: tuple, options: _Options) -> tuple:
    # Values, not ._version: a trial's rollback restores values in place (bumping the
    # version), and a sweep must not rebuild the graph after every point. Attributes and
    # training flags too: the forward may depend on them (see _attributes).
    params = tuple((n, tuple(p.shape), checksum(p)) for n, p in model.named_parameters())
    structure = tuple((n, type(m).__name__) for n, m in model.named_modules())
    return (params, structure, _attributes(model), _describe(inputs), options)


def _check_device(model: nn.Module) -> None:
    devices = {p.device.type for p in model.parameters()} - {"cpu"}
    if devices:
        raise ValueError(
            f"model: its parameters are on {', '.join(sorted(devices))}; the dependency graph "
            "is built in a forked process, which runs on the CPU only. Move the model to the "
            "CPU first (model.cpu()), remove channels, then move it back."
        )


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget cached groups (of ``model``, or of every model)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def channel_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    layers: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    include_output: bool = False,
    importance: str = "l1",
    timeout: float = 120.0,
    memory: int = 4 << 30,
) -> list[Group]:
    """The model's coupled channel groups, each rooted at a Conv/Linear's output channels.

    The dependency graph is built in a forked child process bounded in time and memory
    (the model is never changed); results are cached per model, weights, structure, plain
    module attributes, training flags and inputs, so a sweep builds it once.

    Args:
        model: The model.
        example_inputs: One batch (tensor, tuple or dict) the model runs on.
        layers: Glob pattern(s) of the root layers that may lose channels (others are
            returned with a ``reason``; their groups are not even expanded).
        ignore: Glob pattern(s) of modules never touched: groups reaching them keep
            their channels.
        include_output: Also allow the output layer(s)' outputs to be removed.
        importance: ``"l1"`` (group-aware L1) or ``"wanda"`` (|W| · ‖X‖ on the input).
        timeout: Seconds the child may take.
        memory: Bytes of extra memory the child may use.

    Returns:
        The groups (prunable ones have ``reason is None``).

    Raises:
        ValueError: Bad argument, or the graph could not be built (one line with the fix).
    """
    check_module(model)
    check_bounds(timeout, memory)
    _check_device(model)
    inputs = as_inputs(example_inputs)
    if importance not in IMPORTANCES:
        raise ValueError(
            f"importance: {importance!r} is unknown; choose one of {list(IMPORTANCES)}."
        )
    layer_patterns = _patterns(layers, "layers")
    if layer_patterns is not None:
        select_layers(model, list(layer_patterns), include_output=True)  # unknown pattern → error
    ignore_patterns = _patterns(ignore, "ignore") or ()
    _check_ignore(model, ignore_patterns)
    options = _Options(layer_patterns, ignore_patterns, bool(include_output), importance)
    key = _cache_key(model, inputs, options)
    cached = _CACHE.get(model, {})
    if key in cached:
        return cached[key]
    groups = run_bounded(_groups_in_child, model, inputs, options, timeout=timeout, memory=memory)
    _CACHE[model] = {key: groups}  # one entry per model: a sweep reuses it, an edit replaces it
    return groups
