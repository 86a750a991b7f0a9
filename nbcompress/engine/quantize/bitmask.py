"""Weights saved as a bitmask of their nonzeros plus the nonzero values, when that is smaller.

A pruned layer quantized to int8 keeps its zeros (symmetric int8: zero point 0), but a
dense int8 buffer spends a byte on each of them: a 50%-pruned, int8 MiniLM was exactly the
size of an unpruned one. Serialized as one bit per weight (set where it is not zero) and
then the nonzero values' bytes, an int8 weight takes ``1/8 + density`` bytes per weight:
0.625 at 50% zeros (1.6× smaller), 0.225 at 90% (4.4×). Dense stays where the mask would
not pay (below 1/8 zeros for int8).

:class:`BitmaskBuffers` applies this to a module's named buffers in every serialized form
(``state_dict`` / ``torch.save``, ``pickle``), and only there: the running module keeps
its dense buffer (the kernels need it), ``copy.deepcopy`` (and
:func:`~nbcompress.engine.core.memory.twin`, which shares tensors through the memo) copies
it as it is, and ``state_dict(keep_vars=True)`` returns the live buffers. Zeros are
found on the bit pattern, so the round trip is bit-exact for every dtype (``-0.0`` stays).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from nbcompress.engine.core.costs import bitmask_size

__all__ = [
    "BitmaskBuffers",
    "PackedQTensor",
    "bitmask_size",
    "pack_bitmask",
    "pack_qtensors",
    "unpack_bitmask",
    "unpack_qtensors",
]

# Integer dtype of each element size: zeros are compared and values moved as raw bits.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
# Pickled alongside the state: buffer name → (shape, dtype) of the ones saved packed.
_SHAPES = "_bitmask_shapes"
# First item of the tuple a packed qint8 tensor is saved as (state dicts: tuples load
# with ``torch.load(weights_only=True)``, a class of ours would not).
_QTAG = "nbcompress.bitmask.qint8"
_QTUPLE_BYTES = 128
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)


def pack_bitmask(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as one uint8 vector (bitmask, then nonzero values), or ``None`` if not smaller.

    Bit ``i`` (little bit order within each byte) is set when element ``i`` of ``t``
    (row-major) is not all zero bits; the nonzero elements' bytes follow in that order.
    """
    if t.dtype == torch.bool or t.element_size() not in _BITS or t.numel() == 0:
        return None
    size = t.element_size()
    # numpy, on a bool mask: a boolean index (numpy's or torch's) took 13-37 ms on 2.4M
    # weights here, the mask's flatnonzero + take 3 ms
    flat = t.detach().reshape(-1).view(_BITS[size]).numpy()
    nonzero = flat != 0
    count = int(np.count_nonzero(nonzero))
    if bitmask_size(flat.size, count, size) >= flat.size * size:
        return None
    values = flat.take(np.flatnonzero(nonzero)).view(np.uint8)
    return torch.from_numpy(np.concatenate([np.packbits(nonzero, bitorder="little"), values]))


