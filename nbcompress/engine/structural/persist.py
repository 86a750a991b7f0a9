"""Save a compressed model's weights with its new shapes; load them into the original class.

After channels are removed, ``model.state_dict()`` no longer fits a freshly built model:
``fresh.load_state_dict(sd)`` raises torch's size-mismatch ``RuntimeError``. :func:`save`
writes the state_dict together with the *structure* — per module its class, its integer
width attributes (``out_channels``, ``num_features``, ``hidden_dim``, ``num_heads``, ...) and
the shapes of its parameters and buffers — and :func:`load` reshapes a freshly built model
of the original architecture to that structure before loading the weights.

Modules that compression *replaced* by another class (torch.ao quantized modules,
nbcompress sparse modules, ``nn.Identity`` left by fusion) are stored whole and put in
place. The file format (``torch.save`` of a dict)::

    {"format": "nbcompress/1",
     "state_dict": {key: tensor},                      # without replaced modules' keys
     "metadata": {module prefix: {"version": int}},    # the state_dict's _metadata
     "structure": {module name: {"class": "torch.nn.modules.conv.Conv2d",
                                 "attrs": {"out_channels": 45, ...},
                                 "params": {"weight": [45, 3, 3, 3], "bias": None},
                                 "buffers": {"running_mean": [45], ...},
                                 "dtypes": {"weight": "float32", ...}}},
     "replaced": {module name: bytes of torch.save(module) | "identity"}}

Everything but the replaced modules loads with ``torch.load(weights_only=True)``. Loading
does not record a history step: it builds the model, like ``load_state_dict``; it is
refused on a model that has steps to undo, since those could no longer be undone exactly.
"""

from __future__ import annotations

import io
import os
import pickle
import weakref
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import nn

from nbcompress.engine.core.history import history
from nbcompress.engine.core.validation import check_module
from nbcompress.engine.structural.structure import (
    apply_structure,
    check_state,
    describe,
    qualname,
    structure_changes,
)

__all__ = ["FORMAT", "load", "save"]

FORMAT = "nbcompress/1"

PathLike = str | os.PathLike | IO[bytes]

