"""Grouped and depthwise convolutions in SparseConv2d, against dense torch."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from nbcompress.kernels import dispatch, pack_bsr, pack_csr
from nbcompress.kernels.formats import ungroup
from nbcompress.kernels.modules import SparseConv2d

#: (in, out, kernel, stride, padding, dilation, groups)
CONVS = [
    (8, 8, 3, 1, 1, 1, 8),  # depthwise
    (8, 16, 3, 2, 1, 1, 8),  # depthwise, channel multiplier 2, stride 2
    (8, 8, 3, 1, 2, 2, 2),  # two groups, dilation 2
    (12, 8, 1, 1, 0, 1, 4),  # grouped 1 × 1 (multiplied directly)
    (16, 16, 3, 1, 0, 1, 16),  # depthwise without padding
    (8, 16, (3, 1), 1, (1, 0), 1, 2),
]
KERNELS = ["panels", "tiles", "direct", "direct_kb", "unfold"]


def _conv(args: tuple, keep: float = 0.5) -> nn.Conv2d:
    cin, cout, k, s, p, d, g = args
    conv = nn.Conv2d(cin, cout, k, s, p, d, groups=g)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < keep)
    return conv


@pytest.mark.parametrize("kernel", ["measured", *KERNELS])
@pytest.mark.parametrize("fmt", ["csr", "csr_int8", "bsr"])
@pytest.mark.parametrize("args", CONVS, ids=str)
def test_grouped_convs_match_conv2d(args, fmt, kernel, monkeypatch):
    if kernel != "measured":

        def pick(options):
            for fn in options.values():
                fn()
            return kernel if kernel in options else next(iter(options))

        monkeypatch.setattr(dispatch, "choose", pick)
    conv = _conv(args)
    sparse = SparseConv2d.from_dense(conv, format=fmt)
    weight = sparse.dense_weight().reshape(conv.weight.shape)  # int8: as dequantized
    ref_conv = copy.deepcopy(conv)
    with torch.no_grad():
        ref_conv.weight.copy_(weight)
        for hw in [(9, 9), (5, 70), (9, 9), (3, 4)]:  # 70: more than one tile per row
            x = torch.randn(2, conv.in_channels, *hw)
            torch.testing.assert_close(sparse(x), ref_conv(x), rtol=1e-5, atol=1e-5)
            if fmt == "csr":
                torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_a_grouped_conv_keeps_its_weight_and_density(fmt):
    conv = _conv((8, 16, 3, 1, 1, 1, 4))
    sparse = SparseConv2d.from_dense(conv, format=fmt)
    torch.testing.assert_close(sparse.dense_weight(), conv.weight.reshape(16, -1))
    if fmt == "csr":
        assert sparse.nnz == int(conv.weight.ne(0).sum())
        assert sparse.density == pytest.approx(float(conv.weight.ne(0).float().mean()))
    assert "groups=4" in repr(sparse)
    assert "groups" not in repr(SparseConv2d.from_dense(_conv((4, 4, 3, 1, 1, 1, 1))))


def test_a_grouped_conv_survives_pickle_deepcopy_and_save():
    conv = _conv((8, 8, 3, 1, 1, 1, 8))
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(1, 8, 6, 6)
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    copies = [pickle.loads(pickle.dumps(sparse)), copy.deepcopy(sparse)]
    copies.append(torch.load(buf, weights_only=False))
    with torch.no_grad():
        for other in copies:
            assert other.groups == 8
            torch.testing.assert_close(other(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_ungroup_places_each_group_in_its_span(groups):
    rng = np.random.default_rng(groups)
    w = rng.standard_normal((8, 6)).astype(np.float32)  # (out × in/groups·kh·kw)
    w[rng.random(w.shape) < 0.5] = 0
    full = np.zeros((8, groups * 6), np.float32)
    for row in range(8):
        g = row // (8 // groups)
        full[row, g * 6 : (g + 1) * 6] = w[row]
    np.testing.assert_array_equal(ungroup(pack_csr(w), groups).to_dense(), full)
    if 8 // groups % 4 == 0:
        np.testing.assert_array_equal(ungroup(pack_bsr(w, (4, 1)), groups).to_dense(), full)
    else:
        with pytest.raises(ValueError, match="straddle"):
            ungroup(pack_bsr(w, (4, 1)), groups)
