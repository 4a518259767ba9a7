"""CMML's clinical graph branch (lungcore.models.clinical_graph): T2G-Former's gated graph and the
dense soft-bias option."""
from __future__ import annotations

import math

import pytest
import torch

from lungcore.models import CMML, CMMLConfig
from lungcore.models.clinical_graph import GRAPHS, ClinicalGraphTransformer, GraphEstimatorAttention, graph_blocks


def encoder(cards=(0, 2, 3, 0, 4), graph="t2g", depth=2, dim=16, heads=2, seed=0):
    torch.manual_seed(seed)
    return ClinicalGraphTransformer(cards, dim=dim, depth=depth, heads=heads, graph=graph, relation_dim=4)


def table(cards, b=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randn(b, generator=g) if k == 0 else torch.randint(0, k, (b,), generator=g).float() for k in cards]
    return torch.stack(cols, dim=1)


def dense_graph_reference(attn: GraphEstimatorAttention, x: torch.Tensor, key_mask: torch.Tensor):
    """Independent reference: per patient, head and node, softmax of G_w over the node's edges, loops."""
    b, t, c = x.shape
    h, d = attn.heads, attn.head_dim
    e_head = attn.col_head / attn.col_head.norm(dim=-1, keepdim=True)
    e_tail = attn.col_tail / attn.col_tail.norm(dim=-1, keepdim=True)
    out_heads = torch.zeros(b, t, h, d, dtype=x.dtype)
    adj = torch.zeros(b, h, t, t)
    for n in range(b):
        fh = attn.w_head(x[n]).view(t, h, d)
        ft = attn.w_tail(x[n]).view(t, h, d)
        fv = attn.w_value(x[n]).view(t, h, d)
        for k in range(h):
            for i in range(t):
                nbrs = [j for j in range(t) if j != i and j != 0 and bool(key_mask[n, j])
                        and torch.sigmoid(e_head[k, i] @ e_tail[k, j] + attn.gate_bias) > 0.5]
                for j in nbrs:
                    adj[n, k, i, j] = 1.0
                if not nbrs:
                    continue
                w = torch.stack([(fh[i, k] * attn.relation[k] * ft[j, k]).sum() / math.sqrt(d) for j in nbrs])
                p = torch.softmax(w, dim=0)
                out_heads[n, i, k] = (p[:, None] * fv[nbrs, k]).sum(0)
    return attn.proj(out_heads.reshape(b, t, c)), adj


def test_graph_matches_independent_reference_and_is_sparse_without_self_or_absent_edges():
    cards = (0, 2, 3, 0, 4)
    enc = encoder(cards)
    attn = enc.blocks[0].attn
    with torch.no_grad():  # a gate bias that leaves a mix of edges and non-edges
        attn.gate_bias.fill_(0.1)
    present = torch.tensor([[True] * 5, [True, False, True, True, False], [False, True, True, True, True],
                            [True] * 5, [False] * 5])
    keys = torch.cat([torch.ones(5, 1, dtype=torch.bool), present], dim=1)
    x = torch.randn(5, 6, 16)
    out, weights = attn(x, keys, return_weights=True)
    ref_out, ref_adj = dense_graph_reference(attn, x, keys)
    adj = attn.adjacency(keys)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert torch.equal(adj.detach(), ref_adj)
    assert set(adj.detach().unique().tolist()) <= {0.0, 1.0}          # hard 0/1 forward
    assert 0 < float(adj[:3].detach().mean()) < 1                               # sparse, not empty or full
    assert not adj.diagonal(dim1=-2, dim2=-1).any()                    # no self-edges
    assert not adj[..., 0].any()                                       # nothing reads the readout
    absent = ~keys[:, None, None, :].expand_as(adj)
    assert not adj[absent].any()                                       # no edges to absent variables
    assert not weights[absent].any() and not weights[(adj == 0)].any()  # attention only along edges
    assert not adj[4].any() and not weights[4].any()                   # no record: no edge at all


