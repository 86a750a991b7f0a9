"""Sensitivity-guided vs uniform vs global L1 pruning at equal sparsity, no fine-tuning.

Models are trained here on scikit-learn's real handwritten digits: LeNet-300-100 on the
8×8 scans and the seed CNN on 28×28 upscales. For every seed the training split is cut
into train (80%) and validation (20%); sensitivity sweeps and suggestions only ever see
the validation split, and every reported accuracy is on the untouched test split.

Methods, each pruning every Linear/Conv layer (output layer included) to the same overall
sparsity:

* uniform — ``prune_(model, s, include_output=True)``: every layer at ``s``;
* global — ``prune_(..., scope="global")``: one magnitude threshold across layers;
* suggested — one sweep on validation accuracy, ``result.suggest(s)``;
* staged — ``prune_to_(model, evaluate, s, stages=n)``: sweep → suggest → apply, ``n``
  times on the already pruned model, one chain per target (all stages one undo step).

Run: ``python benchmarks/bench_sensitivity.py [--seeds 3] [--stages N] [--write]``;
``--quick`` runs one seed; ``--sweep-metric loss`` scores sweeps by validation
cross-entropy. ``--write`` replaces the "Sensitivity-guided pruning (issue 3)" section of
benchmarks/RESULTS.md with one run; the committed section combines an accuracy and a loss run.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import nbcompress as nc  # noqa: E402
from nbcompress import zoo  # noqa: E402
from nbcompress.engine.history import trial  # noqa: E402
from nbcompress.engine.staged import DEFAULT_RATIOS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import cpu_name  # noqa: E402 - one CPU probe for every bench

TARGETS = (0.7, 0.8, 0.9)
GRID = list(DEFAULT_RATIOS)
METHODS = ("uniform", "global", "suggested", "staged")
STAGES = inspect.signature(nc.prune_to_).parameters["stages"].default
MODELS = {
    "LeNet-300-100, 8×8 digits": (8, zoo.LeNet300, 30),
    "seed CNN, 28×28 digits": (28, zoo.SeedCNN, 20),
}
SECTION = "## Sensitivity-guided pruning (issue 3)"
READING = (
    "**Reading.** The suggestions choose per-layer ratios from sensitivity curves "
    "measured on about 290 validation images. Scored by accuracy, those curves are coarse "
    "(one image = 0.35 points) and flat over most ratios, so many allocations are "
    "predicted equal and evaluation noise picks among them; cross-entropy moves before "
    'accuracy does and separates "harmless" from "slightly harmful". The one-sweep '
    "suggestion sums single-layer drops (the additive model of Distiller and NNI); layers "
    "that look harmless alone compound when pruned together, which shows as the "
    "optimistic predictions above (accuracy over-predicted, loss under-predicted). "
    "`prune_to_` re-measures the curves on the pruned model before each of its 5 stages "
    "(50% first, then each stage removes the same share of what is left; about 4× the "
    "evaluations of one sweep). Staged and scored by validation loss it wins every CNN "
    "seed at 80 and 90%; scored by accuracy it does not (CNN seed 0 at 80/90%). An "
    "earlier single accuracy chain through 50, 60, 70, 75, 80, 85, 90% had won 3/3 CNN "
    "seeds at 80/90%; with one schedule per target, seed 0's test accuracy moved by up to "
    "4 points at 80% and 9 at 90% across six schedules tried, so that 3/3 was within the "
    "noise. At 70% (and at 80% on LeNet seed 1) global L1 is already within a point of "
    "the dense model, which leaves no room for a clear win. Recommendation: `prune_to_` "
    "(or `%sensitivity … --stages 5 --apply`) with a continuous validation metric such as "
    "loss (`higher_is_better=False`, `--lower-is-better`) for 80% and above; one sweep is "
    "enough below that."
)


def sparsity(model, layers) -> float:
    """Overall fraction of zero weights over ``layers``."""
    weights = [model.get_submodule(n).weight for n in layers]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def one_seed(size, model_cls, epochs, seed, stages, metric, log):
    """All methods at every target for one data split / initialisation."""
    data = zoo.load_digits(size, seed=seed)
    n_val = len(data.y_train) // 5
    x_val, y_val = data.x_train[:n_val], data.y_train[:n_val]
    torch.manual_seed(seed)
    model = zoo.train(
        model_cls(), data.x_train[n_val:], data.y_train[n_val:], epochs=epochs, seed=seed
    )

    def val_accuracy(m):
        return zoo.accuracy(m, x_val, y_val)

    @torch.no_grad()
    def val_loss(m):
        return float(torch.nn.functional.cross_entropy(m(x_val), y_val))

    def test_accuracy(m):
        return zoo.accuracy(m, data.x_test, data.y_test)

    # Cross-entropy moves before accuracy does: it tells "harmless" from "slightly harmful".
    val_metric, higher = (val_accuracy, True) if metric == "accuracy" else (val_loss, False)
    out = {"dense": test_accuracy(model), "acc": {}, "sp": {}, "pred": {}, "metric": metric}
    sweep = nc.sensitivity(model, val_metric, ratios=GRID, progress=False, higher_is_better=higher)
    out["sweep"] = (sweep.evaluations, sweep.seconds)
    layers = sweep.layers
    for target in TARGETS:
        with trial(model):
            nc.prune_(model, target, include_output=True)
            record(out, "uniform", target, test_accuracy(model), sparsity(model, layers))
        with trial(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the min-density note at 90%
            nc.prune_(model, target, include_output=True, scope="global")
            record(out, "global", target, test_accuracy(model), sparsity(model, layers))
        suggestion = sweep.suggest(target)
        with trial(model):
            nc.prune_(model, {k: r for k, r in suggestion.ratios.items() if r}, include_output=True)
            record(out, "suggested", target, test_accuracy(model), sparsity(model, layers))
            out["pred"][target] = (suggestion.predicted, val_metric(model))
    out["staged_evaluations"], out["stages"] = {}, stages
    for target in TARGETS:
        report = nc.prune_to_(
            model, val_metric, target, stages=stages, progress=False, higher_is_better=higher
        )
        record(out, "staged", target, test_accuracy(model), sparsity(model, layers))
        out["staged_evaluations"][target] = report.evaluations
        nc.undo_(model)  # all stages are one step
    log(f"  seed {seed}: dense {out['dense']:.3f}, " + ", ".join(
        f"{t:.0%}: " + "/".join(f"{out['acc'][m][t]:.3f}" for m in METHODS) for t in TARGETS
    ))  # fmt: skip
    return out


def record(out, method, target, accuracy, achieved) -> None:
    out["acc"].setdefault(method, {})[target] = accuracy
    out["sp"].setdefault(method, {})[target] = achieved


def verdict(runs, method, t) -> str:
    """Margin over the better baseline, seeds won, and whether that is clearly higher."""
    margin = statistics.fmean(
        r["acc"][method][t] - max(r["acc"]["uniform"][t], r["acc"]["global"][t]) for r in runs
    )
    wins = sum(
        r["acc"][method][t] > max(r["acc"]["uniform"][t], r["acc"]["global"][t]) for r in runs
    )
    if margin >= 0.01 and wins == len(runs):
        word = "**clearly higher**"
    elif abs(margin) < 0.01:
        word = "tie"
    else:
        word = "higher" if margin > 0 else "**lower**"
    return f"{100 * margin:+.1f} pts, wins {wins}/{len(runs)}: {word}"


def cell(values) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}%"
    return f"{100 * mean:.1f}% ({100 * min(values):.1f}–{100 * max(values):.1f})"


def table(name, runs) -> list[str]:
    """Markdown table of one model over seeds, and the verdict per target."""
    dense = [r["dense"] for r in runs]
    evals = statistics.fmean(r["sweep"][0] for r in runs)
    secs = statistics.fmean(r["sweep"][1] for r in runs)
    staged_evals = {t: statistics.fmean(r["staged_evaluations"][t] for r in runs) for t in TARGETS}
    lines = [
        f"### {name}",
        "",
        f"Dense test accuracy {cell(dense)}; one sweep = {evals:.0f} evaluations in {secs:.1f} s; "
        f"staged = {runs[0]['stages']} sweeps per target, "
        + ", ".join(f"{staged_evals[t]:.0f} evaluations at {t:.0%}" for t in TARGETS)
        + ".",
        "",
        "| sparsity | uniform L1 | global L1 | suggested (one sweep) | staged (`prune_to_`) "
        "| one sweep vs best baseline | staged vs best baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in TARGETS:
        acc = {m: [r["acc"][m][t] for r in runs] for m in METHODS}
        verdicts = [verdict(runs, m, t) for m in ("suggested", "staged")]
        lines.append(
            f"| {t:.0%} | "
            + " | ".join(cell(acc[m]) for m in METHODS)
            + " | "
            + " | ".join(verdicts)
            + " |"
        )
    achieved = [r["sp"][m][t] for r in runs for m in METHODS for t in TARGETS]
    pred = [(r["pred"][t][0], r["pred"][t][1]) for r in runs for t in TARGETS]
    gap = statistics.fmean(p - m for p, m in pred)
    lines += [
        "",
        f"Achieved sparsity over the analysed layers: {100 * min(achieved):.1f}–"
        f"{100 * max(achieved):.1f}% (suggestions meet the target from above). Validation "
        f"{runs[0]['metric']} predicted by the additive model minus measured, one-sweep "
        "suggestions: "
        + (f"{100 * gap:+.1f} pts" if runs[0]["metric"] == "accuracy" else f"{gap:+.3f}")
        + " on average.",
        "",
    ]
    losses = [
        f"{label} at {t:.0%} on seed {i} ({100 * (r['acc'][m][t] - best):+.1f} pts)"
        for m, label in (("suggested", "one sweep"), ("staged", "staged"))
        for t in TARGETS
        for i, r in enumerate(runs)
        if r["acc"][m][t] <= (best := max(r["acc"]["uniform"][t], r["acc"]["global"][t]))
    ]
    if losses:
        lines += ["Not better than the best baseline: " + "; ".join(losses) + ".", ""]
    return lines


def machine() -> str:
    return f"{cpu_name()}, torch {torch.__version__}, 1 thread, Python {platform.python_version()}"


def write_section(text: str, path: Path) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving others alone."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in current:
        head, _, rest = current.partition(SECTION)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1 :] if nxt >= 0 else ""
        current = head + text + ("\n" + tail if tail else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="One seed, for development.")
    parser.add_argument(
        "--stages", type=int, default=STAGES, help=f"Stages of prune_to_ (default {STAGES})."
    )
    parser.add_argument(
        "--sweep-metric", choices=("accuracy", "loss"), default="accuracy",
        help="What sweeps and suggestions score on the validation split.",
    )  # fmt: skip
    parser.add_argument("--write", action="store_true", help="Update benchmarks/RESULTS.md.")
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    torch.set_num_threads(1)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start, load = time.perf_counter(), os.getloadavg()[0]
    lines = [SECTION, ""]
    lines += [
        "Test accuracy without fine-tuning at equal overall sparsity over every Linear/Conv "
        f"layer (output layer included); mean over {seeds} seeds (data split and "
        "initialisation), min–max in brackets. Sweeps and suggestions score the validation "
        f"{'accuracy' if args.sweep_metric == 'accuracy' else 'cross-entropy'} (20% of the "
        "training data); accuracies are on the untouched test split. "
        "Sweep grid: " + ", ".join(f"{r:g}" for r in GRID) + ". Last two columns: mean "
        "margin over the better of uniform and global, seeds won; 'clearly higher' = at "
        "least 1 point on average and better on every seed, 'tie' = within 1 point.",
        "",
    ]
    for name, (size, cls, epochs) in MODELS.items():
        log(name)
        runs = [
            one_seed(size, cls, epochs, seed, args.stages, args.sweep_metric, log)
            for seed in range(seeds)
        ]
        lines += table(name, runs)
    lines += [READING, ""]
    lines += [
        f"Command: `python benchmarks/bench_sensitivity.py --seeds {seeds}"
        + ("" if args.stages == STAGES else f" --stages {args.stages}")
        + ("" if args.sweep_metric == "accuracy" else f" --sweep-metric {args.sweep_metric}")
        + " --write` "
        f"({time.perf_counter() - start:.0f} s on {machine()}; load average {load:.1f} at "
        f"start, {os.getloadavg()[0]:.1f} at end). Accuracies are deterministic (seeded, one "
        "thread); the seconds are not when other processes share the cores.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(text, Path(__file__).with_name("RESULTS.md"))


if __name__ == "__main__":
    main()
