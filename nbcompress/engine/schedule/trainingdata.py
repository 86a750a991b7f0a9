"""The data and the metric of a training loop: (x, y) tensors or a DataLoader; accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.validation import primary_output
from nbcompress.engine.schedule.finetune_checks import batch_error, data_error

__all__ = ["Batches", "accuracy_metric", "batches", "check_val", "is_pair"]

#: One epoch's batches: called once per epoch.
Batches = Callable[[], Iterator[Any]]


def is_pair(obj: Any) -> bool:
    """Whether ``obj`` is ``(x, y)``: two tensors."""
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and all(map(torch.is_tensor, obj))


def _tensor_batches(train: Sequence[torch.Tensor], batch_size: int, seed: int) -> Batches:
    x, y = train
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"train: x has {len(x)} rows and y {len(y)}; pass (x, y) with one label per input "
            "row (and at least one row)."
        )
    gen = torch.Generator().manual_seed(seed)

    def epoch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]

    return epoch


def batches(train: Any, batch_size: int, seed: int) -> tuple[Batches, int | None]:
    """One epoch's batches, as a function called once per epoch, and their number if known.

    Args:
        train: ``(x, y)`` tensors (shuffled each epoch, seeded) or a re-iterable of
            ``(x, y)`` batches such as a ``DataLoader``.
        batch_size: Rows per batch of ``(x, y)`` tensors.
        seed: Seed of the shuffling of ``(x, y)`` tensors.
    """
    if is_pair(train):
        return _tensor_batches(train, batch_size, seed), math.ceil(len(train[1]) / batch_size)
    loose = isinstance(train, tuple) and not all(isinstance(b, (tuple, list)) for b in train)
    if loose or not isinstance(train, Iterable) or torch.is_tensor(train):
        raise TypeError(
            "train: expected (x, y) tensors (convert arrays with torch.as_tensor) or a "
            f"DataLoader of (x, y) batches, got {type(train).__name__}."
        )
    if iter(train) is train:
        raise TypeError(
            "train: a one-shot iterator runs out after the first epoch; pass a DataLoader, a "
            "list of (x, y) batches, or (x, y) tensors."
        )
    return (lambda: iter(train)), (len(train) if hasattr(train, "__len__") else None)


def accuracy_metric(x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> Callable:
    """A metric ``f(model) -> float``: top-1 accuracy on ``(x, y)``, in eval mode, no grad.

    An error of the model on the first batch is one ``ValueError`` naming ``val``, the
    batch's shape and the fix (:func:`~nbcompress.engine.schedule.finetune_checks.batch_error`).
    """

    @torch.no_grad()
    def accuracy(model: nn.Module) -> float:
        correct = 0
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            try:
                correct += int((primary_output(model(xb)).argmax(1) == yb).sum())
            except Exception as err:
                if i or not data_error(err):  # past the first batch: not the data's shape
                    raise
                raise batch_error("val", xb, yb, err, " (y int64 class indices)") from err
        return correct / len(y)

    return accuracy


def check_val(val: Any) -> tuple[Callable | None, str]:
    """The metric function of ``val`` (a function or (x, y) tensors) and its name."""
    if val is None:
        return None, "metric"
    if is_pair(val):
        if len(val[0]) != len(val[1]) or len(val[0]) == 0:
            raise ValueError(
                f"val: x has {len(val[0])} rows and y {len(val[1])}; pass (x, y) with one "
                "label per row, or a metric function f(model) -> float."
            )
        return accuracy_metric(*val), "accuracy"
    if not callable(val):
        raise TypeError(
            f"val: expected a metric function f(model) -> float or (x, y) tensors, got "
            f"{type(val).__name__}."
        )
    return val, getattr(val, "__name__", "metric")
