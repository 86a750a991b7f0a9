"""Snapshots behind undo: a tensor's pre-edit value (full or sparse diff), a module's dicts."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, ValuesView
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModuleState",
    "SavedTensor",
    "checksum",
    "held_bytes",
    "nbytes",
    "restore_all",
    "tensors_in",
]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor, so that comparisons are bit-exact (NaN, -0.0)."""
    if t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex()):
        return t
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def checksum(t: torch.Tensor) -> int:
    """Sum of the integer bit patterns of ``t``'s elements, wrapping in their own width.

    Bit-exact (NaN payloads and -0.0 count) and as fast as a float sum: the bits are
    summed as integers of the element's width, wrapping around, so no wider temporary is
    made, and any change of a single element changes the sum.

    Args:
        t: Any tensor (floating, integer, bool, complex, quantized or torch.sparse).

    Returns:
        The checksum; equal tensors give equal checksums.
    """
    t = t.detach()
    if t.layout != torch.strided:  # torch.sparse buffers: compare their dense values
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    if t.is_floating_point():
        t = t.contiguous().view(_INT_OF_SIZE[t.element_size()])
    return int(t.sum(dtype=t.dtype)) if t.numel() else 0


def _sig(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, checksum(t))


def nbytes(t: torch.Tensor) -> int:
    """Bytes held by the elements of ``t``."""
    return t.numel() * t.element_size()


