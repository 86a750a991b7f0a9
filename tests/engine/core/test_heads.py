"""The output layer is found from the forward pass, not from registration order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbcompress.engine.core.heads import remember_inputs
from nbcompress.engine.core.layers import output_layers, select_layers
from nbcompress.engine.core.validation import as_inputs


class HeadFirst(nn.Module):
    """Registers its classifier before the body, and an unused pooler last."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.norm = nn.LayerNorm(16)
        self.pooler = nn.Linear(16, 16)  # registered last, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x))).log_softmax(-1)


class Branchy(HeadFirst):
    """The same, with data-dependent control flow that torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.sum() > -1e9:  # always true, but a Proxy cannot be a bool
            h = self.norm(h)
        return self.head(h)


class TwoHeads(nn.Module):
    """Returns two outputs from two heads; an in-place op follows one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.a = nn.Linear(16, 2)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x).relu_()
        return self.a(h), self.b(h).relu_()


class Recurrent(nn.Module):
    """An LSTM followed by a Linear head on its last step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)
        self.lstm = nn.LSTM(6, 12, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def _state(model: nn.Module) -> list:
    return [(n, p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()]


def _same(a: list, b: list) -> bool:
    return all(
        n1 == n2 and torch.equal(t1, t2) and g1 == g2 and d1 is None and d2 is None
        for (n1, t1, g1, d1), (n2, t2, g2, d2) in zip(a, b, strict=True)
    )


def test_traced_head_is_the_layer_feeding_the_output_not_the_last_registered() -> None:
    torch.manual_seed(0)
    model = Branchy()  # torch.fx cannot trace it: the forward pass decides
    before = _state(model)
    found = output_layers(model, as_inputs(torch.randn(4, 8)))
    assert found.names == ("head",)
    assert found.how == "traced forward pass" and not found.guessed
    assert _same(before, _state(model))  # no weight, flag or .grad changed


def test_symbolic_trace_finds_the_head_without_an_input() -> None:
    found = output_layers(HeadFirst())
    assert found.names == ("head",)
    assert found.how == "symbolic trace"


def test_untraceable_model_is_guessed_until_an_input_is_seen() -> None:
    torch.manual_seed(0)
    model = Branchy()
    guessed = output_layers(model)
    assert guessed.guessed and guessed.names == ("pooler",)
    assert "guessed" in guessed.describe()
    remember_inputs(model, as_inputs(torch.randn(2, 8)))
    found = output_layers(model)
    assert found.names == ("head",) and found.how == "traced forward pass"
    # The traced answer is kept: a later question without an input gets the same.
    assert output_layers(model).names == ("head",)


def test_every_head_of_a_multi_output_model_and_in_place_ops() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    found = output_layers(model, as_inputs(torch.randn(3, 8)))
    assert found.names == ("a", "b")
    selected, excluded = select_layers(model)
    assert list(selected) == ["body"] and excluded == "a, b"


def test_recurrent_model_head() -> None:
    torch.manual_seed(0)
    model = Recurrent()
    assert output_layers(model, as_inputs(torch.randn(2, 7, 6))).names == ("fc",)


def test_select_layers_leaves_the_traced_head_alone_and_keeps_the_pooler() -> None:
    torch.manual_seed(0)
    model = Branchy()
    remember_inputs(model, as_inputs(torch.randn(2, 8)))
    selected, excluded = select_layers(model)
    assert excluded == "head"
    assert set(selected) == {"body.0", "pooler"}
    selected, excluded = select_layers(model, include_output=True)
    assert excluded is None and "head" in selected


def test_a_failing_forward_falls_back_without_changing_the_model() -> None:
    model = Branchy()
    before = _state(model)
    found = output_layers(model, as_inputs(torch.randn(2, 5)))  # wrong width
    assert found.guessed and found.names == ("pooler",)
    assert _same(before, _state(model))


@pytest.mark.parametrize("grad", [True, False])
def test_tracing_inside_no_grad_and_inference_mode(grad: bool) -> None:
    torch.manual_seed(0)
    model = Branchy()
    ctx = torch.no_grad() if grad else torch.inference_mode()
    with ctx:
        found = output_layers(model, as_inputs(torch.randn(2, 8)))
    assert found.names == ("head",) and found.how == "traced forward pass"


def test_every_output_layer_left_alone_is_named_in_the_prune_report() -> None:
    import nbcompress as nc

    torch.manual_seed(0)
    model = TwoHeads()
    nc.prune_(model, 0.5)
    detail = nc.history(model)[-1].detail
    assert "output layer a (include_output=True)" in detail
    assert "output layer b (include_output=True)" in detail


def test_a_model_that_is_its_own_output_layer_says_so() -> None:
    import nbcompress as nc

    with pytest.raises(ValueError, match=r"only the output layer '\(the model itself\)'"):
        nc.sensitivity(nn.Linear(4, 3), example_inputs=torch.randn(6, 4), ratios=[0.5])


class Stateful(nn.Module):
    """Counts its calls and keeps its last features on ``self``, as real models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.calls, self.last = 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last = torch.relu(self.body(x))
        if self.last.sum() > -1e9:  # data-dependent: torch.fx fails, the forward pass runs
            return self.head(self.last)
        return self.last


