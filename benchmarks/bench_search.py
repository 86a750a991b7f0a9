"""Search of per-layer ratios at 90% one-shot vs uniform, global L1 and the sensitivity default.

Issue 15's first target: LeNet-300-100 and the seed CNN on sklearn digits at 90% one-shot —
``gp`` and ``tpe`` with 60 trials ≥ the sensitivity default path and ≥ global L1, and within
0.5 point of the best of 1,000 random projected trials. Per seed: train dense (Adam 1e-3,
LeNet 30 epochs, CNN 20), then on copies of it

* **uniform**: ``prune_(m, 0.9)``; **global L1**: ``prune_(m, 0.9, scope="global")``;
* **sensitivity default**: ``r = sensitivity(m, val_accuracy)``, then
  ``apply_suggestion_(m, r.suggest(target_sparsity=0.9))``;
* **tpe / gp**: ``search(m, val_accuracy, target_sparsity=0.9, sampler=…, n_trials=60,
  seed=seed)`` (its first two trials are uniform and global L1), best by validation;
* **random ×1000**: ``search(…, sampler="random", n_trials=1000, warm_start=False)``;
* **tpe / gp re-fit**: the same searches with ``reconstruct=True, example_inputs=`` the first
  128 training rows: every trial re-fits the kept weights by least squares, as the sensitivity
  default path does (which re-fits on the evaluation's own inputs, i.e. validation).

Every choice is made on the validation split; the table reports the TEST accuracy of what
was chosen (mean ± sd over seeds) and the measured sparsity of the searched layers (output
layer excluded, as by default everywhere). Digits is the tuning set; nothing here is tuned.

Usage::

    python benchmarks/bench_search.py [--seeds 5] [--models lenet,cnn] [--random 1000]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbcompress as nc  # noqa: E402
from nbcompress.datasets import digits  # noqa: E402
from nbcompress.zoo import LeNet300, SeedCNN, accuracy, train  # noqa: E402

TARGET = 0.9
MODELS = {"lenet": ("LeNet-300-100", 8, 30), "cnn": ("seed CNN", 28, 20)}


def _sparsity(model: torch.nn.Module) -> float:
    weights = [
        m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    zeros = sum(int((w == 0).sum()) for w in weights[:-1])  # output layer left alone
    return zeros / sum(w.numel() for w in weights[:-1])


def _masked_finetune(model: torch.nn.Module, split, epochs: int, seed: int) -> torch.nn.Module:
    """Keep the model's zeros as masks, then ``nc.finetune`` it for ``epochs`` (in place).

    Re-pruning each layer by L1 at its own zero fraction selects exactly its zeros (a zero
    is the smallest magnitude), so ``keep_masks=True`` freezes the allocation being scored.
    """
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    ratios = {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules()
              if isinstance(m, layers)}  # fmt: skip
    nc.prune_ratios_(model, {n: r for n, r in ratios.items() if r > 0}, keep_masks=True)
    nc.finetune(model, (split.x_train, split.y_train), epochs, progress=False, plot=False,
                seed=seed)  # fmt: skip
    return model


def _arms(dense, val, calibration, random_trials: int, seed: int, only, score=None) -> dict:
    """Each method's pruned copy of ``dense`` (or the error that stopped it), and its seconds.

    ``score`` (default ``val``) is what the searches maximise: with fine-tuning per trial,
    the validation accuracy after masked fine-tuning of a copy of the trial's model.
    """
    out = {}
    score = val if score is None else score

    def run(name, fn):
        if only and not any(name.startswith(o) for o in only):
            return
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        try:
            fn(model)
            out[name] = (model, time.perf_counter() - start)
        except (ValueError, RuntimeError) as err:
            out[name] = (None, f"{type(err).__name__}: {str(err).splitlines()[0][:80]}")

    run("uniform", lambda m: nc.prune_(m, TARGET))
    run("global L1", lambda m: nc.prune_(m, TARGET, scope="global"))

    def default(m):
        sweep = nc.sensitivity(m, val, progress=False)
        nc.apply_suggestion_(m, sweep.suggest(target_sparsity=TARGET))

    run("sensitivity default", default)

    def searched(sampler, trials, warm, x=None):
        refit = dict(example_inputs=x, reconstruct=True) if x is not None else {}

        def fn(m):
            result = nc.search(m, score, target_sparsity=TARGET, sampler=sampler, n_trials=trials,
                               seed=seed, warm_start=warm, progress=False, **refit)  # fmt: skip
            result.apply_(m, result.best(), example_inputs=x)

        return fn

    run("tpe ×60", searched("tpe", 60, True))
    run("gp ×60", searched("gp", 60, True))
    run(f"random ×{random_trials}", searched("random", random_trials, False))
    if calibration is not None:
        run("tpe ×60 re-fit", searched("tpe", 60, True, calibration))
        run("gp ×60 re-fit", searched("gp", 60, True, calibration))
    return out


def main() -> None:
    """Print per-seed rows, then the summary table (test accuracy of val-chosen models)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first … first+seeds-1")
    parser.add_argument("--models", default="lenet,cnn")
    parser.add_argument("--random", type=int, default=1000, help="random projected trials")
    parser.add_argument("--only", type=lambda t: t.split(","), help="arm name prefixes")
    parser.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                        help="masked fine-tune epochs per evaluation (0: one-shot)")  # fmt: skip
    args = parser.parse_args()
    mode = f"{args.finetune} epochs masked fine-tune per trial" if args.finetune else "one-shot"
    torch.set_num_threads(1)
    for key in args.models.split(","):
        label, side, epochs = MODELS[key]
        tests: dict[str, list[float]] = {}
        facts: dict[str, list] = {}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            split = digits(side, seed=seed)
            torch.manual_seed(seed)
            base = LeNet300(side * side) if key == "lenet" else SeedCNN()
            dense = train(base, split.x_train, split.y_train, epochs=epochs, seed=seed)
            val = lambda m, s=split: accuracy(m, s.x_val, s.y_val)  # noqa: E731
            dense_test = accuracy(dense, split.x_test, split.y_test)
            tests.setdefault("dense", []).append(dense_test)
            score = None
            # training rows, never the evaluated ones; the re-fit arms are one-shot only
            calibration = None if args.finetune else split.calibration(128)
            if args.finetune:

                def score(m, s=split, seed=seed):
                    tuned = _masked_finetune(copy.deepcopy(m), s, args.finetune, seed)
                    return accuracy(tuned, s.x_val, s.y_val)

            arms = _arms(dense, val, calibration, args.random, seed, args.only, score)
            for name, (model, seconds) in arms.items():
                if model is not None and args.finetune:  # what was chosen, trained as scored
                    model = _masked_finetune(model, split, args.finetune, seed)
                if model is None:
                    print(f"{label} seed {seed} {name}: failed ({seconds})", flush=True)
                    facts.setdefault(name, []).append("failed")
                    continue
                acc = accuracy(model, split.x_test, split.y_test)
                tests.setdefault(name, []).append(acc)
                facts.setdefault(name, []).append((_sparsity(model), seconds))
                print(f"{label} seed {seed} {name}: test {acc:.3f} val {val(model):.3f} "
                      f"sparsity {_sparsity(model):.3f} {seconds:.1f} s", flush=True)  # fmt: skip
        print(f"\n| {label}, digits, {TARGET:.0%} {mode} | test accuracy (mean ± sd, "
              f"{args.seeds} seeds) | sparsity | seconds |\n|---|---|---|---|")  # fmt: skip
        for name, accs in tests.items():
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            ok = [f for f in facts.get(name, []) if f != "failed"]
            sp = f"{statistics.mean(f[0] for f in ok):.3f}" if ok else ""
            sec = f"{statistics.median(f[1] for f in ok):.1f}" if ok else ""
            failed = len(facts.get(name, [])) - len(ok)
            note = f" ({failed} failed)" if failed else ""
            print(f"| {name} | {statistics.mean(accs):.3f} ± {sd:.3f}{note} | {sp} | {sec} |")


if __name__ == "__main__":
    main()
