"""Per-row int8 embedding tables: lookups vs the dequantized table, every bag option, sizes."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.prune.embedding_rows import prune_embeddings_
from nbcompress.engine.quantize.embedding_int8 import (
    Int8Embedding,
    Int8EmbeddingBag,
    pack_rows_int8,
)
from nbcompress.engine.quantize.report import serialized_size

KERNELS = ["numba", "fbgemm", "auto"]


def test_rows_round_within_half_a_step_and_zero_rows_stay_zero():
    torch.manual_seed(0)
    w = torch.randn(50, 24) * torch.rand(50, 1) * 3 + torch.randn(50, 1)
    w[7] = 0
    table = Int8Embedding(nn.Embedding.from_pretrained(w), "numba")
    deq = table.dequantized_weight()
    step = (w.amax(1) - w.amin(1)) / 255
    assert ((deq - w).abs() <= step[:, None] / 2 + 1e-6).all()
    assert torch.equal(deq[7], torch.zeros(24))
    assert pack_rows_int8(w).shape == (50, 24 + 8) and pack_rows_int8(w).dtype == torch.uint8


@pytest.mark.parametrize("kernel", KERNELS)
def test_embedding_lookup_equals_the_dequantized_table(kernel):
    torch.manual_seed(0)
    table = Int8Embedding(nn.Embedding(300, 16, padding_idx=2), kernel)
    ids = torch.randint(0, 300, (4, 7))
    out = table(ids)
    assert out.shape == (4, 7, 16)
    torch.testing.assert_close(out, F.embedding(ids, table.dequantized_weight()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 5])
@pytest.mark.parametrize("last", [False, True])
def test_bag_equals_the_dequantized_table_in_every_mode(kernel, mode, padding_idx, last):
    torch.manual_seed(2)
    options = dict(mode=mode, padding_idx=padding_idx, include_last_offset=last)
    float_bag = nn.EmbeddingBag(80, 12, **options)
    bag = Int8EmbeddingBag(float_bag, kernel)
    ids = torch.randint(0, 80, (40,))
    ids[:5] = 5
    offsets = torch.tensor([0, 0, 5, 9, 23] + ([40] if last else []))  # empty bag, padding bag
    psw = torch.rand(40) if mode == "sum" else None
    ref = F.embedding_bag(
        ids, bag.dequantized_weight(), offsets, mode=mode, per_sample_weights=psw,
        include_last_offset=last, padding_idx=padding_idx,
    )  # fmt: skip
    torch.testing.assert_close(bag(ids, offsets, psw), ref, rtol=1e-5, atol=1e-5)
    # int8 stays close to the float table itself (a sanity bound, not the exactness check)
    assert (bag(ids, offsets, psw) - float_bag(ids, offsets, psw)).abs().max() < 0.05


def test_ids_after_the_last_offset_belong_to_no_bag():
    float_bag = nn.EmbeddingBag(30, 4, mode="sum", include_last_offset=True)
    ids, offsets = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 2, 4])
    bag = Int8EmbeddingBag(float_bag, "numba")
    ref = F.embedding_bag(
        ids, bag.dequantized_weight(), offsets, mode="sum", include_last_offset=True
    )
    assert bag(ids, offsets).shape == (2, 4)
    torch.testing.assert_close(bag(ids, offsets), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_with_2d_input(mode):
    torch.manual_seed(3)
    bag = Int8EmbeddingBag(nn.EmbeddingBag(40, 8, mode=mode), "numba")
    ids = torch.randint(0, 40, (6, 3))
    ref = F.embedding_bag(ids, bag.dequantized_weight(), mode=mode)
    torch.testing.assert_close(bag(ids), ref, rtol=1e-5, atol=1e-6)


def test_row_pruned_then_int8_stores_only_kept_rows_and_looks_up_zeros_for_pruned_ids():
    torch.manual_seed(4)
    model = nn.Sequential(nn.EmbeddingBag(100, 16, mode="mean"))
    prune_embeddings_(model, 0.5)
    pruned = model[0]
    bag = Int8EmbeddingBag(pruned, "numba")
    assert bag.stored_rows == 51  # 50 kept + the zero row
    dropped = (pruned.rows == pruned.kept).nonzero().flatten()
    assert torch.equal(bag.dequantized_weight()[dropped], torch.zeros(50, 16))
    ids, offsets = torch.randint(0, 100, (30,)), torch.tensor([0, 3, 10])
    ref = F.embedding_bag(ids, bag.dequantized_weight(), offsets, mode="mean")
    torch.testing.assert_close(bag(ids, offsets), ref, rtol=1e-5, atol=1e-6)


def test_serialized_bytes_shrink_about_4x_and_7x_with_half_the_rows_pruned():
    torch.manual_seed(5)
    dense = nn.Sequential(nn.Embedding(20000, 128))
    before = serialized_size(dense)
    int8 = serialized_size(Int8Embedding(dense[0]))
    prune_embeddings_(dense, 0.5)
    both = serialized_size(Int8Embedding(dense[0]))
    # 128 codes + 8 bytes of scale and bias per row: 512 / 136 = 3.76×.
    assert 3.6 < before / int8 < 4
    assert before / both > 7  # half the rows, plus the 4-byte id map


@pytest.mark.parametrize("cls", [Int8Embedding, Int8EmbeddingBag])
def test_pickle_deepcopy_and_torch_save_round_trip(cls):
    torch.manual_seed(6)
    layer = cls(nn.EmbeddingBag(50, 8) if cls is Int8EmbeddingBag else nn.Embedding(50, 8))
    ids = torch.randint(0, 50, (5, 4))
    expected = layer(ids)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer),
                  torch.load(buf, weights_only=False)):  # fmt: skip
        torch.testing.assert_close(other(ids), expected, rtol=1e-6, atol=1e-6)


def test_bad_ids_and_options_raise_one_line():
    bag = Int8EmbeddingBag(nn.EmbeddingBag(10, 4, mode="mean"))
    for ids in (torch.tensor([[1, 10]]), torch.tensor([[-1, 2]])):
        with pytest.raises(IndexError, match="index out of range"):
            bag(ids)
    with pytest.raises(IndexError, match="index out of range"):
        Int8Embedding(nn.Embedding(10, 4))(torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="^per_sample_weights: only supported with mode='sum'"):
        bag(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2))
    with pytest.raises(ValueError, match="^offsets: a 1D input needs 1D offsets"):
        bag(torch.tensor([1, 2]))
    for offsets in ([1, 2], [0, 3, 1], [0, 5]):
        for kernel in ("numba", "fbgemm"):
            with pytest.raises(ValueError, match="^offsets: must start at 0, not decrease"):
                Int8EmbeddingBag(nn.EmbeddingBag(10, 4), kernel)(
                    torch.tensor([1, 2, 3]), torch.tensor(offsets)
                )
    with pytest.raises(TypeError, match="^input: expected integer ids"):
        bag(torch.ones(2, 2))
    with pytest.raises(ValueError, match="^kernel: 'cuda' is unknown"):
        Int8Embedding(nn.Embedding(10, 4), "cuda")
