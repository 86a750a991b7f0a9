"""A module tree's structure: classes, width attributes and tensor shapes; restoring it.

Used by :mod:`nbcompress.engine.structural.persist` to reshape a freshly built model to a
saved (compressed) one before its weights are loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.interrupts import deferred_interrupts
from nbcompress.engine.core.snapshot import ModuleState

__all__ = [
    "apply_structure",
    "check_state",
    "describe",
    "is_width",
    "qualname",
    "shape_of",
    "state_key",
    "structure_changes",
]


def qualname(module: nn.Module) -> str:
    """The qualified name of the module's class, e.g. ``torch.nn.modules.conv.Conv2d``."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_width(value: Any) -> bool:
    """An int, or a tuple/list/set of ints: what removal changes (widths, head counts)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return False


def describe(module: nn.Module) -> dict[str, Any]:
    """Class, width attributes and tensor shapes of one module (not its children)."""
    persistent = [k for k in module._buffers if k not in module._non_persistent_buffers_set]
    tensors = {**module._parameters, **{k: module._buffers[k] for k in persistent}}
    return {
        "class": qualname(module),
        "attrs": {k: v for k, v in vars(module).items() if not k.startswith("_") and is_width(v)},
        "params": {k: shape_of(v) for k, v in module._parameters.items()},
        "buffers": {k: shape_of(module._buffers[k]) for k in persistent},
        "dtypes": {
            k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items() if v is not None
        },
    }


def shape_of(t: torch.Tensor | None) -> list[int] | None:
    """The shape as a list (``None`` for an unset parameter, such as ``bias=False``)."""
    return None if t is None else list(t.shape)


def state_key(name: str, attr: str) -> str:
    """The state_dict key of tensor ``attr`` of the module at ``name``."""
    return f"{name}.{attr}" if name else attr


def check_state(structure: Mapping, state: Mapping[str, Any], label: str) -> None:
    """Every recorded tensor is in the state_dict at its recorded shape (an undamaged file)."""
    expected = {
        state_key(name, k): shape
        for name, record in structure.items()
        for kind in ("params", "buffers")
        for k, shape in record[kind].items()
        if shape is not None
    }
    for key, shape in expected.items():
        if key not in state or list(state[key].shape) != shape:
            raise ValueError(
                f"path: {label} is damaged: {key!r} is missing or not of its recorded shape "
                f"{shape}; save the model again with nbcompress.save(model, path)."
            )
    stray = [k for k in state if k not in expected and not k.endswith("_extra_state")]
    if stray:
        raise ValueError(f"path: {label} is damaged: {stray[0]!r} belongs to no recorded module.")


def structure_changes(model: nn.Module, structure: Mapping) -> list[tuple[nn.Module, dict, list]]:
    """Per module: the width attributes and tensors that differ from the file's."""
    own = dict(model.named_modules(remove_duplicate=False))
    out = []
    for name, record in structure.items():
        module = own[name]
        attrs = {k: v for k, v in record["attrs"].items() if getattr(module, k, None) != v}
        tensors = [
            (kind, k, shape, record["dtypes"].get(k))
            for kind, table in (("params", module._parameters), ("buffers", module._buffers))
            for k, shape in record[kind].items()
            if shape_of(table.get(k)) != shape
        ]
        if attrs or tensors:
            out.append((module, attrs, tensors))
    return out


def _device(module: nn.Module, model: nn.Module) -> torch.device:
    for t in (*module.parameters(recurse=False), *model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _retensor(module: nn.Module, change: tuple, made: dict, model: nn.Module) -> None:
    """Put an empty tensor of the recorded shape in place (filled by load_state_dict)."""
    kind, attr, shape, dtype_name = change
    table = module._parameters if kind == "params" else module._buffers
    old = table.get(attr)
    if shape is None:
        table[attr] = None
        return
    if old is not None and id(old) in made:  # a tied weight stays tied
        table[attr] = made[id(old)]
        return
    dtype = old.dtype if old is not None else getattr(torch, dtype_name or "float32")
    device = old.device if old is not None else _device(module, model)
    new = torch.empty(shape, dtype=dtype, device=device)
    if kind == "params":
        grad = old.requires_grad if old is not None else new.is_floating_point()
        new = nn.Parameter(new, requires_grad=grad)
    if old is not None:
        made[id(old)] = new
    table[attr] = new


def _modules_touched(model: nn.Module, modules: Mapping, changes: list) -> list[nn.Module]:
    touched = {id(m): m for m, _, _ in changes}
    for name in modules:
        parent = model.get_submodule(name.rpartition(".")[0])
        touched[id(parent)] = parent
    return list(touched.values())


def _with_modules(state: Mapping, metadata: Mapping, modules: Mapping) -> OrderedDict:
    """The state_dict plus the stored modules' own state, with the versions loaders read."""
    full = OrderedDict(state)
    full._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    for name, module in modules.items():  # quantized loaders expect their own keys back
        own = module.state_dict()
        full.update({state_key(name, k): v for k, v in own.items()})
        versions = getattr(own, "_metadata", {})
        full._metadata.update({state_key(name, k) if k else name: v for k, v in versions.items()})
    return full


def apply_structure(
    model: nn.Module, modules: Mapping, changes: list, state: Mapping, metadata: Mapping
) -> None:
    """Reshape ``model`` to the saved structure, put stored modules in place, load ``state``.

    Args:
        model: The model to reshape and load (in place).
        modules: Module name -> module to put there whole.
        changes: What :func:`structure_changes` found.
        state: The state_dict, already checked by :func:`check_state`.
        metadata: The state_dict's ``_metadata`` (module versions), as saved.

    Ctrl-C waits until it is done; on an error the modules' attributes are put back.
    """
    saved = [ModuleState(m) for m in _modules_touched(model, modules, changes)]
    made: dict[int, torch.Tensor] = {}
    with deferred_interrupts():
        try:
            for name, new in modules.items():
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
            for module, attrs, tensors in changes:
                for k, v in attrs.items():
                    setattr(module, k, v)
                for change in tensors:
                    _retensor(module, change, made, model)
            model.load_state_dict(_with_modules(state, metadata, modules))  # strict
        except BaseException:
            for s in reversed(saved):
                s.restore()
            raise
