"""The direct convolution (stride 1): tile kernel over the padded image, no unfold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbcompress.kernels import dispatch, get_threads, layouts
from nbcompress.kernels.conv import channel_block
from nbcompress.kernels.modules import SparseConv2d


def _pruned_conv(*args, keep: float = 0.3, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(*args, **kwargs)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) > keep] = 0
    return conv


def _forced(sparse: SparseConv2d, x: torch.Tensor, choice: str) -> torch.Tensor:
    mat = sparse.matrix()
    key = ("conv", *x.shape, get_threads())
    dispatch.set_choices(mat, {key: choice})
    with torch.no_grad():
        y = sparse(x)
    choices = dispatch.kernel_choices(mat)
    assert {k: v for k, v in choices.items() if k[0] == "conv"} == {key: choice}
    assert all(k[0] in ("conv", "bt") for k in choices)  # the unfold records its product's
    return y


@pytest.mark.parametrize(
    ("conv_args", "hw"),
    [
        ((5, 7, 3), (11, 9)),  # no padding
        ((5, 7, 3, 1, 1), (11, 9)),  # stride 1, padding 1: rows of 11 → padded width 12
        ((3, 4, (3, 2)), (13, 17)),
        ((3, 4, 3, 1, 2, 2), (12, 10)),  # dilation 2, padding 2
        ((6, 5, (1, 3), 1, (0, 1)), (7, 70)),  # more than one 64-column tile per row
        ((4, 6, 1, 1, 1), (7, 5)),  # 1×1 with padding goes through the conv path too
        ((2, 3, 5), (5, 5)),  # one output pixel
    ],
)
@pytest.mark.parametrize("fmt", ["csr", "csr_int8"])
def test_direct_matches_conv2d_and_the_unfold_kernels(conv_args, hw, fmt):
    conv = _pruned_conv(*conv_args)
    x = torch.randn(3, conv.in_channels, *hw)
    with torch.no_grad():
        ref = conv(x)
    direct = _forced(SparseConv2d(conv, format=fmt), x, "direct")
    panels = _forced(SparseConv2d(conv, format=fmt), x, "panels")
    tol = 2e-2 * float(ref.abs().max()) if fmt == "csr_int8" else 1e-5
    torch.testing.assert_close(direct, ref, rtol=0 if fmt == "csr_int8" else 1e-5, atol=tol)
    torch.testing.assert_close(direct, panels, rtol=1e-5, atol=1e-5)


@pytest.fixture
def offered(monkeypatch) -> list[list[str]]:
    """The options each first-use kernel choice offers (all run; the first is picked)."""
    seen: list[list[str]] = []

    def pick(options):
        seen.append(list(options))
        for fn in options.values():
            fn()
        return next(iter(options))

    monkeypatch.setattr(dispatch, "choose", pick)
    return seen


def test_direct_is_a_measured_candidate_at_every_stride(offered):
    x = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        SparseConv2d(_pruned_conv(4, 8, 3, 1, 1))(x)
        SparseConv2d(_pruned_conv(4, 8, 3, 2, 1))(x)
    # 100 output columns: tiles compete too; stride 2 (25 columns): panels or direct
    # (stride phases make every nonzero a constant offset again).
    assert offered == [["panels", "tiles", "direct"], ["panels", "direct"]]


def test_reused_buffers_keep_their_zero_border_across_calls_and_sizes():
    conv = _pruned_conv(4, 5, 3, 1, 2, dilation=2)
    sparse = SparseConv2d(conv)
    with torch.no_grad():
        for shape in [(2, 4, 9, 9), (1, 4, 9, 9), (1, 4, 6, 11), (2, 4, 9, 9)]:
            x = torch.randn(shape) * 100  # large values: a stale interior would show
            y = _forced(sparse, x, "direct")
            torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kwargs", [{"padding": 1}, {"padding": 2, "dilation": 2}])
def test_channel_blocked_direct_matches_conv2d(kwargs):
    conv = _pruned_conv(70, 6, 3, **kwargs)  # 70 channels: blocks of 24, 23 and 23
    x = torch.randn(2, 70, 9, 70)
    assert channel_block(70, (3, 3, 1, 1, 0, 0, 1, kwargs.get("dilation", 1), 0)) < 70 * 9
    with torch.no_grad():
        ref = conv(x)
    blocked = _forced(SparseConv2d(conv), x, "direct_kb")
    torch.testing.assert_close(blocked, ref, rtol=1e-5, atol=1e-4)
    unblocked = _forced(SparseConv2d(conv), x, "direct")
    torch.testing.assert_close(blocked, unblocked, rtol=1e-5, atol=1e-4)


def test_channel_blocks_are_whole_channels_sized_for_l1():
    assert channel_block(128, (3, 3, 1, 1, 1, 1, 1, 1, 56)) == 26 * 9  # 5 equal blocks
    assert channel_block(8, (3, 3, 1, 1, 1, 1, 1, 1, 56)) == 8 * 9  # one block
    assert channel_block(64, (1, 1, 1, 1, 0, 0, 1, 1, 56)) == 64  # 1×1: 96 per block
    mat = SparseConv2d(_pruned_conv(70, 6, 3, padding=1)).matrix()
    layouts.block_rows(mat, 24 * 9)
    dispatch.set_choices(mat, {("conv", 1, 70, 9, 70, 1): "direct_kb"})
    dispatch.release_unused(mat)
    assert {k[0] for k in layouts._CACHE[mat]} == {"k"}
    dispatch.set_choices(mat, {("conv", 1, 70, 9, 70, 1): "panels"})
    dispatch.release_unused(mat)
    assert not layouts._CACHE[mat]


def _block_pruned_conv(*args, **kwargs) -> nn.Conv2d:
    # Output channels in groups of four sharing each kept tap (4 × 1 blocks), as
    # prune_(granularity="block") leaves them.
    conv = nn.Conv2d(*args, **kwargs)
    with torch.no_grad():
        w = conv.weight
        keep = torch.rand(w.shape[0] // 4, 1, *w.shape[1:]) < 0.3
        w.mul_(keep.expand(-1, 4, *w.shape[1:]).reshape(w.shape))
    return conv


@pytest.mark.parametrize(
    ("conv_args", "hw"),
    [
        ((5, 8, 3), (11, 9)),
        ((5, 8, 3, 1, 1), (11, 9)),
        ((3, 4, 3, 1, 2, 2), (12, 10)),  # dilation 2, padding 2
        ((6, 12, (1, 3), 1, (0, 1)), (7, 70)),  # several panels of four 16-column tiles
        ((2, 4, 5), (5, 5)),  # one output pixel
    ],
)
def test_block_sparse_direct_matches_conv2d_and_unfold(conv_args, hw):
    conv = _block_pruned_conv(*conv_args, bias=True)
    x = torch.randn(2, conv.in_channels, *hw)
    with torch.no_grad():
        ref = conv(x)
    direct = _forced(SparseConv2d(conv, format="bsr"), x, "direct")
    unfold = _forced(SparseConv2d(conv, format="bsr"), x, "unfold")
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfold, ref, rtol=1e-5, atol=1e-5)


def test_block_sparse_direct_is_offered_at_every_stride(offered):
    x = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        SparseConv2d(_block_pruned_conv(4, 8, 3, 1, 1), format="bsr")(x)
        SparseConv2d(_block_pruned_conv(4, 8, 3, 2, 1), format="bsr")(x)
    assert offered == [["unfold", "direct"], ["unfold", "direct"]]


def test_block_sparse_channel_blocked_direct_matches_conv2d():
    conv = _block_pruned_conv(70, 8, 3, 1, 1, bias=True)  # 70 channels: three channel blocks
    x = torch.randn(2, 70, 9, 9)
    with torch.no_grad():
        ref = conv(x)
    assert channel_block(70, (3, 3, 1, 1, 1, 1, 1, 1, 9)) < 70 * 9
    blocked = _forced(SparseConv2d(conv, format="bsr"), x, "direct_kb")
    torch.testing.assert_close(blocked, ref, rtol=1e-5, atol=1e-4)
