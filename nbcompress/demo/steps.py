"""The demo's steps, each one call (or two) of nbcompress's public API and what it printed.

Every step prints what it measured; the figures it returns feed the final table. The demo
never times or sizes anything itself except in :mod:`nbcompress.demo.final`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nbcompress.demo.engines import EngineTrial, choose_engine
from nbcompress.demo.log import StepLog
from nbcompress.engine.core.report import fmt_bytes, fmt_pct
from nbcompress.engine.prune.prune import remove_masks_
from nbcompress.engine.quantize.config import StaticInt8Config
from nbcompress.engine.quantize.quantize import QuantizeReport, quantize_, quantize_report
from nbcompress.engine.schedule.finetune import finetune
from nbcompress.engine.sensitivity.suggestion import Suggestion, prune_to_suggestion_
from nbcompress.engine.sensitivity.sweep import sensitivity
from nbcompress.engine.speedup.speedup import SpeedupReport, speedup
from nbcompress.kernels.modules import SparseConv2d, SparseLinear
from nbcompress.zoo import SeedCNN, accuracy, train

__all__ = [
    "EngineTiming",
    "Split",
    "fine_tune",
    "int8",
    "prune_with_masks",
    "sparse_kernels",
    "suggest",
    "train_dense",
    "zero_share",
]


@dataclass(frozen=True)
class EngineTiming:
    """How the int8 step times its engines: against ``dense``, on each batch of ``inputs``.

    Attributes:
        dense: The trained dense model (the reference).
        inputs: Batch size → test batch; the first is the serving batch.
        engines: torch quantized engines to try, in order.
        rounds: Interleaved timed rounds per batch.
    """

    dense: nn.Module
    inputs: dict[int, torch.Tensor]
    engines: tuple[str, ...]
    rounds: int


@dataclass(frozen=True)
class Split:
    """Train / validation / test tensors: ratios are chosen on validation, reported on test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def test_accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy on the held-out test images."""
        return accuracy(model, self.x_test, self.y_test)


def zero_share(model: nn.Module, names: list[str]) -> float:
    """Fraction of exactly-zero weights over the named layers (the pruned ones)."""
    layers = dict(model.named_modules())
    weights = [layers[n].weight.detach() for n in names]
    return sum(int(w.eq(0).sum()) for w in weights) / sum(w.numel() for w in weights)


def train_dense(log: StepLog, data: Split, epochs: int) -> nn.Module:
    """Train the seed CNN from a fixed seed, one line per epoch."""
    torch.manual_seed(0)
    model = SeedCNN()

    def epoch_line(epoch: int, loss: float) -> None:
        log.say(f"epoch {epoch}/{epochs}  loss {loss:.4f}  ({log.elapsed:.1f} s)")

    train(model, data.x_train, data.y_train, epochs=epochs, progress=epoch_line)
    return model


def suggest(
    log: StepLog,
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    target: float,
    ratios: list[float] | None,
) -> Suggestion:
    """Sweep every prunable layer alone, then the checked suggestion at ``target``."""
    result = sensitivity(model, evaluate, ratios=ratios, progress=True)
    log.say(
        f"{len(result.layers)} layers × {len(result.ratios)} ratios: {result.evaluations} "
        f"evaluations in {result.seconds:.1f} s (output layer left alone)"
    )
    # The default path: the curves' choice is measured against uniform and global L1 at
    # the same sparsity (each also with its kept weights re-fitted) and the best is kept.
    choice = result.suggest(target)
    log.say(str(choice))
    return choice


def prune_with_masks(log: StepLog, model: nn.Module, choice: Suggestion, data: Split) -> float:
    """Prune to the suggestion's ratios as the suggestion applies them, masks kept."""
    prune_to_suggestion_(model, choice, keep_masks=True)  # fine-tuning must not revive zeros
    acc = data.test_accuracy(model)
    share = zero_share(model, [n for n, r in choice.ratios.items() if r > 0])
    log.say(f"{fmt_pct(share)} of the pruned layers' weights are zero; test accuracy {acc:.2%}")
    return acc


def fine_tune(log: StepLog, model: nn.Module, data: Split, epochs: int) -> float:
    """Fine-tune with the masks kept, then make them permanent."""
    val = (data.x_val, data.y_val)
    finetune(model, (data.x_train, data.y_train), epochs, lr=5e-4, val=val, plot=False)
    remove_masks_(model)
    acc = data.test_accuracy(model)
    log.say(f"test accuracy {acc:.2%} (masks made permanent: plain weights with zeros)")
    return acc


def sparse_kernels(log: StepLog, model: nn.Module, x: torch.Tensor) -> SpeedupReport:
    """``sparsify_`` through ``speedup(apply=True)``: its per-layer report says why.

    Sparse int8 values are allowed: a layer kept on a sparse kernel is out of reach of the
    int8 step that follows (static int8 converts ``nn.Conv2d``/``nn.Linear`` only).
    """
    with warnings.catch_warnings():
        # "left dense" is a result here, printed below, not a warning to the user.
        warnings.filterwarnings("ignore", message="sparsify_:", category=UserWarning)
        # Pruned element-wise, so no 4×1 blocks for the block-sparse kernels to use: not
        # timing them saves their compilation (~10 s on a cold numba cache).
        report = speedup(model, x, apply=True, allow_int8=True, allow_bsr=False)
    for row in report.rows:
        log.say(f"{row['layer']:<13} {fmt_pct(row['sparsity']):>6} zeros: {row['why']}")
    log.say(report.outcome)
    return report


def int8(
    log: StepLog,
    model: nn.Module,
    data: Split,
    evaluate: Callable[[nn.Module], float],
    calibration: int,
    timing: EngineTiming,
) -> tuple[QuantizeReport, EngineTrial, list[EngineTrial]]:
    """Static int8 (Conv+ReLU fused, activations int8 between layers), calibrated on train.

    Packed for each engine of ``timing`` in turn and timed against dense at each batch
    (:func:`~nbcompress.demo.engines.choose_engine`); the model keeps the one chosen.
    """
    serving = next(iter(timing.inputs.values()))

    def quantize(config: StaticInt8Config) -> None:
        # quantize_ keeps torch's TypedStorage warning to itself (report.storage_quiet).
        quantize_(
            model,
            config,
            calibrate=data.x_train[:calibration],
            example_inputs=serving,
            evaluate=evaluate,
        )

    chosen, trials = choose_engine(
        model, timing.dense, quantize, timing.inputs, timing.engines, timing.rounds, log.say
    )
    report = quantize_report(model)
    log.say(report.title)
    for name, module in model.named_modules():
        if isinstance(module, (SparseConv2d, SparseLinear)):
            log.say(f"{name:<13} stays on its sparse kernel ({module.format})")
    for row in report.rows:
        log.say(f"{row['layer']:<13} {row.get('backend') or 'float'}  {row.get('note') or ''}")
    cosine = "" if report.cosine is None else f"; output cosine to float {report.cosine:.5f}"
    log.say(
        f"serialized {fmt_bytes(report.size_before)} → {fmt_bytes(report.size_after)}; "
        f"validation accuracy {report.metric_before:.2%} → {report.metric_after:.2%}{cosine}"
    )
    return report, chosen, trials
