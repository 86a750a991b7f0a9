"""Structural removal on torchvision's classifiers: nbcompress vs Torch-Pruning's plain recipe.

Every ``torchvision.models.list_models(module=torchvision.models)`` classifier (80 with
torchvision 0.29), random init (seed 0), one ``1x3xSxS`` input (S = 224 unless ``--size``),
30% of channels removed (``--ratio``). Each model and each method runs in its own fresh
Python process (``subprocess``), single-threaded, so a runaway cannot take the benchmark
down and memory is measured per model:

* **nbcompress**: ``nbcompress.engine.structural.remove.remove_(model, ratio,
  example_inputs=x)`` (its graph build is bounded by ``timeout=`` and ``memory=`` inside).
  If ``remove_`` is not importable (the core not merged yet) the same pipeline is called
  directly (``channel_groups`` -> ``removal_plan`` -> ``apply_plan``) and the row says so.
* **Torch-Pruning plain**: ``tp.pruner.BasePruner(model, x, MagnitudeImportance(p=1),
  pruning_ratio=ratio, ignored_layers=[output layer])`` then ``step()``, under an
  address-space limit of (size at start + ``--memory``).

"Works" = forward runs, output shape unchanged, finite, fewer parameters. Seconds = wall time
of the removal call (one run: a one-shot operation). Peak extra memory = the worker's peak
resident size during the call (VmHWM, reset just before) minus its resident size just before
the call (model and input loaded), or, if higher, the benchmark's 0.2 s poll of the worker's
resident size plus the private memory of its child processes (the forked graph build).
MACs = sum over Conv/Linear/norm/MHA layers of the hook estimate
(``nbcompress.engine.core.costs.macs``;
theoretical, functional ops such as Swin's attention matmuls not counted). The benchmark
process also kills a worker after ``--timeout`` + load time, or above ``--memory`` + 1 GB of
resident memory (then the row says "killed by the benchmark").

Run (2 shared cores: the full run takes long, start it in the background)::

    PYTHONPATH=$PWD nohup python benchmarks/bench_structural.py \
        --out benchmarks/results/structural > /tmp/bench_structural.log 2>&1 &
    PYTHONPATH=$PWD python benchmarks/bench_structural.py --quick
    PYTHONPATH=$PWD python benchmarks/bench_structural.py --models 'swin*,shufflenet*'

Writes ``<out>.json`` (one record per model and method, appended as they finish, so a
partial run keeps its rows) and ``<out>.md`` (the table). ``--render a.json b.json --out X``
rebuilds the table from earlier runs (e.g. one run per method).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

QUICK = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "swin_t", "vit_b_16"]
METHODS = ("nbcompress", "torch-pruning")
_POLL = 0.2


# ---------------------------------------------------------------- worker (one model, one method)


def _rss_kb(pid: int | str = "self", key: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _reset_peak() -> None:
    """Reset this process's peak resident size (VmHWM) so the peak covers only the call."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def count_macs(model, x) -> int:
    import torch

    from nbcompress.engine.core.costs import macs

    total = [0]

    def hook(module, inputs, output):
        total[0] += macs(module, inputs, output) or 0

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _remove_nbcompress(model, x, ratio: float, timeout: float, memory: int) -> str:
    """nbcompress removal; returns which entry point was used."""
    try:
        from nbcompress.engine.structural.remove import remove_
    except ImportError:
        remove_ = None
    if remove_ is not None:
        remove_(model, ratio, example_inputs=x, timeout=timeout, memory=memory)
        return "remove_"
    from nbcompress.engine.structural.apply import apply_plan
    from nbcompress.engine.structural.graph import channel_groups
    from nbcompress.engine.structural.plan import removal_plan

    class _NoUndo:
        def save(self, *args, **kwargs):
            pass

    groups = channel_groups(model, x, timeout=timeout, memory=memory)
    apply_plan(model, removal_plan(groups, ratio), _NoUndo())
    return "pipeline"


def _remove_tp(model, x, ratio: float, memory: int) -> str:
    import torch_pruning as tp

    from nbcompress.engine.core.layers import output_layers

    vm = _rss_kb("self", "VmSize") * 1024
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (vm + memory, hard))
    heads = [model.get_submodule(n) for n in output_layers(model, (x,)).names]
    pruner = tp.pruner.BasePruner(
        model,
        x,
        tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=heads,
    )
    pruner.step()
    return "BasePruner"


class _TimeLimit(Exception):
    pass


def _on_alarm(signum, frame):
    raise _TimeLimit("did not finish within the time limit")