@dataclass
class SavedTensor:
    """Pre-edit value of one tensor object, as a full copy or as a sparse diff."""

    tensor: torch.Tensor
    full: torch.Tensor | None = None
    index: torch.Tensor | None = None
    values: torch.Tensor | None = None
    after: tuple | None = None  # checksum right after the edit, to detect later changes
    pin: bool = False  # keep a full copy even if unchanged (e.g. weights about to be fine-tuned)

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot holds."""
        if self.full is not None:
            return nbytes(self.full)
        return nbytes(self.index) + nbytes(self.values)

    def compress(self) -> bool:
        """Replace the full copy by a diff when smaller; return False when unchanged."""
        cur, old = self.tensor.detach(), self.full
        self.after = _sig(cur)
        if self.pin or cur.shape != old.shape or cur.dtype != old.dtype or cur.is_quantized:
            return True
        changed = (_bits(cur) != _bits(old)).reshape(-1)
        n = int(torch.count_nonzero(changed))  # a bool .sum() makes an int64 copy
        if n == 0:
            return self.pin
        if not self.pin and n * (8 + old.element_size()) < nbytes(old):
            self.index = changed.nonzero().reshape(-1)
            self.values = old.reshape(-1)[self.index].clone()
            self.full = None
        return True

    def modified_since(self) -> bool:
        """Whether the tensor changed after the edit was recorded (e.g. by training)."""
        return self.after is not None and _sig(self.tensor) != self.after

    def change_since(self) -> str | None:
        """How the tensor changed after the edit in a way undo cannot reverse exactly.

        A pinned copy (kept for fine-tuning) may change in value, not in shape or dtype;
        any other copy must hold the value the edit left.
        """
        if self.after is None:
            return None
        shape, dtype, _ = self.after
        now = _sig(self.tensor)
        if now[:2] != (shape, dtype):
            return f"its dtype or shape changed ({dtype} {list(shape)} -> {now[1]} {list(now[0])})"
        if not self.pin and now != self.after:
            return "its values changed (e.g. by training)"
        return None

    @torch.no_grad()
    def restore(self) -> None:
        """Put the pre-edit value back, bit-exactly."""
        t = self.tensor
        if self.full is not None:
            if t.shape == self.full.shape and t.dtype == self.full.dtype and not t.is_quantized:
                t.copy_(self.full)
            else:
                t.data = self.full
            return
        flat = t.detach().reshape(-1).clone()
        flat[self.index] = self.values
        t.copy_(flat.view_as(t))


class ModuleState:
    """Shallow snapshot of one module's attribute dicts (params, buffers, children, hooks)."""

    def __init__(self, module: nn.Module) -> None:
        # Weak: a step that saves the model itself must not keep the model (the key of its
        # own weakly keyed history) alive. A child that a step removes from the model is
        # held by the snapshot of its parent, so nothing that undo needs can die.
        self._module = weakref.ref(module)
        self.attrs = dict(module.__dict__)
        # Dicts are mutated in place by register_*/hooks; keep a copy of their contents and
        # restore into the same dict objects so existing hook handles stay valid.
        self.dicts = {k: (v, v.copy()) for k, v in self.attrs.items() if isinstance(v, dict)}

    @property
    def module(self) -> nn.Module | None:
        """The module the snapshot is of (``None`` once it was garbage-collected)."""
        return self._module()

    def restore(self) -> None:
        """Put the module's attributes back into the same dict objects."""
        module = self.module
        if module is None:
            return  # gone: nothing can see it any more
        d = module.__dict__
        for key in [k for k in d if k not in self.attrs]:
            del d[key]
        d.update(self.attrs)
        for obj, content in self.dicts.values():
            obj.clear()
            obj.update(content)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the snapshot refers to (parameters, buffers)."""
        for _, content in self.dicts.values():
            for v in content.values():
                if isinstance(v, torch.Tensor):
                    yield v

    def held_modules(self) -> Iterator[nn.Module]:
        """The child modules the snapshot keeps alive."""
        if "_modules" in self.dicts:
            yield from self.dicts["_modules"][1].values()

    def referenced(self, live_modules: set[int]) -> Iterator[torch.Tensor]:
        """Every tensor the snapshot keeps reachable: attributes, dict contents, old children.

        Children still in the model (``live_modules``, by id) are skipped; the state of the
        others counts, including torch.ao packed parameters (through their state_dict).
        """
        yield from tensors_in(self.attrs.values())
        yield from tensors_in(content.values() for _, content in self.dicts.values())
        for child in self.held_modules():
            if child is None or id(child) in live_modules:
                continue
            for sub in child.modules():
                if id(sub) not in live_modules:
                    yield from tensors_in(vars(sub).values())
                    yield from tensors_in(sub.state_dict(keep_vars=True).values())


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value``: a tensor, or tuples, lists, dicts and generators of them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (tuple, list, Iterator, ValuesView)):
        for v in value:
            yield from tensors_in(v)


def _storage_key(t: torch.Tensor) -> tuple[Any, int]:
    """Identity and size of the memory behind ``t`` (views of one storage count once)."""
    try:
        storage = t.untyped_storage()
        return ("storage", storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, meta, packed layouts
        return ("tensor", id(t)), nbytes(t)


def held_bytes(tensors: Iterable[torch.Tensor], live: Iterable[torch.Tensor]) -> int:
    """Bytes of the memory behind ``tensors`` that none of the ``live`` tensors shares."""
    live_keys = {_storage_key(t)[0] for t in live}
    held: dict[Any, int] = {}
    for t in tensors:
        key, size = _storage_key(t)
        if key not in live_keys:
            held[key] = size
    return sum(held.values())


def restore_all(items: Iterable[Any]) -> BaseException | None:
    """Call ``restore()`` on every item, even when one is interrupted; retry those once.

    Every restore is idempotent, so retrying one that a ``KeyboardInterrupt`` cut short
    completes it. Returns the first error met on the first pass (everything was restored
    in the end) so that the caller re-raises it after its own bookkeeping; an error that
    repeats on the retry is raised once every other item is restored.
    """
    failed: list[tuple[Any, BaseException]] = []
    for item in items:
        try:
            item.restore()
        except BaseException as err:  # noqa: BLE001 - finish restoring, then re-raise
            failed.append((item, err))
    persistent: BaseException | None = None
    for item, _ in failed:
        try:
            item.restore()
        except BaseException as err:  # noqa: BLE001
            persistent = persistent or err
    if persistent is not None:
        raise persistent
    return failed[0][1] if failed else None
