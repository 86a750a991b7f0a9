from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from nbcompress.kernels.modules import SparseConv2d, SparseLinear


def _prune(module: nn.Module, keep: float = 0.3) -> nn.Module:
    # Magnitude pruning by hand: keep the largest `keep` fraction of weights.
    with torch.no_grad():
        w = module.weight
        cut = w.abs().flatten().kthvalue(int((1 - keep) * w.numel())).values
        w[w.abs() <= cut] = 0
    return module


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(20,), (1, 20), (7, 20), (2, 3, 20), (19, 20)])
def test_sparse_linear_matches_linear(bias, shape):
    lin = _prune(nn.Linear(20, 13, bias=bias))
    sparse = SparseLinear.from_dense(lin)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), lin(x), rtol=1e-5, atol=1e-5)
    assert sparse.nnz == int(lin.weight.ne(0).sum())
    assert sparse.density == pytest.approx(0.3, abs=0.02)
    torch.testing.assert_close(sparse.dense_weight(), lin.weight.detach())


@pytest.mark.parametrize("fmt", ["csr_int8", "bsr"])
def test_other_formats_of_sparse_linear(fmt):
    lin = _prune(nn.Linear(24, 16))
    sparse = SparseLinear.from_dense(lin, format=fmt)
    x = torch.randn(5, 24)
    with torch.no_grad():
        ref = lin(x)
        tol = 2e-2 * float(ref.abs().max()) if fmt == "csr_int8" else 1e-5
        torch.testing.assert_close(sparse(x), ref, rtol=0, atol=tol)
    assert sparse.format == fmt


def test_sparse_linear_feeds_the_next_one_without_copies():
    a, b = _prune(nn.Linear(12, 24)), _prune(nn.Linear(24, 6))
    dense = nn.Sequential(a, nn.ReLU(), b)
    sparse = nn.Sequential(SparseLinear.from_dense(a), nn.ReLU(), SparseLinear.from_dense(b))
    x = torch.randn(10, 12)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3},
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": (3, 2), "padding": (2, 1), "dilation": (2, 1)},
        {"kernel_size": 1},
        {"kernel_size": 1, "stride": 2},
        {"kernel_size": 3, "bias": False, "padding": "valid"},
    ],
)
def test_sparse_conv2d_matches_conv2d(kwargs):
    conv = _prune(nn.Conv2d(5, 7, **kwargs))
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(2, 5, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["csr_int8", "bsr"])
def test_other_formats_of_sparse_conv2d(fmt):
    conv = _prune(nn.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        ref = conv(x)
        tol = 2e-2 * float(ref.abs().max()) if fmt == "csr_int8" else 1e-5
        torch.testing.assert_close(
            SparseConv2d.from_dense(conv, format=fmt)(x), ref, rtol=0, atol=tol
        )


def test_sparse_conv2d_with_many_columns_uses_panels():
    conv = _prune(nn.Conv2d(4, 8, 3, padding=1))
    x = torch.randn(1, 4, 10, 13)  # 130 columns: 8 panels of 16 + 2 leftover columns
    with torch.no_grad():
        torch.testing.assert_close(SparseConv2d.from_dense(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        (nn.Conv2d(4, 4, 3, padding="same"), "zero padding"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "zero padding"),
    ],
)
def test_unsupported_convs_are_refused_clearly(conv, match):
    with pytest.raises(ValueError, match=match):
        SparseConv2d.from_dense(conv)


def test_wrong_module_types_and_formats():
    with pytest.raises(TypeError, match="module: expected nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="module: expected nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="format: 'coo'"):
        SparseLinear.from_dense(nn.Linear(2, 2), format="coo")


def test_gradients_are_refused_with_a_clear_error():
    sparse = SparseLinear.from_dense(nn.Linear(4, 3))
    with pytest.raises(RuntimeError, match="inference-only"):
        sparse(torch.randn(2, 4, requires_grad=True))
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 3, 1))
    with pytest.raises(RuntimeError, match="inference-only"):
        conv(torch.randn(1, 2, 4, 4, requires_grad=True))
    assert list(sparse.parameters()) == []


def test_bad_inputs_are_named():
    sparse = SparseLinear.from_dense(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="last dimension is 5, expected 4"):
        sparse(torch.randn(2, 5))
    with pytest.raises(TypeError, match="float32"):
        sparse(torch.randn(2, 4, dtype=torch.float64))
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 3, 1))
    with pytest.raises(ValueError, match=r"expected shape \(N, 2, H, W\)"):
        conv(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("fmt", ["csr", "csr_int8", "bsr"])
def test_pickle_deepcopy_save_and_state_dict(fmt):
    lin = _prune(nn.Linear(8, 12))
    sparse = SparseLinear.from_dense(lin, format=fmt)
    x = torch.randn(3, 8)
    ref = sparse(x)
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    copies = [
        copy.deepcopy(sparse),
        pickle.loads(pickle.dumps(sparse)),
        torch.load(buf, weights_only=False),
    ]
    for other in copies:
        torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
    assert set(sparse.state_dict()) == {"indptr", "indices", "values", "scale", "bias"}
    other = SparseLinear.from_dense(lin, format=fmt)
    with torch.no_grad():
        other.values.zero_()
    other.load_state_dict(sparse.state_dict())
    torch.testing.assert_close(other(x), ref, rtol=0, atol=0)


def test_conv_module_pickles_and_repr():
    sparse = SparseConv2d.from_dense(_prune(nn.Conv2d(3, 4, 3, stride=2)))
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(pickle.loads(pickle.dumps(sparse))(x), sparse(x), rtol=0, atol=0)
    assert "stride=(2, 2)" in repr(sparse) and "format=csr" in repr(sparse)
