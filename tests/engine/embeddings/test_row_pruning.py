"""Row pruning of embedding tables: exactness, criteria, compact storage, undo, bad input."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbcompress
from nbcompress.engine.core.history import history, undo_
from nbcompress.engine.prune.embedding_rows import prune_embeddings_
from nbcompress.engine.prune.row_tables import RowPrunedEmbedding, RowPrunedEmbeddingBag
from nbcompress.engine.quantize.report import serialized_size
from tests.engine.embeddings.models import BagModel, TwoTower, pair_batch
from tests.helpers import assert_same_state, snapshot


def zeroed(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return weight.detach() * keep[:, None]


def test_lookups_equal_the_table_with_pruned_rows_zeroed_bit_for_bit():
    torch.manual_seed(0)
    model = TwoTower()
    weight = model.item.weight.detach().clone()
    x = pair_batch(model)
    prune_embeddings_(model, 0.5)
    table = model.item
    assert isinstance(table, RowPrunedEmbedding) and table.kept == 250
    keep = table.dense_weight().abs().sum(1) > 0
    assert int(keep.sum()) == 250
    expected = F.embedding(x[1], zeroed(weight, keep))
    assert torch.equal(table(x[1]), expected)
    assert torch.equal(table.dense_weight(), zeroed(weight, keep))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_bag_modes_offsets_weights_and_padding_match_the_zeroed_table(mode, padding_idx):
    torch.manual_seed(1)
    bag = nn.EmbeddingBag(60, 8, mode=mode, padding_idx=padding_idx)
    model = nn.Sequential(bag)
    weight = bag.weight.detach().clone()
    prune_embeddings_(model, 0.6)
    pruned = model[0]
    assert isinstance(pruned, RowPrunedEmbeddingBag)
    keep = torch.ones(60, dtype=torch.bool)
    keep[pruned.rows == pruned.kept] = False
    assert padding_idx is None or keep[padding_idx]  # the padding row is never pruned
    ids = torch.randint(0, 60, (30,))
    ids[:4] = 3
    offsets = torch.tensor([0, 0, 4, 11, 20])  # an empty bag and a bag of padding ids
    psw = torch.rand(30) if mode == "sum" else None
    ref = F.embedding_bag(
        ids, zeroed(weight, keep), offsets, mode=mode, per_sample_weights=psw,
        padding_idx=padding_idx,
    )  # fmt: skip
    torch.testing.assert_close(pruned(ids, offsets, psw), ref, rtol=0, atol=1e-6)


def test_norm_prunes_the_smallest_rows_and_frequency_the_rarest_ids():
    model = nn.Sequential(nn.Embedding(10, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(10.0)[:, None].expand(10, 4))
    prune_embeddings_(model, 0.3)
    assert model[0].rows.tolist()[:4] == [7, 7, 7, 0]  # ids 0-2 (norms 0, 2, 4) → zero row
    undo_(model)
    counts = torch.tensor([5, 0, 9, 1, 7, 7, 2, 8, 3, 6])
    prune_embeddings_(model, 0.3, by="frequency", counts=counts)
    pruned = (model[0].rows == model[0].kept).nonzero().flatten().tolist()
    assert pruned == [1, 3, 6]


def test_pruning_again_counts_the_rows_pruned_before():
    model = TwoTower()
    prune_embeddings_(model, 0.3)
    prune_embeddings_(model, 0.5)
    assert model.user.kept == 150 and model.item.kept == 250
    assert len(history(model)) == 2


def test_undo_restores_the_tables_bit_exactly_and_the_step_is_one():
    model = TwoTower()
    saved = snapshot(model)
    nbcompress.prune_embeddings_(model, 0.5, layers="item")
    assert type(model.user) is nn.Embedding and isinstance(model.item, RowPrunedEmbedding)
    assert len(history(model)) == 1 and "item 500→250" in history(model)[-1].detail
    undo_(model)
    assert type(model.item) is nn.Embedding
    assert_same_state(model, saved)


def test_pruned_rows_cost_nothing_in_the_saved_model():
    table = nn.Sequential(nn.Embedding(20000, 64))
    before = serialized_size(table)
    prune_embeddings_(table, 0.5)
    after = serialized_size(table)
    # Kept rows + one zero row + a 4-byte map entry per id: 0.5 + 1/64 of the bytes.
    assert 0.5 < after / before < 0.53


def test_pickle_and_training_keep_pruned_ids_at_zero():
    torch.manual_seed(0)
    model = BagModel()
    prune_embeddings_(model, 0.5)
    loaded = pickle.loads(pickle.dumps(model))
    u, hist = torch.randint(0, 100, (8,)), torch.randint(0, 200, (8, 5))
    assert torch.equal(loaded(u, hist), model(u, hist))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        model(u, hist).sum().backward()
        opt.step()
    model(u, hist)  # a training-mode forward re-zeroes the shared zero row
    pruned_ids = (model.user.rows == model.user.kept).nonzero().flatten()
    assert model.user(pruned_ids).abs().sum() == 0


def test_prune_granularity_row_routes_to_row_pruning():
    model = TwoTower()
    nbcompress.prune_(model, 0.5, types=["Embedding"], granularity="row")
    assert model.user.kept == 150 and type(model.mlp[0]) is nn.Linear


@pytest.mark.parametrize(
    ("kwargs", "error", "start"),
    [
        (dict(amount=1.0), ValueError, "amount: 1.0 is outside [0, 1)"),
        (dict(amount=-0.1), ValueError, "amount: -0.1 is outside"),
        (dict(amount="half"), TypeError, "amount: expected a number"),
        (dict(amount=0.5, by="size"), ValueError, "by: 'size' is unknown"),
        (dict(amount=0.5, by="frequency"), ValueError, "counts: by='frequency' needs"),
        (dict(amount=0.5, counts=[1, 2]), ValueError, "counts: only used with by='frequency'"),
        (dict(amount=0.5, by="frequency", counts=[1, 2]), ValueError, "counts: 2 tables"),
        (
            dict(amount=0.5, by="frequency", counts=[1, 2], layers="user"),
            ValueError,
            "counts: has shape (2,) but table 'user' has 300 rows",
        ),
        (dict(amount=0.5, layers="mlp.*"), ValueError, "layers: pattern 'mlp.*' matches no"),
        (dict(amount=0.5, granularity="row", method="random"), ValueError, "method: 'random'"),
        (dict(amount=0.5, granularity="row", types="Linear"), ValueError, "types: granularity"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument_and_leaves_the_model(kwargs, error, start):
    model = TwoTower()
    saved = snapshot(model)
    verb = nbcompress.prune_ if "granularity" in kwargs else prune_embeddings_
    with pytest.raises(error) as info:
        verb(model, **kwargs)
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message
    assert_same_state(model, saved)
    assert not history(model)


def test_a_model_without_tables_is_refused():
    with pytest.raises(ValueError, match="^model: no Embedding or EmbeddingBag layer"):
        prune_embeddings_(nn.Sequential(nn.Linear(3, 3)), 0.5)
