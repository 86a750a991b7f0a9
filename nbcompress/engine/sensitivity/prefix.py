"""Replaying what runs before a layer, so a proxy trial computes only what pruning changes.

A data-free sweep runs the same input through the model once per layer and ratio. Every
module call that finished before the pruned layer's first call started cannot depend on
that layer, so its output is the dense run's: it is replayed from a copy instead of
recomputed (on a torchvision resnet18 about half of each forward). A replayed call is one
whose result is nothing but its output: calls that changed their inputs in place (a
``ReLU(inplace=True)``), whose output was later changed in place, or whose output is not
a plain structure of tensors run for real (their children may still be replayed). Each
layer's replay is checked before use: the checksums of the inputs the layer receives must
equal the dense run's, else that layer is swept with full forwards. A layer whose weights
are shared with a module called before it (tied embeddings) is never replayed.

The replay puts an instance ``forward`` on the replayed modules for the length of one
layer's sweep and removes it afterwards (also on Ctrl-C); the model's tensors are not
touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.interrupts import deferred_interrupts
from nbcompress.engine.core.validation import call_model, run_forward
from nbcompress.engine.sensitivity.guard import checksum

__all__ = ["Prefix"]

#: Copies of replayed outputs kept at most (bytes); above it the sweep runs full forwards.
BUDGET = 1 << 30


@dataclass(eq=False)
class _Call:
    module: nn.Module
    start: int
    parent: _Call | None
    end: int = -1
    output: Any = None
    inputs: list[tuple] = field(default_factory=list)  # (tensor, version) while recording
    outputs: list[tuple] = field(default_factory=list)
    cacheable: bool = False


class _Stop(Exception):
    """Raised at the layer's first call during the check: the rest need not run."""


def _tensors(obj: Any, depth: int = 0) -> list[torch.Tensor] | None:
    """Every tensor of a plain structure (tensors, tuples, lists, dicts); ``None`` if other."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if obj is None or isinstance(obj, (int, float, bool, str)) or depth > 8:
        return [] if depth <= 8 else None
    if isinstance(obj, (tuple, list)) or type(obj) is dict:
        items = obj.values() if isinstance(obj, dict) else obj
        found: list[torch.Tensor] = []
        for item in items:
            sub = _tensors(item, depth + 1)
            if sub is None:
                return None
            found += sub
        return found
    return None


def _copy(obj: Any) -> Any:
    """A fresh copy of a plain structure: later in-place edits must not reach the stored one."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_copy(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    return obj


def _stamps(obj: Any) -> list[tuple] | None:
    found = _tensors(obj)
    return None if found is None else [(t, t._version) for t in found]


def _intact(stamps: list[tuple] | None) -> bool:
    return stamps is not None and all(t._version == v for t, v in stamps)