def test_readout_collects_without_feeding_back():
    cards = (0, 2, 3, 0, 4)
    enc = encoder(cards, depth=3).eval()
    x, present = table(cards), torch.ones(5, 5, dtype=torch.bool)
    present[1, 2] = False
    tokens, _ = enc(x, present)
    with torch.no_grad():
        enc.readout.add_(torch.randn_like(enc.readout) * 5.0)
    tokens2, _ = enc(x, present)
    torch.testing.assert_close(tokens2[:, 1:], tokens[:, 1:], rtol=0, atol=0)   # features untouched
    assert (tokens2[:, 0] - tokens[:, 0]).abs().max() > 1e-3                     # the readout itself moved
    # and it does collect: changing a feature the readout reads changes the readout
    adj = enc.blocks[0].attn.adjacency(torch.ones(1, 6, dtype=torch.bool))[0]
    read = adj[:, 0].nonzero()
    assert len(read), "the readout reads no feature in layer 1 (seeded init)"
    j = int(read[0, 1]) - 1
    x2 = x.clone()
    x2[:, j] = x2[:, j] + 1.0 if cards[j] == 0 else (x2[:, j] + 1) % cards[j]
    tokens3, _ = enc(x2, present)
    assert (tokens3[:, 0] - tokens[:, 0]).abs().max() > 1e-4


def test_dense_option_readout_is_an_ordinary_token():
    """The contrast: in the dense graph the readout is attended, so it does feed back."""
    cards = (0, 2, 3)
    enc = encoder(cards, graph="dense").eval()
    x, present = table(cards), torch.ones(5, 3, dtype=torch.bool)
    tokens, _ = enc(x, present)
    with torch.no_grad():
        enc.readout.add_(torch.randn_like(enc.readout) * 5.0)  # (a constant shift would vanish in LayerNorm)
    assert (enc(x, present)[0][:, 1:] - tokens[:, 1:]).abs().max() > 1e-4


def test_straight_through_gradients_reach_the_estimator():
    cards = (0, 2, 3, 0, 4)
    enc = encoder(cards, depth=1)
    attn = enc.blocks[0].attn
    x, present = table(cards), torch.ones(5, 5, dtype=torch.bool)
    tokens, _ = enc(x, present)
    (tokens * torch.randn_like(tokens)).sum().backward()
    for name in ("col_head", "col_tail", "gate_bias", "w_head", "w_tail", "relation"):
        p = getattr(attn, name)
        grad = p.grad if isinstance(p, torch.nn.Parameter) else p.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the estimator's gradient is exactly that of the soft probabilities at the hard edges
    keys = torch.ones(2, 6, dtype=torch.bool)
    adj = attn.adjacency(keys)
    probe = torch.randn_like(adj)
    g_st = torch.autograd.grad((adj * probe).sum(), attn.col_head)[0]
    soft = attn.edge_probability()[None].expand_as(adj)
    g_soft = torch.autograd.grad((soft * probe).sum(), attn.col_head)[0]
    torch.testing.assert_close(g_st, g_soft)


@pytest.mark.parametrize("cards", [(0, 0, 0), (3, 2, 5), (2, 0, 3, 0, 0, 4, 2)])
@pytest.mark.parametrize("graph", GRAPHS)
def test_variables_in_any_order_and_mixes(cards, graph):
    """A patient's tokens do not depend on where a variable sits: permute the schema and the columns."""
    enc = encoder(cards, graph=graph).eval()
    perm = torch.randperm(len(cards), generator=torch.Generator().manual_seed(3))
    enc_p = encoder(tuple(cards[i] for i in perm), graph=graph).eval()
    sd = enc.state_dict()
    idx = torch.cat([torch.zeros(1, dtype=torch.long), perm + 1])  # node order: readout, then variables
    new = {}
    for k, v in sd.items():
        if k.endswith(("num_weight", "num_bias", "var_embed")):
            v = v[perm]
        elif k.endswith(("col_head", "col_tail", "rel_head", "rel_tail")):
            v = v[:, idx]
        new[k] = v
    # categorical embedding rows follow their variable
    offs = [0]
    for c in cards:
        offs.append(offs[-1] + c)
    rows = torch.cat([torch.arange(offs[i], offs[i + 1]) for i in perm.tolist()]).long()
    if len(rows):
        new["tokenizer.cat_embed.weight"] = sd["tokenizer.cat_embed.weight"][rows]
    enc_p.load_state_dict(new)
    x = table(cards)
    present = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) > 0.3
    tok, keys = enc(x, present)
    tok_p, keys_p = enc_p(x[:, perm], present[:, perm])
    torch.testing.assert_close(tok_p, tok[:, idx], rtol=1e-5, atol=1e-5)
    assert torch.equal(keys_p, keys[:, idx])
    assert torch.isfinite(tok).all()


