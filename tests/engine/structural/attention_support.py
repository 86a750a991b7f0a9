"""Shared steps of the attention-removal tests: remove in one step, check undo, round-trip."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import torch
from torch import nn

from nbcompress.engine.core.history import transaction, undo_
from nbcompress.engine.structural.attention import AttentionPlan, apply_attention, attention_plan
from tests.helpers import assert_same_state, snapshot


def remove(model: nn.Module, **kw) -> tuple[AttentionPlan, list[str]]:
    """Plan and apply in one undoable step, as remove_ does."""
    plan = attention_plan(model, **kw)
    with transaction(model, "remove") as tx:
        notes = apply_attention(model, plan, tx)
    return plan, notes


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def removed_then_undone(
    model: nn.Module, run: Callable[[], torch.Tensor], check: Callable[[], None], **kw
) -> int:
    """Remove (``kw``), run ``check`` on the removed model, undo; return params removed.

    Asserts the output keeps its shape and stays finite, and that undo restores the state
    bit-exactly with the same parameter objects and the same output.
    """
    saved, ids = snapshot(model), [id(p) for p in model.parameters()]
    before = params(model)
    with torch.no_grad():
        ref = run()
    remove(model, **kw)
    try:
        check()
        gone = before - params(model)
        with torch.no_grad():
            out = run()
        assert out.shape == ref.shape and torch.isfinite(out).all()
    finally:
        undo_(model)
    assert_same_state(model, saved)
    assert [id(p) for p in model.parameters()] == ids
    with torch.no_grad():
        assert torch.equal(run(), ref)
    return gone


def round_trips(model: nn.Module) -> list[nn.Module]:
    """``model`` through copy.deepcopy, pickle and torch.save / torch.load."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return [
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(buf, weights_only=False),
    ]


def with_heads_zeroed(
    model: nn.Module, plan: AttentionPlan, out_weight: Callable[[nn.Module], torch.Tensor]
) -> nn.Module:
    """A copy of ``model`` whose planned heads have zero output-projection columns.

    ``out_weight`` maps an attention module of the plan to its output projection weight.
    """
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for cut in plan.heads:
            weight, d = out_weight(zeroed.get_submodule(cut.site.module)), cut.site.head_dim
            for h in cut.removed:
                weight[:, h * d : (h + 1) * d] = 0
    return zeroed
