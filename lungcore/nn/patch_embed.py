"""``PatchEmbed3d``: the CT tokenizer of network A on the fused ``lungcore.ops.patch_embed3d``.

Parameters use Conv3d's layout and MONAI's token order, so a ``PatchEmbed3d`` converts to and
from ``monai.networks.blocks.PatchEmbeddingBlock`` and ``torch.nn.Conv3d`` without changing any
output (``from_monai``/``to_monai``, ``from_conv3d``/``to_conv3d``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lungcore import checks
from lungcore.ops.patch_embed import patch_embed3d, token_grid

POS_EMBED_KINDS = ("learnable", "sincos", "none")


def _triple(name: str, value: int | Sequence[int]) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} must be a positive int or 3 positive ints (depth, height, width), got {value!r}")
    return values


def sincos_position_embedding_3d(grid_size: Sequence[int], embed_dim: int,
                                 temperature: float = 10000.0) -> torch.Tensor:
    """Fixed (N, E) sin-cos position embedding of a 3D token grid, MONAI's formula and layout.

    Channels are [sin, cos] of axis 1, then axis 0, then axis 2, ``E // 6`` frequencies each
    (``monai.networks.blocks.pos_embed_utils.build_sincos_position_embedding``); when ``E`` is
    not a multiple of 6 the remaining ``E % 6`` channels are zero (MONAI refuses such E).

    Example:
        >>> sincos_position_embedding_3d((8, 8, 8), 256).shape
        torch.Size([512, 256])
    """
    g0, g1, g2 = (int(g) for g in grid_size)
    dim = embed_dim // 6
    if dim < 1:
        raise ValueError(f"embed_dim must be >= 6 for a 3D sin-cos position embedding, got {embed_dim}")
    a0, a1, a2 = torch.meshgrid(torch.arange(g0, dtype=torch.float32), torch.arange(g1, dtype=torch.float32),
                                torch.arange(g2, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim, dtype=torch.float32) / dim)
    parts = []
    for axis in (a1, a0, a2):
        angle = axis.flatten()[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    pos = torch.cat(parts, dim=1)
    if pos.shape[1] < embed_dim:
        pos = torch.cat([pos, pos.new_zeros(pos.shape[0], embed_dim - pos.shape[1])], dim=1)
    return pos


class PatchEmbed3d(nn.Module):
    """Patch tokens of a CT volume: fused patchify + linear + bias + position embedding + gather.

    Args:
        in_channels: C of the (B, C, D, H, W) volume.
        embed_dim: token width E.
        patch_size: (pd, ph, pw) or one int.
        img_size: (D, H, W) of the volumes (fixes the token grid and the position embedding).
        pos_embed: "learnable" (truncated normal, std 0.02), "sincos" (fixed buffer, MONAI's
            formula) or "none".
        norm: apply LayerNorm(E) to the projected patches before the position embedding is added
            (timm's convention); the position add is then a separate gather-add.
        bias: learn a projection bias.
        pad: zero-pad volumes whose size is not a multiple of the patch (high end of each axis).
        check_visible: validate ``visible`` sets (range, no repeats; one device sync per call).

    Defaults are network A's (1 x 32 x 128 x 128, patch 4 x 16 x 16, width 256: 512 tokens).

    Example:
        >>> embed = PatchEmbed3d()
        >>> ct = torch.randn(2, 1, 32, 128, 128)
        >>> keep = torch.rand(2, embed.num_tokens).argsort(dim=1)[:, :128]   # mask ratio 0.75
        >>> embed(ct, keep).shape
        torch.Size([2, 128, 256])
    """

    def __init__(self, in_channels: int = 1, embed_dim: int = 256,
                 patch_size: int | Sequence[int] = (4, 16, 16),
                 img_size: int | Sequence[int] = (32, 128, 128), pos_embed: str = "learnable",
                 norm: bool = False, bias: bool = True, pad: bool = False, check_visible: bool = True,
                 temperature: float = 10000.0) -> None:
        super().__init__()
        checks.one_of("pos_embed", pos_embed, POS_EMBED_KINDS)
        if in_channels < 1 or embed_dim < 1:
            raise ValueError(f"in_channels and embed_dim must be >= 1, got {in_channels}, {embed_dim}")
        self.in_channels = int(in_channels)
        self.embed_dim = int(embed_dim)
        self.patch_size = _triple("patch_size", patch_size)
        self.img_size = _triple("img_size", img_size)
        self.pad = bool(pad)
        self.check_visible = bool(check_visible)
        self.pos_embed_kind = pos_embed
        self.grid_size = token_grid(self.img_size, self.patch_size, self.pad)
        self.num_tokens = math.prod(self.grid_size)
        self.weight = nn.Parameter(torch.empty(embed_dim, in_channels, *self.patch_size))
        self.bias = nn.Parameter(torch.empty(embed_dim)) if bias else None
        if pos_embed == "learnable":
            self.pos_embed = nn.Parameter(torch.empty(self.num_tokens, embed_dim))
        elif pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_position_embedding_3d(self.grid_size, embed_dim, temperature))
        else:
            self.pos_embed = None
        self.norm = nn.LayerNorm(embed_dim) if norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv3d's default initialisation for weight/bias; MONAI's for a learnable embedding."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, mean=0.0, std=0.02, a=-2.0, b=2.0)

    def forward(self, volume: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, E) tokens, or (B, T, E) for the (B, T) ``visible`` token indices."""
        checks.tensor("volume", volume, ndim=5)
        if self.pos_embed is not None:
            grid = token_grid(volume.shape[2:], self.patch_size, self.pad)
            if grid != self.grid_size:
                raise ValueError(f"volume of spatial size {tuple(volume.shape[2:])} gives a token grid {grid}, "
                                 f"but this PatchEmbed3d was built for img_size {self.img_size} (grid {self.grid_size})")
        if self.norm is None:
            return patch_embed3d(volume, self.weight, self.bias, self.pos_embed, visible,
                                 pad=self.pad, check_visible=self.check_visible)
        tokens = self.norm(patch_embed3d(volume, self.weight, self.bias, None, visible,
                                         pad=self.pad, check_visible=self.check_visible))
        if self.pos_embed is None:
            return tokens
        pos = self.pos_embed if visible is None else self.pos_embed[visible.long()]
        return tokens + pos.to(tokens.dtype)

    def extra_repr(self) -> str:
        """The settings shown in ``repr(module)``."""
        return (f"in_channels={self.in_channels}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
                f"img_size={self.img_size}, pos_embed={self.pos_embed_kind!r}, pad={self.pad}")

    # ------------------------------------------------------------------------------------------
    # weight porting
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d, img_size: int | Sequence[int],
                    pos_embed: torch.Tensor | None = None, **kwargs: Any) -> PatchEmbed3d:
        """A PatchEmbed3d computing ``conv(x).flatten(2).transpose(1, 2) (+ pos_embed)``.

        ``conv`` must have stride == kernel_size, no padding, dilation 1 and groups 1.
        """
        if not isinstance(conv, nn.Conv3d):
            raise TypeError(f"conv must be a torch.nn.Conv3d, got {type(conv).__name__}")
        k = tuple(conv.kernel_size)
        no_padding = conv.padding == "valid" or (not isinstance(conv.padding, str) and not any(conv.padding))
        if tuple(conv.stride) != k or not no_padding:
            raise ValueError(f"conv must have stride == kernel_size and no padding, got kernel {k}, "
                             f"stride {tuple(conv.stride)}, padding {conv.padding}")
        if tuple(conv.dilation) != (1, 1, 1) or conv.groups != 1:
            raise ValueError("conv must have dilation 1 and groups 1")
        module = cls(conv.in_channels, conv.out_channels, k, img_size, bias=conv.bias is not None,
                     pos_embed="learnable" if pos_embed is not None else "none", **kwargs)
        with torch.no_grad():
            module.weight.copy_(conv.weight)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
            if pos_embed is not None:
                module.pos_embed.copy_(pos_embed.reshape(module.num_tokens, module.embed_dim))
        return module.to(conv.weight.device)

    def to_conv3d(self) -> nn.Conv3d:
        """The equivalent ``nn.Conv3d(C, E, kernel_size=patch, stride=patch)`` (without position embedding)."""
        conv = nn.Conv3d(self.in_channels, self.embed_dim, self.patch_size, stride=self.patch_size,
                         bias=self.bias is not None).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @classmethod
    def from_monai(cls, block: nn.Module, img_size: int | Sequence[int], **kwargs: Any) -> PatchEmbed3d:
        """Port a MONAI ``PatchEmbeddingBlock`` (spatial_dims=3, proj_type "conv").

        ``img_size`` is the one the block was built with (MONAI does not store it). The block's
        position embedding keeps its kind (learnable -> parameter, sincos -> fixed buffer with the
        block's values, none -> none) unless ``pos_embed=`` says otherwise; dropout is not ported
        (apply it on the tokens if needed).
        """
        if not hasattr(block, "patch_embeddings") or not hasattr(block, "position_embeddings"):
            raise TypeError(f"block must be a monai PatchEmbeddingBlock, got {type(block).__name__}")
        proj = block.patch_embeddings
        if not isinstance(proj, nn.Conv3d):
            raise ValueError("from_monai supports proj_type='conv' blocks with spatial_dims=3, got "
                             f"{type(proj).__name__} as patch_embeddings")
        weight, bias = proj.weight, proj.bias
        patch = tuple(proj.kernel_size)
        default_kind = {"none": "none", "sincos": "sincos"}.get(block.pos_embed_type, "learnable")
        kind = kwargs.pop("pos_embed", default_kind)
        module = cls(weight.shape[1], weight.shape[0], patch, img_size, bias=bias is not None, pos_embed=kind,
                     **kwargs)
        if module.num_tokens != int(block.n_patches):
            raise ValueError(f"img_size {module.img_size} gives {module.num_tokens} tokens but the block has "
                             f"{int(block.n_patches)}")
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
            if kind != "none":  # the block's values (a sincos block may use another temperature)
                module.pos_embed.copy_(block.position_embeddings.reshape(module.num_tokens, module.embed_dim))
        return module.to(weight.device)

    def to_monai(self, num_heads: int = 1) -> nn.Module:
        """The equivalent MONAI ``PatchEmbeddingBlock`` (proj_type "conv", dropout 0).

        Any position embedding is copied into the block's ``position_embeddings`` (frozen when it
        is a sincos table), so this also works for widths that MONAI's own sincos refuses.
        """
        from monai.networks.blocks import PatchEmbeddingBlock

        if self.norm is not None or self.pad:
            raise ValueError("to_monai: MONAI's PatchEmbeddingBlock has no LayerNorm and no padding")
        if self.bias is None:
            raise ValueError("to_monai: MONAI's PatchEmbeddingBlock always has a projection bias")
        block = PatchEmbeddingBlock(self.in_channels, self.img_size, self.patch_size, self.embed_dim, num_heads,
                                    proj_type="conv", pos_embed_type="none" if self.pos_embed is None else "learnable",
                                    spatial_dims=3).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            block.patch_embeddings.weight.copy_(self.weight)
            block.patch_embeddings.bias.copy_(self.bias)
            if self.pos_embed is not None:
                block.position_embeddings.copy_(self.pos_embed[None])
            else:
                block.position_embeddings.zero_()
        # a fixed sincos table stays fixed (what MONAI's pos_embed_type="sincos" does)
        block.position_embeddings.requires_grad_(self.pos_embed_kind != "sincos")
        return block