def worker(args: argparse.Namespace) -> dict:
    """Load one model, remove channels with one method, check the forward; a JSON record."""
    import warnings

    import torch
    import torchvision

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rec: dict = {"model": args.worker, "method": args.method, "size": args.size}
    model = torchvision.models.get_model(args.worker).eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        ref = model(x)
    rec["params_before"] = sum(p.numel() for p in model.parameters())
    rec["macs_before"] = count_macs(model, x)
    base = _rss_kb()
    Path(args.base_file).write_text(str(base))
    _reset_peak()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(args.timeout) + 1)
    t0 = time.perf_counter()
    try:
        if args.method == "nbcompress":
            rec["path"] = _remove_nbcompress(model, x, args.ratio, args.timeout, args.memory)
        else:
            rec["path"] = _remove_tp(model, x, args.ratio, args.memory)
        rec["status"] = "works"
    except (Exception, _TimeLimit) as err:  # noqa: BLE001 - every failure is one table cell
        rec["status"], rec["reason"] = "refused", _one_line(err)
    finally:
        signal.alarm(0)
        rec["seconds"] = time.perf_counter() - t0
    rec["peak_extra_mb"] = max(0, _rss_kb("self", "VmHWM") - base) / 1024
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    if rec["status"] == "works":
        rec.update(_check(model, x, ref, rec["params_before"]))
    return rec


def _check(model, x, ref, params_before: int) -> dict:
    import torch

    out: dict = {"params_after": sum(p.numel() for p in model.parameters())}
    try:
        with torch.no_grad():
            y = model(x)
        out["macs_after"] = count_macs(model, x)
    except Exception as err:  # noqa: BLE001
        return {**out, "status": "broken", "reason": "forward fails: " + _one_line(err)}
    if y.shape != ref.shape:
        return {
            **out,
            "status": "broken",
            "reason": f"output {tuple(y.shape)} != {tuple(ref.shape)}",
        }
    if not bool(torch.isfinite(y).all()):
        return {**out, "status": "broken", "reason": "output not finite"}
    if out["params_after"] >= params_before:
        return {**out, "status": "unchanged", "reason": "no parameter removed"}
    return out


# ---------------------------------------------------------------- parent


def _private_kb(pid: int) -> int:
    """Private resident memory of a process (pages it does not share, e.g. with its parent)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return total


def _tree_kb(pid: int) -> int:
    """Resident size of a process plus the private memory of all its descendants.

    A forked child shares the model's pages with its parent; counting its private pages
    only does not count the model twice.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = _rss_kb(pid), list(children.get(pid, []))
    while stack:
        p = stack.pop()
        total += _private_kb(p)
        stack.extend(children.get(p, []))
    return total