@pytest.mark.parametrize("with_input", [False, True])
def test_finding_the_head_leaves_plain_attributes_as_they_were(with_input: bool) -> None:
    torch.manual_seed(0)
    model = Stateful()
    model(torch.randn(2, 8))
    last = model.last
    inputs = as_inputs(torch.randn(2, 8)) if with_input else None
    found = output_layers(model, inputs)
    assert found.names == ("head",) and found.how == (
        "traced forward pass" if with_input else "registration order"
    )
    assert model.calls == 1 and model.last is last


def test_a_glob_of_per_layer_amounts_leaves_every_head_alone() -> None:
    import nbcompress as nc

    torch.manual_seed(0)
    model = TwoHeads()
    nc.prune_(model, {"*": 0.5})
    assert float((model.body.weight == 0).float().mean()) == 0.5
    assert not (model.a.weight == 0).any() and not (model.b.weight == 0).any()


class TiedLM(nn.Module):
    """Logits through the tied embedding (no head Linear), residual blocks before it."""

    def __init__(self, vocab: int = 50, width: int = 16, branchy: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.fc1 = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.branchy = branchy

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for fc in self.fc1:
            h = h + torch.relu(fc(h))
        if self.branchy and h.sum() > -1e9:  # data-dependent: only the forward pass sees it
            h = h * 1.0
        return torch.nn.functional.linear(h, self.emb.weight)


@pytest.mark.parametrize("branchy", [False, True])
def test_a_head_tied_to_the_embedding_is_the_output_layer_not_every_block(branchy: bool) -> None:
    torch.manual_seed(0)
    model = TiedLM(branchy=branchy)
    found = output_layers(model, as_inputs(torch.randint(0, 50, (2, 5))))
    assert found.names == ("emb",)
    selected, excluded = select_layers(model)
    assert set(selected) == {"fc1.0", "fc1.1"} and excluded is None


class ResidualStream(nn.Module):
    """A sentence-encoder-like stack: every block writes into the residual stream, no head."""

    def __init__(self, width: int = 8, blocks: int = 3, branchy: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.fc = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.branchy = branchy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for fc in self.fc:
            h = h + torch.relu(fc(h))
        if self.branchy and h.sum() > -1e9:
            h = h * 1.0
        return self.norm(h).mean(0)


@pytest.mark.parametrize("branchy", [False, True])
def test_in_a_residual_stream_the_last_writer_is_the_output_layer(branchy: bool) -> None:
    """Every block reaches the output through the skips; only the last is the head."""
    torch.manual_seed(0)
    model = ResidualStream(branchy=branchy)
    found = output_layers(model, as_inputs(torch.randn(3, 4)))
    assert found.names == ("fc.2",)
    assert found.how == ("traced forward pass" if branchy else "symbolic trace")
