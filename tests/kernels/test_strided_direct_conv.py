"""The direct convolution at any stride (stride phases), shared scratch, BN folding, layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.kernels import conv as kconv
from nbcompress.kernels import dispatch, get_threads
from nbcompress.kernels.modules import SparseConv2d

#: (conv arguments, input H × W): strides 2 and 3, asymmetric ones, padding, dilation,
#: depthwise and grouped, odd sizes, a stem-like 7 × 7, more than one tile per row.
STRIDED = [
    ((5, 7, 3, 2, 1), (11, 9)),
    ((3, 8, 7, 2, 3), (30, 31)),
    ((4, 6, 3, 3, 2, 2), (17, 13)),
    ((6, 6, 3, 2, 1, 1, 6), (9, 10)),  # depthwise
    ((4, 8, (3, 2), (2, 3), (1, 0), (1, 2), 2), (12, 15)),  # groups 2, dilation (1, 2)
    ((4, 6, 3, 2, 0), (5, 5)),  # one output pixel... of 2 × 2
    ((2, 4, 3, 2, 1), (3, 140)),  # rows of 70 outputs: more than one 64-column tile
]


def _pruned_conv(*args, keep: float = 0.3, seed: int = 0, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(*args, **kwargs)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) > keep] = 0
    return conv


def _forced(sparse: SparseConv2d, x: torch.Tensor, choice: str) -> torch.Tensor:
    key = ("conv", *x.shape, get_threads())
    dispatch.set_choices(sparse.matrix(), {key: choice})
    with torch.no_grad():
        return sparse(x)


@pytest.mark.parametrize(("conv_args", "hw"), STRIDED)
@pytest.mark.parametrize("fmt", ["csr", "csr_int8"])
def test_strided_direct_matches_conv2d(conv_args, hw, fmt):
    conv = _pruned_conv(*conv_args)
    x = torch.randn(2, conv.in_channels, *hw)
    with torch.no_grad():
        ref = conv(x)
    direct = _forced(SparseConv2d(conv, format=fmt), x, "direct")
    panels = _forced(SparseConv2d(conv, format=fmt), x, "panels")
    if fmt == "csr":
        torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-5)
    else:  # int8 values: rounding, but the same rounding as the unfold kernels
        torch.testing.assert_close(direct, ref, rtol=0, atol=2e-2 * float(ref.abs().max()))
    torch.testing.assert_close(direct, panels, rtol=1e-5, atol=1e-5)


def test_strided_channel_blocked_direct_matches_conv2d():
    conv = _pruned_conv(70, 6, 3, 2, 1)  # 70 channels: blocks of whole channels
    x = torch.randn(2, 70, 13, 75)
    assert kconv.channel_block(70, (3, 3, 2, 2, 1, 1, 1, 1, 0)) < 70 * 9
    with torch.no_grad():
        ref = conv(x)
    torch.testing.assert_close(_forced(SparseConv2d(conv), x, "direct_kb"), ref, atol=1e-4, rtol=0)


def test_block_sparse_strided_direct_matches_conv2d():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, 2, 1)
    with torch.no_grad():  # whole 4 × 1 blocks (4 output rows) zero
        keep = torch.rand(2, 1, 4, 3, 3) < 0.4
        conv.weight.mul_(keep.repeat_interleave(4, dim=0).reshape(8, 1, 4, 3, 3)[:, 0])
    x = torch.randn(1, 4, 11, 13)
    with torch.no_grad():
        ref = conv(x)
    y = _forced(SparseConv2d(conv, format="bsr"), x, "direct")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided_one_by_one_multiplies_the_strided_pixels(stride):
    conv = _pruned_conv(6, 5, 1, stride)
    x = torch.randn(2, 6, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_direct_is_offered_at_every_stride(monkeypatch):
    offered: list[list[str]] = []

    def pick(options):
        offered.append(list(options))
        for fn in options.values():
            fn()
        return next(iter(options))

    monkeypatch.setattr(dispatch, "choose", pick)
    x = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        SparseConv2d(_pruned_conv(4, 8, 3, 2, 1))(x)
    assert offered == [["panels", "direct"]]  # 25 output columns: no 64-column tiles


def test_phase_planes_skip_the_width_rounding_where_it_costs_a_tile():
    # 7 × 7 at 3 × 3, padding 1: rows of 9, 63 outputs, one tile; rows of 12 would need two.
    assert kconv.phases(7, 7, (3, 3, 1, 1, 1, 1, 1, 1, 7), 64) == kconv.Phases(1, 1, 9, 9, 7)
    # 56 × 56: rows of 58 rounded to 60 (53 tiles either way).
    assert kconv.phases(56, 56, (3, 3, 1, 1, 1, 1, 1, 1, 56), 64).wq == 60
    # Stride 2 on 224 with padding 3: planes of 115 rows, rows of 115 → 116.
    assert kconv.phases(224, 224, (7, 7, 2, 2, 3, 3, 1, 1, 112), 64) == kconv.Phases(
        2, 2, 115, 116, 112
    )


def test_phase_offsets_address_the_phase_planes():
    # Convolving by hand through the offsets gives F.conv2d's output.
    conv = _pruned_conv(3, 4, (3, 2), (2, 3), (1, 2), (2, 1))
    x = torch.randn(1, 3, 10, 11)
    sparse = SparseConv2d(conv)
    mat = sparse.matrix()
    geom = (3, 2, 2, 3, 1, 2, 2, 1, 0)
    ref = F.conv2d(x, conv.weight, conv.bias, (2, 3), (1, 2), (2, 1))[0]
    ho, wo = ref.shape[1:]
    geom = (*geom[:8], wo)
    lay = kconv.phases(10, 11, geom, 64)
    planes = np.zeros((3, 2, 3, lay.hq, lay.wq), np.float32)
    kconv._fill(planes, x[0].numpy(), geom)
    flat = np.concatenate([planes.reshape(-1), np.zeros(64, np.float32)])
    offs = kconv.phase_offsets(mat, geom, lay, None, (10, 11))
    out = np.zeros((4, lay.ho * lay.wq), np.float32)
    q = np.arange(lay.ho * lay.wq)
    for i in range(4):
        for j in range(mat.indptr[i], mat.indptr[i + 1]):
            out[i] += mat.data[j] * flat[offs[j] + q]
    got = out.reshape(4, lay.ho, lay.wq)[:, :, :wo] + conv.bias.detach().numpy()[:, None, None]
    np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_shared_buffers_keep_their_zero_border_across_layers_and_sizes():
    # Two layers of the same layout share one padded buffer; calls at other sizes and
    # strides in between must not leave pixels in any border (large values would show).
    first, second = _pruned_conv(4, 5, 3, 2, 2, seed=1), _pruned_conv(4, 6, 3, 2, 2, seed=2)
    other = _pruned_conv(4, 5, 3, 1, 1, seed=3)
    layers = [(SparseConv2d(c), c) for c in (first, second, other)]
    shapes = [(1, 4, 9, 9), (2, 4, 9, 9), (1, 4, 6, 11), (1, 4, 9, 9), (1, 4, 7, 7)]
    with torch.no_grad():
        for shape in shapes:
            for sparse, conv in layers:
                x = torch.randn(shape) * 100
                y = _forced(sparse, x, "direct")
                torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-3)
    images = [k for k in kconv.shared_scratch_keys() if k[0] == "image"]
    assert len(images) == len(set(images)) <= kconv.SHARED_KEEP
    layout = (4, 9, 9, (3, 3, 2, 2, 2, 2, 1, 1))
    assert sum(k[2][:4] == layout for k in images) == 1  # one buffer for both layers


def test_offsets_of_a_geometry_that_did_not_choose_direct_are_dropped():
    sparse = SparseConv2d(_pruned_conv(4, 8, 3, 2, 1))
    x = torch.randn(1, 4, 10, 10)
    _forced(sparse, x, "direct")
    mat = sparse.matrix()
    assert kconv._OFFSETS[mat]
    dispatch.set_choices(mat, {("conv", 1, 4, 10, 10, get_threads()): "panels"})
    with torch.no_grad():
        sparse(x)
    assert not kconv._OFFSETS[mat]


@pytest.mark.parametrize("fmt", ["csr", "csr_int8", "bsr"])
@pytest.mark.parametrize(("groups", "bias", "affine"), [(1, False, True), (2, True, False)])
def test_fold_batchnorm_matches_conv_then_batchnorm(fmt, groups, bias, affine):
    conv = _pruned_conv(8, 8, 3, 1, 1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(8, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 9, 9)
    sparse = SparseConv2d(conv, format=fmt)
    nnz = sparse.nnz
    with torch.no_grad():
        sparse(x)  # a kernel choice and layouts for the old weight: must not be reused
        ref = bn(sparse(x))
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        assert sparse.fold_batchnorm_(bn) is sparse
        got = sparse(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())  # bn untouched
    assert sparse.bias is not None and sparse.nnz == nnz  # the same pattern


def test_fold_batchnorm_refuses_what_does_not_fold():
    sparse = SparseConv2d(_pruned_conv(4, 6, 3))
    with pytest.raises(ValueError, match="eval-mode"):
        sparse.fold_batchnorm_(nn.BatchNorm2d(6).train())
    with pytest.raises(ValueError, match="6 outputs"):
        sparse.fold_batchnorm_(nn.BatchNorm2d(5).eval())
    with pytest.raises(TypeError, match="BatchNorm2d"):
        sparse.fold_batchnorm_(nn.BatchNorm1d(6).eval())


def test_channels_last_output_has_the_same_values_and_pickles():
    conv = _pruned_conv(3, 8, 7, 2, 3)
    x = torch.randn(1, 3, 32, 32)
    sparse = SparseConv2d(conv)
    with torch.no_grad():
        plain = sparse(x)
        sparse.channels_last_output = True
        cl = sparse(x)
        again = pickle.loads(pickle.dumps(sparse))(x)
    assert plain.is_contiguous() and not cl.is_contiguous()
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, plain) and torch.equal(again, plain)
    assert again.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("choice", ["measured", "direct", "direct_kb"])
def test_layers_sharing_buffers_over_random_size_sequences(choice):
    # A model's worth of layers (strides 1–3, a 7 × 7 stem, 1 × 1 and grouped ones, two
    # of the same layout) called in a random order at sizes drawn from a pool, so that
    # sizes repeat after others: every call against F.conv2d.
    rng = np.random.default_rng(0)
    specs = [(3, 8, 7, 2, 3, 1), (8, 8, 3, 1, 1, 1), (8, 8, 3, 1, 1, 1), (8, 16, 3, 2, 1, 1)]
    specs += [(8, 16, 1, 2, 0, 1), (16, 16, 3, 3, 2, 4), (40, 8, 3, 2, 1, 1)]
    layers = []
    for n, (cin, cout, k, s, p, g) in enumerate(specs):
        conv = _pruned_conv(cin, cout, k, s, p, groups=g, seed=n)
        layers.append((SparseConv2d(conv), conv))
    pool = [(9, 9), (16, 12), (7, 23), (9, 9), (31, 30), (5, 6)]
    with torch.no_grad():
        for step in range(40):
            sparse, conv = layers[rng.integers(len(layers))]
            h, w = pool[rng.integers(len(pool))]
            x = torch.from_numpy(rng.standard_normal((1, conv.in_channels, h, w), np.float32))
            if choice != "measured":
                options = ("conv", *x.shape, get_threads())
                dispatch.set_choices(sparse.matrix(), {options: choice})
            try:
                y = sparse(x)
            except KeyError:  # direct_kb is offered only where a block is under K
                continue
            torch.testing.assert_close(y, conv(x), rtol=1e-4, atol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("budget", [1, 3000, 10**9])  # a row per chunk, a few, one chunk
@pytest.mark.parametrize(
    ("fmt", "choice"), [("csr", "direct"), ("csr", "direct_kb"), ("bsr", "direct")]
)
def test_any_output_chunk_gives_the_same_convolution(budget, fmt, choice, monkeypatch):
    monkeypatch.setattr(kconv, "OUT_CHUNK_BYTES", budget)
    conv = _pruned_conv(70, 8, 3, 2, 1, keep=0.5)
    x = torch.randn(2, 70, 21, 37) * 10
    with torch.no_grad():
        ref = conv(x)
    got = _forced(SparseConv2d(conv, format=fmt), x, choice)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
