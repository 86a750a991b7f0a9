"""The demo behind ``python -m nbcompress demo``: train, summarise, prune, fine-tune, compare."""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from nbcompress.engine.core.compare import compare_change
from nbcompress.engine.core.summary import summary
from nbcompress.engine.prune.prune import prune_, remove_masks_
from nbcompress.zoo import SeedCNN, accuracy, load_digits, train

__all__ = ["run_demo"]


def _say(text: str) -> None:
    print(text, flush=True)


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

    accuracies: dict[str, float] = {}

    def prune_and_finetune(m: nn.Module) -> None:
        _say(f"\nPruning {amount:.0%} of each layer's weights by L1 magnitude (masks kept) …")
        prune_(m, amount, keep_masks=True)
        accuracies["pruned"] = accuracy(m, data.x_test, data.y_test)
        _say(f"Test accuracy right after pruning: {accuracies['pruned']:.2%}")
        tune = max(1, epochs // 3)
        _say(f"Fine-tuning {tune} epoch(s) with masks kept (pruned weights stay zero) …")
        train(m, data.x_train, data.y_train, epochs=tune, lr=5e-4, seed=1, progress=True)
        remove_masks_(m)

    # The dense model is copied and timed side by side with the pruned one at the end.
    report = compare_change(
        model,
        prune_and_finetune,
        x,
        title="Before/after: {detail}",
        notes=[
            "Sizes are CSR estimates; dense storage is unchanged until sparse kernels are used."
        ],
        before=before,
    )
    acc_pruned, acc_tuned = accuracies["pruned"], accuracy(model, data.x_test, data.y_test)
    after = report.after
    _say("\n" + str(report))
    figures = {
        "accuracy_dense": acc_dense,
        "accuracy_pruned": acc_pruned,
        "accuracy_finetuned": acc_tuned,
        "sparsity": after.totals["sparsity"],
        "csr_bytes_before": before.totals["CSR (est.)"],
        "csr_bytes_after": after.totals["CSR (est.)"],
        "latency_before": before.latency.median,
        "latency_after": after.latency.median,
    }
    _say(
        f"\nTest accuracy: dense {acc_dense:.2%} → pruned {acc_pruned:.2%} → fine-tuned "
        f"{acc_tuned:.2%}; sparsity {figures['sparsity']:.1%}; CSR size "
        f"{figures['csr_bytes_before'] / 1024:.0f} → {figures['csr_bytes_after'] / 1024:.0f} KiB; "
        f"latency {before.latency.ms:.2f} → {after.latency.ms:.2f} ms (dense kernels: zeros alone "
        "do not speed it up — see %speedup). "
        f"Undo with nbcompress.undo_(model, all=True). Total {time.perf_counter() - start:.0f} s."
    )
    sys.stdout.flush()
    return figures
