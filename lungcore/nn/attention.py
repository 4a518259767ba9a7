"""``MaskedCrossAttention``: projections, heads and output projection around
:func:`lungcore.ops.masked_cross_attention`.

Used by both networks:
* CMML (network A): slice and depth self-attention of the CT encoder with the groups folded into
  the batch (``x`` of shape (B, G, L, C): any number of leading batch axes), padded groups marked
  by ``query_mask``/``key_mask``; cross-attention between CT tokens and clinical tokens.
* CSF-Net (network B): per-patient clinical <-> image cross-attention, missing clinical
  variables masked out of the keys.

Cheap layout: q/k/v are head-split *views* of one fused projection (no copy); the Triton kernels
read them through their strides and write the output directly in (..., L, H, D) memory order,
so merging the heads before the output projection is a free reshape.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lungcore import checks
from lungcore.ops.attention import MAX_HEAD_DIM, masked_cross_attention


class MaskedCrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context`` (self-attention when it is None).

    Args:
        dim: width of the query tokens (and of the output).
        num_heads: number of heads; ``dim_head = head_dim or dim // num_heads`` (<= 128).
        context_dim: width of the key/value tokens (default ``dim``).
        head_dim: per-head width (default ``dim // num_heads``).
        qkv_bias: bias in the q/k/v projections.
        attn_dropout: dropout on the attention probabilities (training only).
        proj_dropout: dropout after the output projection (training only).

    Forward:
        x (*batch, Lq, dim), context (*batch, Lk, context_dim) or None; key_mask bool
        broadcastable to (*batch, Lk) (True = attend), query_mask bool broadcastable to
        (*batch, Lq). Returns (*batch, Lq, dim). Query rows that are masked, or have no key to
        attend to, output exactly zero (so a residual ``x + attn(x, ...)`` leaves them unchanged).

    Example:
        >>> import torch
        >>> from lungcore.nn import MaskedCrossAttention
        >>> attn = MaskedCrossAttention(dim=128, num_heads=4)
        >>> image = torch.randn(2, 129, 128)          # 128 spatial tokens + 1 global token
        >>> clinical = torch.randn(2, 6, 128)         # one token per clinical variable
        >>> present = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
        >>> attn(image, clinical, key_mask=present).shape
        torch.Size([2, 129, 128])
    """

    def __init__(self, dim: int, num_heads: int = 8, context_dim: Optional[int] = None,
                 head_dim: Optional[int] = None, qkv_bias: bool = True, attn_dropout: float = 0.0,
                 proj_dropout: float = 0.0) -> None:
        super().__init__()
        if num_heads < 1 or (head_dim is None and dim % num_heads):
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) unless head_dim is given")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = head_dim or dim // num_heads
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {self.head_dim}")
        self.context_dim = context_dim or dim
        inner = num_heads * self.head_dim
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv_proj = nn.Linear(self.context_dim, 2 * inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, dim)
        self.attn_dropout = attn_dropout
        self.proj_dropout = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_mask: Optional[Tensor] = None,
                query_mask: Optional[Tensor] = None) -> Tensor:
        """Attend from ``x`` (*batch, Lq, dim) over ``context`` (*batch, Lk, context_dim), or over ``x``
        itself when it is None; returns (*batch, Lq, dim).

        ``key_mask`` (broadcastable to (*batch, Lk)) and ``query_mask`` (to (*batch, Lq)) are bool,
        True = take part; a masked query row, or one with no key to attend to, outputs exact zeros.
        The class docstring's example calls it.
        """
        checks.tensor("x", x, ndim=range(2, 64))
        if context is None:
            context = x
        checks.tensor("context", context, ndim=x.dim(), device=x.device)
        *batch, lq, _ = x.shape
        lk = context.shape[-2]
        checks.shape("x", x, (*batch, lq, self.dim))
        checks.shape("context", context, (*batch, lk, self.context_dim))
        h, dh = self.num_heads, self.head_dim
        nb = 1
        for s in batch:
            nb *= s
        # fresh contiguous projections -> folding the batch axes and splitting heads are views
        q = self.q_proj(x).reshape(nb, lq, h, dh).transpose(1, 2)
        kv = self.kv_proj(context).reshape(nb, lk, 2, h, dh)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        km = self._flat_mask("key_mask", key_mask, batch, nb, lk, x.device)
        qm = self._flat_mask("query_mask", query_mask, batch, nb, lq, x.device)
        out = masked_cross_attention(q, k, v, key_mask=km, query_mask=qm,
                                     dropout_p=self.attn_dropout if self.training else 0.0)
        out = self.proj_dropout(self.out_proj(out.transpose(1, 2).reshape(nb, lq, h * dh)))
        alive = None
        if km is not None:
            alive = km.any(dim=-1, keepdim=True)
        if qm is not None:
            alive = qm if alive is None else alive & qm
        if alive is not None:
            out = out * alive[..., None].to(out.dtype)
        return out.reshape(*batch, lq, self.dim)

    @staticmethod
    def _flat_mask(name: str, mask: Optional[Tensor], batch: list[int], nb: int, length: int,
                   device: torch.device) -> Optional[Tensor]:
        if mask is None:
            return None
        checks.tensor(name, mask, dtypes=(torch.bool,), device=device)
        try:
            mask = mask.expand(*batch, length)
        except RuntimeError:
            want = "(" + ", ".join(str(s) for s in (*batch, length)) + ")"
            raise ValueError(f"{name} must broadcast to {want}, got {tuple(mask.shape)}") from None
        return mask.reshape(nb, length)


__all__ = ["MaskedCrossAttention"]
