"""Where a model's attention heads and feed-forward neurons are, and how much each one weighs.

Two attention families are recognised:

* ``"torch"``: ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` /
  ``nn.TransformerDecoderLayer`` and torchvision's ViT) and :class:`PrunedMultiheadAttention`;
* ``"bert"``: a Hugging Face BERT-style attention: a module whose ``self`` holds
  ``query``/``key``/``value`` Linear layers and ``num_attention_heads`` /
  ``attention_head_size`` / ``all_head_size``, and whose ``output.dense`` projects back.

Feed-forward pairs (``fc1`` → elementwise → ``fc2``) are looked for in the blocks that hold
an attention: ``linear1``/``linear2`` (torch), ``intermediate.dense``/``output.dense``
(BERT) and a ``Sequential`` of Linear, activations/dropout, Linear (torchvision's MLPBlock).
Scores are L1 norms (low = removed first): a head's query, key and value rows plus its
output-projection columns; a neuron's ``fc1`` row plus its ``fc2`` column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nbcompress.engine.structural.mha import PrunedMultiheadAttention

__all__ = ["SUPPORTED", "FfnSite", "HeadSite", "ffn_sites", "head_sites", "unsupported_attention"]

SUPPORTED = (
    "nn.MultiheadAttention (also inside nn.TransformerEncoderLayer and torchvision ViT) and "
    "Hugging Face BERT-style self-attention (query/key/value with num_attention_heads)"
)

# Modules that act on each feature on its own, so an FFN neuron passes through them alone.
_ELEMENTWISE = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Hardswish, nn.LeakyReLU,
    nn.ELU, nn.ReLU6, nn.Dropout, nn.Identity,
)  # fmt: skip


@dataclass(frozen=True)
class HeadSite:
    """One attention layer whose heads can be removed.

    Attributes:
        module: Qualified name (the ``nn.MultiheadAttention``, or the BERT ``attention``).
        family: ``"torch"`` or ``"bert"``.
        num_heads: Heads now.
        head_dim: Width of one head.
        scores: L1 importance per head.
    """

    module: str
    family: str
    num_heads: int
    head_dim: int
    scores: tuple[float, ...]


@dataclass(frozen=True)
class FfnSite:
    """One feed-forward pair whose hidden neurons can be removed.

    Attributes:
        fc1: Qualified name of the Linear producing the hidden neurons.
        fc2: Qualified name of the Linear consuming them.
        width: Hidden neurons now.
        scores: L1 importance per neuron.
    """

    fc1: str
    fc2: str
    width: int
    scores: tuple[float, ...]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_bert_attention(module: nn.Module) -> bool:
    sa, out = module._modules.get("self"), module._modules.get("output")
    if sa is None or out is None or not isinstance(getattr(out, "dense", None), nn.Linear):
        return False
    linears = all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value"))
    widths = ("num_attention_heads", "attention_head_size", "all_head_size")
    sizes = all(isinstance(getattr(sa, n, None), int) for n in widths)
    return linears and sizes and out.dense.in_features == sa.all_head_size


def bert_parts(attention: nn.Module) -> tuple[nn.Module, list[nn.Linear], nn.Linear]:
    """The self-attention module, its query/key/value Linears and the output projection."""
    sa = attention._modules["self"]
    return sa, [sa.query, sa.key, sa.value], attention._modules["output"].dense


def _head_scores(qkv: list[torch.Tensor], out: torch.Tensor, heads: int) -> tuple[float, ...]:
    """L1 per head of the q/k/v rows (each ``(heads * d, in)``) and out columns."""
    with torch.no_grad():
        total = sum(w.detach().abs().double().reshape(heads, -1).sum(1) for w in qkv)
        cols = out.detach().abs().double().sum(0).reshape(heads, -1).sum(1)
        return tuple(float(s) for s in total + cols)


def head_sites(model: nn.Module) -> list[HeadSite]:
    """Every attention layer of ``model`` whose heads can be removed, in module order."""
    sites = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)):
            if isinstance(m, PrunedMultiheadAttention):
                qkv = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]
            elif m.in_proj_weight is not None:
                qkv = list(m.in_proj_weight.chunk(3))
            else:
                qkv = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
            scores = _head_scores(qkv, m.out_proj.weight, m.num_heads)
            sites.append(HeadSite(name, "torch", m.num_heads, m.head_dim, scores))
        elif _is_bert_attention(m):
            sa, qkv, out = bert_parts(m)
            heads = sa.num_attention_heads
            scores = _head_scores([lin.weight for lin in qkv], out.weight, heads)
            sites.append(HeadSite(name, "bert", heads, sa.attention_head_size, scores))
    return sites


def _sequential_pairs(prefix: str, seq: nn.Sequential) -> list[tuple[str, str]]:
    """Linear, elementwise modules, Linear runs inside one Sequential."""
    pairs, items = [], list(seq._modules.items())
    for i, (n1, m1) in enumerate(items):
        if not isinstance(m1, nn.Linear):
            continue
        for n2, m2 in items[i + 1 :]:
            if isinstance(m2, nn.Linear):
                if m2.in_features == m1.out_features:
                    pairs.append((_join(prefix, n1), _join(prefix, n2)))
                break
            if not isinstance(m2, _ELEMENTWISE):
                break
    return pairs


def _block_pairs(block_name: str, block: nn.Module, skip: str) -> list[tuple[str, str]]:
    """FFN pairs of one transformer block (``skip``: its attention, not searched)."""
    get = block._modules.get
    if isinstance(get("linear1"), nn.Linear) and isinstance(get("linear2"), nn.Linear):
        return [(_join(block_name, "linear1"), _join(block_name, "linear2"))]
    inter, out = get("intermediate"), get("output")
    if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(
        getattr(out, "dense", None), nn.Linear
    ):
        return [(_join(block_name, "intermediate.dense"), _join(block_name, "output.dense"))]
    pairs = []
    for name, m in block.named_modules():
        full = _join(block_name, name)
        if isinstance(m, nn.Sequential) and not (full == skip or full.startswith(skip + ".")):
            pairs += _sequential_pairs(full, m)
    return pairs


def ffn_sites(model: nn.Module, heads: list[HeadSite] | None = None) -> list[FfnSite]:
    """The feed-forward pairs of the blocks holding the attention layers ``heads``."""
    heads = head_sites(model) if heads is None else heads
    pairs: list[tuple[str, str]] = []
    for site in heads:
        block_name = site.module.rpartition(".")[0]
        for pair in _block_pairs(block_name, model.get_submodule(block_name), site.module):
            if pair not in pairs:
                pairs.append(pair)
    sites = []
    for fc1, fc2 in pairs:
        w1, w2 = model.get_submodule(fc1).weight, model.get_submodule(fc2).weight
        with torch.no_grad():
            s = w1.detach().abs().double().sum(1) + w2.detach().abs().double().sum(0)
        sites.append(FfnSite(fc1, fc2, w1.shape[0], tuple(float(v) for v in s)))
    return sites


def unsupported_attention(model: nn.Module, sites: list[HeadSite]) -> list[str]:
    """Modules that look like attention but are not supported: their heads are left alone.

    "Look like": a class named ``*Attention`` or an integer ``num_heads``; a site, a module
    inside one and a module holding one are not counted.
    """
    names = [s.module for s in sites]
    found = []
    for name, m in model.named_modules():
        related = any(_related(name, n) for n in names)
        looks = type(m).__name__.endswith("Attention") or isinstance(
            getattr(m, "num_heads", None), int
        )
        if looks and not related:
            found.append(name)
    return found


def _related(a: str, b: str) -> bool:
    """Whether one of two qualified module names contains the other (or is the other)."""
    return a == b or not a or not b or a.startswith(f"{b}.") or b.startswith(f"{a}.")
