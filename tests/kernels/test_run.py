"""SparseRun computes exactly what its layers compute one by one, and refuses what they refuse."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from nbcompress.kernels import threads
from nbcompress.kernels.modules import SparseLinear
from nbcompress.kernels.run import SparseRun, joinable
from tests.helpers import concurrent_calls

pytestmark = pytest.mark.filterwarnings("ignore:nbcompress. sparse kernel")


def _steps(fmt: str, width: int = 32) -> list[nn.Module]:
    """Linear 32→128 (GELU folded in), Identity, Linear 128→32 (ReLU folded in), 90% pruned."""
    torch.manual_seed(0)
    steps: list[nn.Module] = []
    for fan_in, fan_out, act in ((width, 4 * width, nn.GELU()), (4 * width, width, nn.ReLU())):
        layer = nn.Linear(fan_in, fan_out)
        with torch.no_grad():  # 90% zeros in 4-row blocks: every format can pack it
            blocks = layer.weight.view(fan_out // 4, 4, fan_in)
            keep = torch.rand(fan_out // 4, 1, fan_in) < 0.1
            blocks.mul_(keep)
        sparse = SparseLinear.from_dense(layer, format=fmt)
        assert sparse.fuse_activation_(act)
        steps += [sparse, nn.Identity()]
    return steps[:-1]


def _one_by_one(steps: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        x = step(x)
    return x


FORMATS = ["csr", "bsr", "csr_int8", "csr_int8_dynamic", "bsr_int8"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 32), (5, 32), (32,), (2, 3, 32), (0, 32)])
def test_a_run_is_bit_identical_to_its_layers_called_one_by_one(fmt, shape):
    steps = _steps(fmt)
    run = SparseRun(steps)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _one_by_one(steps, x)
        got = run.forward(x)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("fmt", ["csr", "csr_int8_dynamic", "bsr_int8"])
def test_on_two_threads_and_from_four_python_threads_it_computes_the_same(fmt, threads_allowed):
    steps = _steps(fmt)
    run = SparseRun(steps)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _one_by_one(steps, x)
    if fmt != "csr":  # the int8 kernels' threads (numba's own pool is capped at 1 here)
        with threads.using(2), torch.no_grad():
            assert torch.equal(run.forward(x), want)
    outs = concurrent_calls(lambda: run.forward(x), calls=20)
    assert all(torch.equal(y, want) for y in outs)


def test_bad_input_gets_the_first_layers_own_message():
    run = SparseRun(_steps("csr"))
    with pytest.raises(ValueError, match="last dimension is 31, expected 32"):
        run.forward(torch.randn(2, 31))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        run.forward([[0.0] * 32])
    with pytest.raises(TypeError, match="float32 on CPU"):
        run.forward(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="inference-only"):
        run.forward(torch.randn(2, 32, requires_grad=True))


def test_only_chained_sparse_linears_with_identities_between_are_joinable():
    a, ident, b = _steps("csr")
    assert joinable([a, ident, b]) and joinable([a, b.__class__.from_dense(nn.Linear(128, 8))])
    assert not joinable([a])  # one layer: nothing to save
    assert not joinable([ident, a, b]) and not joinable([a, b, ident])  # ends are layers
    assert not joinable([a, nn.ReLU(), b])  # an activation torch computes
    assert not joinable([a, a])  # 128 wide out, 32 wide in
    with pytest.raises(ValueError, match="steps: expected ≥ 2 chained SparseLinear"):
        SparseRun([a, nn.ReLU(), b])


def test_a_run_survives_pickle_and_deepcopy():
    run = SparseRun(_steps("bsr_int8"))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = run.forward(x)
        for other in (pickle.loads(pickle.dumps(run)), copy.deepcopy(run)):
            assert torch.equal(other.forward(x), want)
