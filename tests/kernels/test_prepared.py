"""Prepared CSR panel products (``prepared.py``): the same bits as the general path, kept fresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbcompress.kernels import _gomp, dispatch, pack_csr, prepared
from nbcompress.kernels._epilogue import ACTIVATIONS, NO_BIAS
from nbcompress.kernels.csr import matmul_unchecked
from nbcompress.kernels.linear import bias_array, linear_array
from nbcompress.kernels.modules import SparseLinear
from nbcompress.kernels.threads import POOL, using
from tests.helpers import child_env, child_json, run_child

#: The suite's thread caps (conftest), lifted in the children.
_THREADS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")


def _matrix(m: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=gen) * (torch.rand(m, k, generator=gen) < 0.1)
    w[3] = 0  # an empty row
    return pack_csr(w)


def _batch(n: int, k: int, fortran: bool, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32)
    return np.asfortranarray(x) if fortran else x


# Every (threads, choice, batch, layout): the first call takes the general path and keeps a
# plan, the second runs the plan; both are compared bit for bit with a fresh weight's
# general-path result (no plan anywhere).
_CHILD = r"""
import json
import numpy as np
import torch
from nbcompress.kernels import dispatch, pack_csr, prepared, _gomp
from nbcompress.kernels.csr import matmul_unchecked
from nbcompress.kernels.threads import using

gen = torch.Generator().manual_seed(0)
w = torch.randn(300, 200, generator=gen) * (torch.rand(300, 200, generator=gen) < 0.1)
w[3] = 0
bias = np.random.default_rng(2).standard_normal(300).astype(np.float32)
rng = np.random.default_rng(1)
checked, planned, pools = 0, 0, set()
for threads in (1, 2, 3):
    with using(threads):
        for choice in ("panels", "panels ×1"):
            for n in (8, 16, 24, 40):
                for fortran in (False, True):
                    x = rng.standard_normal((n, 200), dtype=np.float32)
                    x = np.asfortranarray(x) if fortran else x
                    ref_mat, mat = pack_csr(w), pack_csr(w)
                    if threads > 1 or choice == "panels":
                        key = {("x", n, threads): choice}
                        dispatch.set_choices(ref_mat, key)
                        dispatch.set_choices(mat, key)
                    expected = matmul_unchecked(ref_mat, x, bias, 2).copy()
                    first = matmul_unchecked(mat, x, bias, 2).copy()
                    plan = prepared.prepared(mat, x, bias, 2)
                    assert plan is not None, (threads, choice, n, fortran)
                    second = matmul_unchecked(mat, x, bias, 2)
                    assert np.array_equal(first, expected), (threads, choice, n, fortran)
                    assert np.array_equal(second, expected), (threads, choice, n, fortran)
                    assert plan.threads == (1 if choice.endswith("×1") else threads)
                    pools |= {(s.fn is not None, s.pool) for s in plan.steps if plan.threads > 1}
                    checked += 1
print(json.dumps({"checked": checked, "pools": sorted(map(list, pools)),
                  "gomp": _gomp.available()}))
