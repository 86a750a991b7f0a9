"""What a training loop checks beyond its arguments: the first batch, the metric, zero weights.

A batch of the wrong shape or dtype only shows itself inside the model's forward or the loss,
as an error about ``mat1 and mat2`` that names neither the argument nor the fix.
:func:`batch_error` turns such an error on the first batch (before any optimizer step, so the
model is untouched) into one line naming the argument, the batch and the fix;
:func:`metric_value` does the same for a metric that returns no number. Weights left at zero
by a one-shot prune without kept masks come back to life in training:
:func:`warn_unmasked_zeros` says so before it starts.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import torch
from torch import nn

from nbcompress.engine.core.layers import (
    PRUNABLE_TYPES,
    prunable_weights,
    weighted_layers,
)
from nbcompress.engine.core.validation import describe_inputs
from nbcompress.engine.prune.apply import is_masked

__all__ = [
    "UNMASKED_ZEROS",
    "batch_error",
    "data_error",
    "describe_batch",
    "metric_value",
    "warn_unmasked_zeros",
    "zero_fraction",
    "zero_fractions",
]

#: Characters of the original error's message kept in :func:`batch_error`'s one line.
MAX_DETAIL = 200

#: Fraction of exactly-zero, unmasked prunable weights above which training warns that it
#: will revive them (a trained dense layer has next to none).
UNMASKED_ZEROS = 0.10


def data_error(err: BaseException) -> bool:
    """Whether ``err`` is how torch (or a loss) refuses a batch's shape, dtype or labels.

    The exception types ``run_forward`` treats as a model's refusal of its input. Running
    out of memory is about the batch's size, and any other type (a ``KeyError`` in a model's
    forward) is left as raised, for the caller to place in the user's code.
    """
    common = (RuntimeError, ValueError, TypeError, IndexError)
    return isinstance(err, common) and not isinstance(err, torch.OutOfMemoryError)


def describe_batch(x: Any, y: Any) -> str:
    """A batch for a message, e.g. ``x of shape (64, 5), y int64``."""
    if torch.is_tensor(x):
        kind = "" if x.dtype == torch.get_default_dtype() else f" {_dtype(x)}"
        xs = f"x of shape {tuple(x.shape)}{kind}"
    else:
        xs = f"x {describe_inputs((x,))}"
    if torch.is_tensor(y):
        shape = "" if y.dim() == 1 else f" of shape {tuple(y.shape)}"
        ys = f"y {_dtype(y)}{shape}"
    else:
        ys = f"y {type(y).__name__}"
    return f"{xs}, {ys}"


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def batch_error(arg: str, x: Any, y: Any, err: BaseException, hint: str = "") -> ValueError:
    """One line for an error of the model (or loss) on the first batch ``(x, y)`` of ``arg``.

    Args:
        arg: The argument the batch came from (``"train"``, ``"val"``).
        x: The batch's input.
        y: The batch's target.
        err: What the forward or the loss raised; its message is put on one line and cut
            to ``MAX_DETAIL`` characters.
        hint: Appended to the fix, e.g. ``" (y int64 class indices …)"``.

    Returns:
        The ``ValueError`` to raise ``from err``.
    """
    text = " ".join(str(err).split()).rstrip(".")  # the fix follows after a semicolon
    if len(text) > MAX_DETAIL:
        text = text[: MAX_DETAIL - 1].rstrip() + "…"
    detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return ValueError(
        f"{arg}: the model failed on the first batch ({describe_batch(x, y)}): {detail}; "
        f"pass (x, y) shaped like a real batch{hint}."
    )


def metric_value(value: Any) -> float:
    """A metric's result as a float: a number or a one-element tensor or array.

    Raises:
        TypeError: Anything else (``None``, a string, a list), in one line naming ``val``.
    """
    if isinstance(value, numbers.Real):
        return float(value)
    if (torch.is_tensor(value) and value.numel() == 1) or (
        callable(getattr(value, "item", None)) and getattr(value, "size", None) == 1
    ):
        return float(value.item())
    raise TypeError(
        f"val: the metric returned {type(value).__name__}; return a number (e.g. accuracy as "
        "a float)."
    )


def zero_fractions(model: nn.Module) -> tuple[float, float]:
    """Zero weights over the Linear/Conv weights: all of them, and those without a kept mask.

    One pass (a training loop calls it per epoch, so it stays cheap): the first fraction is
    the model's sparsity; the second counts only zeros a training step would revive.
    """
    zeros = loose = total = 0
    with torch.no_grad():
        for module in weighted_layers(model).values():
            if isinstance(module, PRUNABLE_TYPES):
                for path, w in prunable_weights(module).items():
                    n = w.numel() - int(torch.count_nonzero(w))
                    zeros, total = zeros + n, total + w.numel()
                    owner, _, leaf = path.rpartition(".")
                    kept = is_masked(module.get_submodule(owner) if owner else module, leaf)
                    loose += 0 if kept else n
    return (zeros / total, loose / total) if total else (0.0, 0.0)


def zero_fraction(model: nn.Module) -> float:
    """Fraction of zero weights over the model's Linear/Conv weights (0.0 without any)."""
    return zero_fractions(model)[0]


def warn_unmasked_zeros(model: nn.Module, stacklevel: int = 2) -> float:
    """Warn once when training would revive a one-shot prune that kept no masks.

    Returns:
        The model's zero fraction (all weights), which the caller shows as the sparsity.
    """
    sparsity, fraction = zero_fractions(model)
    if fraction > UNMASKED_ZEROS:
        warnings.warn(
            f"train: {fraction:.0%} of the Linear/Conv weights are zero but not masked, and "
            "training will make them non-zero; prune with keep_masks=True (%prune ... "
            "--keep-masks) or pass a GradualPruner to keep them at zero.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return sparsity