def test_decoder_blocks_and_masked_variables():
    cards = (0, 2, 3)
    blocks = graph_blocks("t2g", dim=8, heads=2, num_variables=3, depth=2)
    enc = ClinicalGraphTransformer(cards, dim=8, depth=1, heads=2)
    x, present = table(cards), torch.ones(5, 3, dtype=torch.bool)
    masked = torch.zeros(5, 3, dtype=torch.bool)
    masked[:, 1] = True
    tok, keys = enc(x, present, masked)
    assert not keys[:, 2].any() and keys[:, 0].all()
    for blk in blocks:
        tok = blk(tok, keys)
    assert not blocks[0].attn.adjacency(keys)[..., 2].any()   # nobody reads a masked value
    # the masked variable's value cannot reach any token (only its mask token does)
    x2 = x.clone()
    x2[:, 1] = 1 - x2[:, 1]
    tok2, _ = enc(x2, present, masked)
    torch.testing.assert_close(tok2, enc(x, present, masked)[0], rtol=0, atol=0)


def test_config_rejects_unknown_graph():
    with pytest.raises(ValueError, match="clinical_graph"):
        CMMLConfig(clinical_graph="gnn")


@pytest.mark.parametrize("graph", GRAPHS)
def test_cmml_end_to_end_with_both_graphs(graph):
    torch.manual_seed(0)
    cfg = CMMLConfig(img_size=(4, 8, 8), patch_size=(2, 4, 4), embed_dim=16, depth=1, num_heads=2, decoder_dim=8,
                     decoder_depth=1, decoder_heads=2, clinical_cardinalities=(2, 0, 3, 0), clinical_dim=16,
                     clinical_depth=2, clinical_heads=2, clinical_decoder_depth=1, relation_dim=4, fusion_heads=2,
                     clinical_graph=graph, modality_dropout=0.0)
    m = CMML(cfg)
    b = 6
    g = torch.Generator().manual_seed(0)
    clinical = torch.stack([torch.randint(0, 2, (b,), generator=g).float(), torch.randn(b, generator=g),
                            torch.randint(0, 3, (b,), generator=g).float(), torch.randn(b, generator=g)], 1)
    batch = {"ct": torch.randn(b, 1, 4, 8, 8, generator=g), "clinical": clinical,
             "clinical_mask": torch.rand(b, 4, generator=g) > 0.2, "ct_mask": torch.tensor([1, 1, 0, 1, 0, 1]).bool()}
    for e in ("pfs", "os"):
        batch[f"{e}_time"] = torch.rand(b, generator=g) * 20 + 1
        batch[f"{e}_event"] = torch.tensor([1, 0, 1, 1, 0, 1]).float()
        batch[f"{e}_mask"] = torch.ones(b, dtype=torch.bool)
    kinds = {type(blk.attn).__name__ for blk in [*m.clinical_encoder.blocks, *m.clinical_decoder]}
    assert kinds == {"GraphEstimatorAttention" if graph == "t2g" else "GraphAttention"}
    for stage in m.stages:
        m.zero_grad(set_to_none=True)
        loss, logs = m.loss(batch, stage)
        assert torch.isfinite(loss), (stage, logs)
        loss.backward()
        grads = {n: p.grad for n, p in m.clinical_encoder.named_parameters()
                 if stage == "pretrain" or n != "tokenizer.mask_token"}  # nothing is masked when fine-tuning
        assert all(v is not None and torch.isfinite(v).all() for v in grads.values()), stage
        assert sum(float(v.abs().sum()) for v in grads.values()) > 0, stage
        if stage == "pretrain":
            dec = [p.grad for p in m.clinical_decoder.parameters()]
            assert all(v is not None for v in dec)
    risks = m.predict(batch)
    assert all(torch.isfinite(r).all() for r in risks.values())
