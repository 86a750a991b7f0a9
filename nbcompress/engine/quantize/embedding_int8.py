"""Per-row int8 embedding tables (``Embedding``, ``EmbeddingBag``), row-pruned ones included.

Every row is stored in 8 bits with its own float32 scale and bias (fbgemm's 8-bit rowwise
format, ``w = q · scale + bias``, one ``uint8`` buffer of ``dim + 8`` bytes per row): an
asymmetric range per row fits rows that are not centred on zero, and an all-zero row (a
pruned id's) stays exactly zero. A row-pruned table
(:class:`~nbcompress.engine.prune.row_tables.RowPrunedEmbedding`) keeps its id → row
map, so only its kept rows are stored.

The lookup dequantizes on the fly: the numba kernel
(:func:`~nbcompress.engine.quantize.embedding_kernel.bag_int8`) or torch's fbgemm operator,
whichever measured faster for the call's size on its first call (numba wins small
lookups here, fbgemm large bags); ``padding_idx`` needs the numba kernel, ``mode="max"``
dequantizes the gathered rows and reduces with torch. The modules hold buffers only, so
``state_dict``, ``torch.save``, ``pickle`` and ``copy.deepcopy`` work. A table with many
exact zeros is saved as a bitmask plus the other codes where that is smaller
(:mod:`~nbcompress.engine.quantize.bitmask`; each row's codes taken relative to the code
of 0.0 in that row, so that its zeros are zero bits); in memory it stays dense.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.prune.row_tables import RowPrunedEmbedding, RowPrunedEmbeddingBag
from nbcompress.engine.quantize.bitmask import BitmaskBuffers
from nbcompress.engine.quantize.embedding_kernel import bag_int8, lookup_int8
from nbcompress.timing import race

__all__ = [
    "Int8Embedding",
    "Int8EmbeddingBag",
    "int8_table",
    "pack_rows_int8",
    "table_supports",
    "tied_problem",
]

KERNELS = ("auto", "numba", "fbgemm")
_MODES = {"sum": 0, "mean": 1}
_EMPTY = np.empty(0, np.float32)
_NO_ROWS = np.empty(0, np.int32)
_BAD_OFFSETS = "offsets: must start at 0, not decrease and stay within the input."
_TABLES = (nn.Embedding, nn.EmbeddingBag, RowPrunedEmbedding, RowPrunedEmbeddingBag)


def pack_rows_int8(w: torch.Tensor) -> torch.Tensor:
    """``(rows, dim + 8)`` uint8: each row's codes, then its float32 scale and bias.

    ``scale = (max - min) / 255`` (1 for a constant row), ``bias = min`` and
    ``q = round((w - min) / scale)``, so ``q · scale + bias`` is within ``scale / 2``.
    """
    w = w.detach().float()
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(lo))
    q = ((w - lo[:, None]) / scale[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    tail = torch.stack([scale, lo], dim=1).contiguous().view(torch.uint8)
    return torch.cat([q, tail], dim=1).contiguous()


def _shift_codes(packed: torch.Tensor, dim: int, sign: int) -> torch.Tensor:
    """``packed`` with each row's codes minus (``sign`` -1) or plus (+1) its code of 0.0.

    Modulo 256, so a bijection whatever the codes; the row's scale and bias (the tail,
    which gives the code of 0.0 as :func:`pack_rows_int8` computes it) stay as they are.
    """
    tail = packed[:, dim:].contiguous().view(torch.float32)
    scale, lo = tail[:, 0], tail[:, 1]
    zero = torch.nan_to_num((0 - lo) / scale).round_().clamp_(0, 255).to(torch.uint8)
    out = packed.clone()
    codes = out[:, :dim]
    if sign < 0:
        codes.sub_(zero[:, None])
    else:
        codes.add_(zero[:, None])
    return out


class _Int8Table(BitmaskBuffers, nn.Module):
    """What both int8 tables share: packed rows, the id map, kernel choice, dense view."""

    _bitmask_buffers = ("packed",)

    def __init__(self, layer: nn.Module, kernel: str = "auto") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel: {kernel!r} is unknown; choose one of {KERNELS}.")
        self.kernel = kernel
        self.num_embeddings, self.embedding_dim = layer.num_embeddings, layer.embedding_dim
        self.padding_idx = layer.padding_idx
        pruned = isinstance(layer, (RowPrunedEmbedding, RowPrunedEmbeddingBag))
        self.register_buffer("packed", pack_rows_int8(layer.weight))
        self.register_buffer("rows", layer.rows.clone() if pruned else None)
        self._reset()

    def _reset(self) -> None:
        # The kernels' arrays (packed rows, scale, bias, id map), built on first use: a
        # tensor's .numpy() costs ~1.4 µs, a quarter of a small lookup.
        self._np: tuple[np.ndarray, ...] | None = None
        self._choice: dict[tuple, str] = {}

    def _copy_state(self) -> dict[str, Any]:
        state = super()._copy_state()
        state["_np"], state["_choice"] = None, {}  # views / this machine's timings
        return state

    def _before_packing(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return _shift_codes(value, self.embedding_dim, -1)  # a 0.0 weight → zero bits

    def _after_unpacking(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return _shift_codes(value, self.embedding_dim, +1)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._reset()

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        out = super()._apply(fn, recurse)
        self._reset()  # buffers may be new tensors (.to(), share_memory_()): drop old views
        return out

    @property
    def stored_rows(self) -> int:
        """Rows stored (a row-pruned table's kept rows plus its zero row)."""
        return self.packed.shape[0]

    def _arrays(self) -> tuple[np.ndarray, ...]:
        """``(packed rows, scale, bias, id map)`` as the kernels take them."""
        if self._np is None:
            tail = self.packed[:, self.embedding_dim :].contiguous().view(torch.float32)
            rows = _NO_ROWS if self.rows is None else self.rows.numpy()
            scale, bias = tail[:, 0].contiguous().numpy(), tail[:, 1].contiguous().numpy()
            self._np = (self.packed.numpy(), scale, bias, rows)
        return self._np

    def dequantized_rows(self) -> torch.Tensor:
        """The stored rows in float32 (``q · scale + bias``)."""
        scale, bias = (torch.from_numpy(a) for a in self._arrays()[1:3])
        q = self.packed[:, : self.embedding_dim].float()
        return q * scale[:, None] + bias[:, None]

    def dequantized_weight(self) -> torch.Tensor:
        """The full ``(num_embeddings, dim)`` float table the lookup computes with."""
        rows = self.dequantized_rows()
        return rows if self.rows is None else rows[self.rows.long()]

    def _pad(self) -> int:
        return -1 if self.padding_idx is None else self.padding_idx

    def _ids(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """The ids flattened, as contiguous int64 (the kernels check their range)."""
        if input.is_floating_point() or input.is_complex():
            raise TypeError(f"input: expected integer ids, got {input.dtype}.")
        return input.reshape(-1).long().contiguous()

    def _check(self, bad: int, ids: torch.Tensor) -> None:
        if bad == -2:
            raise ValueError(_BAD_OFFSETS)
        if bad >= 0:  # the message nn.Embedding gives, with the id
            raise IndexError(f"index out of range in self (id {int(ids[bad])})")

    def _checked_rows(self, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Ids and offsets checked in torch (the kernels check their own); stored rows."""
        n = ids.numel()
        if starts.numel() and (int(starts[0]) != 0 or int(starts[-1]) > n):
            raise ValueError(_BAD_OFFSETS)
        if starts.numel() > 1 and bool((starts.diff() < 0).any()):
            raise ValueError(_BAD_OFFSETS)
        outside = (ids < 0) | (ids >= self.num_embeddings)
        if bool(outside.any()):
            self._check(int(torch.nonzero(outside)[0]), ids)
        return ids if self.rows is None else self.rows[ids].long()

    def _fbgemm(self, ids, starts, psw, mean: bool) -> torch.Tensor:
        """The fbgemm 8-bit rowwise bag of torch (sum; a mean is divided here)."""
        stored = self._checked_rows(ids, starts)
        # Summed, then divided here: fbgemm's own mean left garbage in empty bags.
        total = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            self.packed, stored, starts, False, 0, False, psw
        )
        if not mean:
            return total
        sizes = torch.diff(starts, append=starts.new_tensor([ids.numel()]))
        return total / sizes.clamp_min(1)[:, None]

    def _lookup(self, ids, starts, psw, pad: int, mean: bool) -> torch.Tensor:
        """Bags starting at ``starts`` (the last ends at ``len(ids)``), sum or mean."""
        out = torch.empty(starts.numel(), self.embedding_dim)
        w = _EMPTY if psw is None else psw.reshape(-1).float().contiguous().numpy()
        args = (*self._arrays(), ids.numpy(), starts.numpy())

        def numba_run() -> torch.Tensor:
            self._check(bag_int8(*args, w, pad, mean, out.numpy()), ids)
            return out

        def fbgemm_run() -> torch.Tensor:
            return self._fbgemm(ids, starts, psw, mean)

        name = self.kernel
        if pad >= 0 or name == "numba":
            name = "numba"
        elif name == "auto":
            key = (int(ids.numel()).bit_length(), int(starts.numel()).bit_length(), psw is None)
            if key not in self._choice:
                # Paired per-round ratios; numba (the incumbent) keeps ties.
                timed = race({"numba": numba_run, "fbgemm": fbgemm_run}, rounds=6, warmup=1)
                self._choice[key] = timed.fastest()
            name = self._choice[key]
        return numba_run() if name == "numba" else fbgemm_run()


class Int8Embedding(_Int8Table):
    """``nn.Embedding`` with per-row int8 rows, dequantized on lookup."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002, D102
        # One row per id: the plain numba gather (a bag kernel would pay for offsets).
        ids = self._ids(input)
        out = torch.empty(ids.numel(), self.embedding_dim)
        bad = lookup_int8(*self._arrays(), ids.numpy(), out.numpy())
        self._check(bad, ids)
        return out.reshape(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row, {self.stored_rows} rows"


class Int8EmbeddingBag(_Int8Table):
    """``nn.EmbeddingBag`` (sum, mean, max) with per-row int8 rows, dequantized on lookup."""

    def __init__(self, layer: nn.EmbeddingBag, kernel: str = "auto") -> None:
        super().__init__(layer, kernel)
        self.mode, self.include_last_offset = layer.mode, layer.include_last_offset

    def _starts(self, input: torch.Tensor, offsets: torch.Tensor | None) -> tuple:
        """``(ids, bag starts)`` as ``nn.EmbeddingBag`` reads its arguments.

        With ``include_last_offset`` the ids past the last offset belong to no bag: cut off.
        """
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets: must be None when input is 2D (one bag per row).")
            bags, size = input.shape
            return input, torch.arange(bags) * size
        if input.dim() != 1 or offsets is None or offsets.dim() != 1:
            raise ValueError("offsets: a 1D input needs 1D offsets (the start of each bag).")
        starts = offsets.long().contiguous()
        if self.include_last_offset:
            if not starts.numel() or int(starts[-1]) > input.numel():
                raise ValueError(_BAD_OFFSETS)
            input, starts = input[: int(starts[-1])], starts[:-1]
        return input, starts

    def forward(  # noqa: D102
        self,
        input: torch.Tensor,  # noqa: A002
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError(
                    "per_sample_weights: only supported with mode='sum' (as in nn.EmbeddingBag)."
                )
            if per_sample_weights.shape != input.shape:
                raise ValueError("per_sample_weights: must have the shape of input.")
        input, starts = self._starts(input, offsets)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)[: input.numel()]
        ids = self._ids(input)
        if self.mode == "max":
            return self._max(ids, starts)
        return self._lookup(ids, starts, per_sample_weights, self._pad(), self.mode == "mean")

    def _max(self, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Max bags: the gathered rows dequantized, reduced by torch (padding skipped)."""
        packed = self.packed[self._checked_rows(ids, starts)]
        codes = packed[:, : self.embedding_dim].float()
        tail = packed[:, self.embedding_dim :].contiguous().view(torch.float32)
        rows = codes * tail[:, :1] + tail[:, 1:]
        rows = torch.cat([rows, rows.new_zeros(1, self.embedding_dim)])
        local, pad = torch.arange(ids.numel()), self._pad()
        if pad >= 0:
            local = torch.where(ids == pad, ids.numel(), local)  # → the extra padding row
        return F.embedding_bag(
            local, rows, starts, mode="max", padding_idx=ids.numel() if pad >= 0 else None
        )

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row, {self.stored_rows} "
            f"rows, mode={self.mode!r}"
        )


def table_supports(config: object, layer: nn.Module) -> str | None:
    """``None`` if ``layer`` is an embedding table int8 rows can replace, else why not."""
    if type(layer) not in (
        nn.Embedding,
        nn.EmbeddingBag,
        RowPrunedEmbedding,
        RowPrunedEmbeddingBag,
    ):
        return "per-row int8 tables handle Embedding and EmbeddingBag"
    if layer.max_norm is not None:
        return "max_norm renormalises rows on lookup; int8 rows cannot (set max_norm=None)"
    return None


def tied_problem(model: nn.Module, name: str) -> str | None:
    """Why table ``name`` may not be replaced: its weight is another module's too (tied).

    A language model's output layer often shares the token table's weight: replacing the
    table would keep the float weight for that layer and add an int8 copy, a bigger model.
    """
    layer = model.get_submodule(name)
    if not isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        return None
    for other, module in model.named_modules():
        if module is not layer and any(p is layer.weight for p in module.parameters(False)):
            return f"its weight is tied to {other!r}'s: int8 rows would store the table twice"
    return None


def int8_table(config: object, layer: nn.Module) -> nn.Module:
    """The per-row int8 replacement of an embedding table (never edits ``layer``)."""
    if isinstance(layer, nn.EmbeddingBag):
        return Int8EmbeddingBag(layer)
    return Int8Embedding(layer)
