"""Kernel fuzz over sequences of input sizes: every call of a sequence against dense torch.

Single calls can all be right while a sequence is wrong: state cached per weight (kernel
choices, derived layouts, scratch buffers) is reused by later calls at other sizes. Each
sequence runs six calls drawn from a few sizes (so sizes repeat after others), on one
thread and on two simulated threads (as in ``test_choice.py``), with the measured choice
and with each kernel forced in turn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.kernels import dispatch, threads
from nbcompress.kernels.modules import SparseConv2d, SparseLinear

#: Kernels by format (``measured``: the real measured choice; the others forced).
CONV_KERNELS = {
    "csr": ["measured", "panels", "tiles", "kblocks", "direct", "direct_kb"],
    "bsr": ["measured", "unfold", "direct"],
}
LINEAR_KERNELS = {
    "csr": ["measured", "spmv", "spmv8", "panels", "tiles", "kblocks"],
    "bsr": ["measured", "bsr4", "bsr4_kb"],
}
LINEAR_KERNELS["csr_int8"] = LINEAR_KERNELS["csr"]
#: Input channels: 40 (K = 360 at 3 × 3) make the channel-blocked direct conv and the
#: K-blocked tiles candidates too.
CHANNELS = 40


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def nthreads(request, monkeypatch) -> int:
    if request.param == 2:
        # The suite's pool has one thread: the choice sees two (and offers the serial
        # twins), the kernels run on one.
        real_run = dispatch.Kernel.run

        def run(kernel, args, dtypes=(), n=None):
            with threads.serial():
                real_run(kernel, args, dtypes)

        monkeypatch.setattr(dispatch, "get_threads", lambda: 1 if threads.in_serial() else 2)
        monkeypatch.setattr(dispatch.Kernel, "run", run)
    return request.param


def force(monkeypatch, kernel: str, rng: np.random.Generator) -> list[str]:
    """Make every first-use choice pick ``kernel`` (or its serial twin) when offered.

    Every offered option still runs once first, in random order, as in a real race: they
    share the output, so the chosen one must overwrite whatever the others left.

    Returns:
        The names picked so far (filled as the test runs).
    """
    picked: list[str] = []
    if kernel == "measured":
        return [kernel]

    def pick(options):
        names = list(options)
        for i in rng.permutation(len(names)):
            options[names[i]]()
        mine = [n for n in names if n.removesuffix(dispatch.SERIAL) == kernel]
        picked.append(str(rng.choice(mine)) if mine else names[0])
        return picked[-1]

    monkeypatch.setattr(dispatch, "choose", pick)
    return picked


def _pairs(kernels: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(fmt, kernel) for fmt, names in kernels.items() for kernel in names]


def sequence(rng: np.random.Generator, pool: list) -> list:
    """Six draws from ``pool``, each size at least once."""
    order = list(range(len(pool))) + list(rng.integers(0, len(pool), 6 - len(pool)))
    return [pool[i] for i in rng.permutation(order)]


def pruned(module: nn.Module, rng: np.random.Generator, block: bool) -> nn.Module:
    # 70% zeros; with ``block`` in groups of four output rows (4 × 1 blocks).
    w = module.weight.detach()
    shape = (w.shape[0] // 4, 1, *w.shape[1:]) if block else w.shape
    keep = torch.from_numpy(rng.random(shape) < 0.3)
    if block:
        keep = keep.expand(-1, 4, *w.shape[1:]).reshape(w.shape)
    with torch.no_grad():
        w.mul_(keep)
    return module


def close(y: torch.Tensor, ref: torch.Tensor, what: str, int8: bool = False) -> None:
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    err = float((y - ref).abs().max()) / max(scale, 1e-12) if ref.numel() else 0.0
    assert err <= (2e-6 if int8 else 1e-5), f"{what}: relative error {err:.2e}"


def conv_sizes(rng: np.random.Generator, smallest: int) -> list[tuple[int, int, int]]:
    """Four small (batch, H, W) for a pool.

    Small images, so that sizes whose padded buffers have equal lengths come up often
    (in about one pool of eight).
    """
    return [
        (int(rng.integers(1, 3)), int(rng.integers(smallest, 7)), int(rng.integers(smallest, 35)))
        for _ in range(4)
    ]


@pytest.mark.parametrize(("fmt", "kernel"), _pairs(CONV_KERNELS))
def test_conv_over_size_sequences(fmt, kernel, nthreads, monkeypatch):
    rng = np.random.default_rng([7, CONV_KERNELS[fmt].index(kernel), nthreads, len(fmt)])
    picked = force(monkeypatch, kernel, rng)
    # The sizes of the reported failure first (2 × 62 then 6 × 30: buffers of one length).
    sequences = [(1, 1, [(1, 2, 62), (1, 6, 30), (1, 6, 30)])]
    for stride, repeats in ((1, 4), (2, 2)):  # the direct conv (stride 1) keeps buffers
        for padding in (0, 1):
            for _ in range(repeats):
                pool = conv_sizes(rng, 3 - 2 * padding)
                sequences.append((stride, padding, sequence(rng, pool)))
    for stride, padding, sizes in sequences:
        conv = pruned(nn.Conv2d(CHANNELS, 8, 3, stride, padding), rng, block=fmt == "bsr")
        sparse = SparseConv2d.from_dense(conv, format=fmt)
        for step, (n, h, w) in enumerate(sizes):
            x = torch.randn(n, CHANNELS, h, w) * 10
            with torch.no_grad():
                y, ref = sparse(x), F.conv2d(x, conv.weight, conv.bias, stride, padding)
            close(y, ref, f"stride {stride}, padding {padding}, call {step} of {sizes}")
    assert any(p.removesuffix(dispatch.SERIAL) == kernel for p in picked)  # was offered


@pytest.mark.parametrize(("fmt", "kernel"), _pairs(LINEAR_KERNELS))
def test_linear_over_batch_sequences(fmt, kernel, nthreads, monkeypatch):
    rng = np.random.default_rng([11, LINEAR_KERNELS[fmt].index(kernel), nthreads, len(fmt)])
    picked = force(monkeypatch, kernel, rng)
    for _ in range(2):
        # 300 inputs: more than one block of input rows (layouts.KBLOCK), so the
        # K-blocked kernels are offered too.
        lin = pruned(nn.Linear(300, 40), rng, block=fmt == "bsr")
        sparse = SparseLinear.from_dense(lin, format=fmt)
        weight = sparse.dense_weight()  # the int8 weight dequantized: what it computes
        # Batch 1 (the SpMVs), below one 64-column tile (panels) and above (tiles).
        pool = [1, int(rng.choice([2, 7, 8, 63])), int(rng.choice([64, 65, 130]))]
        sizes = sequence(rng, pool)
        for step, batch in enumerate(sizes):
            x = torch.randn(batch, 300)
            with torch.no_grad():
                y, ref = sparse(x), F.linear(x, weight, lin.bias)
            close(y, ref, f"call {step} of batches {sizes}", int8=fmt == "csr_int8")
    assert any(p.removesuffix(dispatch.SERIAL) == kernel for p in picked)  # was offered
