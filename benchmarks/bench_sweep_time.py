"""Time of the default data-free sensitivity sweep (issue 12, target: resnet18 b8 in <= 60 s).

    python benchmarks/bench_sweep_time.py                      # resnet18 b8 224 and SeedCNN
    python benchmarks/bench_sweep_time.py --before /work/main  # also an older checkout, interleaved
    python benchmarks/bench_sweep_time.py --models seedcnn --repeats 5

Each sweep runs in a fresh process (seeded random-init model, torch imported first, as in a
notebook): ``nbcompress.sensitivity(model, example_inputs=x, progress=False)``. With
``--before`` the same sweep of an older checkout runs in turn with this one, round after
round, so that load from other processes falls on both alike; the grid is then passed
explicitly (the older default had 9 ratios). Reported: median wall seconds over the rounds,
evaluations, seconds per evaluation, process CPU seconds, and the 1-minute load average
around the runs (the machine is shared: a load above the core count inflates every
figure). Prints one markdown row per model and checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]


def child(model_name: str, explicit_grid: bool) -> None:
    """One sweep in this process; prints a JSON line with its figures."""
    import torch  # first, as in a notebook

    import nbcompress

    torch.manual_seed(0)
    if model_name == "resnet18":
        import torchvision

        model, x = torchvision.models.resnet18(), torch.randn(8, 3, 224, 224)
    else:
        from nbcompress.zoo import SeedCNN

        model, x = SeedCNN(), torch.randn(64, 1, 28, 28)
    kwargs = {"ratios": GRID} if explicit_grid else {}
    cpu, wall = time.process_time(), time.perf_counter()
    r = nbcompress.sensitivity(model, example_inputs=x, progress=False, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"wall": wall, "cpu": cpu, "evaluations": r.evaluations,
                      "ratios": len(r.ratios), "layers": len(r.layers)}))  # fmt: skip


def run(tree: Path, model_name: str, explicit_grid: bool) -> dict:
    """One sweep of ``tree``'s nbcompress in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, str(Path(__file__).resolve()), "--child", model_name]
    args += ["--grid"] if explicit_grid else []
    load = os.getloadavg()[0]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=3600)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    found["load"] = (load + os.getloadavg()[0]) / 2
    print(f"{model_name} {tree}: {found}", file=sys.stderr, flush=True)
    return found


def main() -> None:
    """Interleave the rounds, then print the medians as markdown rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,seedcnn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="an older checkout to time alongside")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--grid", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.grid)
        return
    trees = [("this checkout", ROOT)] + ([("before", args.before)] if args.before else [])
    print(f"# {os.cpu_count()} cores; load is the 1-minute load average around each run")
    print("| model | code | seconds (median) | evaluations | s/eval | CPU s | load |")
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        rounds: dict[str, list[dict]] = {label: [] for label, _ in trees}
        for _ in range(args.repeats):
            for label, tree in trees:
                rounds[label].append(run(tree, model_name, args.before is not None))
        for label, _ in trees:
            runs = rounds[label]
            wall = statistics.median(r["wall"] for r in runs)
            evals = runs[0]["evaluations"]
            cpu = statistics.median(r["cpu"] for r in runs)
            load = statistics.median(r["load"] for r in runs)
            walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
            print(f"| {model_name} ({runs[0]['layers']} layers × {runs[0]['ratios']} ratios) | "
                  f"{label} | {wall:.1f} ({walls}) | {evals} | {wall / evals:.3f} | {cpu:.1f} | "
                  f"{load:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
