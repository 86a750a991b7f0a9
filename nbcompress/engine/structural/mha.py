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
    attention itself runs through ``F.scaled_dot_product_attention``.

    Attributes:
        embed_dim: Width of the query input and of the output (unchanged by removal).
        num_heads: Heads kept.
        head_dim: Width of one head (unchanged by removal).
        kept_heads: Original indices of the kept heads (maps per-head 3-D masks).
        original_heads: Number of heads of the module removal started from.
    """

    _qkv_same_embed_dim = False  # keeps torch's fused encoder fast paths away from this module
    in_proj_weight = None

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
        self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim, **kw))
        self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim, **kw))
        self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **kw)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, inner, **kw))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, inner, **kw))
        else:
            self.bias_k = self.bias_v = None
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)

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
        q, k, v = _projections(mha)
        kept_before = getattr(mha, "kept_heads", tuple(range(mha.num_heads)))
        new = cls(
            mha.embed_dim, len(keep), d, kdim=mha.kdim, vdim=mha.vdim,
            bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn, dropout=mha.dropout, batch_first=mha.batch_first,
            kept_heads=tuple(kept_before[h] for h in keep),
            original_heads=getattr(mha, "original_heads", mha.num_heads),
            device=q.device, dtype=q.dtype,
        )  # fmt: skip
        with torch.no_grad():
            new.q_proj_weight.copy_(q[rows])
            new.k_proj_weight.copy_(k[rows])
            new.v_proj_weight.copy_(v[rows])
            new.out_proj.weight.copy_(mha.out_proj.weight[:, rows])
            if mha.in_proj_bias is not None:
                inner = mha.num_heads * d
                parts = mha.in_proj_bias.view(3, inner)[:, rows]
                new.in_proj_bias.copy_(parts.reshape(-1))
                new.out_proj.bias.copy_(mha.out_proj.bias)
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k[..., rows])
                new.bias_v.copy_(mha.bias_v[..., rows])
        new.train(mha.training)
        for name, p in new.named_parameters():
            p.requires_grad_(_requires_grad(mha, name))
        return new

    def extra_repr(self) -> str:
        """Widths and kept heads, shown in the module's repr."""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads} (of {self.original_heads}), "
            f"head_dim={self.head_dim}, batch_first={self.batch_first}"
        )

    def estimate_macs(self, inputs: tuple, output: object = None) -> int:
        """Multiply-accumulates of one call with ``inputs`` ``(query[, key, value])``.

        The q, k and v projections at the kept inner width and the two attention matmuls;
        ``out_proj`` is a Linear submodule, counted on its own by per-module hooks. An
        estimate from shapes, like ``nbcompress.engine.core.costs.macs``.
        """
        q = inputs[0]
        k = inputs[1] if len(inputs) > 1 else q
        inner = self.num_heads * self.head_dim
        queries, keys = q.numel() // self.embed_dim, k.numel() // self.kdim
        seq = k.shape[1] if k.dim() == 3 and self.batch_first else k.shape[0]
        projections = queries * inner * self.embed_dim + keys * inner * (self.kdim + self.vdim)
        return projections + 2 * queries * seq * inner

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
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, self.q_proj_weight, bq)
        k = F.linear(key, self.k_proj_weight, bk)
        v = F.linear(value, self.v_proj_weight, bv)
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


def _projections(mha: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """The query, key and value projection weights of an (original or pruned) attention."""
    if getattr(mha, "in_proj_weight", None) is not None:
        return mha.in_proj_weight.detach().chunk(3)
    return mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()


def _requires_grad(mha: nn.Module, name: str) -> bool:
    """Whether the original parameter behind ``name`` of the new module required grad."""
    if name.endswith("_proj_weight") and getattr(mha, "in_proj_weight", None) is not None:
        return mha.in_proj_weight.requires_grad
    return mha.get_parameter(name).requires_grad
