"""quantize_ and the magics on recommender-shaped models: tables in int8, undoable."""

import torch
from torch import nn

import nbcompress
from nbcompress.engine.core.history import history, undo_
from nbcompress.engine.quantize.embedding_int8 import Int8Embedding, Int8EmbeddingBag
from tests.engine.embeddings.models import BagModel, TwoTower, pair_batch
from tests.helpers import assert_same_state, snapshot


def test_int8_modes_quantize_the_tables_and_report_them():
    torch.manual_seed(0)
    for mode in ("dynamic", "weight"):
        model = TwoTower().eval()
        x = pair_batch(model)
        saved = snapshot(model)
        nbcompress.quantize_(model, mode, example_inputs=x, repeats=2)
        report = nbcompress.quantize_report(model)
        rows = {r["layer"]: r for r in report.rows}
        assert rows["user"]["backend"] == "nbcompress-int8-rows"
        assert isinstance(model.item, Int8Embedding)
        assert report.cosine > 0.999 and rows["item"]["smaller"] > 2.2
        assert not any("Embedding" in n for n in report.notes if n.startswith("Left in float"))
        undo_(model)
        assert type(model.user) is nn.Embedding
        assert_same_state(model, saved)


def test_row_pruned_then_int8_model_is_4x_smaller_and_undoes_in_two_steps():
    torch.manual_seed(1)
    model = TwoTower(users=2000, items=3000, dim=32).eval()
    x = pair_batch(model)
    saved = snapshot(model)
    before = nbcompress.quantize_report.__globals__["serialized_size"](model)
    nbcompress.prune_embeddings_(model, 0.5)
    nbcompress.quantize_(model, "weight", types=["Embedding"], example_inputs=x, repeats=2)
    report = nbcompress.quantize_report(model)
    assert model.user.stored_rows == 1001
    assert before / report.size_after > 4
    assert [s.name for s in history(model)] == ["prune", "quantize"]
    undo_(model, all=True)
    assert_same_state(model, saved)


def test_embedding_bag_model_with_padding_is_quantized_end_to_end():
    torch.manual_seed(2)
    model = BagModel().eval()
    u, hist = torch.randint(0, 100, (16,)), torch.randint(0, 200, (16, 6))
    ref = model(u, hist)
    nbcompress.quantize_(model, "weight", example_inputs=(u, hist), repeats=2)
    assert isinstance(model.history, Int8EmbeddingBag)
    torch.testing.assert_close(model(u, hist), ref, rtol=0, atol=0.02)


def test_magics_prune_rows_and_quantize_a_two_tower_model(shell):
    torch.manual_seed(3)
    model = TwoTower().eval()
    saved = snapshot(model)
    shell.user_ns.update(model=model, x=pair_batch(model))
    shell.run_line_magic("prune", "model 0.5 --types Embedding --granularity row --input x")
    assert model.user.kept == 150
    report = shell.run_line_magic("quantize", "model int8 --input x --repeats 2")
    assert {"user", "item"} <= set(report.quantized)
    assert model.item.stored_rows == 251
    shell.run_line_magic("undo", "model")
    shell.run_line_magic("undo", "model")
    assert_same_state(model, saved)


def test_a_table_tied_to_the_output_layer_stays_float_with_the_reason():
    torch.manual_seed(4)

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(40, 16)
            self.mid = nn.Linear(16, 16)
            self.out = nn.Linear(16, 40, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.mid(self.embed(tokens))))

    model = TiedLM().eval()
    nbcompress.quantize_(model, "weight", example_inputs=torch.randint(0, 40, (4, 5)), repeats=2)
    report = nbcompress.quantize_report(model)
    assert type(model.embed) is nn.Embedding
    assert "tied to 'out'" in report.skipped["embed"]


def test_half_modes_store_the_tables_in_half_precision():
    torch.manual_seed(5)
    for model, x in (
        (TwoTower().eval(), None),
        (BagModel().eval(), (torch.randint(0, 100, (8,)), torch.randint(0, 200, (8, 4)))),
    ):
        x = x or pair_batch(model)
        ref = model(*x)
        nbcompress.quantize_(model, "fp16", example_inputs=x, repeats=2)
        report = nbcompress.quantize_report(model)
        tables = [r for r in report.rows if "Embedding" in r["type"]]
        assert tables and all(r["backend"] == "half-compute" for r in tables)
        out = model(*x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=0.01)