class Prefix:
    """The dense run's module calls, and per layer which of them a trial can replay.

    Args:
        model: The model (in eval mode), about to be swept.
        inputs: Its example inputs, as :func:`~nbcompress.engine.core.validation.as_inputs`
            returns them.
        layers: Qualified name → layer that will be swept.

    Attributes:
        output: The dense run's output (the proxy's reference).
        plans: Layer name → module → outputs to replay for its calls before the layer
            (``None``: run that call for real); layers without a plan run full forwards.
    """

    def __init__(self, model: nn.Module, inputs: tuple, layers: dict[str, nn.Module]) -> None:
        self.model, self.inputs = model, inputs
        self.plans: dict[str, dict[nn.Module, list]] = {}
        self.checks: dict[str, list[tuple]] = {}
        if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
            self.output = run_forward(model, inputs)  # no hooks in TorchScript: full forwards
            return
        calls = self._record(model, inputs, set(map(id, layers.values())))
        for name, layer in layers.items():
            first = next((c for c in calls if c.module is layer), None)
            if first is not None and not _tied(layer, calls, first):
                plan = _plan(calls, first)
                if plan:
                    self.plans[name], self.checks[name] = plan, self._layer_inputs[id(layer)]
        kept = {id(o): o for plan in self.plans.values() for outs in plan.values() for o in outs}
        held = sum(t.nbytes for o in kept.values() if o is not None for t in _tensors(o) or [])
        if held > BUDGET:
            self.plans.clear()

    def _record(self, model: nn.Module, inputs: tuple, wanted: set[int]) -> list[_Call]:
        calls: list[_Call] = []
        stack: list[_Call] = []
        self._layer_inputs: dict[int, list[tuple]] = {}

        def before(module, args, kwargs):
            call = _Call(module, 2 * len(calls), stack[-1] if stack else None)
            call.inputs = _stamps((args, kwargs)) or []
            if id(module) in wanted and id(module) not in self._layer_inputs:
                self._layer_inputs[id(module)] = _signature((args, kwargs))
            calls.append(call)
            stack.append(call)

        def after(module, args, kwargs, output):
            call = stack.pop()
            call.end = 2 * len(calls) + 1
            call.outputs = _stamps(output)
            # In place on its inputs: the edit is part of what the call does, so replay
            # cannot stand in for it.
            call.cacheable = (
                call.outputs is not None and _intact(call.inputs) and id(module) not in hooked
            )  # a module with hooks of its own would see them run again on the replay
            call.output = output

        hooked = {id(m) for m in model.modules() if m._forward_hooks or m._forward_pre_hooks}
        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        try:
            self.output = run_forward(model, inputs)  # one error naming example_inputs
        finally:
            for handle in handles:
                handle.remove()
        for call in calls:
            # Changed in place after it was returned: the stored tensor no longer holds it.
            call.cacheable = call.cacheable and call.end >= 0 and _intact(call.outputs)
            call.inputs = call.outputs = []
        return calls

    @contextlib.contextmanager
    def replaying(self, name: str) -> Iterator[bool]:
        """Replay the calls before layer ``name`` while the block runs, if checked correct.

        Yields:
            Whether the replay is on (else every forward in the block runs in full).
        """
        plan = self.plans.get(name)
        if plan is None:
            yield False
            return
        installed: list[nn.Module] = []
        replayers: list[_replayer] = []

        def rewind(module, args):
            for replayer in replayers:
                replayer.at = 0  # each forward of the model starts from its first call

        handle = self.model.register_forward_pre_hook(rewind)
        try:
            with deferred_interrupts():
                for module, outs in plan.items():
                    if "forward" not in vars(module) and not isinstance(
                        module, torch.jit.ScriptModule
                    ):
                        replayers.append(_replayer(module, outs))
                        module.forward = replayers[-1]
                        installed.append(module)
            on = len(installed) == len(plan) and self._check(name)
            if not on:
                self.plans.pop(name, None)
                _remove(installed)
                installed = []
            yield on
        finally:
            handle.remove()
            _remove(installed)

    def _check(self, name: str) -> bool:
        """Run the replay up to the layer; its inputs must be the dense run's, bit for bit."""
        layer = dict(self.model.named_modules())[name]
        seen: list = []

        def stop(module, args, kwargs):
            seen.append(_signature((args, kwargs)))
            raise _Stop

        handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with torch.no_grad():
                call_model(self.model, self.inputs)
        except _Stop:
            pass
        except Exception:
            return False
        finally:
            handle.remove()
        return seen == [self.checks[name]]


def _signature(obj: Any) -> list[tuple]:
    return [(tuple(t.shape), t.dtype, checksum(t)) for t in _tensors(obj) or []]


def _tied(layer: nn.Module, calls: list[_Call], first: _Call) -> bool:
    """Whether a module called before ``layer`` holds one of its tensors (tied weights)."""
    mine = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    for call in calls:
        if call.end < first.start:
            theirs = [*call.module.parameters(), *call.module.buffers()]
            if any(t.untyped_storage().data_ptr() in mine for t in theirs):
                return True
    return False


def _plan(calls: list[_Call], first: _Call) -> dict[nn.Module, list]:
    """Module → per executed call before ``first``: its output to replay, or ``None`` (run).

    A call runs before the layer if it ended before the layer started; it is executed in
    a replay unless an enclosing call that also ended before is replayed.
    """
    executed: dict[int, bool] = {}
    plan: dict[nn.Module, list] = {}
    for call in calls:
        if call.end >= first.start:
            continue
        parent = call.parent
        if parent is not None and parent.end < first.start:
            runs = executed[id(parent)] and not parent.cacheable
        else:
            runs = True
        executed[id(call)] = runs
        if runs:
            plan.setdefault(call.module, []).append(call.output if call.cacheable else None)
    # A module whose every call runs for real needs no stand-in.
    return {m: outs for m, outs in plan.items() if any(o is not None for o in outs)}


class _replayer:  # noqa: N801 - a callable standing in for a bound method
    """An instance ``forward`` returning copies of stored outputs, call after call."""

    def __init__(self, module: nn.Module, outs: list) -> None:
        self.forward = type(module).forward.__get__(module)
        self.outs, self.at = outs, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        at, self.at = self.at, self.at + 1
        out = self.outs[at] if at < len(self.outs) else None
        return self.forward(*args, **kwargs) if out is None else _copy(out)


def _remove(modules: list[nn.Module]) -> None:
    with deferred_interrupts():
        for module in modules:
            vars(module).pop("forward", None)
