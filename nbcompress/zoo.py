"""Real offline data and small reference models for the demo, examples and benchmarks.

The data is scikit-learn's bundled handwritten digits (1,797 real 8×8 scans), so nothing
is downloaded. Models follow the seed design: a three-conv CNN for 28×28×1 input and
LeNet-300-100 for flattened 8×8 input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.progress import Progress

__all__ = [
    "Digits",
    "LeNet300",
    "SeedCNN",
    "accuracy",
    "load_digits",
    "train",
]


@dataclass(frozen=True)
class Digits:
    """Train/test split of the digits data as tensors (images in [0, 1])."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(size: int = 28, *, test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """Load scikit-learn's handwritten digits, upscaled to ``size``×``size``, split by seed.

    Args:
        size: Image side; 8 keeps the originals, 28 matches MNIST-style CNNs.
        test_fraction: Held-out share of the 1,797 images.
        seed: Shuffle seed for the split.

    Returns:
        Tensors shaped ``(N, 1, size, size)`` float32 and ``(N,)`` int64 labels.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits data comes from scikit-learn: pip install 'nbcompress[demo]'."
        ) from err
    bunch = _sk_load()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(round(test_fraction * len(y)))
    return Digits(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


class SeedCNN(nn.Sequential):
    """Conv 32 3×3 → MaxPool → Conv 64 3×3 → MaxPool → Conv 64 3×3 → classifier (28×28×1 in)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )


class LeNet300(nn.Sequential):
    """LeNet-300-100: two hidden fully connected layers (300, 100) on flattened input."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (training mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool | Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy; return it (in eval mode).

    Args:
        model: The model to train in place.
        x: Inputs.
        y: Integer labels.
        epochs: Passes over the data.
        lr: Adam learning rate.
        batch_size: Mini-batch size.
        seed: Seed for the mini-batch order.
        progress: ``None`` (default) shows progress (batches, rate, ETA, the last epoch's
            loss) once training has run for 2 s: a live bar in a notebook, a line every
            few seconds on stdout elsewhere. ``True`` shows it from the start, ``False``
            never; a callable gets ``(epoch, loss)`` after each epoch instead.

    Returns:
        The trained model.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    per_epoch = -(-len(y) // batch_size)
    shown = progress is not False and not callable(progress)
    bar = Progress(
        epochs * per_epoch, "train", "batch", delay=0 if progress else 2.0, enabled=shown
    )
    model.train()
    with bar:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(y), generator=gen)
            total = 0.0
            for i in range(0, len(y), batch_size):
                idx = order[i : i + batch_size]
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                bar.update()
            if callable(progress):
                progress(epoch, total / len(y))
            bar.note = f"epoch {epoch}/{epochs}, loss {total / len(y):.4f}"
    model.eval()
    return model
