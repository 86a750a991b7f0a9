"""Sparse int8 kernels (``kernels/int8.py``): exact integer sums on both CPU paths."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from nbcompress.kernels import cpu, dispatch
from nbcompress.kernels.cpu import forced_int8_cpu, sparse_int8_path
from nbcompress.kernels.formats import pack_bsr, pack_csr
from nbcompress.kernels.int8 import LANES, int8_matmul, quantize_batch, sliced
from nbcompress.kernels.modules import FORMATS, SparseConv2d, SparseLinear

HAS_VNNI = {"avx512_vnni", "avx512bw", "avx512vl"} <= cpu._cpu_flags()
# The VNNI kernel runs only where the CPU has the instruction; elsewhere its case skips
# (the portable one always runs, and the CPU choice below is tested everywhere).
PATHS = ["portable", pytest.param("vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="no VNNI"))]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _weight(rng, m, k, density, blk=1):
    """A pruned weight with some empty rows (blocks) and empty columns."""
    keep = rng.random((m // blk, k)) < density
    keep[::5] = False  # empty rows
    keep[:, ::7] = False  # empty columns
    w = rng.standard_normal((m, k)).astype(np.float32)
    return w * np.repeat(keep, blk, axis=0)


def _mat(rng, fmt, m, k, density=0.2):
    if fmt == "bsr_int8":
        return pack_bsr(_weight(rng, m, k, density, 4), (4, 1), int8=True)
    return pack_csr(_weight(rng, m, k, density), int8=True)


def _reference_quantize(x):
    # numpy, float32 throughout, the same operations in the same order as the kernel.
    f = np.float32
    lo = np.minimum(x.min(axis=1), f(0))
    hi = np.maximum(x.max(axis=1), f(0))
    scale = (hi - lo) / f(255)
    scale[~(scale > 0)] = f(1)
    zp = np.clip(np.rint(-lo / scale), 0, 255).astype(f)
    inv = f(1) / scale
    q = np.clip(np.rint(x * inv[:, None]) + zp[:, None], 0, 255).astype(np.uint8)
    return q, scale, zp.astype(np.int32)


def _unpack(x8, n, k):
    # (chunks × K) words → the (N × K) uint8 inputs they hold.
    chunks = x8.view(np.uint8).reshape(-1, k, 8).transpose(0, 2, 1).reshape(-1, k)
    return chunks[:n]


@pytest.mark.parametrize("n", [1, 3, 8, 13])
def test_quantized_inputs_equal_the_numpy_reference(rng, n):
    x = (rng.standard_normal((n, 37)) * 3).astype(np.float32)
    x[0] = 0  # a zero row: scale 1, zero point 0
    if n > 2:
        x[1] = np.abs(x[1])  # no negative values: zero point 0
        x[2] = -np.abs(x[2])  # no positive values: zero point 255
    x8, scale, zp = quantize_batch(x)
    q, ref_scale, ref_zp = _reference_quantize(x)
    np.testing.assert_array_equal(_unpack(x8, n, 37), q)
    # Within an ulp: a build may divide by 255 as a multiply by its reciprocal (seen in a
    # fresh clone's cache), which moves no quantized value here.
    np.testing.assert_allclose(scale, ref_scale, rtol=2.5e-7, atol=0)
    np.testing.assert_array_equal(zp, ref_zp)
    approx = (q.astype(np.float32) - zp[:, None]) * scale[:, None]
    assert np.abs(approx - x).max() <= scale.max() / 2 * 1.0001


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
@pytest.mark.parametrize(("n", "m", "k"), [(2, 36, 53), (3, 4, 9), (8, 100, 300), (64, 52, 70)])
def test_batches_sum_exactly_the_integer_reference(rng, fmt, path, n, m, k):
    mat = _mat(rng, fmt, m, k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    y = int8_matmul(mat, x, bias, path)
    # The integer product in int64, then the kernels' float epilogue.
    q, xs, zp = _reference_quantize(x)
    dense = np.rint(mat.to_dense() / mat.scale[:, None]).astype(np.int64)
    acc = q.astype(np.int64) @ dense.T - zp[:, None] * dense.sum(axis=1)[None, :]
    scale = (mat.scale[None, :] * xs[:, None]).astype(np.float32)
    ref = (acc.astype(np.float32) * scale).astype(np.float64) + bias
    assert np.abs(acc).max() < 2**24  # so float32(acc) is exact and 1e-6 catches ±1
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
@pytest.mark.parametrize("n", [2, 3, 8, 64])
def test_both_cpu_paths_return_the_same_bits(rng, fmt, n):
    if not HAS_VNNI:
        pytest.skip("needs a CPU with AVX512-VNNI to run both paths")
    mat = _mat(rng, fmt, 68, 131)
    x = rng.standard_normal((n, 131)).astype(np.float32)
    vnni, portable = int8_matmul(mat, x, None, "vnni"), int8_matmul(mat, x, None, "portable")
    assert np.array_equal(vnni, portable)


def test_the_cpu_path_is_injectable_and_never_vnni_without_the_instruction(monkeypatch):
    with forced_int8_cpu(False):
        assert sparse_int8_path() == "portable"
    with forced_int8_cpu(True):
        assert sparse_int8_path() == ("vnni" if HAS_VNNI else "portable")
    monkeypatch.setattr(cpu, "_has_avx512_vnni", lambda: False)
    with forced_int8_cpu(True):  # an AMD EPYC (AVX2): VNNI forced, the instruction absent
        assert sparse_int8_path() == "portable"


@pytest.mark.parametrize("fmt", ["csr_int8", "bsr_int8"])
@pytest.mark.parametrize(("m", "k"), [(36, 53), (4, 9), (100, 300), (16, 70_000)])
def test_batch_one_matches_the_float_product(rng, fmt, m, k):
    mat = _mat(rng, fmt, m, k, 0.05 if k > 1000 else 0.2)
    x = rng.standard_normal(k).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    ref = mat.to_dense().astype(np.float64) @ x + bias
    for y in (int8_matmul(mat, x, bias), int8_matmul(mat, x[None], bias)[0]):
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_sliced_layout_holds_every_value_once_sorted_by_row_length(rng):
    mat = _mat(rng, "csr_int8", 37, 29)
    lay = sliced(mat)
    assert sliced(mat) is lay  # built once per matrix
    counts = np.diff(mat.indptr)
    rows = lay.perm[lay.perm >= 0]
    assert sorted(rows) == list(range(37)) and list(counts[rows]) == sorted(counts, reverse=True)
    assert np.count_nonzero(lay.w) == np.count_nonzero(mat.data)
    assert int(np.abs(lay.w.astype(np.int64)).sum()) == int(np.abs(mat.data.astype(np.int64)).sum())
    assert lay.idx.size % (4 * LANES) == 0 and lay.sptr[-1] * 4 * LANES == lay.idx.size


def test_an_empty_weight_gives_the_bias(rng):
    mat = pack_csr(np.zeros((5, 7), np.float32), int8=True)
    bias = np.arange(5, dtype=np.float32)
    for x in (rng.standard_normal(7), rng.standard_normal((3, 7))):
        y = int8_matmul(mat, x.astype(np.float32), bias)
        np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))


def _ffn_layer(granularity: str) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    with torch.no_grad():
        w = lin.weight
        if granularity == "block":  # 4 × 1 blocks: four output rows share a column
            keep = torch.rand(16, 96) < 0.1
            w.mul_(keep.repeat_interleave(4, dim=0))
        else:
            w.mul_(torch.rand_like(w) < 0.1)
    return lin.eval()


@pytest.mark.parametrize("fmt", ["csr_int8_dynamic", "bsr_int8"])
@pytest.mark.parametrize("shape", [(96,), (1, 96), (3, 96), (8, 96), (2, 5, 96), (64, 96)])
def test_sparse_linear_int8_formats_stay_within_the_stated_tolerance(fmt, shape):
    lin = _ffn_layer("block" if fmt == "bsr_int8" else "element")
    sparse = SparseLinear.from_dense(lin, format=fmt)
    x = torch.nn.functional.gelu(torch.randn(shape) * 2)  # GELU outputs: skewed range
    with torch.no_grad():
        ref = lin(x)
        y = sparse(x)
    assert y.shape == ref.shape and sparse.format == fmt
    assert float((y - ref).abs().max()) <= 2e-2 * float(ref.abs().max())  # analysis.RTOL
    if fmt == "csr_int8_dynamic":
        assert sparse.nnz == int(lin.weight.ne(0).sum())


@pytest.mark.parametrize("fmt", ["csr_int8_dynamic", "bsr_int8"])
def test_int8_formats_pickle_copy_save_and_load_state(fmt):
    lin = _ffn_layer("block" if fmt == "bsr_int8" else "element")
    sparse = SparseLinear.from_dense(lin, format=fmt)
    x = torch.randn(3, 96)
    ref = sparse(x)
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    for other in (
        copy.deepcopy(sparse),
        pickle.loads(pickle.dumps(sparse)),
        torch.load(buf, weights_only=False),
    ):
        torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
    assert set(sparse.state_dict()) == {"indptr", "indices", "values", "scale", "bias"}
    assert sparse.values.dtype == torch.int8
    other = SparseLinear.from_dense(lin, format=fmt)
    other(x)  # built its layout from the first values
    with torch.no_grad():
        other.values.zero_()
    assert float(other(x).sub(other.bias).abs().max()) == 0  # in-place write seen
    other.load_state_dict(sparse.state_dict())  # in place again: the layout follows
    torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(
        other.dense_weight(), lin.weight.detach(), rtol=0, atol=float(other.scale.max())
    )


def test_csr_int8_at_batch_one_races_the_gathering_kernel_with_float_inputs(monkeypatch):
    lin = _ffn_layer("element")
    sparse = SparseLinear.from_dense(lin, format="csr_int8")
    offered = []

    def pick(options):
        offered.extend(options)
        for run in options.values():
            run()
        return "sliced"

    monkeypatch.setattr(dispatch, "choose", pick)
    x = torch.randn(96)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, sparse.dense_weight(), lin.bias)
        y = sparse(x)
    assert "sliced" in offered and "spmv" in offered
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # float inputs: no rounding


def test_bsr_int8_is_named_in_formats_and_refused_where_it_does_not_apply():
    assert {"bsr_int8", "csr_int8", "csr_int8_dynamic"} <= set(FORMATS)
    with pytest.raises(ValueError, match="block: format 'bsr_int8' stores 4 × 1 blocks"):
        SparseLinear.from_dense(nn.Linear(8, 8), format="bsr_int8", block=(2, 2))
    with pytest.raises(ValueError, match="block"):
        SparseLinear.from_dense(nn.Linear(8, 6), format="bsr_int8")  # 6 rows: no 4-row blocks
    for fmt in ("bsr_int8", "csr_int8_dynamic"):
        with pytest.raises(ValueError, match=f"'{fmt}' is for SparseLinear"):
            SparseConv2d.from_dense(nn.Conv2d(4, 8, 3), format=fmt)


@pytest.mark.parametrize("vnni", [False, True])
def test_forced_cpu_paths_give_the_module_the_same_outputs(vnni):
    lin = _ffn_layer("element")
    sparse = SparseLinear.from_dense(lin, format="csr_int8_dynamic")
    x = torch.randn(8, 96)
    baseline = sparse(x)
    with forced_int8_cpu(vnni):
        assert torch.equal(sparse(x), baseline)


@pytest.mark.parametrize("fmt", ["csr_int8_dynamic", "bsr_int8"])
def test_int8_formats_are_saved_whole_and_load_into_a_fresh_model(tmp_path, fmt):
    from nbcompress.engine.structural.persist import load, save

    def net() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 8)).eval()

    model = net()
    model[0] = SparseLinear.from_dense(
        _ffn_layer("block" if fmt == "bsr_int8" else "element"), format=fmt
    )
    save(model, tmp_path / "m.pt")
    fresh = load(tmp_path / "m.pt", net()).eval()
    x = torch.randn(8, 96)
    assert isinstance(fresh[0], SparseLinear) and fresh[0].format == fmt
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
