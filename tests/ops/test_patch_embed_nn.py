"""PatchEmbed3d: weight porting with MONAI's real PatchEmbeddingBlock and Conv3d, sin-cos, LayerNorm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerance import rel_error, tolerance

from lungcore.backend import count_launches, use_backend
from lungcore.nn import PatchEmbed3d, sincos_position_embedding_3d


def _monai(module: str = "monai.networks.blocks"):
    """MONAI (the peer), imported per test: without it only the tests that use it skip."""
    return pytest.importorskip(module)


IMG, PATCH = (4, 8, 16), (2, 4, 8)   # grid 2 x 2 x 2 = 8 tokens


def _close(a: torch.Tensor, b: torch.Tensor, device: str) -> bool:
    return rel_error(a, b) < tolerance(torch.float32, dot=True, device=device)


@pytest.mark.parametrize("pos_kind", ["learnable", "sincos", "none"])
def test_from_and_to_monai(device, pos_kind):
    torch.manual_seed(0)
    block = _monai().PatchEmbeddingBlock(2, IMG, PATCH, 24, 2, proj_type="conv", pos_embed_type=pos_kind,
                                         spatial_dims=3).to(device).eval()
    x = torch.randn(2, 2, *IMG, device=device)
    ref = block(x)
    embed = PatchEmbed3d.from_monai(block, IMG)
    with torch.no_grad(), use_backend("triton"), count_launches() as launches:
        out = embed(x)
        visible = torch.tensor([[5, 0, 7], [1, 2, 3]], device=device)
        picked = embed(x, visible)
    assert launches["patch_embed3d.forward"] == 2
    assert _close(out, ref, device)
    assert _close(picked, torch.gather(ref, 1, visible[:, :, None].expand(-1, -1, 24)), device)
    back = embed.to_monai(num_heads=2).eval()
    with torch.no_grad():
        assert _close(back(x), ref, device)
    for name, param in block.state_dict().items():
        assert torch.equal(back.state_dict()[name], param), name
    assert back.position_embeddings.requires_grad == block.position_embeddings.requires_grad
    if pos_kind == "sincos":
        assert "pos_embed" in dict(embed.named_buffers())


def test_conv3d_round_trip(device):
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(3, 16, PATCH, stride=PATCH).to(device)
    pos = torch.randn(8, 16, device=device)
    embed = PatchEmbed3d.from_conv3d(conv, IMG, pos_embed=pos)
    x = torch.randn(2, 3, *IMG, device=device)
    with torch.no_grad(), use_backend("triton"):
        out = embed(x)
    assert _close(out, conv(x).flatten(2).transpose(1, 2) + pos, device)
    conv2 = embed.to_conv3d()
    assert torch.equal(conv2.weight, conv.weight) and torch.equal(conv2.bias, conv.bias)
    with pytest.raises(ValueError, match="stride == kernel_size"):
        PatchEmbed3d.from_conv3d(torch.nn.Conv3d(1, 4, 2, stride=1), IMG)


def test_sincos_matches_monai():
    for grid, dim in [((2, 3, 4), 24), ((8, 8, 8), 48), ((3, 1, 5), 12)]:
        ours = sincos_position_embedding_3d(grid, dim)
        theirs = _monai("monai.networks.blocks.pos_embed_utils").build_sincos_position_embedding(list(grid), dim, 3)[0]
        assert torch.equal(ours, theirs)
    # network A's width 256 is not a multiple of 6: 42 frequencies per axis, 4 zero channels
    pos = sincos_position_embedding_3d((8, 8, 8), 256)
    assert pos.shape == (512, 256) and torch.equal(pos[:, 252:], torch.zeros(512, 4))
    assert torch.equal(pos[:, :252], _monai("monai.networks.blocks.pos_embed_utils").build_sincos_position_embedding([8, 8, 8], 252, 3)[0])


def test_sincos_is_a_fixed_buffer(device):
    embed = PatchEmbed3d(1, 12, PATCH, IMG, pos_embed="sincos").to(device)
    assert "pos_embed" in dict(embed.named_buffers()) and "pos_embed" not in dict(embed.named_parameters())
    x = torch.randn(1, 1, *IMG, device=device)
    with use_backend("triton"):
        embed(x).sum().backward()
    assert embed.weight.grad is not None


def test_layer_norm_then_position(device):
    torch.manual_seed(2)
    embed = PatchEmbed3d(1, 16, PATCH, IMG, norm=True).to(device)
    x = torch.randn(2, 1, *IMG, device=device)
    visible = torch.tensor([[6, 1], [0, 4]], device=device)
    with use_backend("triton"), count_launches() as launches:
        out = embed(x, visible)
        out.sum().backward()
    assert launches["patch_embed3d.forward"] == 1 and launches["patch_embed3d.grad_weight"] == 1
    tokens = F.conv3d(x, embed.weight, embed.bias, stride=PATCH).flatten(2).transpose(1, 2)
    ref = F.layer_norm(tokens, (16,), embed.norm.weight, embed.norm.bias) + embed.pos_embed
    ref = torch.gather(ref, 1, visible[:, :, None].expand(-1, -1, 16))
    assert _close(out.detach(), ref.detach(), device)
    assert embed.pos_embed.grad is not None and embed.norm.weight.grad is not None


def test_network_a_defaults_and_bad_sizes(device):
    embed = PatchEmbed3d()
    assert embed.grid_size == (8, 8, 8) and embed.num_tokens == 512
    assert tuple(embed.weight.shape) == (256, 1, 4, 16, 16) and tuple(embed.pos_embed.shape) == (512, 256)
    small = PatchEmbed3d(1, 8, PATCH, IMG).to(device)
    with pytest.raises(ValueError, match="built for img_size"):
        small(torch.randn(1, 1, 4, 8, 32, device=device))
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        PatchEmbed3d(pos_embed="fourier")
    with pytest.raises(ValueError, match="not a multiple"):
        PatchEmbed3d(1, 8, PATCH, (5, 8, 16))
    padded = PatchEmbed3d(1, 8, PATCH, (5, 8, 16), pad=True).to(device)
    assert padded.grid_size == (3, 2, 2)
    with use_backend("triton"):
        assert padded(torch.randn(1, 1, 5, 8, 16, device=device)).shape == (1, 12, 8)
