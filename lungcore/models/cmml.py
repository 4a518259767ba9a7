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
  cross-level readout, its column embeddings trained at the authors' own learning rate
  (``graph_column_lr``), ``"dense"`` the earlier soft relation bias.
* Pretraining (``loss(batch, "pretrain")``): CT masked at ``mask_ratio_ct``; the visible tokens
  are encoded, every masked position gets a learned mask token plus its position embedding, and
  all tokens cross-attend to the *intact* clinical tokens (``ct_from_clinical``: the completion);
  a light Slice-Depth decoder reconstructs the masked patches (MSE on per-patch normalised voxels).
  Clinical variables masked at ``mask_ratio_clinical`` (mask token) cross-attend to the *intact*
  CT tokens (``clinical_from_ct``) and a graph decoder reconstructs them (MSE numeric,
  cross-entropy categorical). With probability ``full_mask_prob`` per patient and direction the
  whole CT / the whole record is masked, so completion also learns an absent modality.
  Loss = L_ct + lambda L_cli.
* Fine-tuning (``loss(batch, "finetune")``): both branches, bidirectional masked cross-attention
  through the **pretrained** completion layers (``fusion_init="pretrained"``; ``"fresh"`` builds
  new ``fuse_*`` layers for the ablation), pooled (CT token mean, clinical readout), two linear
  risk heads; loss = Efron Cox loss (``lungcore.nn.CoxPHLoss``, i.e.
  ``lungcore.ops.cox_ph_loss``) per endpoint with the endpoint masks, summed.
* A missing modality is **completed** (``missing_modality="complete"``): a patient without a CT
  (``ct_mask`` False) gets the CT tokens that pretraining's fully masked case taught (mask tokens
  + positions cross-attending to its clinical tokens, pooled like encoded CT tokens); a patient
  without any clinical value (``clinical_mask`` all False) gets the record that the pretrained path
  reconstructs from its CT (a fully masked record cross-attends to the CT tokens, the graph decoder
  predicts every variable: numeric values, most likely codes), encoded like any record.
  ``"zero"`` is the earlier behaviour (zero CT pool; a record of variable identities only). During
  fine-tuning a whole modality is dropped per patient with probability ``modality_dropout``, so
  the head learns from completed modalities too.
* Survival probabilities: ``fit_baseline`` estimates a Breslow baseline hazard on the training
  split (``lungcore.models.survival``); ``survival(batch, horizons)`` returns S(t) per patient.
  The baseline lives in the state dict, so checkpoints carry it.

What the paper states (/work/shared/papers/cmml.md: abstract and figure caption; no code is
public): the two branches (Slice-Depth Transformer; graph-based Transformer over the clinical
variables), pretraining with an intact and a masked copy of each modality where the masked
modality's features are completed from the intact features of the other by cross-modal attention
and decoders reconstruct the masked parts (a learnable mask token in the visual decoder), then
fine-tuning with a survival objective on PFS and OS, C-index as the metric; the mask ratio matters.

lungcore's choices (the paper does not state them): input 32 x 128 x 128 and patches 4 x 16 x 16;
every width, depth and head count; mask ratios 0.75 (CT) and 0.3 (clinical); lambda = 1; the
reconstruction losses (normalised-voxel MSE, MSE / cross-entropy per variable); the Cox partial
likelihood with Efron ties as the survival objective; one joint model with a PFS and an OS head;
modality dropout 0.1; whole-modality masking 0.1 in pretraining; the completion design (the mask
token enters before the cross-modal completion rather than inside the decoder, so the completion
fills masked positions; fine-tuning reuses the completion layers as its fusion; an absent CT is
completed at the feature level, not reconstructed as voxels, which the normalised-voxel target could
not give back; an absent record at the value level, since the clinical readout never attends to
masked variables and completed tokens alone would not reach the head); mean pooling + readout + linear
heads; the Breslow baseline. Checkpoints of the CMML before pretrained fusion (``decoder_mask_token``,
``fuse_*``) do not load: retrain them.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lungcore import checks
from lungcore.models.clinical_graph import GRAPHS, ClinicalGraphTransformer, graph_blocks
from lungcore.models.registry import register_model
from lungcore.models.slice_depth import SliceDepthBlock, SliceDepthTransformer
from lungcore.models.survival import BreslowBaseline
from lungcore.nn import CoxPHLoss, MaskedCrossAttention

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

