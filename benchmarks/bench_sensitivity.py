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
  times on the already pruned model, one chain per target (all stages one undo step);
* one sweep + refine — ``result.suggest(s, evaluate=evaluate, refine=B)``: the curve
  suggestion, uniform and global allocations measured, then a measured local search;
* staged + refine (recommended) — ``prune_to_(..., refine=B)``: the same search started
  from the best measured of staged, one sweep, uniform and global. The staged column is
  the staged candidate of this run (per-layer L1 at its final ratios: the same masks).

Run: ``python benchmarks/bench_sensitivity.py [--seeds 3] [--stages N] [--write]``;
``--quick`` runs one seed; ``--sweep-metric loss`` scores sweeps by validation
cross-entropy; ``--refine B`` sets the refinement budget (evaluations). ``--write``
replaces the "Sensitivity-guided pruning (issue 3)" section of benchmarks/RESULTS.md; the
section combines a loss and an accuracy run, so the other metric's subsection is kept as
it is. ``--raw FILE`` saves every figure as JSON, ``--render FILE`` rewrites the section
from such a file without rerunning.
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

import nbcompress as nc  # noqa: E402
from nbcompress import zoo  # noqa: E402
from nbcompress.engine.core.history import trial  # noqa: E402
from nbcompress.engine.sensitivity.staged import DEFAULT_RATIOS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import cpu_name  # noqa: E402 - one CPU probe for every bench

TARGETS = (0.7, 0.8, 0.9)
GRID = list(DEFAULT_RATIOS)
METHODS = ("uniform", "global", "suggested", "staged", "sweep+refine", "staged+refine")
LABELS = {
    "uniform": "uniform L1", "global": "global L1", "suggested": "one sweep",
    "staged": "staged", "sweep+refine": "one sweep + refine",
    "staged+refine": "staged + refine (recommended)",
}  # fmt: skip
#: Fixed before the refined runs were looked at (see the commit introducing refine).
RECOMMENDED = "staged+refine"
BUDGET = 100
STAGES = inspect.signature(nc.prune_to_).parameters["stages"].default
MODELS = {
    "LeNet-300-100, 8×8 digits": (8, zoo.LeNet300, 30),
    "seed CNN, 28×28 digits": (28, zoo.SeedCNN, 20),
}
SECTION = "## Sensitivity-guided pruning (issue 3)"
TARGET_INTRO = (
    "Judged for the recommended method only, fixed (and written in the commit message "
    "that introduced it) before any refined cell was seen: `prune_to_(model, val_loss, s, "
    "higher_is_better=False, refine=100)`, i.e. 5 stages on validation cross-entropy, then "
    "a measured refinement (at most 100 evaluations after its candidates) started from the "
    "best measured of the "
    "staged, one-sweep, uniform and global allocations. The other variants are in the "
    "tables below; picking the best of them per cell would flatter them."
)
TARGET_NOTE = (
    "Before refinement (staged on loss alone, same seeds): met at LeNet 90%, CNN 80% and "
    "CNN 90% (seed 0 by only +0.5 pts); missed at LeNet 70% (+0.1, 1/3), LeNet 80% (+3.3, "
    "2/3) and CNN 70% (+0.6, 3/3). With refinement CNN 70% is met (+1.5, 3/3) and CNN 90% "
    "no longer narrowly (seed 0 by +5.4). **Still missed: LeNet 70% and 80%, both for lack "
    "of room, not redefined here.** At 70% the better baseline is within 0.7 pts of the "
    "dense model on average (0.2–1.3 per seed), so 'at least 1 point above it' would mean "
    "beating the unpruned model; the recommended method is +0.3 on average and loses seed 0 "
    "by one test image (96.2% vs 96.4%). At 80% seed 1's global L1 keeps 93.3%, one test "
    "image (0.2 pts) from the dense 93.5%, and the recommended method lands at 92.7% (−0.7, "
    "3 of 449 images) although its validation loss is lower than global L1's (global L1's "
    "allocation is one of its measured candidates): on 269 validation images that "
    "difference does not carry over to the test split."
)
READING = (
    "**Reading.** The suggestions choose per-layer ratios from sensitivity curves "
    "measured on 269 validation images. Scored by accuracy (the kept run below), those "
    "curves are coarse (one image = 0.37 points) and flat over most ratios, so many "
    "allocations are predicted equal and evaluation noise picks among them; cross-entropy "
    "moves before accuracy does and separates 'harmless' from 'slightly harmful'. The "
    "one-sweep suggestion sums single-layer drops (the additive model of Distiller and "
    "NNI); layers that look harmless alone compound when pruned together, so the "
    "prediction is optimistic, the more so the sparser (validation loss under-predicted "
    "by 0.2 on average for one-sweep suggestions, by 0.2–0.5 for the refined allocations "
    "at 90%). `prune_to_` re-measures the curves on the "
    "pruned model before each of its 5 stages (about 4× the evaluations of one sweep). "
    "Refinement closes the loop with real evaluations instead of predictions: it "
    "measures the staged, one-sweep, uniform and global allocations at the same "
    "sparsity, starts from the best and moves sparsity between pairs of layers while the "
    "measured validation loss improves, so on validation it can never be worse than "
    "either baseline. The search stops when halving the move no longer helps, well "
    "inside the 100-evaluation budget (about 30 evaluations on LeNet's 3 layers, 70–80 "
    "on the CNN's 5, about a quarter of what the stages cost). Its starting point is "
    "often not the staged allocation (one sweep measured better on 4 of the 9 CNN runs, "
    "2 of 3 at 70%, where the margin rose from +0.6 to +1.5 pts), and the moves then "
    "lowered the CNN's validation loss by 2–12% (table above). One sweep + refine, a "
    "quarter of the evaluations, reached the same verdicts in every cell of this run; it "
    "was not the method fixed in advance, so the table above does not use it. "
    "Recommendation: `prune_to_(model, val_loss, s, higher_is_better=False, refine=100)` "
    "(`%sensitivity model --eval val_loss --lower-is-better --target-sparsity s "
    "--stages 5 --refine 100 --apply`); when sweeps are expensive, "
    "`result.suggest(s, evaluate=val_loss, refine=100)` after one sweep."
)


