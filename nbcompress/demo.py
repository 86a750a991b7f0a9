"""The demo behind ``python -m nbcompress demo``: train, summarise, prune, fine-tune, compare."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.compare import Comparison, compare_change
from nbcompress.engine.core.summary import summary
from nbcompress.engine.prune.prune import prune_, remove_masks_
from nbcompress.zoo import SeedCNN, accuracy, load_digits, train

__all__ = ["run_demo"]


def _say(text: str) -> None:
    print(text, flush=True)


class _PruneAndFinetune:
    """The demo's change: prune by L1 with masks kept, fine-tune, make the masks permanent."""

    def __init__(self, data: Any, amount: float, epochs: int) -> None:
        self.data, self.amount, self.epochs = data, amount, epochs
        self.accuracy = float("nan")  # right after pruning, before fine-tuning

    def __call__(self, model: nn.Module) -> None:
        data = self.data
        _say(f"\nPruning {self.amount:.0%} of each layer's weights by L1 magnitude (masks kept) …")
        prune_(model, self.amount, keep_masks=True)
        self.accuracy = accuracy(model, data.x_test, data.y_test)
        _say(f"Test accuracy right after pruning: {self.accuracy:.2%}")
        _say(f"Fine-tuning {self.epochs} epoch(s) with masks kept (pruned weights stay zero) …")
        train(model, data.x_train, data.y_train, epochs=self.epochs, lr=5e-4, seed=1, progress=True)
        remove_masks_(model)


def run_demo(*, epochs: int = 8, amount: float = 0.5, threads: int | None = None) -> dict:
    """Train the seed CNN on real digits, prune it by L1, fine-tune with masks, report.

    Args:
        epochs: Training epochs before pruning (fine-tuning uses a third of them).
        amount: Fraction of weights removed from each layer except the classifier.
        threads: Torch thread count (``None`` keeps torch's default).

    Returns:
        The headline figures (accuracies, sparsity, sizes, latencies).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    data = load_digits(28)
    _say(
        f"Data: scikit-learn handwritten digits upscaled to 28×28 — {len(data.y_train)} train, "
        f"{len(data.y_test)} held-out test images."
    )
    model = SeedCNN()
    _say(f"Training the seed CNN for {epochs} epochs …")
    train(model, data.x_train, data.y_train, epochs=epochs, progress=True)
    acc_dense = accuracy(model, data.x_test, data.y_test)
    x = data.x_test[:64]
    before = summary(model, x)
    _say(f"\nTest accuracy (dense): {acc_dense:.2%}\n")
    _say(str(before))

    # The dense model is copied and timed side by side with the pruned one at the end.
    tuning = _PruneAndFinetune(data, amount, max(1, epochs // 3))
    report = compare_change(
        model,
        tuning,
        x,
        title="Before/after: {detail}",
        notes=[
            "Sizes are CSR estimates; dense storage is unchanged until sparse kernels are used."
        ],
        before=before,
    )
    _say("\n" + str(report))
    accuracies = (acc_dense, tuning.accuracy, accuracy(model, data.x_test, data.y_test))
    figures = _figures(report, *accuracies)
    _say(_headline(figures, report) + f" Total {time.perf_counter() - start:.0f} s.")
    sys.stdout.flush()
    return figures


def _figures(report: Comparison, dense: float, pruned: float, tuned: float) -> dict:
    before, after = report.before, report.after
    return {
        "accuracy_dense": dense,
        "accuracy_pruned": pruned,
        "accuracy_finetuned": tuned,
        "sparsity": after.totals["sparsity"],
        "csr_bytes_before": before.totals["CSR (est.)"],
        "csr_bytes_after": after.totals["CSR (est.)"],
        "latency_before": before.latency.median,
        "latency_after": after.latency.median,
    }


def _headline(f: dict, report: Comparison) -> str:
    return (
        f"\nTest accuracy: dense {f['accuracy_dense']:.2%} → pruned {f['accuracy_pruned']:.2%} → "
        f"fine-tuned {f['accuracy_finetuned']:.2%}; sparsity {f['sparsity']:.1%}; CSR size "
        f"{f['csr_bytes_before'] / 1024:.0f} → {f['csr_bytes_after'] / 1024:.0f} KiB; "
        f"latency {report.before.latency.ms:.2f} → {report.after.latency.ms:.2f} ms (dense "
        "kernels: zeros alone do not speed it up — see %speedup). "
        "Undo with nbcompress.undo_(model, all=True)."
    )
