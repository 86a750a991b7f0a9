"""The kernels' epilogue: bias and a fused activation (``_epilogue.py``, ``fuse_activation_``)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from nbcompress.kernels import _epilogue
from nbcompress.kernels.modules import DYNAMIC_FORMATS, SparseConv2d, SparseLinear
from tests.helpers import child_env, child_json

ACTS = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh")}
BATCHES = (1, 2, 8, 17, 64, 130)
# Our GELU is a polynomial erf (6.5e-8 from the exact erf, 4.2e-7 after float32 rounding);
# torch's float32 GELU is itself up to 1.1e-6 from the exact one on [-6, 6], ours 1.2e-6:
# 1e-5 absolute leaves room for both and would still catch a wrong formula or coefficient
# (a term off by 1e-4 shifts outputs by more than that).
ATOL = 1e-5


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(96, 80, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.2)
        lin.weight.mul_(3)  # outputs over GELU's whole curve, clamps included
    return lin


@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh"])
def test_each_activation_matches_torch_elementwise(name):
    x = torch.linspace(-12, 12, 20001).reshape(1, -1)
    bias = torch.tensor([0.25])
    out = x.numpy().copy()
    _epilogue.epilogue(out, bias.numpy(), _epilogue.ACTIVATIONS[name])
    expected = ACTS[name](x + bias)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "csr_int8", *DYNAMIC_FORMATS])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_tanh"])
def test_a_fused_linear_returns_the_activation_of_the_unfused_one(fmt, bias, name):
    lin = _linear(bias)
    plain = SparseLinear.from_dense(lin, format=fmt)
    fused = SparseLinear.from_dense(lin, format=fmt)
    assert fused.fuse_activation_(ACTS[name])
    assert fused.activation == name and plain.activation is None
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.randn(batch, 96)
            expected = ACTS[name](plain(x))
            torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=ATOL)
        x3 = torch.randn(2, 5, 96)  # leading dimensions as nn.Linear
        torch.testing.assert_close(fused(x3), ACTS[name](plain(x3)), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_the_bias_in_the_epilogue_equals_the_dense_layer(fmt):
    lin = _linear()
    sparse = SparseLinear.from_dense(lin, format=fmt)
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.randn(batch, 96)
            torch.testing.assert_close(sparse(x), lin(x), rtol=1e-5, atol=1e-5)


def test_in_place_edits_of_bias_and_weight_are_seen_by_the_next_call():
    lin = _linear()
    fused = SparseLinear.from_dense(lin)
    fused.fuse_activation_(nn.GELU())
    x = torch.randn(8, 96)
    with torch.no_grad():
        fused(x)
        fused.bias.add_(1.5)
        fused.values.mul_(-1)
        expected = nn.functional.gelu(x @ -lin.weight.T + lin.bias + 1.5)
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=ATOL)
        fused.bias = torch.zeros(80)  # a new buffer object
        expected = nn.functional.gelu(x @ -lin.weight.T)
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=ATOL)


def test_pickle_deepcopy_and_state_dict_keep_the_activation():
    lin = _linear()
    fused = SparseLinear.from_dense(lin)
    keys = set(fused.state_dict())
    fused.fuse_activation_(nn.ReLU())
    assert set(fused.state_dict()) == keys
    assert "activation=relu" in repr(fused)
    x = torch.randn(8, 96)
    with torch.no_grad():
        expected = fused(x)
        for other in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
            assert other.activation == "relu"
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_a_module_pickled_before_activations_loads_without_one():
    sparse = SparseLinear.from_dense(_linear())
    state = sparse.__getstate__()
    assert "activation" not in state  # the class default serves old pickles
    old = SparseLinear.__new__(SparseLinear)
    old.__setstate__(state)
    assert old.activation is None
    with torch.no_grad():
        x = torch.randn(3, 96)
        torch.testing.assert_close(old(x), sparse(x), rtol=0, atol=0)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.SiLU(), type("MyReLU", (nn.ReLU,), {})()])
def test_what_does_not_fuse_is_refused_and_nothing_changes(act):
    sparse = SparseLinear.from_dense(_linear())
    assert not sparse.fuse_activation_(act)
    assert sparse.activation is None


def test_a_second_activation_is_refused():
    sparse = SparseLinear.from_dense(_linear())
    assert sparse.fuse_activation_(nn.GELU())
    assert not sparse.fuse_activation_(nn.ReLU())
    assert sparse.activation == "gelu"


@pytest.mark.parametrize("fmt", DYNAMIC_FORMATS)
def test_the_dynamic_int8_formats_fuse_and_pickle_with_their_activation(fmt):
    # int8.py's kernels apply it in their last pass, after the bias (batch 1 and batches).
    plain = SparseLinear.from_dense(_linear(), format=fmt)
    sparse = copy.deepcopy(plain)
    assert sparse.fuse_activation_(nn.GELU())
    assert not sparse.fuse_activation_(nn.ReLU())
    with torch.no_grad():
        for batch in (1, 8):
            x = torch.randn(batch, 96)
            expected = nn.functional.gelu(plain(x))
            torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=ATOL)
            again = pickle.loads(pickle.dumps(sparse))
            assert again.activation == "gelu"
            torch.testing.assert_close(again(x), sparse(x), rtol=0, atol=0)


def test_a_fused_module_refuses_bad_input_as_before():
    fused = SparseLinear.from_dense(_linear())
    fused.fuse_activation_(nn.GELU())
    with pytest.raises(ValueError, match="last dimension is 95, expected 96"):
        fused(torch.randn(2, 95))
    with pytest.raises(TypeError, match="computes in float32"):
        fused(torch.randn(2, 96, dtype=torch.float64))


@pytest.mark.parametrize("fmt", ["csr", "bsr", "csr_int8"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_a_conv_with_relu_fused_matches_relu_of_the_conv(fmt, kernel):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, kernel, padding=kernel // 2)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    sparse = SparseConv2d.from_dense(conv, format=fmt)
    plain = SparseConv2d.from_dense(conv, format=fmt)  # int8: the same quantized weight
    assert sparse.fuse_activation_(nn.ReLU())
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), torch.relu(plain(x)), rtol=1e-5, atol=1e-5)
        if fmt != "csr_int8":
            torch.testing.assert_close(sparse(x), torch.relu(conv(x)), rtol=1e-4, atol=1e-4)


_CHILD = """
import json, sys, torch
from torch import nn
from nbcompress.kernels import dispatch, get_threads
from nbcompress.kernels.modules import SparseLinear
torch.set_num_threads(2)
torch.manual_seed(0)
lin = nn.Linear(300, 260)
with torch.no_grad():
    lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
