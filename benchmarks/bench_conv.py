"""Whole Conv2d layers: nn.Conv2d (dense) vs SparseConv2d, every sparse kernel forced.

bench_kernels.py times the conv-as-GEMM product on an input that is already unfolded; a
user runs the layer, unfold included. This bench times the layers side by side in one run
(interleaved, shuffled order, medians of per-round ratios), with the kernel the measured
choice picked and each candidate forced: panels and tiles over the unfolded image, and
the direct convolution that reads the padded image (split into stride phases) in place.

    python benchmarks/bench_conv.py                 # 1 thread, batch 1
    python benchmarks/bench_conv.py --write         # also update benchmarks/RESULTS.md
    python benchmarks/bench_conv.py --resnet18      # resnet18 90% end to end: sparsify_
                                                    # vs its swapped layers alone (--batch)
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
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import machine, paired, write_results  # noqa: E402

from nbcompress.kernels.dispatch import kernel_choices, set_choices  # noqa: E402
from nbcompress.kernels.modules import SparseConv2d  # noqa: E402

warnings.filterwarnings("ignore")

#: (in channels, out channels, kernel, padding, image side, stride): the issue's
#: conv-as-GEMM shape (256 × 128·3·3 over 56·56 pixels), a ResNet stage-1 conv, a late
#: 14×14 stage, and resnet18's strided ones: the 7×7 stem, a stage's first 3×3 and a
#: 1×1 downsample.
LAYERS = [
    (128, 256, 3, 1, 56, 1),
    (64, 64, 3, 1, 56, 1),
    (256, 256, 3, 1, 14, 1),
    (3, 64, 7, 3, 224, 2),
    (64, 128, 3, 1, 56, 2),
    (64, 128, 1, 0, 56, 2),
]
FORCED = ("panels", "tiles", "kblocks", "direct", "direct_kb")


def pruned(conv: nn.Conv2d, sparsity: float) -> nn.Conv2d:
    """``conv`` with its smallest-magnitude weights zeroed (magnitude pruning)."""
    with torch.no_grad():
        w = conv.weight
        cut = w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
        w[w.abs() <= cut] = 0
    return conv


def run_layer(layer: tuple, sparsity: float, repeats: int) -> dict:
    cin, cout, k, pad, side, stride = layer
    conv = pruned(nn.Conv2d(cin, cout, k, stride, padding=pad, bias=False), sparsity)
    x = torch.randn(1, cin, side, side)
    auto = SparseConv2d(conv)
    fns = {"dense": lambda: conv(x), "nbc": lambda: auto(x)}
    key = ("conv", *x.shape, 1)
    # A 1×1 without padding multiplies the (strided) pixels: no conv kernels to force.
    for name in FORCED if (k, pad) != (1, 0) else ():
        forced = SparseConv2d(conv)
        set_choices(forced.matrix(), {key: name})
        fns[name] = lambda m=forced: m(x)
    with torch.no_grad():
        for name, fn in list(fns.items()):
            try:
                fn()  # compile / measure the choice / warm caches
            except KeyError:  # not offered for this layer (tiles under 64 columns, …)
                del fns[name]
                continue
            fn()
        t = paired(fns, repeats, min_sample=5e-3)
    chosen = ",".join(kernel_choices(auto.matrix()).values())
    name = f"{cin}→{cout} {k}×{k}/{stride} {side}×{side}"
    return {"layer": name, "sparsity": sparsity, "chosen": chosen} | t


def fmt(r: dict) -> str:
    forced = " ".join(f"{k} {1 / r[f'{k} ratio']:.2f}×" for k in FORCED if f"{k} ratio" in r)
    return (
        f"{r['layer']:<22} sp={r['sparsity']:.0%}  dense {1e3 * r['dense']:7.2f} ms  "
        f"SparseConv2d {1 / r['nbc ratio']:.2f}× ({r['chosen']})  [{forced}]"
    )


def run_resnet18(repeats: int, batch: int) -> None:
    """resnet18 90% end to end: the swapped layers alone, and ``sparsify_``'s chosen variant.

    ``sparsify_`` races, end to end, the chosen sparse layers as they are against each
    eval BatchNorm folded into the SparseConv2d before it and the stem's output in
    channels-last strides (torch's max-pool is ~10× faster on it); "layers only" is the
    first of those. BatchNorm statistics are randomised as a trained model's would be, so
    that the fold is not the identity.
    """
    from bench_runtimes import resnet18

    from nbcompress.engine.core.memory import twin
    from nbcompress.engine.speedup import sparsify as sp

    model = resnet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(batch, 3, 224, 224)
    sparse = copy.deepcopy(model)
    analysis = sp.analyse(sparse, x, repeats=5, time_whole=False)
    plain = twin(sparse, {n: r.replacement for n, r in analysis.chosen.items()})
    sp.install_(sparse, analysis)
    folded = sum(isinstance(m, nn.Identity) for m in sparse.modules())
    stem = getattr(sparse.conv1, "channels_last_output", False)
    print(f"sparsify_: {analysis.verdict}; {folded} BatchNorms folded; stem channels-last {stem}")
    models = {"dense": model, "layers only": plain, "sparsify_": sparse}
    with torch.no_grad():
        ref = model(x)
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        for k, m in models.items():
            err = float((m(x) - ref).abs().max() / ref.abs().max())
            print(f"{k:22} max relative error {err:.1e}")
        t = paired(fns, repeats, min_sample=0.05)
    for k in models:
        ratio = "" if k == "dense" else f"  {1 / t[f'{k} ratio']:.2f}× dense"
        print(f"{k:22} {1e3 * t[k]:7.2f} ms{ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9, 0.95, 0.98])
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds per row")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    ap.add_argument(
        "--resnet18", action="store_true", help="resnet18 90%% end to end instead of layers"
    )
    ap.add_argument("--batch", type=int, default=1, help="batch size of --resnet18 (1)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.resnet18:
        print(machine())
        run_resnet18(args.repeats, args.batch)
        return
    started = machine()
    print(started)
    lines = []
    for layer in LAYERS:
        for s in args.sparsities:
            lines.append(fmt(run_layer(layer, s, args.repeats)))
            print(lines[-1], flush=True)
    if args.write:
        cmd = "python benchmarks/bench_conv.py " + " ".join(sys.argv[1:])
        text = (
            f"Command: `{cmd.strip()}`. Machine: {machine(started)}. 1 thread, batch 1, "
            "magnitude-pruned random weights, bias off. Ratios are dense time / sparse time "
            "(> 1: SparseConv2d faster), medians over interleaved rounds of per-round ratios; "
            "in brackets each kernel forced, before it the one the measured choice picked.\n\n"
            "```\n" + "\n".join(lines) + "\n```"
        )
        write_results("Conv2d layers (bench_conv.py)", text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