ENDPOINTS = ("pfs", "os")
FUSION_INITS = ("pretrained", "fresh")
MISSING_MODALITY = ("complete", "zero")


@dataclass
class CMMLConfig:
    """Defaults reproduce cmml.md (32 x 128 x 128 crop, 4 x 16 x 16 patches, width 256, ...).

    ``clinical_cardinalities``: one entry per clinical variable, 0 = numeric, k >= 2 = categorical
    with k codes (the default is ``lungcore.data.synth``'s survival schema: age, sex, ECOG, stage,
    PD-L1, smoking; use ``CohortSchema.cardinalities()`` for a real cohort).

    ``full_mask_prob``: per patient and pretraining direction, the probability of masking the whole
    CT / the whole record (teaches completion of an absent modality). ``fusion_init``:
    ``"pretrained"`` fine-tunes the fusion from the pretrained cross-modal completion layers,
    ``"fresh"`` builds new ``fuse_*`` layers. ``missing_modality``: ``"complete"`` completes an
    absent CT / record from the other modality, ``"zero"`` zero-fills (the behaviour before
    pretrained fusion; with ``fusion_init="fresh"`` the earlier fine-tuning forward exactly).
    ``graph_column_lr``: the peak learning rate of the T2G graph's column embeddings (``col_head``,
    ``col_tail``; no weight decay), as T2G-Former's authors train them (their ``col_lr``: 1e-2 in
    ``configs/california/T2GFormer/cfg.json``, 2.8e-2 tuned for adult; about 100x their main rate);
    it follows the run's warm-up and schedule. None: the run's ``optim.lr`` for them too. Which
    defaults the paper states and which are lungcore's choices: the documentation of
    :mod:`lungcore.models.cmml`.

    Example:
        >>> cfg = CMMLConfig(img_size=[8, 16, 16], patch_size=[4, 8, 8], embed_dim=16, depth=1)
        >>> cfg.img_size, cfg.endpoints          # sequences are normalised to tuples
        ((8, 16, 16), ('pfs', 'os'))
        >>> CMMLConfig(img_size=(10, 16, 16))
        Traceback (most recent call last):
        ...
        ValueError: img_size (10, 16, 16) must be a multiple of patch_size (4, 16, 16)
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
    full_mask_prob: float = 0.1
    fusion_init: str = "pretrained"
    missing_modality: str = "complete"
    graph_column_lr: Optional[float] = 1e-2

    def __post_init__(self) -> None:
        self.norm_pix_loss = checks.boolean("norm_pix_loss", self.norm_pix_loss)
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
        if not 0.0 <= self.full_mask_prob <= 1.0:
            raise ValueError(f"full_mask_prob must be in [0, 1], got {self.full_mask_prob}")
        if self.fusion_init not in FUSION_INITS:
            raise ValueError(f"fusion_init must be one of {FUSION_INITS}, got {self.fusion_init!r}")
        if self.missing_modality not in MISSING_MODALITY:
            raise ValueError(f"missing_modality must be one of {MISSING_MODALITY}, got {self.missing_modality!r}")
        if self.graph_column_lr is not None and not (math.isfinite(self.graph_column_lr) and self.graph_column_lr > 0):
            raise ValueError(f"graph_column_lr must be a positive number or None, got {self.graph_column_lr!r}")


# --------------------------------------------------------------------------------------------
# the network
@register_model("cmml")
class CMML(nn.Module):
    """Cross-modality masked learning for survival (the design: :mod:`lungcore.models.cmml`).

    Training contract (``lungcore.models.registry``): ``task = "survival"``,
    ``stages = ("pretrain", "finetune")``, ``loss(batch, stage)``, ``predict(batch)``.

    Example:
        >>> import torch
        >>> cfg = CMMLConfig(img_size=(8, 16, 16), patch_size=(4, 8, 8), embed_dim=16, depth=1, num_heads=2,
        ...                  decoder_dim=16, decoder_depth=1, decoder_heads=2, clinical_dim=16, clinical_depth=1,
        ...                  clinical_heads=2)
        >>> model = CMML(cfg)
        >>> clinical = torch.tensor([[0.3, 1, 0, 1, -0.2, 2], [0.0, 0, 2, 0, 1.1, 1], [1.2, 1, 1, 1, 0.4, 0]])
        >>> batch = {"ct": torch.randn(3, 1, 8, 16, 16), "ct_mask": torch.tensor([True, True, False]),  # 3rd: no CT
        ...          "clinical": clinical, "clinical_mask": torch.ones(3, 6, dtype=torch.bool),
        ...          "os_time": torch.tensor([2.0, 5.0, 8.0]), "os_event": torch.tensor([1, 0, 1]),
        ...          "pfs_time": torch.tensor([1.0, 4.0, 6.0]), "pfs_event": torch.tensor([1, 1, 0])}
        >>> loss, logs = model.loss(batch, "pretrain")        # masked cross-modal reconstruction
        >>> sorted(logs)
        ['clinical_reconstruction', 'ct_reconstruction', 'loss']
        >>> risks = model.predict(batch)                      # log-hazards, higher = earlier event
        >>> risks["pfs"].shape, risks["os"].shape
        (torch.Size([3]), torch.Size([3]))
        >>> model.fit_baseline(risks, batch)                  # Breslow baseline (on the training split)
        >>> model.survival(batch, horizons=[1.0, 5.0], risks=risks)["os"].shape   # S(t) per patient
        torch.Size([3, 2])
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
        # cross-modal completion, trained by masked pretraining and (fusion_init="pretrained") the
        # fine-tuning fusion: masked CT (visible tokens + mask tokens at the masked positions) <- intact
        # clinical; a decoder reconstructs the masked patches
        self.ct_mask_token = nn.Parameter(torch.zeros(e))
        self.ct_from_clinical = MaskedCrossAttention(e, cfg.fusion_heads if e % cfg.fusion_heads == 0 else 1,
                                                     context_dim=c)
        self.ct_from_clinical_norm = nn.LayerNorm(e)
        self.decoder_embed = nn.Linear(e, cfg.decoder_dim)
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
        # fine-tuning: bidirectional fusion (the pretrained completion layers, or fresh ones), pooled,
        # two risk heads
        if cfg.fusion_init == "fresh":
            self.fuse_ct = MaskedCrossAttention(e, cfg.fusion_heads if e % cfg.fusion_heads == 0 else 1,
                                                context_dim=c)
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

    def _fusion_layers(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """(CT <- clinical attention, its norm, clinical <- CT attention, its norm) that fine-tuning fuses
        with: the pretrained completion layers, or the fresh ``fuse_*`` ones (``fusion_init``)."""
        if self.config.fusion_init == "fresh":
            return self.fuse_ct, self.fuse_ct_norm, self.fuse_clinical, self.fuse_clinical_norm
        return self.ct_from_clinical, self.ct_from_clinical_norm, self.clinical_from_ct, self.clinical_from_ct_norm

    def ct_mask_tokens(self, b: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(b, N, E): a fully masked CT, the learned mask token plus the position embedding of every patch."""
        tok = self.ct_mask_token
        pos = self.ct_encoder.embed.pos_embed
        if pos is not None:
            tok = tok + pos
        return tok.to(dtype).expand(b, self.ct_encoder.num_tokens, -1)

    def complete_ct(self, tokens: Tensor, cli_tok: Tensor, cli_keys: Tensor) -> Tensor:
        """CT tokens (n, N, E) completed from the intact clinical tokens by the pretrained cross-attention."""
        return tokens + self.ct_from_clinical(self.ct_from_clinical_norm(tokens), cli_tok, key_mask=cli_keys)

    def complete_clinical(self, tokens: Tensor, ct_tok: Tensor) -> Tensor:
        """Clinical tokens (n, 1 + V, C) completed from the intact CT tokens by the pretrained cross-attention."""
        return tokens + self.clinical_from_ct(self.clinical_from_ct_norm(tokens), ct_tok)

    def decode_clinical(self, tokens: Tensor, key_mask: Tensor) -> tuple[Tensor, list[Optional[Tensor]]]:
        """The pretrained graph decoder and heads on (completed) clinical tokens (B, 1 + V, C):
        numeric predictions (B, V) and per variable the categorical logits (B, k) (None if numeric)."""
        for blk in self.clinical_decoder:
            tokens = blk(tokens, key_mask)
        h = self.clinical_decoder_norm(tokens)[:, 1:]  # (B, V, C)
        numeric = (h * self.numeric_head).sum(-1) + self.numeric_head_bias
        logits = [self.categorical_heads[i](h[:, i]) if k > 0 else None
                  for i, k in enumerate(self.config.clinical_cardinalities)]
        return numeric, logits

    def complete_record(self, ct_tok: Tensor) -> Tensor:
        """(n, V) clinical values completed from the CT tokens ``ct_tok`` (n, N, E) the way masked
        pretraining taught it: a fully masked record cross-attends to the CT (``clinical_from_ct``)
        and the graph decoder reconstructs every variable (numeric: its prediction; categorical: the
        most likely code). Differentiable in the numeric values."""
        n, v = ct_tok.shape[0], self.num_clinical
        everything = torch.ones(n, v, dtype=torch.bool, device=ct_tok.device)
        tok, keys = self.clinical_encoder(ct_tok.new_zeros(n, v), everything, everything)
        numeric, logits = self.decode_clinical(self.complete_clinical(tok, ct_tok), keys)
        cols = [numeric[:, i] if lg is None else lg.argmax(dim=1).to(numeric.dtype) for i, lg in enumerate(logits)]
        return torch.stack(cols, dim=1)

    def _fuse(self, ct_tok: Optional[Tensor], rows: Optional[Tensor], ct_present: Tensor, cli_tok: Tensor,
              cli_keys: Tensor) -> Tensor:
        """Bidirectional fusion -> head features (B, E + C). ``ct_tok`` (n, N, E): the CT tokens of the
        patients ``rows`` (None = all; ``ct_tok`` None = nobody has a CT).

        A patient without a CT gets (``missing_modality="complete"``) the CT tokens that pretraining
        taught the model to complete from the clinical tokens (mask tokens at every position, cross-
        attention to the clinical tokens), or (``"zero"``) a zero CT pool; its clinical readout has no
        CT to attend to. With ``fusion_init="pretrained"`` the completion layer is the fusion; with
        ``"fresh"`` the completed tokens then go through the fresh fusion like any others.
        """
        cfg = self.config
        b = cli_tok.shape[0]
        attn_ct, norm_ct, attn_cli, norm_cli = self._fusion_layers()
        fresh, complete = cfg.fusion_init == "fresh", cfg.missing_modality == "complete"
        readout = cli_tok[:, 0]
        ct_pool = cli_tok.new_zeros(b, cfg.embed_dim)
        if ct_tok is not None:
            cli_s, keys_s = self._rows_of(cli_tok, rows), self._rows_of(cli_keys, rows)
            ct2 = ct_tok + attn_ct(norm_ct(ct_tok), cli_s, key_mask=keys_s)
            cli2 = cli_s + attn_cli(norm_cli(cli_s), ct_tok)
            ct_pool = self._put_rows(ct_pool, rows, ct2.mean(dim=1))
            readout = self._put_rows(readout, rows, cli2[:, 0])
        if complete and not bool(ct_present.all()):
            miss = (~ct_present).nonzero().squeeze(1)
            cli_m, keys_m = cli_tok[miss], cli_keys[miss]
            x = self.complete_ct(self.ct_mask_tokens(int(miss.numel()), cli_tok.dtype), cli_m, keys_m)
            if fresh:
                x = x + attn_ct(norm_ct(x), cli_m, key_mask=keys_m)
            ct_pool = ct_pool.index_copy(0, miss, x.mean(dim=1).to(ct_pool.dtype))
        return self.head_norm(torch.cat([ct_pool, readout], dim=-1))

    def _complete_records(self, clinical: Tensor, clinical_mask: Tensor, ct_tok: Tensor, rows: Optional[Tensor]
                          ) -> tuple[Tensor, Tensor]:
        """``clinical``/``clinical_mask`` with every patient that has a CT but no clinical value given
        the record :meth:`complete_record` reconstructs from its CT (then encoded like any record)."""
        absent = self._rows_of(~clinical_mask.any(dim=1), rows)
        if not bool(absent.any()):
            return clinical, clinical_mask
        which = absent.nonzero().squeeze(1)
        target = which if rows is None else rows[which]
        values = self.complete_record(ct_tok[which]).to(clinical.dtype)
        return clinical.index_copy(0, target, values), clinical_mask.index_fill(0, target, True)

    def param_group_overrides(self) -> dict[str, dict[str, float]]:
        """Parameter name -> its own optimiser settings (``lungcore.train.schedule.optimizer``): the
        T2G graph's column embeddings at ``graph_column_lr`` without weight decay (empty for the dense
        graph or ``graph_column_lr=None``).

        Example:
            >>> from lungcore.models import create
            >>> m = create("cmml", img_size=(8, 16, 16), patch_size=(4, 8, 8), embed_dim=16, depth=1, num_heads=2,
            ...            decoder_dim=16, decoder_depth=1, decoder_heads=2, clinical_dim=16, clinical_depth=1,
            ...            clinical_heads=2, clinical_decoder_depth=1)
            >>> sorted(m.param_group_overrides())[:2]
            ['clinical_decoder.0.attn.col_head', 'clinical_decoder.0.attn.col_tail']
            >>> m.param_group_overrides()["clinical_encoder.blocks.0.attn.col_head"]
            {'lr': 0.01, 'weight_decay': 0.0}
        """
        lr = self.config.graph_column_lr
        if lr is None:
            return {}
        return {name: {"lr": float(lr), "weight_decay": 0.0} for name, _ in self.named_parameters()
                if name.endswith((".col_head", ".col_tail"))}

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> _IncompatibleKeys:
        """``nn.Module.load_state_dict``, refusing with one clear message a state dict of the CMML
        before pretrained fusion (it has ``decoder_mask_token`` and fresh ``fuse_*`` layers)."""
        if "decoder_mask_token" in state_dict and "ct_mask_token" not in state_dict:
            raise RuntimeError(
                "CMML weights from before the pretrained fusion (decoder_mask_token, fresh fuse_* layers): this "
                "CMML fine-tunes with the pretrained cross-modal layers and completes missing modalities; retrain it")
        return super().load_state_dict(state_dict, *args, **kwargs)

    # ---------------------------------------------------------------------------- inference
    def forward(self, ct: Tensor, clinical: Tensor, clinical_mask: Tensor,
                ct_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Risks (log-hazards) ``{"pfs": (B,), "os": (B,)}``; higher = earlier event.

        ``ct`` (B, 1, D, H, W); ``clinical`` (B, V) float32 (categorical codes as floats);
        ``clinical_mask`` (B, V) bool; ``ct_mask`` (B,) bool, False = the patient has no CT (its
        voxels are never read). A missing modality is completed or zero-filled (``missing_modality``).
        """
        clinical_mask = clinical_mask.to(torch.bool)
        self._check(ct, clinical, clinical_mask)
        ct_present = self._ct_present(ct, ct_mask)
        rows = self._ct_rows(ct_present)
        ct_tok = None if rows is not None and rows.numel() == 0 else self.ct_encoder(self._rows_of(ct, rows))
        if self.config.missing_modality == "complete" and ct_tok is not None:
            clinical, clinical_mask = self._complete_records(clinical, clinical_mask, ct_tok, rows)
        cli_tok, cli_keys = self.clinical_encoder(clinical, clinical_mask)
        feats = self._fuse(ct_tok, rows, ct_present, cli_tok, cli_keys)
        risk = self.risk_head(feats)
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
    def survival(self, batch: dict[str, Any], horizons: Sequence[float] | Tensor,
                 risks: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
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
        """Cox fine-tuning loss of a batch (the sum over endpoints) and its logs; ``loss(batch, "finetune")``."""
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
                             generator: Optional[torch.Generator] = None, full: Optional[Tensor] = None) -> Tensor:
        """(B, V) bool: present variables chosen for masking (about ``ratio`` of them, >= 1 when any,
        and at least one left visible when two or more are present); ``full`` (B,) bool rows mask
        every present variable (a fully missing record, which completion must learn)."""
        ratio = self.config.mask_ratio_clinical if ratio is None else ratio
        noise = torch.rand(present.shape, device=present.device, generator=generator)
        noise = noise.masked_fill(~present, 2.0)
        n_present = present.sum(dim=1, keepdim=True)
        n_mask = torch.where(n_present > 0, (n_present.float() * ratio).round().clamp(min=1), torch.zeros_like(n_present.float()))
        n_mask = torch.minimum(n_mask, (n_present - 1).clamp(min=0).float()) if present.shape[1] > 1 else n_mask
        rank = noise.argsort(dim=1).argsort(dim=1)
        masked = (rank < n_mask) & present
        return masked if full is None else masked | (full.reshape(-1, 1).to(torch.bool) & present)

    def _reconstruct_ct(self, ct: Tensor, visible: Tensor, masked: Tensor, cli_tok: Tensor, cli_keys: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """CT direction on patients with a CT: visible tokens + mask tokens, completed from the intact
        clinical tokens, decoded; (prediction (n, N, P), target (n, N, P), MSE over the masked patches)."""
        vis_tok = self.ct_encoder(ct, visible)
        mask_tok = self.ct_mask_tokens(ct.shape[0], vis_tok.dtype)
        idx = visible[..., None].expand(-1, -1, vis_tok.shape[-1])
        tokens = torch.where(masked[..., None], mask_tok, mask_tok.scatter(1, idx, vis_tok))
        tokens = self.complete_ct(tokens, cli_tok, cli_keys)
        full = self.decoder_embed(tokens) + self.decoder_pos
        layouts = self.ct_encoder.layouts(None)
        for blk in self.decoder_blocks:
            full = blk(full, *layouts)
        pred = self.decoder_pred(self.decoder_norm(full))
        target = self.patchify(ct)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        weight = masked.to(pred.dtype)
        per_tok = ((pred - target) ** 2).mean(dim=-1)
        return pred, target, (per_tok * weight).sum() / weight.sum().clamp(min=1.0)

    def _clinical_loss(self, clinical: Tensor, masked: Tensor, numeric_pred: Tensor,
                       logits_all: list[Optional[Tensor]], dtype: torch.dtype) -> Tensor:
        """Mean reconstruction error over the masked variables: squared error (numeric), cross-entropy
        (categorical)."""
        loss_terms, counts = [], []
        for i, k in enumerate(self.config.clinical_cardinalities):
            sel = masked[:, i]
            if k == 0:
                err = (numeric_pred[:, i] - clinical[:, i]) ** 2
            else:
                target_i = clinical[:, i].round().long().clamp(0, k - 1)
                err = F.cross_entropy(logits_all[i], target_i, reduction="none")
            loss_terms.append((err * sel.to(err.dtype)).sum())
            counts.append(sel.sum())
        return torch.stack(loss_terms).sum() / torch.stack(counts).sum().clamp(min=1).to(dtype)

    def pretrain_losses(self, ct: Tensor, clinical: Tensor, clinical_mask: Tensor, ct_mask: Optional[Tensor] = None,
                        visible: Optional[Tensor] = None, clinical_masked: Optional[Tensor] = None,
                        return_predictions: bool = False, ct_all_masked: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Cross-modality masked reconstruction, both directions: ``{"ct": L_ct, "clinical": L_cli}``.

        CT direction: the visible tokens are encoded, every masked position gets the mask token plus
        its position embedding, all N tokens cross-attend to the intact clinical tokens (the
        completion), the decoder reconstructs the masked patches. Clinical direction: the masked
        variables are mask tokens, the tokens cross-attend to the intact CT tokens, the graph decoder
        reconstructs them. With probability ``full_mask_prob`` per patient and direction the whole
        CT / the whole record is masked, so the completion layers also learn an absent modality.

        ``visible`` (B, T) CT token indices, ``ct_all_masked`` (B,) bool (patients whose whole CT is
        masked; drawn only with the random ``visible``) and ``clinical_masked`` (B, V) bool override
        the random masks (tests, evaluation); with ``return_predictions`` the dict also holds
        ``ct_pred`` (B, N, P), ``ct_target`` (B, N, P), ``ct_masked`` (B, N) bool,
        ``numeric_pred`` (B, V) and ``categorical_logits`` (list of (B, k) or None).
        """
        cfg = self.config
        clinical_mask = clinical_mask.to(torch.bool)
        self._check(ct, clinical, clinical_mask)
        b = ct.shape[0]
        ct_present = self._ct_present(ct, ct_mask)
        n = self.ct_encoder.num_tokens
        p_full = cfg.full_mask_prob
        if visible is None:
            visible = self.random_visible(b, ct.device)
            if ct_all_masked is None and p_full > 0:
                ct_all_masked = torch.rand(b, device=ct.device) < p_full
        if clinical_masked is None:
            clinical_masked = self.random_clinical_mask(
                clinical_mask, full=torch.rand(b, device=ct.device) < p_full if p_full > 0 else None)
        clinical_masked = clinical_masked & clinical_mask

        # intact copies of both modalities; every CT step runs on the patients with a CT only
        rows = self._ct_rows(ct_present)
        n_ct = b if rows is None else int(rows.numel())

        def sub(x: Tensor) -> Tensor:
            return self._rows_of(x, rows)

        ct_full = self.ct_encoder(sub(ct)) if n_ct else None
        cli_full, cli_keys = self.clinical_encoder(clinical, clinical_mask)

        # CT direction: visible tokens + mask tokens -> completed from the intact clinical -> decoder
        masked_tok = torch.ones(b, n, dtype=torch.bool, device=ct.device).scatter(1, visible, False)
        if ct_all_masked is not None:
            masked_tok = masked_tok | ct_all_masked.reshape(b, 1).to(device=ct.device, dtype=torch.bool)
        if n_ct:
            pred, target, loss_ct = self._reconstruct_ct(sub(ct), sub(visible), sub(masked_tok), sub(cli_full),
                                                         sub(cli_keys))
        else:
            loss_ct = cli_full.new_zeros(())

        # clinical direction: masked variables -> + intact CT -> graph decoder -> heads
        cli_m, keys_m = self.clinical_encoder(clinical, clinical_mask, clinical_masked)
        if n_ct:  # without a CT there is nothing to attend to: the tokens stay as they are
            cli_s = sub(cli_m)
            cli_m = self._put_rows(cli_m, rows, self.complete_clinical(cli_s, ct_full))
        numeric_pred, logits_all = self.decode_clinical(cli_m, keys_m)
        loss_cli = self._clinical_loss(clinical, clinical_masked, numeric_pred, logits_all, loss_ct.dtype)
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