def run_one(name: str, method: str, args: argparse.Namespace) -> dict:
    """One worker process, killed on (load time + timeout) or resident memory over budget."""
    with tempfile.TemporaryDirectory() as tmp:
        base_file, out_file = Path(tmp) / "base", Path(tmp) / "out"
        cmd = [sys.executable, __file__, "--worker", name, "--method", method]
        cmd += [
            "--ratio",
            str(args.ratio),
            "--size",
            str(args.size),
            "--timeout",
            str(args.timeout),
        ]
        cmd += ["--memory", str(args.memory), "--base-file", str(base_file)]
        t0, started, killed, peak = time.monotonic(), None, None, 0
        with open(out_file, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
            while proc.poll() is None:
                time.sleep(_POLL)
                if started is None and base_file.exists():
                    started, base = time.monotonic(), int(base_file.read_text() or 0)
                if started is None:
                    if time.monotonic() - t0 > 900:
                        killed = "killed by the benchmark: model load took over 900 s"
                else:
                    extra = _tree_kb(proc.pid) - base
                    peak = max(peak, extra)
                    if time.monotonic() - started > args.timeout + 30:
                        killed = f"killed by the benchmark after {args.timeout:g} s"
                    elif extra > (args.memory >> 10) + (1 << 20):
                        killed = "killed by the benchmark: memory over budget + 1 GB"
                if killed:
                    proc.kill()
                    proc.wait()
        lines = out_file.read_text().strip().splitlines()
    if killed or not lines:
        reason = killed or f"worker died (exit code {proc.returncode})"
        rec = {"model": name, "method": method, "status": "refused", "reason": reason}
        return {**rec, "peak_extra_mb": peak / 1024} if started else rec
    rec = json.loads(lines[-1])
    # The worker's own peak (VmHWM) is exact; the poll (every 0.2 s) adds child processes.
    rec["peak_extra_mb"] = max(rec.get("peak_extra_mb", 0), peak / 1024)
    return rec


def _fmt_params(rec: dict) -> str:
    if "params_after" not in rec:
        return f"{rec.get('params_before', 0) / 1e6:.1f}M"
    ratio = rec["params_after"] / rec["params_before"]
    return f"{rec['params_before'] / 1e6:.1f}M → {rec['params_after'] / 1e6:.1f}M ({ratio:.2f})"


def _fmt_macs(rec: dict) -> str:
    if not rec.get("macs_after") or not rec.get("macs_before"):
        return "–"
    before, after = rec["macs_before"] / 1e9, rec["macs_after"] / 1e9
    return f"{before:.2f}G → {after:.2f}G ({after / before:.2f})"


def _cell(rec: dict | None) -> tuple[str, str, str]:
    if rec is None:
        return ("–", "–", "–")
    status = "yes" if rec["status"] == "works" else f"no: {rec.get('reason', rec['status'])}"
    secs = f"{rec['seconds']:.1f}" if "seconds" in rec else "–"
    mem = f"{rec['peak_extra_mb']:.0f}" if "peak_extra_mb" in rec else "–"
    return (status.replace("|", "/"), secs, mem)


def markdown(records: list[dict], args: argparse.Namespace) -> str:
    """The results table (one row per model) and the totals."""
    by: dict[str, dict[str, dict]] = {}
    for rec in records:  # a later record of a model and method replaces an earlier one
        by.setdefault(rec["model"], {})[rec["method"]] = rec
    records = [rec for recs in by.values() for rec in recs.values()]
    lines = [
        f"Structural removal, {args.ratio:.0%} of channels, random init, "
        f"1x3x{args.size}x{args.size}, 1 thread, one process per model and method "
        f"(limits {args.timeout:g} s, {args.memory / 2**30:g} GB extra).",
        "",
        "| model | nbcompress works | params before → after | MACs (hooked layers) | s "
        "| peak extra MB | TP plain works | TP s | TP peak extra MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, recs in by.items():
        nb, tpr = recs.get("nbcompress"), recs.get("torch-pruning")
        ns, nt, nm = _cell(nb)
        ts, tt, tm = _cell(tpr)
        params = _fmt_params(nb) if nb else "–"
        macs = _fmt_macs(nb) if nb else "–"
        lines.append(f"| {name} | {ns} | {params} | {macs} | {nt} | {nm} | {ts} | {tt} | {tm} |")
    for method in METHODS:
        done = [r for r in records if r["method"] == method]
        if not done:
            continue
        ok = [r for r in done if r["status"] == "works"]
        slowest = max((r.get("seconds", 0) for r in done), default=0)
        most = max((r.get("peak_extra_mb", 0) for r in done), default=0)
        lines.append(
            f"\n**{method}**: {len(ok)}/{len(done)} work; slowest {slowest:.1f} s; "
            f"highest peak extra memory {most:.0f} MB."
        )
    return "\n".join(lines) + "\n"


def _select(patterns: str | None, quick: bool) -> list[str]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if quick:
        return [n for n in QUICK if n in names]
    if not patterns:
        return names
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--models", help="comma-separated names or globs, e.g. 'swin*,resnet18'")
    p.add_argument("--methods", default=",".join(METHODS), help="nbcompress,torch-pruning")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--memory", type=int, default=4 << 30, help="bytes of extra memory")
    p.add_argument("--out", default="benchmarks/results/structural", help="path without suffix")
    p.add_argument("--render", nargs="+", help="only write the table from these JSON files")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--base-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.render:
        records = [r for path in args.render for r in json.loads(Path(path).read_text())]
        Path(args.out).with_suffix(".md").write_text(markdown(records, args))
        print(markdown(records, args))
        return
    names = _select(args.models, args.quick)
    methods = [m for m in args.methods.split(",") if m in METHODS]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    json_path = out.with_suffix(".json")
    for name in names:
        for method in methods:
            rec = run_one(name, method, args)
            records.append(rec)
            json_path.write_text(json.dumps(records, indent=1))
            out.with_suffix(".md").write_text(markdown(records, args))
            cell = _cell(rec)
            print(
                f"{name:28s} {method:14s} {cell[1]:>6s} s {cell[2]:>6s} MB  {cell[0]}", flush=True
            )
    print(markdown(records, args))


if __name__ == "__main__":
    main()
