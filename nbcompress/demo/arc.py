"""``run_demo``: the whole compression arc on the seed CNN, every figure measured in the run.

Train → sensitivity sweep and its checked suggestion at a high sparsity → prune to it with
masks kept → fine-tune with the masks → sparse kernels where measured faster → static int8,
packed for the torch engine measured not slower than dense at batch 64 and at batch 1
(:mod:`nbcompress.demo.engines`) → a final table of test accuracy, serialized size and
latency, dense vs compressed. Ratios are chosen on a validation split of the training
images; the test images are only used to report.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from nbcompress.demo.engines import NOISE, tradeoff
from nbcompress.demo.final import FinalTable, measure_final
from nbcompress.demo.log import StepLog
from nbcompress.demo.steps import (
    EngineTiming,
    Split,
    fine_tune,
    int8,
    prune_with_masks,
    sparse_kernels,
    suggest,
    train_dense,
)
from nbcompress.engine.core.report import fmt_bytes
from nbcompress.engine.quantize.report import serialized_size
from nbcompress.zoo import accuracy, load_digits

__all__ = ["DemoInputError", "DemoSettings", "run_demo"]

#: Accuracy the compressed model may lose against dense, in points (issue 16's target).
MAX_LOSS_POINTS = 1.0


class DemoInputError(ValueError):
    """A bad argument of the demo, found before anything runs (the message names it)."""


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; :meth:`quick` is the small setting of the tests.

    Attributes:
        epochs: Training epochs of the dense model.
        finetune_epochs: Fine-tuning epochs after pruning (masks kept).
        target: Sparsity of the suggestion, over the layers it prunes.
        batch: The batch the sparse kernels and int8 backends are chosen on, and timed.
        ratios: Ratios of the sensitivity sweep (``None``: the package's default grid).
        rounds: Timed rounds of the final dense-vs-compressed race per batch size.
        calibration: Training images that calibrate static int8.
        validation: Training images held out to choose the ratios and watch fine-tuning.
        engines: torch int8 engines the int8 step tries (those this torch supports), each
            timed against dense at every reported batch (see :mod:`nbcompress.demo.engines`).
    """

    epochs: int = 8
    finetune_epochs: int = 3
    target: float = 0.9
    batch: int = 64
    ratios: tuple[float, ...] | None = None
    rounds: int = 15
    calibration: int = 256
    validation: int = 270
    engines: tuple[str, ...] = ("x86", "fbgemm")

    def __post_init__(self) -> None:
        if not 0 < self.target < 1:
            raise DemoInputError(
                f"target: expected a sparsity in (0, 1) such as 0.9, got {self.target}."
            )
        for name in ("epochs", "finetune_epochs", "batch", "calibration", "validation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DemoInputError(f"{name}: expected a positive integer, got {value!r}.")
        if self.rounds < 3:
            raise DemoInputError(f"rounds: expected at least 3 timed rounds, got {self.rounds}.")

    @classmethod
    def quick(cls) -> DemoSettings:
        """The same steps with fewer epochs, ratios and timed rounds (for tests)."""
        return cls(epochs=3, finetune_epochs=1, ratios=(0.5, 0.8, 0.9, 0.95), rounds=5)


def _split(validation: int) -> Split:
    data = load_digits(28)
    n = len(data.y_train) - validation
    return Split(
        data.x_train[:n],
        data.y_train[:n],
        data.x_train[n:],
        data.y_train[n:],
        data.x_test,
        data.y_test,
    )


def run_demo(
    *,
    epochs: int | None = None,
    threads: int | None = 1,
    target: float | None = None,
    batch: int | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """Train the seed CNN on real digits and compress it end to end, printing each step.

    Args:
        epochs: Training epochs (default 8; 3 with ``quick``).
        threads: Torch thread count for the run, restored at the end (``None`` keeps
            torch's default, all cores). One by default: this small CNN gains little from
            more, and on a busy machine threads that wait for each other made every step
            several times slower here (8 epochs: 105 s on 2 threads at load 10, 12 s on 1).
        target: Sparsity the suggestion prunes to (default 0.9).
        batch: Batch size the kernels are chosen on and the latency is reported for
            (default 64; batch 1 is always timed too).
        quick: Small settings for a test (fewer epochs, ratios and timed rounds).

    Returns:
        The measured figures: accuracies after each step, sizes, latencies, ratios, the
        final table (``"table"``), the compressed model (``"model"``, every step undoable)
        and the trained dense model it started from (``"dense"``).
    """
    settings = DemoSettings.quick() if quick else DemoSettings()
    overrides = {"epochs": epochs, "target": target, "batch": batch}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise DemoInputError(f"threads: expected a positive integer such as 1, got {threads!r}.")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _arc(settings)
    finally:
        torch.set_num_threads(before)


def _arc(s: DemoSettings) -> dict[str, Any]:
    data = _split(s.validation)
    if s.batch > len(data.y_test):
        raise DemoInputError(
            f"batch: at most {len(data.y_test)} (the test images it is timed on), got {s.batch}."
        )
    log = StepLog(total=7)
    log.say(
        f"Data: scikit-learn's handwritten digits at 28×28 — {len(data.y_train)} train, "
        f"{len(data.y_val)} validation (choose ratios), {len(data.y_test)} test (report).",
        0,
    )
    log.say(_machine(), 0)

    def val_accuracy(model: torch.nn.Module) -> float:
        return accuracy(model, data.x_val, data.y_val)

    x = data.x_test[: s.batch]
    batches = [s.batch] if s.batch == 1 else [s.batch, 1]
    figures: dict[str, Any] = {"settings": s}
    with log.step(f"Train the seed CNN for {s.epochs} epochs"):
        model = train_dense(log, data, s.epochs)
        dense = copy.deepcopy(model)  # the reference of the final table, never changed
        figures["accuracy_dense"] = acc = data.test_accuracy(model)
        log.say(f"test accuracy {acc:.2%}; serialized {fmt_bytes(serialized_size(model))}")
    with log.step(f"Sensitivity sweep and its suggestion for {s.target:.0%} sparsity"):
        ratios = list(s.ratios) if s.ratios else None
        choice = suggest(log, model, val_accuracy, s.target, ratios)
        figures["ratios"] = dict(choice.ratios)
    with log.step("Prune to the suggestion, masks kept"):
        figures["accuracy_pruned"] = prune_with_masks(log, model, choice, data)
    with log.step(f"Fine-tune {s.finetune_epochs} epoch(s) with the masks (finetune)"):
        figures["accuracy_finetuned"] = fine_tune(log, model, data, s.finetune_epochs)
    with log.step(f"Sparse kernels where measured faster at batch {s.batch} (sparsify_)"):
        figures["speedup_report"] = sparse_kernels(log, model, x)
    engines = _engines(s.engines)
    with log.step(f"int8: quantize_ static, engine ({', '.join(engines)}) measured at batch "
                  + " and ".join(map(str, batches))):  # fmt: skip
        timing = EngineTiming(dense, {b: data.x_test[:b] for b in batches}, engines, s.rounds)
        report, chosen, trials = int8(log, model, data, val_accuracy, s.calibration, timing)
        figures["quantize_report"], figures["engine"] = report, chosen
        figures["engine_trials"] = trials
    with log.step("Measure dense vs compressed"):
        accuracies = (figures["accuracy_dense"], data.test_accuracy(model))
        table = measure_final(dense, model, data.x_test, accuracies, batches, s.rounds)
    log.say("\n" + str(table), 0)
    sparse = figures["speedup_report"].applied
    trade = tradeoff(trials, chosen, s.batch)
    verdict = _verdict(table, s.batch, sparse, trade)
    log.say("\n" + verdict + f" Total {log.elapsed:.0f} s.", 0)
    log.say(_machine(), 0)
    return {**figures, **_final_figures(table), "table": table, "model": model, "dense": dense}


def _engines(wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The wanted int8 engines this torch supports (else its current one)."""
    supported = torch.backends.quantized.supported_engines
    return tuple(e for e in wanted if e in supported) or (torch.backends.quantized.engine,)


def _machine() -> str:
    """Cores, torch threads and load: the context every measured time depends on."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    line = f"Machine: {cores} cores, {threads} torch thread(s)"
    if load is None:
        return line + "."
    line += f", load average {load:.1f}."
    if load > cores and threads > 1:
        line += (
            " Busy (load above the cores): threads wait for each other, so steps run slower "
            "and times are noisier; --threads 1 avoids the waiting."
        )
    return line


def _final_figures(table: FinalTable) -> dict[str, Any]:
    return {
        "accuracy_compressed": table.accuracy[1],
        "bytes_dense": table.size[0],
        "bytes_compressed": table.size[1],
        "smaller": table.smaller,
        "latency": table.latency,
        "speedup": table.speedup,
    }


def _verdict(table: FinalTable, batch: int, sparse: bool, trade: str | None = None) -> str:
    """The headline in words, from the measured figures (nothing claimed that was not)."""
    loss = -table.accuracy_change
    kept = "within" if loss <= MAX_LOSS_POINTS else "MORE than"
    speed = ", ".join(f"{g:.2f}× the speed at batch {b}" for b, g in table.speedup.items())
    line = (
        f"Compressed: {table.smaller:.2f}× smaller, {speed}, test accuracy {kept} "
        f"{MAX_LOSS_POINTS:g} point of dense ({table.accuracy_change:+.1f})."
    )
    one = table.speedup.get(1)
    if one is not None and batch != 1 and one < 1:
        line += (
            f" At batch 1 it is SLOWER than dense ({one:.2f}×): on one 28×28 image the fixed "
            "cost of each int8 call outweighs what it saves; serve this model batched."
            if one < 1 - NOISE
            else f" At batch 1 it is about as fast as dense ({one:.2f}×, within noise)."
        )
    if trade:
        line += " " + trade
    if not sparse:
        line += (
            " The zeros are not what made it smaller or faster here: no layer measured faster "
            "on the sparse kernels (step 5), and static int8 packs its weights dense."
        )
    return line + (
        " Every step is recorded: nbcompress.undo_(model, all=True) on the model run_demo() "
        "returns gives the trained dense model back, bit-exactly."
    )
