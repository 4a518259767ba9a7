"""CMML's CT branch: the Slice-Depth Transformer (divided attention within each slice, then along
depth, over the visible patch tokens of a 3D CT).

Example:
    >>> import torch
    >>> from lungcore.models.cmml import CMMLConfig
    >>> enc = SliceDepthTransformer(CMMLConfig(img_size=(8, 16, 16), patch_size=(2, 4, 4), embed_dim=16, depth=1,
    ...                                        num_heads=2))
    >>> enc(torch.randn(2, 1, 8, 16, 16)).shape, enc(torch.randn(2, 1, 8, 16, 16), torch.tensor([[0, 5], [3, 60]])).shape
    (torch.Size([2, 64, 16]), torch.Size([2, 2, 16]))
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lungcore.models.clinical_graph import Mlp as _Mlp
from lungcore.nn import MaskedCrossAttention, PatchEmbed3d


def group_layout(group: Tensor, num_groups: int) -> tuple[Tensor, Tensor, int]:
    """Slots that pad each group of tokens to the longest group.

    ``group`` (B, T) group index of every token. Returns ``slot`` (B, T) in [0, G * L), the mask
    (B, G, L) of real slots and L (the longest group over the batch).
    """
    b, t = group.shape
    order = torch.argsort(group * t + torch.arange(t, device=group.device), dim=1)
    sorted_group = torch.gather(group, 1, order)
    counts = torch.zeros(b, num_groups, dtype=torch.long, device=group.device)
    counts.scatter_add_(1, group, torch.ones_like(group))
    start = counts.cumsum(1) - counts  # first sorted position of each group
    rank_sorted = torch.arange(t, device=group.device).expand(b, t) - torch.gather(start, 1, sorted_group)
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    longest = int(counts.max()) if t else 0
    slot = group * longest + rank
    mask = torch.arange(longest, device=group.device)[None, None, :] < counts[:, :, None]
    return slot, mask, longest


class SliceDepthBlock(nn.Module):
    """Pre-norm divided attention on a token subset: slice attention, depth attention, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_slice, self.norm_depth, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.slice_attn = MaskedCrossAttention(dim, heads, attn_dropout=dropout, proj_dropout=dropout)
        self.depth_attn = MaskedCrossAttention(dim, heads, attn_dropout=dropout, proj_dropout=dropout)
        self.mlp = _Mlp(dim, mlp_ratio, dropout)

    @staticmethod
    def _grouped(attn: MaskedCrossAttention, x: Tensor, layout) -> Tensor:
        b, t, c = x.shape
        if layout[0] == "slice":  # every token present: a slice group is a contiguous run of tokens
            _, nd, npl = layout
            return attn(x.view(b, nd, npl, c)).view(b, t, c)
        if layout[0] == "depth":  # every token present: a depth group is a strided view
            _, nd, npl = layout
            return attn(x.view(b, nd, npl, c).transpose(1, 2)).transpose(1, 2).reshape(b, t, c)
        slot, mask, longest = layout
        groups = mask.shape[1]
        idx = slot[..., None].expand(b, t, c)
        padded = x.new_zeros(b, groups * longest, c).scatter(1, idx, x).view(b, groups, longest, c)
        out = attn(padded, key_mask=mask, query_mask=mask)
        return torch.gather(out.reshape(b, groups * longest, c), 1, idx)

    def forward(self, x: Tensor, slice_layout, depth_layout) -> Tensor:
        x = x + self._grouped(self.slice_attn, self.norm_slice(x), slice_layout)
        x = x + self._grouped(self.depth_attn, self.norm_depth(x), depth_layout)
        return x + self.mlp(self.norm_mlp(x))


class SliceDepthTransformer(nn.Module):
    """CT encoder: patch embedding of the visible tokens + Slice-Depth blocks + LayerNorm."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.embed = PatchEmbed3d(cfg.in_channels, cfg.embed_dim, cfg.patch_size, cfg.img_size,
                                  pos_embed="learnable", check_visible=False)
        self.grid = self.embed.grid_size
        self.num_tokens = self.embed.num_tokens
        self.blocks = nn.ModuleList(SliceDepthBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def layouts(self, ids: Optional[Tensor]):
        """Slice and depth groupings of the tokens ``ids`` (B, T); None = every token, in order."""
        nd, nh, nw = self.grid
        if ids is None:
            return ("slice", nd, nh * nw), ("depth", nd, nh * nw)
        return group_layout(ids // (nh * nw), nd), group_layout(ids % (nh * nw), nh * nw)

    def forward(self, ct: Tensor, visible: Optional[Tensor] = None) -> Tensor:
        """(B, N, E) tokens of every patch, or (B, T, E) of the ``visible`` (B, T) token indices."""
        x = self.embed(ct, visible)
        slice_layout, depth_layout = self.layouts(visible)
        for blk in self.blocks:
            x = blk(x, slice_layout, depth_layout)
        return self.norm(x)


__all__ = ["SliceDepthBlock", "SliceDepthTransformer", "group_layout"]