def sparsity(model, layers) -> float:
    """Overall fraction of zero weights over ``layers``."""
    weights = [model.get_submodule(n).weight for n in layers]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def one_seed(size, model_cls, epochs, seed, stages, metric, budget, log):
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
    out["refine"] = {}
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
        measured = apply_ratios(
            model, suggestion.ratios, out, "suggested", target, test_accuracy, layers, val_metric
        )
        out["pred"][target] = (suggestion.predicted, measured)
        refined = sweep.suggest(target, evaluate=val_metric, refine=budget)
        apply_ratios(model, refined.ratios, out, "sweep+refine", target, test_accuracy, layers)
        out["refine"].setdefault("sweep+refine", {})[target] = refine_figures(refined.refinement)
    out["staged_evaluations"], out["stages"], out["budget"] = {}, stages, budget
    for target in TARGETS:
        report = nc.prune_to_(
            model, val_metric, target, stages=stages, progress=False, higher_is_better=higher,
            refine=budget,
        )  # fmt: skip
        record(out, "staged+refine", target, test_accuracy(model), sparsity(model, layers))
        out["staged_evaluations"][target] = report.evaluations
        out["refine"].setdefault("staged+refine", {})[target] = refine_figures(report.refinement)
        nc.undo_(model)  # all stages and the refinement are one step
        staged = report.refinement.candidates["staged"]
        apply_ratios(model, staged, out, "staged", target, test_accuracy, layers)
    log(f"  seed {seed}: dense {out['dense']:.3f}, " + ", ".join(
        f"{t:.0%}: " + "/".join(f"{out['acc'][m][t]:.3f}" for m in METHODS) for t in TARGETS
    ))  # fmt: skip
    return out


def apply_ratios(model, ratios, out, method, target, test_accuracy, layers, val_metric=None):
    """Record test accuracy and sparsity of per-layer ratios, applied inside a trial.

    Returns the validation metric of the pruned model when ``val_metric`` is given.
    """
    with trial(model):
        nc.prune_(model, {k: r for k, r in ratios.items() if r}, include_output=True)
        record(out, method, target, test_accuracy(model), sparsity(model, layers))
        return val_metric(model) if val_metric is not None else None


def refine_figures(refinement) -> dict:
    """Start, evaluations, seconds, predicted and measured metric of one refinement."""
    return {
        "start": refinement.start, "evaluations": refinement.evaluations,
        "seconds": refinement.seconds, "predicted": refinement.predicted,
        "measured": refinement.measured, "start_measured": next(
            s["measured"] for s in refinement.steps
            if s["step"] == f"candidate: {refinement.start}"
        ),
        "moves": sum(
            s["step"].startswith("move") for s in refinement.steps
        ),
    }  # fmt: skip


def record(out, method, target, accuracy, achieved) -> None:
    out["acc"].setdefault(method, {})[target] = accuracy
    out["sp"].setdefault(method, {})[target] = achieved


def margin_wins(runs, method, t) -> tuple[float, int]:
    """Mean margin over the better of uniform and global, and the number of seeds won."""
    best = [max(r["acc"]["uniform"][t], r["acc"]["global"][t]) for r in runs]
    margin = statistics.fmean(r["acc"][method][t] - b for r, b in zip(runs, best, strict=True))
    return margin, sum(r["acc"][method][t] > b for r, b in zip(runs, best, strict=True))


def verdict(runs, method, t) -> str:
    """Margin over the better baseline, seeds won, and whether that is clearly higher."""
    margin, wins = margin_wins(runs, method, t)
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
    """Markdown tables of one model over seeds: accuracies, verdicts, refinement figures."""
    dense = [r["dense"] for r in runs]
    evals = statistics.fmean(r["sweep"][0] for r in runs)
    secs = statistics.fmean(r["sweep"][1] for r in runs)
    staged_evals = {t: statistics.fmean(r["staged_evaluations"][t] for r in runs) for t in TARGETS}
    guided = [m for m in METHODS if m not in ("uniform", "global")]
    lines = [
        f"#### {name}",
        "",
        f"Dense test accuracy {cell(dense)}; one sweep = {evals:.0f} evaluations in {secs:.1f} s; "
        f"staged + refine = {runs[0]['stages']} sweeps and a refinement (at most "
        f"{runs[0]['budget']} evaluations after its candidates) per target, "
        + ", ".join(f"{staged_evals[t]:.0f} evaluations at {t:.0%}" for t in TARGETS)
        + ".",
        "",
        "| sparsity | " + " | ".join(LABELS[m] for m in METHODS) + " |",
        "|---" * (len(METHODS) + 1) + "|",
    ]
    for t in TARGETS:
        acc = {m: [r["acc"][m][t] for r in runs] for m in METHODS}
        lines.append(f"| {t:.0%} | " + " | ".join(cell(acc[m]) for m in METHODS) + " |")
    lines += [
        "",
        "vs the best baseline (mean margin, seeds won):",
        "",
        "| sparsity | " + " | ".join(LABELS[m] for m in guided) + " |",
        "|---" * (len(guided) + 1) + "|",
    ]
    for t in TARGETS:
        lines.append(f"| {t:.0%} | " + " | ".join(verdict(runs, m, t) for m in guided) + " |")
    achieved = [r["sp"][m][t] for r in runs for m in METHODS for t in TARGETS]
    pred = [(r["pred"][t][0], r["pred"][t][1]) for r in runs for t in TARGETS]
    gap = statistics.fmean(p - m for p, m in pred)
    loss = runs[0]["metric"] != "accuracy"

    def fmt(v):
        return f"{v:+.3f}" if loss else f"{100 * v:+.1f} pts"

    lines += [
        "",
        f"Achieved sparsity over the analysed layers: {100 * min(achieved):.1f}–"
        f"{100 * max(achieved):.1f}% (suggestions meet the target from above). Validation "
        f"{runs[0]['metric']} predicted by the additive model minus measured, one-sweep "
        f"suggestions: {fmt(gap)} on average.",
        "",
    ]
    lines += refine_lines(runs, fmt)
    losses = [
        f"{LABELS[m]} at {t:.0%} on seed {i} ({100 * (r['acc'][m][t] - best):+.1f} pts)"
        for m in guided
        for t in TARGETS
        for i, r in enumerate(runs)
        if r["acc"][m][t] <= (best := max(r["acc"]["uniform"][t], r["acc"]["global"][t]))
    ]
    if losses:
        lines += ["Not better than the best baseline: " + "; ".join(losses) + ".", ""]
    return lines


def refine_lines(runs, fmt) -> list[str]:
    """Per refined method and target: where the search started, its cost, predicted − measured."""
    rows = [
        "| refinement | sparsity | started from (per seed) | moves kept | evaluations | seconds "
        "| validation metric: start → refined | predicted − measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ("sweep+refine", "staged+refine"):
        for t in TARGETS:
            figs = [r["refine"][m][t] for r in runs]
            rows.append(
                f"| {LABELS[m]} | {t:.0%} | " + ", ".join(f["start"] for f in figs)
                + f" | {statistics.fmean(f['moves'] for f in figs):.1f}"
                + f" | {statistics.fmean(f['evaluations'] for f in figs):.0f}"
                + f" | {statistics.fmean(f['seconds'] for f in figs):.1f}"
                + f" | {statistics.fmean(f['start_measured'] for f in figs):.4g} → "
                + f"{statistics.fmean(f['measured'] for f in figs):.4g}"
                + f" | {fmt(statistics.fmean(f['predicted'] - f['measured'] for f in figs))} |"
            )  # fmt: skip
    note = (
        "Refinement: evaluations include measuring its candidates; for staged + refine the "
        "predicted metric is the first sweep's additive prediction of the final allocation."
    )
    return [*rows, "", note, ""]


def target_table(results) -> list[str]:
    """The verdict for the recommended method only, one row per model and target."""
    lines = [
        "| model | sparsity | dense | best baseline (per seed) | room to dense | recommended "
        "| margin, seeds won | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        for t in TARGETS:
            margin, wins = margin_wins(runs, RECOMMENDED, t)
            base = [max(r["acc"]["uniform"][t], r["acc"]["global"][t]) for r in runs]
            dense = statistics.fmean(r["dense"] for r in runs)
            room = min(r["dense"] - b for r, b in zip(runs, base, strict=True))
            met = margin >= 0.01 and wins == len(runs)
            lines.append(
                f"| {name.split(',')[0]} | {t:.0%} | {100 * dense:.1f}% | {cell(base)} | "
                f"{100 * (dense - statistics.fmean(base)):.1f} pts (min {100 * room:.1f}) | "
                f"{cell([r['acc'][RECOMMENDED][t] for r in runs])} | {100 * margin:+.1f} pts, "
                f"{wins}/{len(runs)} | {'**yes**' if met else '**no**'} |"
            )
    return lines


def machine() -> str:
    return f"{cpu_name()}, torch {torch.__version__}, 1 thread, Python {platform.python_version()}"


SUBSECTION = "### Sweeps scored on validation "
KEPT = (
    "*Kept from an earlier run, made before refinement existed (no refine columns); the "
    "uniform, global, one-sweep and staged code has not changed since.*"
)


def write_section(head: str, metric: str, sub: str, path: Path) -> None:
    """Replace this benchmark's section of RESULTS.md, leaving other sections alone.

    The section holds one subsection per sweep metric; the other metric's subsection is
    kept as it is. ``head`` (intro and target verdicts) is replaced only when given.
    """
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    before, old, after = current, "", ""
    if SECTION in current:
        before, _, rest = current.partition(SECTION)
        nxt = rest.find("\n## ")
        old, after = (rest[:nxt], rest[nxt + 1 :]) if nxt >= 0 else (rest, "")
        old = SECTION + old
    parts = old.split(SUBSECTION)
    kept = {p.split("\n", 1)[0].strip(): SUBSECTION + p for p in parts[1:]}
    kept = {k: v.split("**Reading.**")[0].rstrip() + "\n" for k, v in kept.items()}
    kept[metric] = sub
    other = "accuracy" if metric != "accuracy" else "cross-entropy"
    if other in kept and KEPT not in kept[other]:
        title, _, body = kept[other].partition("\n")
        kept[other] = f"{title}\n\n{KEPT}\n{body}"
    head = head if head else (parts[0] if parts[0].strip() else SECTION + "\n")
    order = [k for k in ("cross-entropy", "accuracy") if k in kept]
    text = head.rstrip() + "\n\n" + "\n".join(kept[k].rstrip() + "\n" for k in order)
    text += "\n" + READING + "\n"
    sep = "" if not before or before.endswith("\n\n") else "\n"
    path.write_text(before + sep + text + ("\n" + after if after else ""))


def render(results, metric, seeds, command) -> tuple[str, str]:
    """The section head (intro and target verdicts) and this run's subsection."""
    name = "accuracy" if metric == "accuracy" else "cross-entropy"
    head = [
        SECTION,
        "",
        "Test accuracy without fine-tuning at equal overall sparsity over every Linear/Conv "
        f"layer (output layer included); mean over {seeds} seeds (data split and "
        "initialisation), min–max in brackets. Sweeps, suggestions and refinements score a "
        "validation split (20% of the training data), by cross-entropy (the recommended "
        "metric) and, in an earlier run, by accuracy; accuracies are on the untouched test "
        "split. Sweep grid: " + ", ".join(f"{r:g}" for r in GRID) + ". 'Clearly higher' = "
        "at least 1 point above the better of uniform and global L1 on average and better "
        "on every seed; 'tie' = within 1 point.",
        "",
        "### Target met? (clearly higher than uniform and global L1)",
        "",
        TARGET_INTRO,
        "",
        *target_table(results),
        "",
        TARGET_NOTE,
        "",
    ]
    sub = [f"{SUBSECTION}{name}", ""]
    for model_name, runs in results.items():
        sub += table(model_name, runs)
    sub += [command, ""]
    return ("\n".join(head) if metric != "accuracy" else ""), "\n".join(sub)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="One seed, for development.")
    parser.add_argument(
        "--stages", type=int, default=STAGES, help=f"Stages of prune_to_ (default {STAGES})."
    )
    parser.add_argument(
        "--refine", type=int, default=BUDGET, help=f"Refinement budget (default {BUDGET})."
    )
    parser.add_argument(
        "--sweep-metric", choices=("accuracy", "loss"), default="accuracy",
        help="What sweeps and suggestions score on the validation split.",
    )  # fmt: skip
    parser.add_argument("--write", action="store_true", help="Update benchmarks/RESULTS.md.")
    parser.add_argument("--raw", help="Save every figure of the run to this JSON file.")
    parser.add_argument("--render", help="Rewrite the section from a --raw file, no run.")
    args = parser.parse_args(argv)
    render_from = Path(args.render) if args.render else None
    saved = float_keys(json.loads(render_from.read_text())) if render_from else run(args)
    if args.raw:
        Path(args.raw).write_text(json.dumps(saved))
    head, sub = render(saved["results"], saved["metric"], saved["seeds"], saved["command"])
    print(head + "\n" + sub)
    if args.write:
        metric = "accuracy" if saved["metric"] == "accuracy" else "cross-entropy"
        write_section(head, metric, sub, Path(__file__).with_name("RESULTS.md"))


def float_keys(obj):
    """Undo JSON's string keys for dicts keyed by target sparsity."""
    if isinstance(obj, dict):
        as_targets = obj and all(k in {str(t) for t in TARGETS} for k in obj)
        return {(float(k) if as_targets else k): float_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [float_keys(v) for v in obj]
    return obj


def run(args) -> dict:
    """Train, prune and measure every model and seed; a JSON-ready record of the run."""
    seeds = 1 if args.quick else args.seeds
    torch.set_num_threads(1)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start, load = time.perf_counter(), os.getloadavg()[0]
    results = {}
    for name, (size, cls, epochs) in MODELS.items():
        log(name)
        results[name] = [
            one_seed(size, cls, epochs, seed, args.stages, args.sweep_metric, args.refine, log)
            for seed in range(seeds)
        ]
    command = (
        f"Command: `python benchmarks/bench_sensitivity.py --seeds {seeds}"
        + ("" if args.stages == STAGES else f" --stages {args.stages}")
        + ("" if args.refine == BUDGET else f" --refine {args.refine}")
        + ("" if args.sweep_metric == "accuracy" else f" --sweep-metric {args.sweep_metric}")
        + " --write` "
        f"({time.perf_counter() - start:.0f} s on {machine()}; load average {load:.1f} at "
        f"start, {os.getloadavg()[0]:.1f} at end). Accuracies are deterministic (seeded, one "
        "thread); the seconds are not when other processes share the cores."
    )
    return {"results": results, "metric": args.sweep_metric, "seeds": seeds, "command": command}


if __name__ == "__main__":
    main()
