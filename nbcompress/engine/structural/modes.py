"""Training-mode forwards: the flags a training step uses, and forwards that leave no trace.

Branches that only run in training mode (GoogLeNet's and Inception's auxiliary classifiers,
``if self.training: return out, self.aux(h)``) are invisible to an eval-mode forward: the
dependency graph must be built from a forward that runs them, and the model must be checked
in that mode after removal, or it breaks at its first training step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "build_flags",
    "called_modules",
    "returned_layers",
    "set_flags",
    "tensor_shapes",
    "traceless",
    "training_flags",
]

Flags = dict[nn.Module, bool]


def training_flags(model: nn.Module) -> Flags:
    """The flags of the model's training forward: its own if any module trains, else all on.

    A model in eval mode is trained later with ``model.train()`` (every flag on).
    """
    flags = {m: m.training for m in model.modules()}
    return flags if any(flags.values()) else dict.fromkeys(flags, True)


def set_flags(flags: Flags) -> None:
    """Set every module's ``training`` flag as ``flags`` says."""
    for module, flag in flags.items():
        module.training = flag


@contextlib.contextmanager
def traceless(model: nn.Module, flags: Flags | None = None) -> Iterator[None]:
    """Forwards that leave no trace, optionally run with other training ``flags``.

    The running statistics (BatchNorm's mean, variance and ``num_batches_tracked``) of every
    module that trains in the block, the random number generators and the flags come back
    afterwards; gradients are off.
    """
    saved = {m: m.training for m in model.modules()}
    active = flags if flags is not None else saved
    buffers = [
        (b, b.clone()) for m in model.modules() if active.get(m, False) for b in m.buffers(False)
    ]
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            set_flags(active)
            yield
    finally:
        with torch.no_grad():
            for buf, value in buffers:
                buf.copy_(value)
        set_flags(saved)


def called_modules(model: nn.Module, flags: Flags, run: Callable[[], Any]) -> set[int]:
    """Ids of the modules that ``run()`` calls with ``flags`` set (the model left as it was)."""
    called: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, _a: called.add(id(mod))) for m in flags]
    try:
        with traceless(model, flags):
            run()
    finally:
        for h in handles:
            h.remove()
    return called


def tensor_shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a model's output (tuples, lists, dicts walked)."""
    return [tuple(t.shape) for t in _tensors(out)]


def build_flags(model: nn.Module, run: Callable[[], Any]) -> Flags:
    """The training flags to build the dependency graph with: the mode whose forward runs most.

    A model that trains (any module) is traced in its own mode; a model in eval mode in
    training mode only when that forward calls modules the eval forward does not (auxiliary
    classifiers), so that the graph covers the training step too.
    """
    own = {m: m.training for m in model.modules()}
    train = training_flags(model)
    if train == own:
        return own
    try:
        in_train = called_modules(model, train, run)
    except Exception:  # noqa: BLE001 - no training forward on this input: eval it is
        return own
    return train if in_train > called_modules(model, own, run) else own


def returned_layers(model: nn.Module, run: Callable[[], Any]) -> set[str]:
    """Conv/Linear layers whose output ``run()`` returns as is (e.g. a training-only head)."""
    made: dict[int, str] = {}
    kinds = (nn.modules.conv._ConvNd, nn.Linear)

    def hook(name: str) -> Callable[..., None]:
        def record(_mod: nn.Module, _args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                made[id(out)] = name

        return record

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        with torch.no_grad():
            out = run()
    finally:
        for h in handles:
            h.remove()
    found = {made.get(id(t)) for t in _tensors(out)}
    return {n for n in found if n is not None}


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []
