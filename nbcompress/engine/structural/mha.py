"""Multi-head attention with fewer heads than ``embed_dim // head_dim``: what head removal leaves.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (``head_dim = embed_dim //
num_heads``), so removing heads cannot be expressed by shrinking its tensors: the residual
stream keeps ``embed_dim`` while the heads shrink. :class:`PrunedMultiheadAttention` keeps
the call signature and outputs of ``nn.MultiheadAttention`` (``batch_first`` both ways,
unbatched inputs, boolean or float masks, per-head 3-D masks in the original head numbering,
``bias_k``/``bias_v``, ``add_zero_attn``, dropout) with any number of kept heads, and is
an ordinary picklable module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention"]


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = masked out) as an additive float mask; float masks pass."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with some heads removed (inner width ``num_heads * head_dim``).

    Built by :meth:`from_module` from an ``nn.MultiheadAttention`` (or from another
    ``PrunedMultiheadAttention``) and the heads to keep. The outputs equal the original
    module's with the removed heads' contributions to ``out_proj`` zeroed; returned
    attention weights are those of the kept heads (their average when
    ``average_attn_weights``). The fused fast path of ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` is not taken (``_qkv_same_embed_dim`` is False); the
    projections are ordinary ``nn.Linear`` submodules (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``, so per-layer tools see them) and the attention runs through
    ``F.scaled_dot_product_attention``.

    Attributes:
        embed_dim: Width of the query input and of the output (unchanged by removal).
        num_heads: Heads kept.
        head_dim: Width of one head (unchanged by removal).
        kept_heads: Original indices of the kept heads (maps per-head 3-D masks).
        original_heads: Number of heads of the module removal started from.
    """

    # Torch's fused encoder paths test these before using the module's fused weights.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        dropout: float = 0.0,
        batch_first: bool = False,
        kept_heads: tuple[int, ...] | None = None,
        original_heads: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.kept_heads = tuple(range(num_heads)) if kept_heads is None else tuple(kept_heads)
        self.original_heads = num_heads if original_heads is None else original_heads
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, inner, **kw))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, inner, **kw))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_module(
        cls, mha: nn.Module, keep: list[int] | tuple[int, ...]
    ) -> PrunedMultiheadAttention:
        """A module computing ``mha``'s kept heads ``keep`` (indices in ``mha``'s own heads).

        The new parameters are copies of the kept slices; ``mha`` is not modified.
        """
        keep = sorted(keep)
        if not keep or keep[-1] >= mha.num_heads or keep[0] < 0:
            raise ValueError(f"keep: expected 1 to {mha.num_heads} head indices, got {keep}.")
        d = mha.head_dim
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
        sources = _projections(mha)
        kept_before = getattr(mha, "kept_heads", tuple(range(mha.num_heads)))
        new = cls(
            mha.embed_dim, len(keep), d, kdim=mha.kdim, vdim=mha.vdim,
            bias=sources[0][1] is not None, add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn, dropout=mha.dropout, batch_first=mha.batch_first,
            kept_heads=tuple(kept_before[h] for h in keep),
            original_heads=getattr(mha, "original_heads", mha.num_heads),
            device=sources[0][0].device, dtype=sources[0][0].dtype,
        )  # fmt: skip
        targets = [new.q_proj, new.k_proj, new.v_proj]
        with torch.no_grad():
            for linear, (weight, bias) in zip(targets, sources, strict=True):
                _fill(linear.weight, weight, rows, 0)
                if bias is not None:
                    _fill(linear.bias, bias, rows, 0)
            _fill(new.out_proj.weight, mha.out_proj.weight, rows, 1)
            if mha.out_proj.bias is not None:
                _fill(new.out_proj.bias, mha.out_proj.bias, None, 0)
            if mha.bias_k is not None:
                _fill(new.bias_k, mha.bias_k, rows, 2)
                _fill(new.bias_v, mha.bias_v, rows, 2)
        return new.train(mha.training)

    def init_kwargs(self) -> dict[str, object]:
        """Constructor arguments that rebuild this module's shapes (for a state_dict route).

        ``PrunedMultiheadAttention(**m.init_kwargs())`` has the same parameter shapes as
        ``m``, so ``load_state_dict`` fills it exactly.
        """
        return {
            "embed_dim": self.embed_dim, "num_heads": self.num_heads, "head_dim": self.head_dim,
            "kdim": self.kdim, "vdim": self.vdim, "bias": self.q_proj.bias is not None,
            "add_bias_kv": self.bias_k is not None, "add_zero_attn": self.add_zero_attn,
            "dropout": self.dropout, "batch_first": self.batch_first,
            "kept_heads": self.kept_heads, "original_heads": self.original_heads,
        }  # fmt: skip

    def extra_repr(self) -> str:
        """Widths and kept heads, shown in the module's repr."""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads} (of {self.original_heads}), "
            f"head_dim={self.head_dim}, batch_first={self.batch_first}"
        )

    def estimate_macs(self, inputs: tuple, output: object = None) -> int:
        """Multiply-accumulates of the two attention matmuls of one call with ``inputs``.

        The projections are ``nn.Linear`` submodules, counted on their own by per-module
        hooks (as ``nbcompress.engine.core.costs.macs`` does). An estimate from shapes.
        """
        q = inputs[0]
        k = inputs[1] if len(inputs) > 1 else q
        seq = k.shape[1] if k.dim() == 3 and self.batch_first else k.shape[0]
        seq += int(self.bias_k is not None) + int(self.add_zero_attn)
        return 2 * (q.numel() // self.embed_dim) * seq * self.num_heads * self.head_dim

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments and results as ``nn.MultiheadAttention.forward``."""
        batched = query.dim() == 3
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else self._mask(attn_mask, key_padding_mask, query)
        q, k, v = self._project(query, key, value)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p=p) @ v if p else weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=causal)  # fmt: skip
        n, h, length, d = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, h * d))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project to ``(N, heads, length, head_dim)`` with bias_k/v and zero attention added."""
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        n = q.shape[0]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
        q, k, v = (t.view(n, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
                   for t in (q, k, v))  # fmt: skip
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, self.num_heads, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(n, self.num_heads, 1, self.head_dim)], dim=2)
        return q, k, v

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
              query: Tensor) -> Tensor | None:  # fmt: skip
        """One additive mask of shape ``(N or 1, heads or 1, L, S)``, or None."""
        dtype = query.dtype
        mask = _float_mask(attn_mask, dtype)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask[None, None]
            else:  # (N * original heads, L, S) in the original numbering of heads
                mask = mask.view(-1, self.original_heads, *mask.shape[1:])
                mask = mask[:, list(self.kept_heads)]
        kpm = _float_mask(key_padding_mask, dtype)
        if kpm is not None:
            kpm = kpm[:, None, None, :]
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if extra:
            mask = None if mask is None else F.pad(mask, (0, extra))
            kpm = None if kpm is None else F.pad(kpm, (0, extra))
        if mask is None:
            return kpm
        return mask if kpm is None else mask + kpm


def _fill(new: nn.Parameter, old: Tensor, rows: Tensor | None, dim: int) -> None:
    """Copy ``old`` (its ``rows`` along ``dim``) into ``new``; keep ``requires_grad``."""
    new.copy_(old if rows is None else old.index_select(dim, rows.to(old.device)))
    new.requires_grad_(old.requires_grad)


def _projections(mha: nn.Module) -> list[tuple[Tensor, Tensor | None]]:
    """Query, key and value projection (weight, bias) of an original or pruned attention."""
    if isinstance(mha, PrunedMultiheadAttention):
        return [(lin.weight, lin.bias) for lin in (mha.q_proj, mha.k_proj, mha.v_proj)]
    if mha.in_proj_weight is not None:
        weights = list(mha.in_proj_weight.chunk(3))
    else:
        weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    biases = [None] * 3 if mha.in_proj_bias is None else list(mha.in_proj_bias.chunk(3))
    return list(zip(weights, biases, strict=True))
