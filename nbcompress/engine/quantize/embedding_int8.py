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
``state_dict``, ``torch.save``, ``pickle`` and ``copy.deepcopy`` work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.prune.row_tables import RowPrunedEmbedding, RowPrunedEmbeddingBag
from nbcompress.engine.quantize.embedding_kernel import bag_int8, lookup_int8
from nbcompress.timing import race

__all__ = [
    "Int8Embedding",
    "Int8EmbeddingBag",
    "int8_table",
    "pack_rows_int8",
    "table_supports",
]

KERNELS = ("auto", "numba", "fbgemm")
_MODES = {"sum": 0, "mean": 1}
_EMPTY = np.empty(0, np.float32)
_NO_ROWS = np.empty(0, np.int32)
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


class _Int8Table(nn.Module):
    """What both int8 tables share: packed rows, the id map, kernel choice, dense view."""

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
        self._tail: tuple[np.ndarray, ...] | None = None
        self._choice: dict[tuple, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tail"], state["_choice"] = None, {}  # views / this machine's timings
        return state

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
        if self._tail is None:
            tail = self.packed[:, self.embedding_dim :].contiguous().view(torch.float32)
            rows = _NO_ROWS if self.rows is None else self.rows.numpy()
            scale, bias = tail[:, 0].contiguous().numpy(), tail[:, 1].contiguous().numpy()
            self._tail = (self.packed.numpy(), scale, bias, rows)
        return self._tail

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
        if bad >= 0:  # the message nn.Embedding gives, with the id
            raise IndexError(f"index out of range in self (id {int(ids[bad])})")

    def _fbgemm(self, ids, bounds, psw, mean: bool) -> torch.Tensor:
        """The fbgemm 8-bit rowwise bag of torch (sum; a mean is divided here)."""
        low, high = torch.aminmax(ids) if ids.numel() else (ids.new_zeros(()),) * 2
        if int(low) < 0 or int(high) >= self.num_embeddings:
            self._check(int(torch.nonzero((ids < 0) | (ids >= self.num_embeddings))[0]), ids)
        stored = ids if self.rows is None else self.rows[ids].long()
        # Summed, then divided here: fbgemm's own mean left garbage in empty bags.
        total = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            self.packed, stored, bounds[:-1], False, 0, False, psw
        )
        return total / bounds.diff().clamp_min(1)[:, None] if mean else total

    def _lookup(self, ids, bounds, psw, pad: int, mean: bool) -> torch.Tensor:
        """Bags ``ids[bounds[b]:bounds[b+1]]`` reduced (sum or mean), by the chosen kernel."""
        out = torch.empty(bounds.numel() - 1, self.embedding_dim)
        w = _EMPTY if psw is None else psw.reshape(-1).float().contiguous().numpy()
        args = (*self._arrays(), ids.numpy(), bounds.numpy())

        def numba_run() -> torch.Tensor:
            self._check(bag_int8(*args, w, pad, mean, out.numpy()), ids)
            return out

        def fbgemm_run() -> torch.Tensor:
            return self._fbgemm(ids, bounds, psw, mean)

        name = self.kernel
        if pad >= 0 or name == "numba":
            name = "numba"
        elif name == "auto":
            key = (int(ids.numel()).bit_length(), int(bounds.numel()).bit_length(), psw is None)
            if key not in self._choice:
                timed = race({"numba": numba_run, "fbgemm": fbgemm_run}, rounds=6, warmup=1)
                self._choice[key] = min(timed.times, key=lambda n: timed.times[n].median)
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

    def _bounds(self, input: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """Bag boundaries (bags + 1 of them), as ``nn.EmbeddingBag`` reads its arguments."""
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets: must be None when input is 2D (one bag per row).")
            bags, size = input.shape
            return torch.arange(bags + 1) * size
        if input.dim() != 1 or offsets is None or offsets.dim() != 1:
            raise ValueError("offsets: a 1D input needs 1D offsets (the start of each bag).")
        offsets = offsets.long()
        if not self.include_last_offset:
            offsets = torch.cat([offsets, offsets.new_tensor([input.numel()])])
        bad = offsets.numel() and (offsets[0] != 0 or bool((offsets.diff() < 0).any()))
        if bad or (offsets.numel() and int(offsets[-1]) > input.numel()):
            raise ValueError("offsets: must start at 0, not decrease and stay within the input.")
        return offsets.contiguous()

    def forward(  # noqa: D102
        self,
        input: torch.Tensor,  # noqa: A002
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bounds = self._bounds(input, offsets)
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError(
                    "per_sample_weights: only supported with mode='sum' (as in nn.EmbeddingBag)."
                )
            if per_sample_weights.shape != input.shape:
                raise ValueError("per_sample_weights: must have the shape of input.")
        ids = self._ids(input)
        if self.mode == "max":
            return self._max(ids, bounds)
        return self._lookup(ids, bounds, per_sample_weights, self._pad(), self.mode == "mean")

    def _max(self, ids: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        """Max bags: the gathered rows dequantized, reduced by torch (padding skipped)."""
        outside = (ids < 0) | (ids >= self.num_embeddings)
        if bool(outside.any()):
            self._check(int(torch.nonzero(outside)[0]), ids)
        packed = self.packed[ids if self.rows is None else self.rows[ids].long()]
        codes = packed[:, : self.embedding_dim].float()
        tail = packed[:, self.embedding_dim :].contiguous().view(torch.float32)
        rows = codes * tail[:, :1] + tail[:, 1:]
        rows = torch.cat([rows, rows.new_zeros(1, self.embedding_dim)])
        local, pad = torch.arange(ids.numel()), self._pad()
        if pad >= 0:
            local = torch.where(ids == pad, ids.numel(), local)  # → the extra padding row
        return F.embedding_bag(
            local, rows, bounds[:-1], mode="max", padding_idx=ids.numel() if pad >= 0 else None
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


def int8_table(config: object, layer: nn.Module) -> nn.Module:
    """The per-row int8 replacement of an embedding table (never edits ``layer``)."""
    if isinstance(layer, nn.EmbeddingBag):
        return Int8EmbeddingBag(layer)
    return Int8Embedding(layer)