"""


@pytest.mark.parametrize("openmp", ["torch", "pool", "0"])
def test_plans_give_the_general_paths_bits_on_every_pool_and_thread_count(openmp):
    # The suite's process has one numba thread (conftest): 1–3 threads run in a child.
    env = child_env(_THREADS, NUMBA_NUM_THREADS="3", NBCOMPRESS_OPENMP=openmp,
                    NBCOMPRESS_TUNING="off")  # fmt: skip
    outcome = child_json(["-c", _CHILD], env)
    assert outcome["checked"] == 3 * 2 * 4 * 2
    if openmp == "0" or not outcome["gomp"]:
        assert outcome["pools"] == [[False, False]]  # numba's parallel build
    else:  # the pool the plan launches on, as NBCOMPRESS_OPENMP says
        assert outcome["pools"] == [[True, openmp == "pool"]]


def test_a_new_recorded_choice_makes_the_plan_stale():
    mat, x = _matrix(64, 96), _batch(8, 96, True)
    dispatch.set_choices(mat, {("x", 8, 1): "panels"})
    expected = matmul_unchecked(mat, x).copy()
    assert prepared.prepared(mat, x) is not None
    dispatch.set_choices(mat, {})  # forgotten: the next call chooses again
    assert prepared.prepared(mat, x) is None
    np.testing.assert_array_equal(matmul_unchecked(mat, x), expected)
    dispatch.set_choices(mat, {("x", 8, 1): "panels ×1"})  # another name for the key
    assert prepared.prepared(mat, x) is None
    np.testing.assert_array_equal(matmul_unchecked(mat, x), expected)
    plan = prepared.prepared(mat, x)
    assert plan is not None and plan.name == "panels ×1"


def test_no_plan_without_a_recorded_choice_or_for_leftover_columns():
    mat = _matrix(64, 96)
    x = _batch(8, 96, False)
    prepared.prepare(mat, x, np.empty((64, 8), np.float32), NO_BIAS, 0)  # nothing recorded
    assert prepared.prepared(mat, x) is None
    for n in (10, 64):  # columns left for csr_cols; the tiles' batches
        xn = _batch(n, 96, False)
        dispatch.set_choices(mat, {("x", n, 1): "panels"})
        y = matmul_unchecked(mat, xn)
        assert prepared.prepared(mat, xn) is None
        np.testing.assert_allclose(y.T, mat.to_dense() @ xn.T, rtol=1e-5, atol=1e-5)


def test_a_new_bias_array_or_activation_is_a_new_plan_and_an_edit_is_seen():
    mat, x = _matrix(64, 96), _batch(16, 96, True)
    dispatch.set_choices(mat, {("x", 16, 1): "panels"})
    dense = x @ mat.to_dense().T
    bias = np.arange(64, dtype=np.float32)
    for _ in range(2):  # the general path, then the plan
        np.testing.assert_allclose(matmul_unchecked(mat, x, bias), dense + bias, rtol=1e-5)
    bias += 1  # in place: the plan's kernels read the same memory
    np.testing.assert_allclose(matmul_unchecked(mat, x, bias), dense + bias, rtol=1e-5)
    other = -bias
    for _ in range(2):
        np.testing.assert_allclose(matmul_unchecked(mat, x, other), dense + other, rtol=1e-5)
    relu = ACTIVATIONS["relu"]
    for _ in range(2):
        y = matmul_unchecked(mat, x, other, relu)
        np.testing.assert_allclose(y, np.maximum(dense + other, 0), rtol=1e-5, atol=1e-6)
    assert prepared.prepared(mat, x, other, relu) is not prepared.prepared(mat, x, other)


def test_a_changed_weight_or_bias_of_a_layer_is_honoured():
    lin = torch.nn.Linear(96, 64)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(64, 96) < 0.1)
    layer = SparseLinear.from_dense(lin)
    x = _batch(8, 96, False)
    for _ in range(3):
        linear_array(layer, x)
    mat = layer.matrix()
    assert prepared.prepared(mat, x, bias_array(layer)) is not None
    with torch.no_grad():
        layer._buffers["values"].mul_(2)  # in place: the matrix is rebuilt
        layer._buffers["bias"] = torch.zeros(64)  # a new tensor: a new bias array
    expected = x @ (2 * lin.weight.detach().numpy()).T
    for _ in range(2):
        np.testing.assert_allclose(linear_array(layer, x), expected, rtol=1e-5, atol=1e-5)
    assert layer.matrix() is not mat


@pytest.mark.skipif(not _gomp.available(), reason="torch does not run on GNU OpenMP here")
def test_a_held_pool_runs_the_serial_twin_with_the_same_bits(threads_allowed, openmp):
    mat, x = _matrix(300, 200), _batch(8, 200, True)
    with using(2):
        dispatch.set_choices(mat, {("x", 8, 2): "panels"})
        expected = matmul_unchecked(mat, x).copy()
        plan = prepared.prepared(mat, x)
        assert plan is not None and plan.threads == 2
        np.testing.assert_array_equal(matmul_unchecked(mat, x), expected)
        with POOL:  # as while another Python thread's kernel runs
            np.testing.assert_array_equal(matmul_unchecked(mat, x), expected)


_FORK = r"""
import os
import numpy as np
import torch
from nbcompress.kernels import dispatch, pack_csr, prepared, _gomp
from nbcompress.kernels.csr import matmul_unchecked
from nbcompress.kernels.threads import using

gen = torch.Generator().manual_seed(0)
mat = pack_csr(torch.randn(300, 200, generator=gen) * (torch.rand(300, 200, generator=gen) < 0.1))
x = np.random.default_rng(1).standard_normal((8, 200), dtype=np.float32)
with using(2):
    dispatch.set_choices(mat, {("x", 8, 2): "panels"})
    expected = matmul_unchecked(mat, x).copy()
    assert prepared.prepared(mat, x).steps[0].fn is not None  # on torch's team
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # libgomp's team is not here: the plan is made again, on numba's pool
        same = np.array_equal(matmul_unchecked(mat, x), expected)
        plan = prepared.prepared(mat, x)
        os.write(w, f"{same} {_gomp.available()} {plan.steps[0].fn is None}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    print(os.read(r, 100).decode())
"""


@pytest.mark.skipif(not _gomp.available(), reason="torch does not run on GNU OpenMP here")
def test_a_plan_made_before_a_fork_is_made_again_in_the_child():
    env = child_env(_THREADS, NUMBA_NUM_THREADS="2", NBCOMPRESS_OPENMP="torch",
                    NBCOMPRESS_TUNING="off")  # fmt: skip
    # A child launching on libgomp's team from before the fork hangs: a short timeout.
    done = run_child(["-c", _FORK], env, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "True False True"
