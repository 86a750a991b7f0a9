"""4×1 block pruning vs unstructured: the speed the block pattern buys, the accuracy it costs.

    python benchmarks/bench_blocks.py --quick      # < 3 minutes
    python benchmarks/bench_blocks.py --write      # also update benchmarks/RESULTS.md

Speed: random weights pruned to the same sparsity two ways — element-wise L1 (run on the
CSR kernels) and in 4 × 1 blocks by L1 norm (``prune_(granularity="block")``, run on the
CSR and the block-sparse kernels) — timed against torch dense fp32 in one interleaved run
(shuffled order, median of per-round ratios, as bench_kernels.py), 1 thread: the three
BERT-base/4096² Linear shapes at batch 1, 8 and 64, the conv-as-GEMM product on an
unfolded input, and whole 3×3 Conv2d layers (unfold or direct convolution included).

Accuracy: LeNet-300-100 (8×8 digits) and the seed CNN (28×28 digits) trained here, pruned
per layer (L1, output layer left alone) element-wise and in blocks; test accuracy without
fine-tuning and after a short fine-tune with the masks kept.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/numba load OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import LAYERS  # noqa: E402
from bench_kernels import machine, paired, write_results  # noqa: E402

from nbcompress import zoo  # noqa: E402
from nbcompress.engine.prune.masks import layer_mask  # noqa: E402
from nbcompress.engine.prune.prune import prune_  # noqa: E402
from nbcompress.kernels import bsr_matmul, csr_matmul, csr_matmul_t, pack_bsr, pack_csr  # noqa: E402
from nbcompress.kernels.bsr import bsr_matmul_t_unchecked  # noqa: E402
from nbcompress.kernels.modules import SparseConv2d  # noqa: E402

warnings.filterwarnings("ignore")

SHAPES = [(3072, 768), (768, 3072), (4096, 4096)]
GEMM = (256, 1152, 3136)  # conv-as-GEMM: 256 × 128·3·3 over 56·56 pixels
FINETUNE = 5  # epochs of fine-tuning after pruning, masks kept
MODELS = {  # name → (image side, class, training epochs), as bench_sensitivity.py
    "LeNet-300-100, 8×8 digits": (8, zoo.LeNet300, 30),
    "seed CNN, 28×28 digits": (28, zoo.SeedCNN, 20),
}


def pruned_pair(w: torch.Tensor, sparsity: float) -> tuple[np.ndarray, np.ndarray]:
    """``w`` pruned element-wise and in 4 × 1 blocks (L1) to ``sparsity``, as float32 arrays."""
    out = []
    for granularity in ("element", "block"):
        mask = layer_mask(w, sparsity, granularity=granularity)
        out.append((w * mask).numpy())
    return out[0], out[1]


def speed_row(label: str, fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # compile, choose kernels, warm caches
        fn()
    t = paired(fns, repeats)
    row = {"case": label, "dense": t["dense"]}
    row |= {k: t["dense ratio"] / t[f"{k} ratio"] for k in fns if k != "dense"}
    return row


def linear_fns(w_el: np.ndarray, w_bl: np.ndarray, x: torch.Tensor) -> dict:
    dense, el, bl_csr, bl_bsr = (
        torch.from_numpy(w_el),
        pack_csr(w_el),
        pack_csr(w_bl),
        pack_bsr(w_bl, (4, 1)),
    )
    return {
        "dense": lambda: F.linear(x, dense),
        "element csr": lambda: csr_matmul(el, x),
        "block csr": lambda: csr_matmul(bl_csr, x),
        "block bsr": lambda: bsr_matmul(bl_bsr, x),
    }


def gemm_fns(w_el: np.ndarray, w_bl: np.ndarray, xt: np.ndarray) -> dict:
    dense, xtt = torch.from_numpy(w_el), torch.from_numpy(xt)
    el, bl_csr, bl_bsr = pack_csr(w_el), pack_csr(w_bl), pack_bsr(w_bl, (4, 1))
    out = np.empty((w_bl.shape[0], xt.shape[1]), dtype=np.float32)
    return {
        "dense": lambda: torch.mm(dense, xtt),
        "element csr": lambda: csr_matmul_t(el, xt),
        "block csr": lambda: csr_matmul_t(bl_csr, xt),
        "block bsr": lambda: bsr_matmul_t_unchecked(bl_bsr, xt, out),
    }


def conv_fns(layer: tuple, sparsity: float) -> dict:
    cin, cout, k, pad, side = layer
    conv = nn.Conv2d(cin, cout, k, padding=pad, bias=False)
    x = torch.randn(1, cin, side, side)
    convs = {}
    for granularity in ("element", "block"):
        c = copy.deepcopy(conv)
        with torch.no_grad():
            c.weight.mul_(layer_mask(c.weight, sparsity, granularity=granularity))
        convs[granularity] = c
    el = SparseConv2d(convs["element"])
    bl_csr = SparseConv2d(convs["block"])
    bl_bsr = SparseConv2d(convs["block"], format="bsr")
    return {
        "dense": lambda: convs["element"](x),
        "element csr": lambda: el(x),
        "block csr": lambda: bl_csr(x),
        "block bsr": lambda: bl_bsr(x),
    }


def speed(sparsities: list[float], batches: list[int], repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sparsity in sparsities:
            for m, k in SHAPES:
                w_el, w_bl = pruned_pair(torch.randn(m, k, generator=gen), sparsity)
                for batch in batches:
                    x = torch.randn(batch, k, generator=gen)
                    label = f"{m}×{k} b={batch}"
                    rows.append(speed_row(label, linear_fns(w_el, w_bl, x), repeats))
                    rows[-1]["sparsity"] = sparsity
                    print(fmt_speed(rows[-1]), flush=True)
            m, k, n = GEMM
            w_el, w_bl = pruned_pair(torch.randn(m, k, generator=gen), sparsity)
            xt = torch.randn(k, n, generator=gen).numpy()
            rows.append(speed_row(f"{m}×{k} conv-GEMM {n} cols", gemm_fns(w_el, w_bl, xt), repeats))
            rows[-1]["sparsity"] = sparsity
            print(fmt_speed(rows[-1]), flush=True)
            for layer in LAYERS:
                cin, cout, k, _, side = layer
                label = f"Conv2d {cin}→{cout} {k}×{k} {side}²"
                rows.append(speed_row(label, conv_fns(layer, sparsity), repeats))
                rows[-1]["sparsity"] = sparsity
                print(fmt_speed(rows[-1]), flush=True)
    return rows


def fmt_speed(r: dict) -> str:
    return (
        f"{r['case']:<28} sp={100 * r['sparsity']:3.0f}%  dense {1e3 * r['dense']:8.3f} ms"
        f"  element-pruned CSR {r['element csr']:5.2f}×"
        f"  block-pruned CSR {r['block csr']:5.2f}×  BSR {r['block bsr']:5.2f}×"
    )


def accuracy(sparsities: list[float], finetune_epochs: int) -> list[dict]:
    rows = []
    for name, (size, model_cls, epochs) in MODELS.items():
        data = zoo.load_digits(size, seed=0)
        torch.manual_seed(0)
        base = zoo.train(model_cls(), data.x_train, data.y_train, epochs=epochs, seed=0)
        dense_acc = zoo.accuracy(base, data.x_test, data.y_test)
        for sparsity in sparsities:
            row = {"model": name, "sparsity": sparsity, "dense": dense_acc}
            for granularity in ("element", "block"):
                model = copy.deepcopy(base)
                prune_(model, sparsity, granularity=granularity, keep_masks=True)
                row[granularity] = zoo.accuracy(model, data.x_test, data.y_test)
                zoo.train(model, data.x_train, data.y_train, epochs=finetune_epochs, seed=1)
                row[f"{granularity} ft"] = zoo.accuracy(model, data.x_test, data.y_test)
            rows.append(row)
            print(fmt_accuracy(rows[-1], finetune_epochs), flush=True)
    return rows


def fmt_accuracy(r: dict, epochs: int) -> str:
    pct = 100
    return (
        f"{r['model']:<28} sp={pct * r['sparsity']:3.0f}%  dense {pct * r['dense']:5.1f}%"
        f"  element {pct * r['element']:5.1f}% → {pct * r['element ft']:5.1f}%"
        f"  4×1 blocks {pct * r['block']:5.1f}% → {pct * r['block ft']:5.1f}%"
        f"  (no fine-tuning → {epochs} epochs with masks kept)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds per row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeats = args.repeats or (5 if args.quick else 11)
    started = machine()
    print(started)
    speed_rows = speed(
        [0.9] if args.quick else [0.9, 0.95], [1, 64] if args.quick else [1, 8, 64], repeats
    )
    acc_rows = accuracy([0.9] if args.quick else [0.7, 0.8, 0.9], FINETUNE)
    if args.write:
        text = "\n".join([
            f"Command: `python benchmarks/bench_blocks.py {' '.join(sys.argv[1:])}`, 1 thread. "
            f"Machine: {machine(started)}.",
            "Speed-ups over torch dense fp32 (same shape; medians of per-round ratios over "
            "interleaved rounds). The same random weights pruned to the same sparsity "
            "element-wise (L1) and in 4×1 blocks (L1 block norms, "
            "`prune_(granularity=\"block\")`); block-pruned weights on the CSR kernels and on "
            "the block-sparse (BSR) kernels. Conv2d rows time whole layers, batch 1.",
            "", "```", *(fmt_speed(r) for r in speed_rows), "```", "",
            "Accuracy cost (digits test split, trained here with seed 0; per-layer L1 "
            f"pruning, output layer left alone; fine-tuning {FINETUNE} epochs of Adam at lr "
            "1e-3 with the masks kept):",
            "", "```", *(fmt_accuracy(r, FINETUNE) for r in acc_rows), "```",
        ])  # fmt: skip
        write_results("4×1 block pruning (bench_blocks.py)", text)


if __name__ == "__main__":
    main()
