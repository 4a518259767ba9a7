"""CMML's clinical branch: a graph Transformer over the variables of a clinical table.

Every clinical variable is a node (a token); a readout node in front (index 0) gathers the
patient's representation. Two graphs are offered (``CMMLConfig.clinical_graph``):

* ``"t2g"`` (default): the feature-relation graph of T2G-Former (Yan et al., AAAI 2023; public
  code ``jyansir/t2g-former``, ``bin/t2g_former.py``), per layer and head:

  - **Graph Estimator.** Static (column) embeddings ``E_head``, ``E_tail`` (H, 1 + V, d_col),
    ``d_col = ceil(2 log2(1 + V))``, L2-normalised, give the topology score
    ``G_t = E_head E_tail^T`` (asymmetric: i -> j differs from j -> i); the dynamic (value)
    embeddings of the tokens give the edge weights
    ``G_w = (x_i W_head) diag(r) (x_j W_tail)^T / sqrt(d_head)`` (``r`` a learned relation vector,
    ``W_head`` and ``W_tail`` separate: the paper's asymmetric form; the authors' code defaults
    to sharing them).
  - **Gating.** ``A = 1[sigmoid(G_t + b) > 0.5]`` with the straight-through estimator
    (forward a hard 0/1 adjacency, backward the gradient of the sigmoid probability); no
    self-edges; no edge into the readout (nothing reads from it); no edge to a variable that is
    missing (``present`` False) or masked for pretraining (those are per patient).
  - **Assembly.** ``softmax`` of ``G_w`` over a node's edges (the gated-off keys get exactly zero
    weight, as the authors' ``(1 - A) * -10000`` mask does); a node without any edge receives
    nothing (its residual keeps it). The straight-through gradient reaches ``A`` with unit scale
    (the authors' additive mask multiplies it by 10^4, which would swamp the gradient-norm
    clipping lungcore's trainers use; Adam's step is unaffected by that scale anyway).
  - **Cross-level readout.** The readout node's row of ``A`` is estimated like any other, so in
    every layer it collects from the features it selects, layer after layer, and its column is
    pruned: it never feeds back into the features (tested by perturbing it).

  - **Training.** As the authors' ``run_t2g.py`` does, the column embeddings ``col_head`` /
    ``col_tail`` get their own learning rate without weight decay (``CMMLConfig.graph_column_lr``,
    default 1e-2: their ``col_lr`` in ``configs/california``, about 100x their main rate), through
    ``CMML.param_group_overrides`` and ``lungcore.train.schedule.optimizer``.

  Departures, lungcore's choices: pre-norm blocks with a GELU MLP (ratio 2) as in the rest of
  CMML (the authors use FT-Transformer's ReGLU); the last layer updates every node, not only the
  readout (CMML's fusion and graph decoder read the variable tokens); the column learning rate
  follows the run's warm-up and schedule (the authors' is constant).
* ``"dense"``: the previous branch: every pair of nodes attends, a learned dense relation
  ``(r_head r_tail^T) / sqrt(R)`` (``relation_dim`` R) added to the logits per layer and head,
  the readout an ordinary token (it attends and is attended).

Both share the tokenizer (numeric ``w_i x_i + b_i``, categorical embedding, + a variable identity
embedding; a missing value contributes nothing, a masked one is a learned mask token) and keep
missing and masked variables out of the keys. The attention here is plain PyTorch: the graph
needs per-head, per-query adjacency and a differentiable gate, which the boolean key mask of
``lungcore.nn.MaskedCrossAttention`` does not carry (and a few dozen tokens are no kernel target).

Which is the default: ``experiments/cmml_graph.py`` compares the two clinical-only (no CT) in the
full CMML pipeline (``experiments/results/cmml_graph.md``): on the synthetic cohort (3 seeds, 560
test patients; seed-mean risks, t2g - dense: PFS +0.001 [-0.006, 0.008], OS +0.002 [-0.005, 0.009]),
NCCTG lung (228 patients, 3 x 5-fold: -0.003 [-0.023, 0.015]) and GBSG2 (686 patients:
+0.004 [-0.008, 0.017]) they are indistinguishable, so the default is T2G-Former's graph, the
model CMML's paper states (that comparison ran with one learning rate for all parameters). With one
learning rate the gated topology stays close to its random initialisation (NCCTG lung, one fold: 8
and 4 of the 196 possible edges, 4 heads x 49, of the two layers changed over pretraining and
fine-tuning; the demo's CMML: 7-14 of 196); with the authors' column learning rate it moves
(``experiments/results/cmml_demo_variants.md``).

Example:
    >>> import torch
    >>> from lungcore.models.clinical_graph import ClinicalGraphTransformer
    >>> enc = ClinicalGraphTransformer((0, 2, 3), dim=16, depth=2, heads=2, graph="t2g")
    >>> x = torch.tensor([[0.5, 1.0, 2.0], [-1.0, 0.0, 1.0]])
    >>> present = torch.tensor([[True, True, True], [True, False, True]])
    >>> tokens, keys = enc(x, present)
    >>> tokens.shape, keys.tolist()
    (torch.Size([2, 4, 16]), [[True, True, True, True], [True, True, False, True]])
    >>> adj = enc.blocks[0].attn.adjacency(keys)          # (B, H, 1 + V, 1 + V), 0/1
    >>> bool(adj[:, :, :, 0].any()), bool(adj[1, :, :, 2].any())   # nothing reads the readout / a missing value
    (False, False)
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRAPHS = ("t2g", "dense")


class Mlp(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout, hidden width ``dim * ratio``."""

    def __init__(self, dim: int, ratio: float, dropout: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class ClinicalTokenizer(nn.Module):
    """One token per variable: numeric ``w_i x_i + b_i``, categorical embedding; + identity.

    A missing variable (``present`` False) keeps only its identity embedding and a variable
    masked for pretraining gets a learned mask token; attention keeps both out of the keys.
    """

    def __init__(self, cardinalities: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.cardinalities = cardinalities
        v = len(cardinalities)
        self.register_buffer("is_cat", torch.tensor([c > 0 for c in cardinalities], dtype=torch.bool), persistent=False)
        offsets = [0]
        for c in cardinalities:
            offsets.append(offsets[-1] + c)
        self.register_buffer("offset", torch.tensor(offsets[:-1], dtype=torch.long), persistent=False)
        self.num_weight = nn.Parameter(torch.randn(v, dim) * 0.02)
        self.num_bias = nn.Parameter(torch.zeros(v, dim))
        self.cat_embed = nn.Embedding(max(offsets[-1], 1), dim)
        nn.init.normal_(self.cat_embed.weight, std=0.02)
        self.var_embed = nn.Parameter(torch.randn(v, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, present: Tensor, masked: Optional[Tensor] = None) -> Tensor:
        is_cat = self.is_cat
        numeric = x[..., None] * self.num_weight + self.num_bias
        codes = torch.where(is_cat & present, x, torch.zeros_like(x)).round().long().clamp(min=0)
        # numeric variables look up row 0 (their lookup is discarded below): a numeric variable after
        # the last categorical one has an offset equal to the table size
        codes = torch.where(is_cat, codes + self.offset, torch.zeros_like(codes))
        cat = self.cat_embed(codes)
        tok = torch.where(is_cat[:, None], cat, numeric)
        tok = tok * present[..., None].to(tok.dtype)  # a missing value contributes nothing
        if masked is not None:
            tok = torch.where(masked[..., None], self.mask_token.to(tok.dtype), tok)
        return tok + self.var_embed


# --------------------------------------------------------------------------------------------
# "dense": learned soft relation bias, readout an ordinary token
class GraphAttention(nn.Module):
    """Multi-head self-attention with a learned dense relation graph as an additive bias."""

    def __init__(self, dim: int, heads: int, tokens: int, relation_dim: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"clinical_dim ({dim}) must be divisible by clinical_heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_head = nn.Parameter(torch.randn(heads, tokens, relation_dim) * 0.1)
        self.rel_tail = nn.Parameter(torch.randn(heads, tokens, relation_dim) * 0.1)
        self.dropout = dropout

    def relation_bias(self) -> Tensor:
        """(H, T, T) learned graph: attention bias between every pair of variables."""
        return self.rel_head @ self.rel_tail.transpose(1, 2) / math.sqrt(self.rel_head.shape[-1])

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        blocked = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
        bias = self.relation_bias().to(q.dtype)[None] + blocked[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


# --------------------------------------------------------------------------------------------
# "t2g": T2G-Former's Graph Estimator, gated sparse adjacency, cross-level readout
class GraphEstimatorAttention(nn.Module):
    """T2G-Former's FR-Graph attention over ``tokens`` nodes (readout at index 0 + the variables).

    ``adjacency(key_mask)`` is the gated 0/1 graph (B, H, T, T) (row i = the nodes i reads from);
    ``forward(x, key_mask)`` aggregates the value projections over it (see the module docstring).
    """

    def __init__(self, dim: int, heads: int, tokens: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"clinical_dim ({dim}) must be divisible by clinical_heads ({heads})")
        self.heads, self.head_dim, self.tokens = heads, dim // heads, tokens
        # dynamic (value) embeddings -> edge weights G_w
        self.w_head = nn.Linear(dim, dim)
        self.w_tail = nn.Linear(dim, dim)
        self.relation = nn.Parameter(torch.ones(heads, self.head_dim))
        self.w_value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        # static (column) embeddings -> topology G_t -> gated adjacency A
        d_col = math.ceil(2 * math.log2(max(tokens, 2)))
        self.col_head = nn.Parameter(torch.empty(heads, tokens, d_col))
        self.col_tail = nn.Parameter(torch.empty(heads, tokens, d_col))
        for w in (self.col_head, self.col_tail):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.gate_bias = nn.Parameter(torch.zeros(1))
        for m in (self.w_head, self.w_tail, self.w_value, self.proj):
            nn.init.zeros_(m.bias)
        # structural zeros: no self-edge, nothing reads the readout (column 0)
        allowed = ~torch.eye(tokens, dtype=torch.bool)
        allowed[:, 0] = False
        self.register_buffer("structure", allowed, persistent=False)
        self.dropout = dropout

    def edge_probability(self) -> Tensor:
        """(H, T, T) ``sigmoid(G_t + b)`` with the structural zeros (self-edges, edges into the readout)."""
        e_head = F.normalize(self.col_head, p=2, dim=-1)
        e_tail = F.normalize(self.col_tail, p=2, dim=-1)
        prob = torch.sigmoid(e_head @ e_tail.transpose(1, 2) + self.gate_bias)
        return prob * self.structure.to(prob.dtype)

    def _gate(self, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(hard 0/1 adjacency, straight-through term that is 0 forward), both (B, H, T, T)."""
        prob = self.edge_probability()[None] * key_mask[:, None, None, :].to(self.col_head.dtype)
        hard = (prob > 0.5).to(prob.dtype)
        return hard, prob - prob.detach()

    def adjacency(self, key_mask: Tensor) -> Tensor:
        """(B, H, T, T) the gated adjacency: forward exactly 0/1, gradient that of the edge probability."""
        hard, st = self._gate(key_mask)
        return hard + st

    def forward(self, x: Tensor, key_mask: Tensor, return_weights: bool = False
                ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        b, t, c = x.shape
        h, d = self.heads, self.head_dim
        f_head = self.w_head(x).view(b, t, h, d).transpose(1, 2)
        f_tail = self.w_tail(x).view(b, t, h, d).transpose(1, 2)
        value = self.w_value(x).view(b, t, h, d).transpose(1, 2)
        weight = (f_head * self.relation.to(x.dtype)[None, :, None, :]) @ f_tail.transpose(-1, -2) / math.sqrt(d)
        hard, st = self._gate(key_mask)
        edge = hard.bool()
        has_edge = edge.any(dim=-1, keepdim=True)
        # the straight-through term is 0 forward; its gradient is the logit's (unit scale)
        logits = weight.masked_fill(~edge, float("-inf")) + st.to(weight.dtype)
        logits = logits.masked_fill(~has_edge, 0.0)  # a node with no edge: no NaN, zeroed below
        attn = torch.softmax(logits, dim=-1) * has_edge.to(weight.dtype)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = self.proj((attn @ value).transpose(1, 2).reshape(b, t, c))
        return (out, attn) if return_weights else out


class GraphBlock(nn.Module):
    """Pre-norm block: graph attention (``"t2g"`` or ``"dense"``) then an MLP, both residual.

    ``forward(x (B, T, C), key_mask (B, T) bool)`` -> (B, T, C); ``tokens`` = 1 + number of variables.
    """

    def __init__(self, dim: int, heads: int, tokens: int, relation_dim: int, dropout: float,
                 graph: str = "t2g") -> None:
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"clinical_graph must be one of {GRAPHS}, got {graph!r}")
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn: nn.Module = (GraphEstimatorAttention(dim, heads, tokens, dropout) if graph == "t2g"
                                else GraphAttention(dim, heads, tokens, relation_dim, dropout))
        self.mlp = Mlp(dim, 2.0, dropout)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


def graph_blocks(graph: str, dim: int, heads: int, num_variables: int, depth: int, relation_dim: int = 16,
                 dropout: float = 0.0) -> nn.ModuleList:
    """``depth`` :class:`GraphBlock` s over ``1 + num_variables`` nodes (CMML's graph decoder).

    Example:
        >>> import torch
        >>> blocks = graph_blocks("t2g", dim=8, heads=2, num_variables=3, depth=1)
        >>> x, keys = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
        >>> blocks[0](x, keys).shape
        torch.Size([2, 4, 8])
    """
    return nn.ModuleList(GraphBlock(dim, heads, num_variables + 1, relation_dim, dropout, graph)
                         for _ in range(depth))


class ClinicalGraphTransformer(nn.Module):
    """Clinical encoder: tokenizer, readout node in front, graph blocks, LayerNorm.

    Args:
        cardinalities: per variable, 0 = numeric, k >= 2 = categorical with k codes.
        dim, depth, heads: token width, number of blocks, attention heads.
        graph: ``"t2g"`` (T2G-Former's gated graph) or ``"dense"`` (soft relation bias).
        relation_dim: width of the dense relation embeddings (``"dense"`` only).
        dropout: attention and MLP dropout.

    ``forward(clinical (B, V), present (B, V) bool, masked (B, V) bool or None)`` returns the
    tokens (B, 1 + V, C), the readout at index 0, and their key mask (B, 1 + V): the readout
    True, a variable True when present and not masked.
    """

    def __init__(self, cardinalities: tuple[int, ...], dim: int, depth: int, heads: int, graph: str = "t2g",
                 relation_dim: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.graph = graph
        self.tokenizer = ClinicalTokenizer(tuple(cardinalities), dim)
        self.readout = nn.Parameter(torch.randn(dim) * 0.02)
        self.blocks = graph_blocks(graph, dim, heads, len(cardinalities), depth, relation_dim, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, clinical: Tensor, present: Tensor, masked: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer(clinical, present, masked)
        b = tok.shape[0]
        x = torch.cat([self.readout.to(tok.dtype).expand(b, 1, -1), tok], dim=1)
        visible = present if masked is None else present & ~masked
        key_mask = torch.cat([visible.new_ones(b, 1), visible], dim=1)
        for blk in self.blocks:
            x = blk(x, key_mask)
        return self.norm(x), key_mask


__all__ = ["GRAPHS", "ClinicalGraphTransformer", "ClinicalTokenizer", "GraphAttention", "GraphBlock",
           "GraphEstimatorAttention", "Mlp", "graph_blocks"]
