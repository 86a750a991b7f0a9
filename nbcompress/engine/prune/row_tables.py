"""Embedding tables that store only their kept rows (row pruning, see ``embedding_rows``).

A row-pruned table keeps its kept rows plus one zero row in ``weight`` and an ``int32``
map ``rows`` from every original id to its stored row (pruned ids → the zero row). A
pruned id therefore looks up zeros, exactly as in the same table with those rows zeroed:
it still counts in an ``EmbeddingBag``'s mean and takes part in its max. The padding row
(``padding_idx``) is never pruned and keeps its meaning (an ``EmbeddingBag`` skips it).
The zero row costs one row; the map 4 bytes per id (1.6% of a 64-wide float row).

The classes subclass ``nn.Embedding`` / ``nn.EmbeddingBag`` so that selection by type
(``types=["Embedding"]``), reports and ``quantize_`` treat them as the tables they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RowPrunedEmbedding", "RowPrunedEmbeddingBag", "compact_rows", "dense_table"]


def dense_table(layer: nn.Module) -> torch.Tensor:
    """The full ``(num_embeddings, dim)`` float table a (row-pruned) embedding computes with."""
    if isinstance(layer, (RowPrunedEmbedding, RowPrunedEmbeddingBag)):
        return layer.dense_weight()
    return layer.weight.detach()


def compact_rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept ids, id → stored row map)`` for a boolean ``keep`` over the ids.

    Pruned ids map to ``len(kept ids)``, the index of the zero row stored after the kept ones.
    """
    kept = torch.nonzero(keep).flatten()
    rows = torch.full((keep.numel(),), kept.numel(), dtype=torch.int32)
    rows[kept] = torch.arange(kept.numel(), dtype=torch.int32)
    return kept, rows


class _RowPruned:
    """What both row-pruned tables share: the stored rows, the map and the dense view."""

    weight: nn.Parameter
    rows: torch.Tensor
    padding_idx: int | None
    num_embeddings: int
    embedding_dim: int

    def _setup(self, layer: nn.Module, keep: torch.Tensor) -> None:
        """Copy ``layer``'s options; store its kept rows and a zero row."""
        if layer.max_norm is not None:
            raise ValueError(
                "model: row pruning of a table with max_norm is not supported (its lookup "
                "renormalises rows in place); set max_norm=None first."
            )
        nn.Module.__init__(self)  # type: ignore[arg-type]  # no full-size weight allocated
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type"):
            setattr(self, attr, getattr(layer, attr))
        self.scale_grad_by_freq, self.sparse = layer.scale_grad_by_freq, layer.sparse
        w = dense_table(layer)
        kept, rows = compact_rows(keep)
        table = torch.cat([w[kept], w.new_zeros(1, w.shape[1])])
        self.weight = nn.Parameter(table, requires_grad=layer.weight.requires_grad)
        self.register_buffer("rows", rows)

    @property
    def kept(self) -> int:
        """Number of rows stored (the zero row of pruned ids not counted)."""
        return self.weight.shape[0] - 1

    def dense_weight(self) -> torch.Tensor:
        """The full float table (pruned rows zero), as the lookup sees it."""
        return self.weight.detach()[self.rows.long()]

    def _stored_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            # Fine-tuning may move the shared zero row; pruned ids must keep reading zeros.
            with torch.no_grad():
                self.weight[-1].zero_()
        return self.rows[ids]

    def _padding(self) -> int | None:
        return None if self.padding_idx is None else int(self.rows[self.padding_idx])

    def extra_repr(self) -> str:  # noqa: D102
        share = 1 - self.kept / max(self.num_embeddings, 1)
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, {self.kept} rows stored "
            f"({share:.0%} pruned){pad}"
        )


class RowPrunedEmbedding(_RowPruned, nn.Embedding):
    """An ``nn.Embedding`` storing only its kept rows; pruned ids look up zeros."""

    def __init__(self, layer: nn.Embedding, keep: torch.Tensor) -> None:
        self._setup(layer, keep)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002, D102
        return F.embedding(
            self._stored_ids(input),
            self.weight,
            self._padding(),
            None,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


class RowPrunedEmbeddingBag(_RowPruned, nn.EmbeddingBag):
    """An ``nn.EmbeddingBag`` storing only its kept rows; pruned ids add zeros to a bag."""

    def __init__(self, layer: nn.EmbeddingBag, keep: torch.Tensor) -> None:
        self._setup(layer, keep)
        self.mode, self.include_last_offset = layer.mode, layer.include_last_offset

    def forward(  # noqa: D102
        self,
        input: torch.Tensor,  # noqa: A002
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return F.embedding_bag(
            self._stored_ids(input),
            self.weight,
            offsets,
            None,
            self.norm_type,
            self.scale_grad_by_freq,
            self.mode,
            self.sparse,
            per_sample_weights,
            self.include_last_offset,
            self._padding(),
        )

    def extra_repr(self) -> str:  # noqa: D102
        return super().extra_repr() + f", mode={self.mode!r}"