worst = 0.0
options = {1: ["spmv", "spmv8"], 64: ["panels", "tiles", "kblocks"], 130: ["tiles", "kblocks"]}
for name, act in (("gelu", nn.GELU()), ("relu", nn.ReLU())):
    fused = SparseLinear.from_dense(lin)
    fused.fuse_activation_(act)
    with torch.no_grad():
        for batch in (1, 2, 8, 17, 64, 130):
            x = torch.randn(batch, 300)
            expected = act(lin(x))
            kind = ("v", 1, 2) if batch == 1 else ("x", batch, 2)
            for option in options.get(batch, ["panels"]):
                dispatch.set_choices(fused.matrix(), {kind: option})
                err = (fused(x) - expected).abs().max().item()
                worst = max(worst, err)
print(json.dumps({"threads": get_threads(), "worst": worst}))
"""


@pytest.mark.parametrize("openmp", ["torch", "pool", "0"])
def test_the_epilogue_on_two_threads_on_every_pool(openmp):
    # The suite's process has one numba thread (conftest): two threads run in a child,
    # each kernel forced in turn, on torch's OpenMP threads, the awake pool or numba's.
    env = child_env(("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"), NUMBA_NUM_THREADS="2",
                    NBCOMPRESS_OPENMP=openmp)  # fmt: skip
    outcome = child_json(["-c", _CHILD], env)
    assert outcome["threads"] == 2
    assert outcome["worst"] < 1e-4, outcome  # sums in another order than torch's, no more
