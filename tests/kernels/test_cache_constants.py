"""The cache-size constants only set speed: kernels give the same results for any value.

``layouts.KBLOCK`` (input rows per block of the K-blocked tiles, sized for a 1 MB L2) and
``conv.CHANNEL_BLOCK_BYTES`` (L1 bytes per channel block of the direct conv) were measured
on one CPU; another CPU's caches may call for other values, never for other results.
Each is set to extremes here (blocks of one row or channel, one block) and the blocked
kernels, forced, are compared with dense torch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.kernels import conv, dispatch, layouts
from nbcompress.kernels.modules import SparseConv2d, SparseLinear


@pytest.fixture
def prefer(monkeypatch):
    """Make each first-use choice pick the first of ``names`` offered (all options run)."""
    names: list[str] = []
    picked: list[str] = []

    def pick(options):
        for fn in options.values():
            fn()
        picked.append(next((n for n in names if n in options), next(iter(options))))
        return picked[-1]

    monkeypatch.setattr(dispatch, "choose", pick)
    return names, picked


def _pruned(module: nn.Module, block: bool = False) -> nn.Module:
    w = module.weight.detach()
    if block:  # 4 × 1 blocks: output rows in groups of four
        keep = torch.rand(w.shape[0] // 4, 1, *w.shape[1:]) < 0.4
        w.mul_(keep.expand(-1, 4, *w.shape[1:]).reshape(w.shape))
    else:
        w.mul_(torch.rand_like(w) < 0.4)
    return module


@pytest.mark.parametrize("kblock", [1, 7, 64, 10**6])
@pytest.mark.parametrize("fmt", ["csr", "csr_int8", "bsr"])
def test_any_kblock_gives_the_same_linear_products(kblock, fmt, prefer, monkeypatch):
    monkeypatch.setattr(layouts, "KBLOCK", kblock)
    names, picked = prefer
    names += ["kblocks", "bsr4_kb"]
    lin = _pruned(nn.Linear(60, 40), block=fmt == "bsr")
    sparse = SparseLinear.from_dense(lin, format=fmt)
    weight = sparse.dense_weight()
    for batch in (1, 8, 64, 130):  # 130: the next block is prefetched
        x = torch.randn(batch, 60)
        with torch.no_grad():
            torch.testing.assert_close(
                sparse(x), F.linear(x, weight, lin.bias), rtol=1e-5, atol=1e-5
            )
    assert (set(picked) & {"kblocks", "bsr4_kb"} != set()) == (kblock < 60)


@pytest.mark.parametrize("budget", [1, 4096, 10**9])
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_any_channel_block_gives_the_same_convolution(budget, fmt, dilation, prefer, monkeypatch):
    monkeypatch.setattr(conv, "CHANNEL_BLOCK_BYTES", budget)
    names, picked = prefer
    names += ["direct_kb", "direct"]
    dense = _pruned(nn.Conv2d(12, 8, 3, padding=dilation, dilation=dilation), block=fmt == "bsr")
    sparse = SparseConv2d.from_dense(dense, format=fmt)
    for shape in [(2, 12, 9, 70), (1, 12, 5, 5)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-4)
    blocks = conv.channel_block(12, (3, 3, 1, 1, 1, 1, 1, dilation, 0)) // 9
    if budget in (1, 10**9):  # one channel per block, one block of all channels
        assert blocks == (1 if budget == 1 else 12)
    assert ("direct_kb" in picked) == (blocks < 12)


def test_the_constants_are_read_at_each_call(monkeypatch):
    monkeypatch.setattr(layouts, "KBLOCK", 10)
    assert layouts.kblock(25) == 9  # three equal blocks
    monkeypatch.setattr(conv, "CHANNEL_BLOCK_BYTES", 1)
    assert conv.channel_block(5, (3, 3, 1, 1, 1, 1, 1, 1, 0)) == 9  # one channel a block