def unpack_bitmask(
    packed: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The dense tensor :func:`pack_bitmask` packed (a new tensor, bit-identical).

    Raises:
        ValueError: ``packed`` is not a packed form of ``shape`` elements.
    """
    numel, itemsize = math.prod(shape), torch.empty(0, dtype=dtype).element_size()
    head = (numel + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() < head:
        raise ValueError(
            f"a bitmask-packed weight of shape {tuple(shape)} is a uint8 vector of at least "
            f"{head} bytes, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    bits = np.unpackbits(packed[:head].numpy(), count=numel, bitorder="little")
    where = np.flatnonzero(bits.view(bool))
    if packed.numel() != bitmask_size(numel, where.size, itemsize):
        raise ValueError(
            f"the bitmask of shape {tuple(shape)} marks {where.size} nonzeros, so "
            f"{bitmask_size(numel, where.size, itemsize)} bytes, got {packed.numel()}"
        )
    ints = _NP_BITS[itemsize]
    out = np.zeros(numel, dtype=ints)
    out[where] = packed[head:].numpy().copy().view(ints)  # a copy: aligned for the view
    return torch.from_numpy(out).view(dtype).reshape(shape)


class BitmaskBuffers(nn.Module):
    """Mixin: the buffers named in ``_bitmask_buffers`` serialize bitmask-packed if smaller.

    Put it before the module's base class (``class M(BitmaskBuffers, Base)``). Attributes
    named in ``_transient`` (caches such as a kernel's packed weight) are dropped (set to
    ``None``) in pickles and copies and rebuilt by the module on first use. A module whose
    zeros are not stored as zero bits (asymmetric int8) maps them there in
    :meth:`_before_packing` and back in :meth:`_after_unpacking` (a bijection: exact).

    ``load_state_dict`` takes either form, so checkpoints saved dense (before packing
    existed, or where it did not pay) still load.
    """

    _bitmask_buffers: tuple[str, ...] = ()
    _transient: tuple[str, ...] = ()

    def _before_packing(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Buffer ``name`` as it is packed (by default unchanged)."""
        return value

    def _after_unpacking(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_before_packing`."""
        return value

    def _bitmask_pack(self, name: str, value: torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else pack_bitmask(self._before_packing(name, value))

    def _bitmask_unpack(
        self, name: str, packed: torch.Tensor, shape: tuple, dtype: Any
    ) -> torch.Tensor:
        return self._after_unpacking(name, unpack_bitmask(packed, shape, dtype))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if keep_vars:  # the live tensors were asked for (memory accounting), not a file
            return
        for name in self._bitmask_buffers:
            packed = self._bitmask_pack(name, destination.get(prefix + name))
            if packed is not None:
                destination[prefix + name] = packed

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, metadata: Any, strict: bool, missing: list,
        unexpected: list, error_msgs: list,
    ) -> None:  # fmt: skip
        for name in self._bitmask_buffers:
            key, own = prefix + name, self._buffers.get(name)
            value = state_dict.get(key)
            # A packed form is a uint8 vector; the dense buffer has the weight's shape.
            if own is None or not _looks_packed(value, own):
                continue
            try:
                state_dict[key] = self._bitmask_unpack(name, value, tuple(own.shape), own.dtype)
            except ValueError as err:
                error_msgs.append(f"{key}: {err}")
        super()._load_from_state_dict(
            state_dict, prefix, metadata, strict, missing, unexpected, error_msgs
        )

    def _copy_state(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(dict.fromkeys(self._transient))
        return state

    def __getstate__(self) -> dict[str, Any]:
        state = self._copy_state()
        buffers, shapes = dict(state["_buffers"]), {}
        for name in self._bitmask_buffers:
            value = buffers.get(name)
            packed = self._bitmask_pack(name, value)
            if packed is not None:
                buffers[name], shapes[name] = packed, (tuple(value.shape), value.dtype)
        state["_buffers"] = buffers
        if shapes:
            state[_SHAPES] = shapes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        shapes = state.pop(_SHAPES, {})  # absent in pickles saved dense
        super().__setstate__(state)
        for name, (shape, dtype) in shapes.items():
            self._buffers[name] = self._bitmask_unpack(name, self._buffers[name], shape, dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> BitmaskBuffers:
        # As copy.deepcopy does by default, minus the packing: a copy stays dense, and a
        # twin's memo can keep sharing the original's tensors.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._copy_state(), memo))
        return new


def _looks_packed(value: Any, own: torch.Tensor) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.uint8
        and value.dim() == 1
        and tuple(value.shape) != tuple(own.shape)
    )


def _pack_qtensor(q: Any) -> tuple | None:
    """A qint8 tensor as ``(tag, packed codes, shape, scale(s), zero point(s), axis)``.

    ``axis`` is -1 for one scale per tensor (then a float and an int, as torch saves
    them). ``None``: not a qint8 tensor, or the packed form would not be smaller by
    :data:`_QTUPLE_BYTES` (what the tuple itself costs in the file).
    """
    if not isinstance(q, torch.Tensor) or not q.is_quantized or q.dtype != torch.qint8:
        return None
    if q.qscheme() in _PER_CHANNEL:
        scales, points = q.q_per_channel_scales(), q.q_per_channel_zero_points()
        axis = q.q_per_channel_axis()
    elif q.qscheme() in _PER_TENSOR:
        scales, points, axis = q.q_scale(), q.q_zero_point(), -1
    else:
        return None
    packed = pack_bitmask(q.int_repr())
    if packed is None or packed.numel() + _QTUPLE_BYTES > q.numel():
        return None
    return (_QTAG, packed, tuple(q.shape), scales, points, axis)


def _unpack_qtensor(entry: tuple) -> torch.Tensor:
    """The qint8 tensor :func:`_pack_qtensor` packed (bit-identical codes and scales)."""
    _, packed, shape, scales, points, axis = entry
    codes = unpack_bitmask(packed, tuple(shape), torch.int8)
    if axis < 0:
        return torch._make_per_tensor_quantized_tensor(codes, scales, points)
    return torch._make_per_channel_quantized_tensor(codes, scales, points, axis)


def _is_packed_qtensor(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 6 and value[0] == _QTAG


class PackedQTensor:
    """A qint8 tensor that pickles packed and unpickles as the quantized tensor itself."""

    def __init__(self, entry: tuple) -> None:
        self.entry = entry

    def __reduce__(self) -> tuple:
        return _unpack_qtensor, (self.entry,)


def _each(value: Any, fn: Any) -> Any:
    """``value`` with ``fn`` applied to it, or to the items of (nested) tuples and lists."""
    if isinstance(value, (tuple, list)) and not _is_packed_qtensor(value):
        return type(value)(_each(v, fn) for v in value)
    return fn(value)


def pack_qtensors(value: Any, *, pickled: bool = False) -> Any:
    """``value`` with each qint8 tensor in it (at any depth of tuples) packed where smaller.

    Args:
        value: A state-dict value or a module's ``__getstate__`` tuple.
        pickled: Pack into :class:`PackedQTensor` (unpickles as the tensor) rather than the
            plain tuple a state dict holds (rebuilt by :func:`unpack_qtensors`).
    """

    def pack(v: Any) -> Any:
        entry = _pack_qtensor(v)
        if entry is None:
            return v
        return PackedQTensor(entry) if pickled else entry

    return _each(value, pack)


def unpack_qtensors(value: Any) -> Any:
    """``value`` with each packed qint8 tensor from :func:`pack_qtensors` rebuilt."""
    return _each(value, lambda v: _unpack_qtensor(v) if _is_packed_qtensor(v) else v)
