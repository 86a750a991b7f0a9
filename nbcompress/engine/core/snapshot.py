"""Snapshots behind undo: a tensor's pre-edit value (full or sparse diff), a module's dicts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModuleState", "SavedTensor", "nbytes"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor, so that comparisons are bit-exact (NaN, -0.0)."""
    if t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex()):
        return t
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def _checksum(t: torch.Tensor) -> tuple:
    if t.is_quantized:
        t = t.int_repr()
    b = _bits(t.detach())
    return (tuple(t.shape), t.dtype, int(b.to(torch.int64).sum()) if b.numel() else 0)


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
        self.after = _checksum(cur)
        if self.pin or cur.shape != old.shape or cur.dtype != old.dtype or cur.is_quantized:
            return True
        changed = (_bits(cur) != _bits(old)).reshape(-1)
        n = int(changed.sum())
        if n == 0:
            return self.pin
        if not self.pin and n * (8 + old.element_size()) < nbytes(old):
            self.index = changed.nonzero().reshape(-1)
            self.values = old.reshape(-1)[self.index].clone()
            self.full = None
        return True

    def modified_since(self) -> bool:
        """Whether the tensor changed after the edit was recorded (e.g. by training)."""
        return self.after is not None and _checksum(self.tensor) != self.after

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
        self.module = module
        self.attrs = dict(module.__dict__)
        # Dicts are mutated in place by register_*/hooks; keep a copy of their contents and
        # restore into the same dict objects so existing hook handles stay valid.
        self.dicts = {k: (v, v.copy()) for k, v in self.attrs.items() if isinstance(v, dict)}

    def restore(self) -> None:
        """Put the module's attributes back into the same dict objects."""
        d = self.module.__dict__
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
