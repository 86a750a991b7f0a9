"""Row pruning of embedding tables: drop whole rows (items, users), stored compactly.

Elementwise magnitude pruning suits weight matrices; an embedding table is a list of
per-id vectors, and the useful unit is the id: rarely seen items or users whose vectors
stayed small. :func:`prune_embeddings_` ranks each table's rows by their L2 norm or by
how often each id occurs (``counts``, e.g. from the training interactions), zeroes the
lowest ``amount`` of them and swaps the table for a
:class:`~nbcompress.engine.prune.row_tables.RowPrunedEmbedding` (or ``…Bag``) that
stores only the kept rows, all in one undoable history step.

Each table is ranked on its own and never against other layers: ranking table entries
together with Linear weights (global magnitude pruning) removed every Linear weight of a
recommender here and collapsed it to a constant prediction (``prune_``'s global scope
guards against that with ``min_density``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from nbcompress.engine.core.history import transaction
from nbcompress.engine.core.layers import select_layers
from nbcompress.engine.core.validation import check_amount, check_module
from nbcompress.engine.prune.row_tables import (
    RowPrunedEmbedding,
    RowPrunedEmbeddingBag,
    dense_table,
)

__all__ = ["BY", "TABLE_TYPES", "prune_embeddings_", "row_keep", "rows_from_prune"]

#: Row criteria: smallest L2 norm, or fewest occurrences in ``counts``.
BY = ("norm", "frequency")
TABLE_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _tables(model: nn.Module, layers: Any) -> dict[str, nn.Module]:
    try:
        selected, _ = select_layers(model, layers, TABLE_TYPES, include_output=True)
    except ValueError as err:
        if not str(err).startswith("types: the model has no layer"):
            raise
        quantized = [n for n, m in model.named_modules() if type(m).__name__.startswith("Int8Emb")]
        if quantized:
            raise ValueError(
                f"model: its tables are quantized ({quantized[0]!r}); prune rows before "
                "quantizing: undo first (undo_(model) / %undo model)."
            ) from None
        raise ValueError(
            f"model: no Embedding or EmbeddingBag layer in this {type(model).__name__}; "
            "row pruning applies to embedding tables (use prune_ for Linear/Conv)."
        ) from None
    return selected


def _as_counts(value: Any, name: str, rows: int, arg: str) -> torch.Tensor:
    try:
        counts = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise TypeError(
            f"{arg}: expected one number per id (a tensor, array or list), got "
            f"{type(value).__name__}."
        ) from None
    if counts.dim() != 1 or counts.numel() != rows:
        raise ValueError(
            f"{arg}: has shape {tuple(counts.shape)} but table {name!r} has {rows} rows; "
            "give one count per id (e.g. torch.bincount(ids, minlength=num_embeddings))."
        )
    if torch.isnan(counts).any() or (counts < 0).any():
        raise ValueError(f"{arg}: counts must be non-negative numbers (no NaN).")
    return counts


def _counts(counts: Any, by: str, tables: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per-table counts (one array for a single table, else a name → array dict)."""
    if by == "norm":
        if counts is not None:
            raise ValueError("counts: only used with by='frequency'; drop counts or set by.")
        return {}
    if counts is None:
        raise ValueError(
            "counts: by='frequency' needs the number of occurrences of each id, e.g. "
            "counts=torch.bincount(train_item_ids, minlength=num_items)."
        )
    single = not isinstance(counts, Mapping)
    if single:
        if len(tables) != 1:
            raise ValueError(
                f"counts: {len(tables)} tables are selected ({', '.join(tables)}); pass a "
                "dict table name → counts, or select one table with layers=."
            )
        counts = {next(iter(tables)): counts}
    unknown = [k for k in counts if k not in tables]
    missing = [k for k in tables if k not in counts]
    if unknown or missing:
        raise ValueError(
            f"counts: keys must be the selected tables {list(tables)}; "
            + (f"unknown {unknown}" if unknown else f"missing {missing}")
            + "."
        )
    return {
        n: _as_counts(
            counts[n], n, tables[n].num_embeddings, "counts" if single else f"counts[{n!r}]"
        )
        for n in tables
    }