# Classes that only compression puts into a model: stored whole rather than reshaped.
_REPLACING = (
    "torch.ao.",
    "torch.nn.quantized",
    "torch.nn.intrinsic",
    "torch.nn.qat",
    "torch.nn.quantizable",
    "nbcompress.engine.",
    "nbcompress.kernels.",
)
# Replaced modules found by load, so that saving the loaded model again keeps them whole.
_LOADED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _under(name: str, prefixes: set[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _replaced(model: nn.Module) -> set[str]:
    """Names of the outermost modules to store whole (their class is not reshaped)."""
    found = set(_LOADED.get(model, ()))
    for name, module in model.named_modules(remove_duplicate=False):
        if name and (type(module).__module__.startswith(_REPLACING) or type(module) is nn.Identity):
            found.add(name)
    return {n for n in found if not _under(n, found - {n})}


def _masked(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if any(k.endswith("_orig") for k in module._parameters):
            return name or "model"
    return None


def save(model: nn.Module, path: PathLike) -> None:
    """Save ``model``'s weights with their shapes, loadable into the original architecture.

    The file holds the state_dict and, per module, the class, integer width attributes and
    tensor shapes (see the module docstring); modules compression replaced (quantized,
    sparse, fused into ``nn.Identity``) are stored whole. Load it with :func:`load` into a
    freshly built model of the original architecture.

    Args:
        model: The model to save (compressed or not).
        path: A file name or a binary file object.

    Raises:
        ValueError: A layer still holds pruning masks kept for fine-tuning.
    """
    check_module(model)
    masked = _masked(model)
    if masked is not None:
        raise ValueError(
            f"model: {masked!r} still holds pruning masks kept for fine-tuning (weight_orig/"
            "weight_mask); make them permanent with nbcompress.remove_masks_(model) first, "
            "or keep everything with torch.save(model, path)."
        )
    replaced = _replaced(model)
    structure = {
        name: describe(module)
        for name, module in model.named_modules(remove_duplicate=False)
        if not _under(name, replaced)
    }
    full = model.state_dict()
    state = {k: v for k, v in full.items() if not _under(k, replaced)}
    metadata = {k: dict(v) for k, v in getattr(full, "_metadata", {}).items()}
    torch.save(
        {
            "format": FORMAT,
            "state_dict": state,
            "metadata": metadata,  # module versions, which some loaders read
            "structure": structure,
            "replaced": {n: _pack(model.get_submodule(n)) for n in sorted(replaced)},
        },
        path,
    )


def _pack(module: nn.Module) -> bytes | str:
    if type(module) is nn.Identity:
        return "identity"  # no pickle needed: the file stays weights_only-loadable
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def _label(path: PathLike) -> str:
    return repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "the file"


def _read(path: PathLike) -> Any:
    """The file's content, read with ``weights_only=True`` (tensors and plain containers)."""
    label = _label(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a pickled object: not a torch file at all
            raise ValueError(f"path: {label} is not a file written by torch.save.") from err
        raise ValueError(
            f"path: {label} holds pickled Python objects (a whole model saved with "
            "torch.save(model)?), not weights: if you trust it, use torch.load(path, "
            "weights_only=False); to move weights, save with nbcompress.save(model, path)."
        ) from err
    except (RuntimeError, EOFError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"path: {label} is not a file written by torch.save or nbcompress.save ({first})."
        ) from err


def _refuse_history(model: nn.Module) -> None:
    steps = len(history(model))
    if steps:
        raise ValueError(
            f"model: it has {steps} recorded nbcompress step(s), which loading over it would "
            "leave impossible to undo exactly; load into a freshly built model, or undo them "
            "first with nbcompress.undo_(model, all=True)."
        )


def _load_plain(state: Mapping[str, Any], model: nn.Module, label: str) -> None:
    """A plain state_dict: loaded when it fits, else one line saying how to save it."""
    # keep_vars: the running (dense) form; int8 weights a state_dict packed as a bitmask
    # (1-D uint8, engine/quantize/bitmask.py) are checked by the module loading them.
    own = model.state_dict(keep_vars=True)
    wrong = [
        k
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape) and not _bitmask_packed(v, own[k])
    ]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"path: {label} was saved without its shapes (a plain state_dict) and "
            f"{len(wrong)} tensor(s) differ from the model's, e.g. {k!r} "
            f"{list(state[k].shape)} vs {list(own[k].shape)}; save the compressed model with "
            "nbcompress.save(model, path) and load that file with nbcompress.load(path, model)."
        )
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"path: the state_dict in {label} does not fit the model (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}); build the same architecture as "
            "was saved, or save with nbcompress.save(model, path)."
        )
    model.load_state_dict(state)


def _bitmask_packed(saved: Any, own: Any) -> bool:
    """Whether ``saved`` is the bitmask-packed form of a tensor shaped like ``own``."""
    return (
        isinstance(saved, torch.Tensor)
        and saved.dim() == 1
        and saved.dtype == torch.uint8
        and isinstance(own, torch.Tensor)
        and own.dim() > 1
    )


def _check_names(model: nn.Module, structure: Mapping, replaced: Mapping) -> None:
    """Same module names and classes as the file, or one line naming the first difference."""
    own = dict(model.named_modules(remove_duplicate=False))
    fix = "build the model with the same class and constructor arguments as the saved one"
    for name, record in structure.items():
        if name not in own:
            raise ValueError(
                f"model: the file has a module {name!r} ({record['class']}) that this model "
                f"lacks; {fix}, then call nbcompress.load(path, model)."
            )
        # By class name: a class defined in a notebook is __main__.Net there, mod.Net here.
        if qualname(own[name]).rpartition(".")[2] != record["class"].rpartition(".")[2]:
            raise ValueError(
                f"model: {repr(name) if name else 'the model'} is a {qualname(own[name])}, "
                f"the file holds "
                f"a {record['class']}; {fix}, then call nbcompress.load(path, model)."
            )
    extra = [n for n in own if n not in structure and not _under(n, set(replaced))]
    if extra:
        raise ValueError(
            f"model: it has a module {extra[0]!r} that the file lacks; {fix}, then call "
            "nbcompress.load(path, model)."
        )


def _unpack(replaced: Mapping[str, Any], label: str) -> dict[str, nn.Module]:
    """The stored modules; a pickled module is code, so it needs ``weights_only=False``."""
    modules = {}
    for name, blob in replaced.items():
        if blob == "identity":
            modules[name] = nn.Identity()
            continue
        try:
            modules[name] = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"path: the module {name!r} stored whole in {label} could not be rebuilt "
                f"({first}); import the package that defines its class, then load again."
            ) from err
    return modules


def load(path: PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save` into a freshly built model of the original class.

    The model is reshaped to the saved structure first (width attributes set, parameters
    and buffers re-created at the saved shapes, stored modules put in place), then the
    weights are loaded. Names, classes and shapes are checked before anything changes; a
    mismatch is one line naming the module and the fix. A plain state_dict file (from
    ``torch.save(model.state_dict())``) is loaded when its shapes fit the model.

    The file is read with ``torch.load(weights_only=True)``. Modules stored whole (quantized,
    sparse) are Python objects, which only ``weights_only=False`` can rebuild: load such files
    only from a source you trust, as for ``torch.load`` of a whole model.

    Loading records no history step (like ``load_state_dict``, it builds the model); it is
    refused on a model with steps to undo.

    Args:
        path: A file name or a binary file object written by :func:`save`.
        model: A model built like the one saved, before compression (modified in place).

    Returns:
        The model.

    Raises:
        ValueError: The file or the architecture does not match (one line: what and how).
    """
    check_module(model)
    _refuse_history(model)
    label = _label(path)
    data = _read(path)
    if not (isinstance(data, Mapping) and "format" in data):
        if isinstance(data, Mapping) and all(torch.is_tensor(v) for v in data.values()):
            _load_plain(data, model, label)
            return model
        raise ValueError(
            f"path: {label} holds a {type(data).__name__}, not a state_dict; write it with "
            "nbcompress.save(model, path)."
        )
    if data["format"] != FORMAT:
        raise ValueError(
            f"path: {label} is in format {data['format']!r}; this nbcompress reads {FORMAT!r} "
            "(a newer nbcompress wrote it: upgrade)."
        )
    structure, replaced, state = data["structure"], data["replaced"], data["state_dict"]
    _check_names(model, structure, replaced)
    check_state(structure, state, label)
    modules = _unpack(replaced, label)
    metadata = data.get("metadata", {})
    apply_structure(model, modules, structure_changes(model, structure), state, metadata)
    if replaced:
        _LOADED[model] = set(replaced)
    return model
