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
* suggested, iterative — sweep → suggest → ``apply_suggestion_`` in stages
  (50, 60, 70, 75, 80, 85, 90%), each sweep on the already pruned model.

Run: ``python benchmarks/bench_sensitivity.py [--seeds 3] [--write]``. ``--write``
replaces the "Sensitivity-guided pruning (issue 3)" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
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

TARGETS = (0.7, 0.8, 0.9)
STAGES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99]
METHODS = ("uniform", "global", "suggested", "iterative")
MODELS = {
    "LeNet-300-100, 8×8 digits": (8, zoo.LeNet300, 30),
    "seed CNN, 28×28 digits": (28, zoo.SeedCNN, 20),
}
SECTION = "## Sensitivity-guided pruning (issue 3)"
READING = (
    "**Reading.** The one-sweep suggestion rests on the additive model of sensitivity "
    "analysis (Distiller, NNI): each layer's drop is measured with only that layer pruned, "
    "and the drops are summed. At 70% the baselines stay within a few points of the dense "
    "model, so there is little to win. At 80–90% the suggestion keeps more accuracy than "
    "global L1 on average on both models; where it loses, layers that each look harmless "
    "alone (flat curves up to 70–80%) compound when pruned together, which shows as an "
    "optimistic prediction (the predicted-minus-measured gap above). Re-measuring in stages "
    "(sweep → suggest → apply_suggestion_, repeated on the pruned model) captures those "
    "interactions at the cost of several sweeps. The quality target — clearly higher than "
    "both baselines at 70, 80 and 90% — is therefore met only where the table says "
    "'clearly higher'; elsewhere it is a tie or a win on most seeds, not on all."
)


def sparsity(model, layers) -> float:
    """Overall fraction of zero weights over ``layers``."""
    weights = [model.get_submodule(n).weight for n in layers]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def one_seed(size, model_cls, epochs, seed, log):
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

    def test_accuracy(m):
        return zoo.accuracy(m, data.x_test, data.y_test)

    out = {"dense": test_accuracy(model), "acc": {}, "sp": {}, "pred": {}}
    sweep = nc.sensitivity(model, val_accuracy, ratios=GRID, progress=False)
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
            out["pred"][target] = (suggestion.predicted, val_accuracy(model))
    evaluations = 0
    for stage in STAGES:
        staged = nc.sensitivity(model, val_accuracy, ratios=GRID, progress=False)
        evaluations += staged.evaluations
        nc.apply_suggestion_(model, staged.suggest(stage))
        if stage in TARGETS:
            record(out, "iterative", stage, test_accuracy(model), sparsity(model, layers))
    out["iterative_evaluations"] = evaluations
    nc.undo_(model, all=True)
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
    iter_evals = statistics.fmean(r["iterative_evaluations"] for r in runs)
    lines = [
        f"### {name}",
        "",
        f"Dense test accuracy {cell(dense)}; one sweep = {evals:.0f} evaluations in {secs:.1f} s; "
        f"the iterative schedule = {iter_evals:.0f} evaluations over {len(STAGES)} sweeps.",
        "",
        "| sparsity | uniform L1 | global L1 | suggested (one sweep) | suggested, iterative "
        "| one sweep vs best baseline | iterative vs best baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in TARGETS:
        acc = {m: [r["acc"][m][t] for r in runs] for m in METHODS}
        verdicts = [verdict(runs, m, t) for m in ("suggested", "iterative")]
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
        f"accuracy predicted by the additive model minus measured, one-sweep suggestions: "
        f"{100 * gap:+.1f} pts on average.",
        "",
    ]
    losses = [
        f"{label} at {t:.0%} on seed {i} ({100 * (r['acc'][m][t] - best):+.1f} pts)"
        for m, label in (("suggested", "one sweep"), ("iterative", "iterative"))
        for t in TARGETS
        for i, r in enumerate(runs)
        if r["acc"][m][t] <= (best := max(r["acc"]["uniform"][t], r["acc"]["global"][t]))
    ]
    if losses:
        lines += ["Not better than the best baseline: " + "; ".join(losses) + ".", ""]
    return lines


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, 1 thread, Python {platform.python_version()}"


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
    parser.add_argument("--write", action="store_true", help="Update benchmarks/RESULTS.md.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start, load = time.perf_counter(), os.getloadavg()[0]
    lines = [SECTION, ""]
    lines += [
        "Test accuracy without fine-tuning at equal overall sparsity over every Linear/Conv "
        f"layer (output layer included); mean over {args.seeds} seeds (data split and "
        "initialisation), min–max in brackets. Sweeps and suggestions use a validation "
        "split (20% of the training data); accuracies are on the untouched test split. "
        "Sweep grid: " + ", ".join(f"{r:g}" for r in GRID) + ". Last two columns: mean "
        "margin over the better of uniform and global, seeds won; 'clearly higher' = at "
        "least 1 point on average and better on every seed, 'tie' = within 1 point.",
        "",
    ]
    for name, (size, cls, epochs) in MODELS.items():
        log(name)
        runs = [one_seed(size, cls, epochs, seed, log) for seed in range(args.seeds)]
        lines += table(name, runs)
    lines += [READING, ""]
    lines += [
        f"Command: `python benchmarks/bench_sensitivity.py --seeds {args.seeds} --write` "
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