def row_keep(layer: nn.Module, amount: float, score: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask over ``layer``'s ids: the lowest-scored ``amount`` of rows pruned.

    Rows already pruned come first; the padding row is never pruned; ties go to the
    lower id (a stable sort), so the same input always prunes the same rows.
    """
    n = layer.num_embeddings
    score = score.double().clone()
    if isinstance(layer, (RowPrunedEmbedding, RowPrunedEmbeddingBag)):
        score[layer.rows.long() == layer.kept] = -np.inf  # stays pruned
    eligible = n - (layer.padding_idx is not None)
    if layer.padding_idx is not None:
        score[layer.padding_idx] = np.inf
    drop = min(round(amount * n), eligible)
    order = torch.sort(score, stable=True).indices
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[:drop]] = False
    return keep


def prune_embeddings_(
    model: nn.Module,
    amount: float,
    *,
    by: str = "norm",
    counts: Any = None,
    layers: str | Sequence[str] | None = None,
) -> nn.Module:
    """Prune whole rows of the model's embedding tables in place, as one undoable step.

    In each selected ``nn.Embedding`` / ``nn.EmbeddingBag`` the ``amount`` share of rows
    (ids) with the smallest L2 norm, or the fewest occurrences in ``counts``, is zeroed and
    the table is replaced by a row-pruned one storing only the kept rows (a pruned id looks
    up zeros; see :mod:`~nbcompress.engine.prune.row_tables`). Each table is ranked on its
    own. ``undo_`` restores the original tables bit-exactly. Quantizing afterwards
    (``quantize_``) stores only the kept rows in int8.

    Args:
        model: The model (edited in place).
        amount: Share of each table's rows pruned, in [0, 1); rows pruned earlier count
            towards it (0.5 after 0.3 leaves half of the rows).
        by: ``"norm"`` (smallest L2 norm) or ``"frequency"`` (fewest occurrences).
        counts: With ``by="frequency"``: occurrences per id, one number per row — an
            array/tensor when one table is selected, else a dict table name → array.
        layers: Glob pattern(s) on table names; ``None`` = every embedding table.

    Returns:
        The model.

    Raises:
        TypeError: ``model`` is not a module, ``amount`` not a number, ``counts`` not numbers.
        ValueError: ``amount`` outside [0, 1), an unknown ``by``, ``counts`` missing, of the
            wrong length or given with ``by="norm"``, no embedding table matched, tables
            already quantized, or a table with ``max_norm``. The model is untouched.
    """
    check_module(model)
    amount = check_amount(amount)
    if not isinstance(by, str) or by not in BY:
        raise ValueError(f"by: {by!r} is unknown; choose one of {BY}.")
    tables = _tables(model, layers)
    per_table = _counts(counts, by, tables)
    with torch.no_grad():
        keeps = {}
        for name, layer in tables.items():
            score = per_table[name] if by == "frequency" else dense_table(layer).norm(dim=1)
            keeps[name] = row_keep(layer, amount, score)
        new = {n: _pruned(tables[n], keeps[n]) for n in tables}  # built before any edit
    detail = ", ".join(f"{n} {m.num_embeddings}→{m.kept}" for n, m in new.items())
    with transaction(model, "prune", f"{amount:.0%} embedding rows by {by}: {detail}") as tx:
        for name, module in new.items():
            module.train(tables[name].training)
            tx.replace(name, module)
        tx.info["rows"] = {n: (m.kept, m.num_embeddings) for n, m in new.items()}
    return model


def _pruned(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    if isinstance(layer, nn.EmbeddingBag):
        return RowPrunedEmbeddingBag(layer, keep)
    return RowPrunedEmbedding(layer, keep)


def rows_from_prune(model: nn.Module, amount: Any, opts: dict[str, Any]) -> nn.Module:
    """``prune_(model, amount, granularity="row")``: row pruning of the embedding tables by norm.

    Options of ``prune_`` that have no meaning for rows are refused, naming the option.
    """
    refused = {
        "method": (opts["method"] != "l1", "rows are ranked by L2 norm; use method='l1'"),
        "scope": (opts["scope"] != "layer", "each table is ranked on its own"),
        "keep_masks": (opts["keep_masks"], "pruned rows are not stored, no mask is kept"),
        "reconstruct": (opts["reconstruct"], "tables are not re-fitted"),
        "remove": (opts["remove"], "pruned rows are removed already"),
    }
    for arg, (bad, fix) in refused.items():
        if bad:
            raise ValueError(f"{arg}: {opts[arg]!r} does not go with granularity='row'; {fix}.")
    types = opts["types"]
    names = [types] if isinstance(types, (str, type)) else list(types or [])
    other = [t for t in names if getattr(t, "__name__", t) not in ("Embedding", "EmbeddingBag")]
    if other:
        raise ValueError(
            f"types: granularity='row' prunes embedding tables only, not {other[0]!r}; "
            "use types=['Embedding'] (or leave types out)."
        )
    if isinstance(amount, Mapping):
        raise TypeError("amount: granularity='row' takes one share of rows such as 0.5.")
    return prune_embeddings_(model, amount, layers=opts["layers"])
