"""Network A: cross-modality masked learning for survival (CMML), /work/shared/papers/cmml.md.

Two branches, one per modality, pretrained by cross-modality masked reconstruction and then
fine-tuned with the Cox partial likelihood on PFS and OS:

* CT: a **Slice-Depth Transformer**. ``lungcore.nn.PatchEmbed3d`` embeds (and, when masking,
  gathers) the visible patches; every block runs pre-norm slice attention (tokens sharing a
  depth index), depth attention (tokens sharing an in-plane position) and an MLP. Both
  attentions are ``lungcore.nn.MaskedCrossAttention`` with the groups folded into the batch:
  with every token present the groups are views of the token tensor ((B, D', H'W', C) for slices,
  its transpose for depth); when masking, the visible tokens are scattered into
  (B, groups, longest group, C) and ``key_mask``/``query_mask`` mark the real ones, so only
  visible patches are encoded.
* Clinical table: a **graph Transformer** (``lungcore.models.clinical_graph``). Per-variable
  tokenizer, missing variables removed from the keys (never imputed), a readout node in front;
  ``clinical_graph="t2g"`` (default) is T2G-Former's gated sparse feature-relation graph with a
  cross-level readout, ``"dense"`` the earlier soft relation bias.
* Pretraining (``loss(batch, "pretrain")``): CT masked at ``mask_ratio_ct``, its visible tokens
  cross-attend to the *intact* clinical tokens, a light Slice-Depth decoder with a mask token
  reconstructs the masked patches (MSE on per-patch normalised voxels); clinical variables masked
  at ``mask_ratio_clinical`` cross-attend to the *intact* CT tokens and a graph decoder
  reconstructs them (MSE numeric, cross-entropy categorical). Loss = L_ct + lambda L_cli.
* Fine-tuning (``loss(batch, "finetune")``): both branches, bidirectional masked cross-attention,
  pooled (CT token mean, clinical readout) and two linear risk heads; loss = Efron Cox loss
  (``lungcore.nn.CoxPHLoss``, i.e. ``lungcore.ops.cox_ph_loss``) per endpoint with the endpoint masks, summed. During training a
  whole modality is dropped per patient with probability ``modality_dropout`` so that inference
  without CT (``ct_mask`` False) or without any clinical value (``clinical_mask`` all False)
  gives meaningful risks.
* Survival probabilities: ``fit_baseline`` estimates a Breslow baseline hazard on the training
  split (``lungcore.models.survival``); ``survival(batch, horizons)`` returns S(t) per patient.
  The baseline lives in the state dict, so checkpoints carry it.

Example:
    >>> import torch
    >>> from lungcore.models import create
    >>> model = create("cmml", img_size=(8, 16, 16), patch_size=(4, 8, 8), embed_dim=32, depth=1,
    ...                num_heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2, clinical_dim=32,
    ...                clinical_depth=1, clinical_heads=2, clinical_decoder_depth=1)
    >>> ct = torch.randn(2, 1, 8, 16, 16)
    >>> clinical = torch.tensor([[0.3, 1, 0, 1, -0.2, 2], [0.0, 0, 2, 0, 1.1, 1]])
    >>> out = model(ct, clinical, torch.ones(2, 6, dtype=torch.bool))
    >>> out["pfs"].shape, out["os"].shape
    (torch.Size([2]), torch.Size([2]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lungcore.models.clinical_graph import GRAPHS, ClinicalGraphTransformer, graph_blocks
from lungcore.models.clinical_graph import Mlp as _Mlp
from lungcore.models.registry import register_model
from lungcore.models.survival import BreslowBaseline
from lungcore.nn import CoxPHLoss, MaskedCrossAttention, PatchEmbed3d

ENDPOINTS = ("pfs", "os")


@dataclass
class CMMLConfig:
    """Defaults reproduce cmml.md (32 x 128 x 128 crop, 4 x 16 x 16 patches, width 256, ...).

    ``clinical_cardinalities``: one entry per clinical variable, 0 = numeric, k >= 2 = categorical
    with k codes (the default is ``lungcore.data.synth``'s survival schema: age, sex, ECOG, stage,
    PD-L1, smoking; use ``CohortSchema.cardinalities()`` for a real cohort).
    """

    in_channels: int = 1
    img_size: tuple[int, int, int] = (32, 128, 128)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    embed_dim: int = 256
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    clinical_cardinalities: tuple[int, ...] = (0, 2, 3, 2, 0, 3)
    clinical_dim: int = 256
    clinical_depth: int = 3
    clinical_heads: int = 8
    clinical_decoder_depth: int = 1
    clinical_graph: str = "t2g"
    relation_dim: int = 16
    fusion_heads: int = 8
    dropout: float = 0.0
    mask_ratio_ct: float = 0.75
    mask_ratio_clinical: float = 0.3
    clinical_loss_weight: float = 1.0
    norm_pix_loss: bool = True
    modality_dropout: float = 0.1
    ties: str = "efron"
    endpoints: tuple[str, ...] = ENDPOINTS

    def __post_init__(self) -> None:
        self.img_size = tuple(int(s) for s in self.img_size)
        self.patch_size = tuple(int(s) for s in self.patch_size)
        self.clinical_cardinalities = tuple(int(c) for c in self.clinical_cardinalities)
        self.endpoints = tuple(str(e) for e in self.endpoints)
        if not self.endpoints or len(set(self.endpoints)) != len(self.endpoints) or \
                any(e not in ENDPOINTS for e in self.endpoints):
            raise ValueError(f"endpoints: one or both of {ENDPOINTS}, each once, got {self.endpoints}")
        if len(self.img_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"img_size and patch_size need 3 entries (D, H, W), got {self.img_size}, {self.patch_size}")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.mask_ratio_ct < 1.0 or not 0.0 <= self.mask_ratio_clinical < 1.0:
            raise ValueError("mask ratios must be in [0, 1)")
        if any(c == 1 or c < 0 for c in self.clinical_cardinalities):
            raise ValueError(f"clinical_cardinalities: 0 (numeric) or >= 2 codes each, got {self.clinical_cardinalities}")
        if self.clinical_graph not in GRAPHS:
            raise ValueError(f"clinical_graph must be one of {GRAPHS}, got {self.clinical_graph!r}")
        if self.ties not in ("efron", "breslow"):
            raise ValueError(f"ties must be 'efron' or 'breslow', got {self.ties!r}")


# --------------------------------------------------------------------------------------------
# CT branch
def _group_layout(group: Tensor, num_groups: int) -> tuple[Tensor, Tensor, int]:
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

    def __init__(self, cfg: CMMLConfig) -> None:
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
        return _group_layout(ids // (nh * nw), nd), _group_layout(ids % (nh * nw), nh * nw)

    def forward(self, ct: Tensor, visible: Optional[Tensor] = None) -> Tensor:
        """(B, N, E) tokens of every patch, or (B, T, E) of the ``visible`` (B, T) token indices."""
        x = self.embed(ct, visible)
        slice_layout, depth_layout = self.layouts(visible)
        for blk in self.blocks:
            x = blk(x, slice_layout, depth_layout)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# the network
@register_model("cmml")
class CMML(nn.Module):
    """Cross-modality masked learning for survival (see the module docstring).

    Training contract (``lungcore.models.registry``): ``task = "survival"``,
    ``stages = ("pretrain", "finetune")``, ``loss(batch, stage)``, ``predict(batch)``.
    """

    config_class = CMMLConfig
    task = "survival"
    stages = ("pretrain", "finetune")
    needs_images = False  # a clinical table alone trains the clinical branch (lungcore.train checks)

    def __init__(self, config: Optional[CMMLConfig] = None) -> None:
        super().__init__()
        cfg = config or CMMLConfig()
        self.config = cfg
        self.endpoints = cfg.endpoints
        e, c = cfg.embed_dim, cfg.clinical_dim
        self.num_clinical = len(cfg.clinical_cardinalities)
        self.ct_encoder = SliceDepthTransformer(cfg)
        self.clinical_encoder = ClinicalGraphTransformer(cfg.clinical_cardinalities, c, cfg.clinical_depth,
                                                         cfg.clinical_heads, cfg.clinical_graph, cfg.relation_dim,
                                                         cfg.dropout)
        # pretraining: masked CT <- intact clinical; decoder with mask tokens
        self.ct_from_clinical = MaskedCrossAttention(e, cfg.fusion_heads if e % cfg.fusion_heads == 0 else 1,
                                                     context_dim=c)
        self.ct_from_clinical_norm = nn.LayerNorm(e)
        self.decoder_embed = nn.Linear(e, cfg.decoder_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(cfg.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(self.ct_encoder.num_tokens, cfg.decoder_dim) * 0.02)
        self.decoder_blocks = nn.ModuleList(SliceDepthBlock(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio, 0.0)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, cfg.in_channels * math.prod(cfg.patch_size))
        # pretraining: masked clinical <- intact CT; graph decoder; per-variable heads
        self.clinical_from_ct = MaskedCrossAttention(c, cfg.fusion_heads if c % cfg.fusion_heads == 0 else 1,
                                                     context_dim=e)
        self.clinical_from_ct_norm = nn.LayerNorm(c)
        self.clinical_decoder = graph_blocks(cfg.clinical_graph, c, cfg.clinical_heads, self.num_clinical,
                                             cfg.clinical_decoder_depth, cfg.relation_dim, 0.0)
        self.clinical_decoder_norm = nn.LayerNorm(c)
        cards = cfg.clinical_cardinalities
        self.numeric_head = nn.Parameter(torch.randn(self.num_clinical, c) * 0.02)
        self.numeric_head_bias = nn.Parameter(torch.zeros(self.num_clinical))
        self.categorical_heads = nn.ModuleList(nn.Linear(c, k) if k > 0 else nn.Identity() for k in cards)
        # fine-tuning: bidirectional fusion, pooled, two risk heads
        self.fuse_ct = MaskedCrossAttention(e, cfg.fusion_heads if e % cfg.fusion_heads == 0 else 1, context_dim=c)
        self.fuse_clinical = MaskedCrossAttention(c, cfg.fusion_heads if c % cfg.fusion_heads == 0 else 1,
                                                  context_dim=e)
        self.fuse_ct_norm, self.fuse_clinical_norm = nn.LayerNorm(e), nn.LayerNorm(c)
        self.head_norm = nn.LayerNorm(e + c)
        self.risk_head = nn.Linear(e + c, len(cfg.endpoints))
        nn.init.zeros_(self.risk_head.bias)
        nn.init.normal_(self.risk_head.weight, std=0.01)
        self.baseline = BreslowBaseline(cfg.endpoints)
        # the Cox objective as a module: the trainer flips its `distributed` flag so that under
        # torchrun the risk sets span every rank
        self.cox = CoxPHLoss(ties=cfg.ties)

    @classmethod
    def config_from_cohort(cls, schema: Any, settings: Any, overrides: Optional[dict[str, Any]] = None
                           ) -> dict[str, Any]:
        """Config fields for a cohort: ``overrides`` (the user's, they win) over what the cohort sets.

        The cohort sets ``clinical_cardinalities`` (the fitted schema's variables in column order,
        numeric and categorical in any order; a categorical variable with a single category gets 2
        codes), ``endpoints`` (the schema's endpoints that have data; ``Manifest.fit_schema`` keeps
        those) and ``img_size`` (= the preprocessing ``crop``). A user value that contradicts the
        cohort raises ``ValueError`` naming both; ``endpoints`` may be a subset (train on OS alone).
        The branch widths (``clinical_dim``, ``embed_dim`` ...) are never taken from the cohort.

        Example:
            >>> from lungcore.data import CohortSchema, ClinicalVariable, PreprocessSettings
            >>> s = CohortSchema(kind="survival", endpoints=["os"], clinical=[ClinicalVariable("age"),
            ...                  ClinicalVariable("sex", "categorical", ["F", "M"])])
            >>> cfg = CMML.config_from_cohort(s, PreprocessSettings(crop=(16, 64, 64)))
            >>> cfg["clinical_cardinalities"], cfg["endpoints"], cfg["img_size"]
            ((0, 2), ('os',), (16, 64, 64))
        """
        from lungcore.models.registry import contradiction

        user = dict(overrides or {})
        cards = tuple(0 if c == 0 else max(c, 2) for c in schema.cardinalities())
        crop = tuple(int(c) for c in settings.crop)
        patch = tuple(user.get("patch_size", CMMLConfig.patch_size))
        if "img_size" in user and tuple(user["img_size"]) != crop:
            raise contradiction("img_size", user["img_size"], "data.preprocess.crop", crop,
                                "CMML's input is the preprocessing crop")
        if any(c % p for c, p in zip(crop, patch)):
            raise ValueError(f"data.preprocess.crop {crop} must be a multiple of CMML's patch_size {patch} "
                             "(change the crop, or model_overrides.patch_size)")
        if "clinical_cardinalities" in user and tuple(user["clinical_cardinalities"]) != cards:
            raise contradiction("clinical_cardinalities", user["clinical_cardinalities"],
                                "the cohort schema's variables", cards, "the clinical embeddings follow the schema")
        endpoints = tuple(schema.endpoints)
        if "endpoints" in user:
            extra = [e for e in user["endpoints"] if e not in endpoints]
            if extra:
                raise contradiction("endpoints", user["endpoints"], "the cohort's endpoints with data", endpoints,
                                    f"{extra} cannot be trained without data")
        return {"clinical_cardinalities": cards, "endpoints": endpoints, "img_size": crop, **user}

    # ---------------------------------------------------------------------------- helpers
    def _ct_present(self, ct: Tensor, ct_mask: Optional[Tensor]) -> Tensor:
        if ct_mask is None:
            return torch.ones(ct.shape[0], dtype=torch.bool, device=ct.device)
        return ct_mask.reshape(ct.shape[0]).to(device=ct.device, dtype=torch.bool)

    @staticmethod
    def _ct_rows(present: Tensor) -> Optional[Tensor]:
        """None when every patient has a CT (no copies), else the indices of those who do.

        Everything that reads CT tokens runs on those patients only: a patient without a CT has
        no CT tokens (the cross-attentions would mask them all out and give exactly zero), so a
        clinical table alone costs no CT encoder, decoder or cross-attention work at all.
        """
        if bool(present.all()):
            return None
        return present.nonzero().squeeze(1)

    @staticmethod
    def _rows_of(x: Tensor, rows: Optional[Tensor]) -> Tensor:
        return x if rows is None else x[rows]

    @staticmethod
    def _put_rows(full: Tensor, rows: Optional[Tensor], part: Tensor) -> Tensor:
        """``full`` with the rows ``rows`` replaced by ``part`` (differentiable in both)."""
        return part if rows is None else full.index_copy(0, rows, part.to(full.dtype))

    def _check(self, ct: Tensor, clinical: Tensor, clinical_mask: Tensor) -> None:
        cfg = self.config
        if ct.dim() != 5 or tuple(ct.shape[1:]) != (cfg.in_channels, *cfg.img_size):
            raise ValueError(f"ct must have shape (B, {cfg.in_channels}, {', '.join(map(str, cfg.img_size))}), "
                             f"got {tuple(ct.shape)}")
        if clinical.shape != (ct.shape[0], self.num_clinical):
            raise ValueError(f"clinical must have shape ({ct.shape[0]}, {self.num_clinical}), got {tuple(clinical.shape)}")
        if clinical_mask.shape != clinical.shape or clinical_mask.dtype != torch.bool:
            raise ValueError(f"clinical_mask must be bool of shape {tuple(clinical.shape)}, "
                             f"got {clinical_mask.dtype} {tuple(clinical_mask.shape)}")

    def patchify(self, ct: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, N, C * pd * ph * pw) in the patch embedding's token order."""
        b, ch, d, h, w = ct.shape
        pd, ph, pw = self.config.patch_size
        x = ct.reshape(b, ch, d // pd, pd, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (d // pd) * (h // ph) * (w // pw), ch * pd * ph * pw)

    def _fuse(self, ct_tok: Optional[Tensor], rows: Optional[Tensor], cli_tok: Tensor, cli_keys: Tensor) -> Tensor:
        """Bidirectional fusion -> head features (B, E + C). ``ct_tok`` (n, N, E): the CT tokens of the
        patients ``rows`` (None = all; ``ct_tok`` None = nobody has a CT)."""
        b = cli_tok.shape[0]
        readout = cli_tok[:, 0]
        ct_pool = cli_tok.new_zeros(b, self.config.embed_dim)
        if ct_tok is not None:
            cli_s, keys_s = self._rows_of(cli_tok, rows), self._rows_of(cli_keys, rows)
            ct2 = ct_tok + self.fuse_ct(self.fuse_ct_norm(ct_tok), cli_s, key_mask=keys_s)
            cli2 = cli_s + self.fuse_clinical(self.fuse_clinical_norm(cli_s), ct_tok)
            ct_pool = self._put_rows(ct_pool, rows, ct2.mean(dim=1))
            readout = self._put_rows(readout, rows, cli2[:, 0])
        return self.head_norm(torch.cat([ct_pool, readout], dim=-1))

    # ---------------------------------------------------------------------------- inference
    def forward(self, ct: Tensor, clinical: Tensor, clinical_mask: Tensor,
                ct_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Risks (log-hazards) ``{"pfs": (B,), "os": (B,)}``; higher = earlier event.

        ``ct`` (B, 1, D, H, W); ``clinical`` (B, V) float32 (categorical codes as floats);
        ``clinical_mask`` (B, V) bool; ``ct_mask`` (B,) bool, False = the patient has no CT.
        """
        clinical_mask = clinical_mask.to(torch.bool)
        self._check(ct, clinical, clinical_mask)
        rows = self._ct_rows(self._ct_present(ct, ct_mask))
        ct_tok = None if rows is not None and rows.numel() == 0 else self.ct_encoder(self._rows_of(ct, rows))
        cli_tok, cli_keys = self.clinical_encoder(clinical, clinical_mask)
        risk = self.risk_head(self._fuse(ct_tok, rows, cli_tok, cli_keys))
        return {name: risk[:, i] for i, name in enumerate(self.endpoints)}

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Eval-mode risks of a batch dict (restores the previous train/eval mode)."""
        was = self.training
        self.eval()
        try:
            return self(batch["ct"], batch["clinical"], batch["clinical_mask"], batch.get("ct_mask"))
        finally:
            self.train(was)

    @torch.no_grad()
    def fit_baseline(self, risks: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        """Fit the Breslow baseline hazard per endpoint on training-split risks and endpoints."""
        for e in self.endpoints:
            self.baseline.fit(e, risks[e], batch[f"{e}_time"], batch[f"{e}_event"], batch.get(f"{e}_mask"))

    @torch.no_grad()
    def survival(self, batch: dict[str, Any], horizons, risks: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
        """``{"pfs": (B, len(horizons)), "os": ...}`` survival probabilities S(h | patient)."""
        risks = risks if risks is not None else self.predict(batch)
        return {e: self.baseline.survival(e, risks[e], horizons) for e in self.endpoints}

    # ---------------------------------------------------------------------------- training
    def loss(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, dict[str, float]]:
        """(scalar to minimise, named floats to log) for ``stage`` "pretrain" or "finetune"."""
        if stage == "pretrain":
            out = self.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], batch.get("ct_mask"))
            total = out["ct"] + self.config.clinical_loss_weight * out["clinical"]
            return total, {"loss": float(total.detach()), "ct_reconstruction": float(out["ct"].detach()),
                           "clinical_reconstruction": float(out["clinical"].detach())}
        if stage == "finetune":
            return self.finetune_loss(batch)
        raise ValueError(f"stage must be one of {self.stages}, got {stage!r}")

    def finetune_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        ct, clinical = batch["ct"], batch["clinical"]
        clinical_mask = batch["clinical_mask"].to(torch.bool)
        ct_mask = self._ct_present(ct, batch.get("ct_mask"))
        p = self.config.modality_dropout
        if self.training and p > 0:
            b = ct.shape[0]
            drop = torch.rand(b, device=ct.device)
            has_cli = clinical_mask.any(dim=1)
            drop_ct = (drop < p) & has_cli  # never drop a patient's only modality
            drop_cli = (drop >= p) & (drop < 2 * p) & ct_mask
            ct_mask = ct_mask & ~drop_ct
            clinical_mask = clinical_mask & ~drop_cli[:, None]
        risks = self(ct, clinical, clinical_mask, ct_mask)
        total = risks[self.endpoints[0]].new_zeros(())
        logs: dict[str, float] = {}
        for e in self.endpoints:
            if f"{e}_time" not in batch:
                continue
            mask = batch.get(f"{e}_mask")
            loss_e = self.cox(risks[e], batch[f"{e}_time"], batch[f"{e}_event"],
                              mask=None if mask is None else mask.to(torch.bool))
            total = total + loss_e
            logs[f"cox_{e}"] = float(loss_e.detach())
        logs["loss"] = float(total.detach())
        return total, logs

    def random_visible(self, b: int, device: torch.device, ratio: Optional[float] = None,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """(B, T) indices of the visible CT tokens, sorted, ``T = round(N (1 - ratio))``."""
        n = self.ct_encoder.num_tokens
        ratio = self.config.mask_ratio_ct if ratio is None else ratio
        keep = max(1, int(round(n * (1 - ratio))))
        noise = torch.rand(b, n, device=device, generator=generator)
        return noise.argsort(dim=1)[:, :keep].sort(dim=1).values

    def random_clinical_mask(self, present: Tensor, ratio: Optional[float] = None,
                             generator: Optional[torch.Generator] = None) -> Tensor:
        """(B, V) bool: present variables chosen for masking (about ``ratio`` of them, >= 1 when any)."""
        ratio = self.config.mask_ratio_clinical if ratio is None else ratio
        noise = torch.rand(present.shape, device=present.device, generator=generator)
        noise = noise.masked_fill(~present, 2.0)
        n_present = present.sum(dim=1, keepdim=True)
        n_mask = torch.where(n_present > 0, (n_present.float() * ratio).round().clamp(min=1), torch.zeros_like(n_present.float()))
        n_mask = torch.minimum(n_mask, (n_present - 1).clamp(min=0).float()) if present.shape[1] > 1 else n_mask
        rank = noise.argsort(dim=1).argsort(dim=1)
        return (rank < n_mask) & present

    def pretrain_losses(self, ct: Tensor, clinical: Tensor, clinical_mask: Tensor, ct_mask: Optional[Tensor] = None,
                        visible: Optional[Tensor] = None, clinical_masked: Optional[Tensor] = None,
                        return_predictions: bool = False) -> dict[str, Tensor]:
        """Cross-modality masked reconstruction, both directions: ``{"ct": L_ct, "clinical": L_cli}``.

        ``visible`` (B, T) CT token indices and ``clinical_masked`` (B, V) bool override the
        random masks (tests, evaluation); with ``return_predictions`` the dict also holds
        ``ct_pred`` (B, N, P), ``ct_target`` (B, N, P), ``ct_masked`` (B, N) bool,
        ``numeric_pred`` (B, V) and ``categorical_logits`` (list of (B, k) or None).
        """
        cfg = self.config
        clinical_mask = clinical_mask.to(torch.bool)
        self._check(ct, clinical, clinical_mask)
        b = ct.shape[0]
        ct_present = self._ct_present(ct, ct_mask)
        n = self.ct_encoder.num_tokens
        if visible is None:
            visible = self.random_visible(b, ct.device)
        if clinical_masked is None:
            clinical_masked = self.random_clinical_mask(clinical_mask)
        clinical_masked = clinical_masked & clinical_mask

        # intact copies of both modalities; every CT step runs on the patients with a CT only
        rows = self._ct_rows(ct_present)
        n_ct = b if rows is None else int(rows.numel())

        def sub(x: Tensor) -> Tensor:
            return self._rows_of(x, rows)

        ct_full = self.ct_encoder(sub(ct)) if n_ct else None
        cli_full, cli_keys = self.clinical_encoder(clinical, clinical_mask)

        # CT direction: visible tokens -> + intact clinical -> decoder with mask tokens
        masked_tok = torch.ones(b, n, dtype=torch.bool, device=ct.device).scatter(1, visible, False)
        if n_ct:
            ct_s, vis_s = sub(ct), sub(visible)
            vis_tok = self.ct_encoder(ct_s, vis_s)
            vis_tok = vis_tok + self.ct_from_clinical(self.ct_from_clinical_norm(vis_tok), sub(cli_full),
                                                      key_mask=sub(cli_keys))
            dec_vis = self.decoder_embed(vis_tok)
            full = self.decoder_mask_token.to(dec_vis.dtype).expand(n_ct, n, -1)
            idx = vis_s[..., None].expand(-1, -1, dec_vis.shape[-1])
            full = full.scatter(1, idx, dec_vis) + self.decoder_pos
            layouts = self.ct_encoder.layouts(None)
            for blk in self.decoder_blocks:
                full = blk(full, *layouts)
            pred = self.decoder_pred(self.decoder_norm(full))
            target = self.patchify(ct_s)
            if cfg.norm_pix_loss:
                mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1e-6).sqrt()
            weight = sub(masked_tok).to(pred.dtype)
            per_tok = ((pred - target) ** 2).mean(dim=-1)
            loss_ct = (per_tok * weight).sum() / weight.sum().clamp(min=1.0)
        else:
            loss_ct = cli_full.new_zeros(())

        # clinical direction: masked variables -> + intact CT -> graph decoder -> heads
        cli_m, keys_m = self.clinical_encoder(clinical, clinical_mask, clinical_masked)
        if n_ct:  # without a CT there is nothing to attend to: the tokens stay as they are
            cli_s = sub(cli_m)
            cli_m = self._put_rows(cli_m, rows, cli_s + self.clinical_from_ct(self.clinical_from_ct_norm(cli_s), ct_full))
        for blk in self.clinical_decoder:
            cli_m = blk(cli_m, keys_m)
        h = self.clinical_decoder_norm(cli_m)[:, 1:]  # (B, V, C)
        numeric_pred = (h * self.numeric_head).sum(-1) + self.numeric_head_bias
        loss_terms = []
        counts = []
        logits_all: list[Optional[Tensor]] = []
        for i, k in enumerate(cfg.clinical_cardinalities):
            sel = clinical_masked[:, i]
            if k == 0:
                logits_all.append(None)
                err = (numeric_pred[:, i] - clinical[:, i]) ** 2
            else:
                logits = self.categorical_heads[i](h[:, i])
                logits_all.append(logits)
                target_i = clinical[:, i].round().long().clamp(0, k - 1)
                err = F.cross_entropy(logits, target_i, reduction="none")
            loss_terms.append((err * sel.to(err.dtype)).sum())
            counts.append(sel.sum())
        loss_cli = torch.stack(loss_terms).sum() / torch.stack(counts).sum().clamp(min=1).to(loss_ct.dtype)
        out = {"ct": loss_ct, "clinical": loss_cli}
        if return_predictions:
            if rows is not None:  # patients without a CT: zeros, never counted (ct_masked False)
                if not n_ct:
                    pred = target = ct.new_zeros(0, n, cfg.in_channels * math.prod(cfg.patch_size))
                pred = pred.new_zeros(b, *pred.shape[1:]).index_copy(0, rows, pred)
                target = target.new_zeros(b, *target.shape[1:]).index_copy(0, rows, target)
            out.update(ct_pred=pred, ct_target=target, ct_masked=masked_tok & ct_present[:, None],
                       numeric_pred=numeric_pred, categorical_logits=logits_all, clinical_masked=clinical_masked)
        return out


__all__ = ["CMML", "CMMLConfig", "SliceDepthTransformer", "ClinicalGraphTransformer"]
