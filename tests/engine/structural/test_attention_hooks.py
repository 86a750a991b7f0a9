"""A user's hooks on an nn.MultiheadAttention survive its replacement by head removal, and undo."""

import torch
from torch import nn

from nbcompress.engine.core.history import undo_
from nbcompress.engine.structural.mha import PrunedMultiheadAttention
from tests.engine.structural.attention_support import remove


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def hooked():
    """An encoder whose attention has forward, pre-forward (one with kwargs) and backward hooks."""
    torch.manual_seed(0)
    model = Encoder().eval()
    calls = []
    attn = model.attn
    attn.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m).__name__)))
    attn.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(("pre-kw", sorted(kwargs))), with_kwargs=True
    )
    attn.register_forward_hook(lambda m, args, out: calls.append(("fwd", out[0].shape[-1])))
    attn.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(("fwd-kw", kwargs["need_weights"])),
        with_kwargs=True,
        always_call=True,
    )
    attn.register_full_backward_hook(lambda m, gin, gout: calls.append(("bwd", len(gout))))
    return model, calls


def run(model, calls):
    calls.clear()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    return list(calls)


def test_hooks_carried_to_the_replacement_in_order_with_their_flags():
    model, calls = hooked()
    original = model.attn
    want = run(model, calls)
    assert [c[0] for c in want] == ["pre", "pre-kw", "fwd", "fwd-kw", "bwd"]
    _, notes = remove(model, heads=0.5)
    assert isinstance(model.attn, PrunedMultiheadAttention)
    got = run(model, calls)
    # Same hooks, same order, same kwargs flags; the module passed is the replacement.
    assert got == [("pre", "PrunedMultiheadAttention"), *want[1:]]
    assert any("5 hook(s)" in n and "carried over" in n for n in notes)
    assert model.attn._forward_hooks_always_called == original._forward_hooks_always_called
    undo_(model)
    assert model.attn is original
    assert run(model, calls) == want  # each hook once, on the original again


def test_no_note_without_hooks_and_state_dict_hooks_carried():
    torch.manual_seed(0)
    model = Encoder().eval()
    _, notes = remove(model, heads=0.5)
    assert not any("hook" in n for n in notes)
    undo_(model)
    seen = []
    model.attn._register_state_dict_hook(lambda m, sd, prefix, local: seen.append(prefix))
    remove(model, heads=0.5)
    seen.clear()
    model.state_dict()
    assert seen == ["attn."]
