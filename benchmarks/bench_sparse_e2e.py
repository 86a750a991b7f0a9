"""End to end: 90%-pruned models before and after ``sparsify_``, timed side by side.

    python benchmarks/bench_sparse_e2e.py --quick      # < 2 minutes
    python benchmarks/bench_sparse_e2e.py --write      # also update benchmarks/RESULTS.md

Each model is pruned with ``nbcompress.prune_`` (L1, per layer), copied (the dense
reference keeps its zeros on dense kernels), then ``sparsify_`` converts what measured
faster. Both are timed interleaved; the outputs are compared. An unpruned model checks
that ``sparsify_`` never makes a model slower (it must leave it alone).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import machine, write_results  # noqa: E402

from nbcompress.engine.prune.prune import prune_  # noqa: E402
from nbcompress.engine.speedup.sparsify import sparsify_  # noqa: E402
from nbcompress.kernels.modules import SparseConv2d, SparseLinear  # noqa: E402
from nbcompress.timing import format_seconds, race  # noqa: E402

warnings.filterwarnings("ignore")


def bert_ffn(blocks: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)]
    return nn.Sequential(*layers).eval()


def lenet_300_100_x4() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 400), nn.ReLU(), nn.Linear(400, 10)
    ).eval()


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


def cases(quick: bool) -> list[tuple[str, nn.Module, torch.Tensor, float, str]]:
    """(label, model, input, sparsity, pruning granularity) per row."""
    out = []
    for batch in (1, 8) if quick else (1, 8, 64):
        x = torch.randn(batch, 768)
        out.append((f"BERT-base FFN ×2, batch {batch}", bert_ffn(), x, 0.9, "element"))
        out.append((f"… in 4×1 blocks, batch {batch}", bert_ffn(), x, 0.9, "block"))
        out.append(
            (f"LeNet-300-100 ×4, batch {batch}", lenet_300_100_x4(), torch.randn(batch, 784), 0.9,
             "element")
        )  # fmt: skip
    out.append(("small CNN 32×32, batch 1", small_cnn(), torch.randn(1, 3, 32, 32), 0.9, "element"))
    out.append(
        ("BERT-base FFN ×2, batch 8, unpruned", bert_ffn(), torch.randn(8, 768), 0.0, "element")
    )
    return out


def run(case: tuple[str, nn.Module, torch.Tensor, float, str], repeats: int, sample: float) -> dict:
    name, model, x, amount, granularity = case
    if amount:
        prune_(model, amount, include_output=True, granularity=granularity)
    dense = copy.deepcopy(model)
    sparsify_(model, x, repeats=repeats)
    sparse = [m for m in model.modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    formats = ", ".join(sorted({m.format for m in sparse})) or "none"
    with torch.no_grad():
        diff = float((model(x) - dense(x)).abs().max())
    fns = {"dense": lambda: dense(x), "sparsified": lambda: model(x)}
    with torch.inference_mode():
        t = race(fns, rounds=3 * repeats, warmup=3, min_sample=sample)
    return {
        "model": name,
        "sparsity": amount,
        "sparse layers": len(sparse),
        "formats": formats,
        "dense": t.times["dense"].median,
        "sparsified": t.times["sparsified"].median,
        "speedup": 1 / t.ratio("sparsified"),
        "max |Δ|": diff,
    }


def fmt(r: dict) -> str:
    return (
        f"{r['model']:<38} pruned {100 * r['sparsity']:3.0f}%  sparse layers {r['sparse layers']}"
        f" ({r['formats']})"
        f"  dense {format_seconds(r['dense'])}  sparsified {format_seconds(r['sparsified'])}"
        f"  → {r['speedup']:.2f}×"
        f"  max |Δ| {r['max |Δ|']:.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument(
        "--sample-ms",
        type=float,
        default=2.0,
        help="each timed sample repeats a model back to back for at least this long: 2 ms is "
        "about one call of the BERT models (cold caches after the other model ran), 20 ms "
        "is repeated inference (a model's weights stay in L3 if they fit)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    repeats = 7 if args.quick else 15
    started = machine()
    print(started)
    rows = []
    for case in cases(args.quick):
        rows.append(run(case, repeats, args.sample_ms / 1e3))
        print(fmt(rows[-1]), flush=True)
    if args.write:
        text = "\n".join([
            f"Command: `python benchmarks/bench_sparse_e2e.py {' '.join(sys.argv[1:])}`, "
            f"1 thread. Machine: {machine(started)}.",
            "Dense = the same pruned model on torch's dense kernels; sparsified = after "
            "`sparsify_` (only layers measured faster are converted). Times are medians over "
            "interleaved rounds; the speed-up is the median of per-round ratios (see above). "
            "\"… in 4×1 blocks\" rows prune the same model in 4×1 blocks "
            "(`granularity=\"block\"`) instead of element-wise; in brackets the sparse formats "
            "`sparsify_` measured fastest. "
            "The last row is an unpruned model: `sparsify_` must leave it alone (never slower).",
            "", "```", *(fmt(r) for r in rows), "```",
        ])  # fmt: skip
        write_results("End to end (bench_sparse_e2e.py)", text)


if __name__ == "__main__":
    main()
