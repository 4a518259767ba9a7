"""lungcore.nn.MaskedCrossAttention: equals torch.nn.MultiheadAttention with the same weights,
Triton path equals the CPU path (outputs and parameter gradients) on network A's folded groups,
per-patient independence (network B), dead rows exactly zero, clear errors."""
from __future__ import annotations

import pytest
import torch
from _tolerance import rel_error

from lungcore.backend import count_launches
from lungcore.nn import MaskedCrossAttention


_rel = rel_error


def test_matches_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 32, 4
    attn = MaskedCrossAttention(dim, heads).double()
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.kv_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.kv_proj.bias]))
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
    x, ctx = torch.randn(3, 9, dim, dtype=torch.float64), torch.randn(3, 5, dim, dtype=torch.float64)
    key_mask = torch.tensor([[True] * 5, [True, False, True, False, False], [False, True, True, True, True]])
    ours = attn(x, ctx, key_mask=key_mask)
    theirs, _ = mha(x, ctx, ctx, key_padding_mask=~key_mask, need_weights=False)
    assert _rel(ours, theirs) < 1e-12


@pytest.mark.parametrize("cross", [False, True])
def test_triton_path_equals_cpu_path_on_folded_groups(cross, device, backend):
    """Network A: (B, G, L, C) tokens, groups folded into the batch, padding marked by masks."""
    torch.manual_seed(1)
    b, g, L, c = 2, 3, 11, 32
    attn = MaskedCrossAttention(c, num_heads=2).to(device)
    x = torch.randn(b, g, L, c, device=device)
    visible = torch.rand(b, g, L, device=device) < 0.7
    visible[0, 1] = False  # a group with no visible token
    if cross:
        ctx = torch.randn(b, 1, 5, c, device=device).expand(b, g, 5, c)  # clinical tokens per patient
        key_mask = torch.tensor([[True, False, True, True, False], [False] * 5], device=device)[:, None, :]
        query_mask = visible
    else:
        ctx, key_mask, query_mask = None, visible, visible
    results = []
    for name in ("triton", "reference"):
        attn.zero_grad()
        with backend(name), count_launches() as launches:
            out = attn(x, ctx, key_mask=key_mask, query_mask=query_mask)
            out.square().sum().backward()
        assert bool(launches) == (name == "triton")
        results.append([out.detach()] + [p.grad.clone() for p in attn.parameters()])
    for a, b_ in zip(*results):
        assert _rel(a, b_) < (2e-3 if device == "cuda" else 1e-5)
    dead = ~query_mask.expand(b, g, L) if not cross else ~(query_mask & key_mask.any(-1, keepdim=True))
    assert (results[0][0][dead] == 0).all()


def test_patient_output_independent_of_batch_mates():
    torch.manual_seed(2)
    attn = MaskedCrossAttention(128, num_heads=4).eval()
    image, clinical = torch.randn(4, 129, 128), torch.randn(4, 6, 128)
    present = torch.rand(4, 6) < 0.7
    present[:, 0] = True
    full = attn(clinical, image, query_mask=present)
    image2, clinical2 = image.clone(), clinical.clone()
    image2[1:] = torch.randn(3, 129, 128)
    clinical2[1:] = torch.randn(3, 6, 128)
    again = attn(clinical2, image2, query_mask=present)
    assert torch.allclose(full[0], again[0], atol=1e-6)
    assert (full[~present] == 0).all()


def test_patient_without_clinical_record_gets_zero_update():
    attn = MaskedCrossAttention(64, num_heads=4)
    image, clinical = torch.randn(2, 33, 64), torch.randn(2, 5, 64)
    present = torch.tensor([[True] * 5, [False] * 5])
    out = attn(image, clinical, key_mask=present)
    assert (out[1] == 0).all() and out[0].abs().sum() > 0


def test_module_errors():
    with pytest.raises(ValueError, match="divisible"):
        MaskedCrossAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        MaskedCrossAttention(512, num_heads=2)
    attn = MaskedCrossAttention(32, num_heads=2)
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="key_mask must broadcast"):
        attn(torch.randn(2, 5, 32), torch.randn(2, 3, 32), key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_mask must have dtype"):
        attn(torch.randn(2, 5, 32), query_mask=torch.ones(2, 5))
