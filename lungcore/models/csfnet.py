"""CSF-Net (network B): nodule malignancy from two follow-up CT crops plus clinical variables.

Shen et al., "CSF-Net: Cross-Modal Spatiotemporal Fusion Network for Pulmonary Nodule Malignancy
Predicting", arXiv 2501.16400; see ``shared/papers/csfnet.md``. The published architecture is kept:

1. **Spatial encoder**, one set of weights for T0 and T1: a 3D residual CNN with residual CBAM
   layers (stem 1->4->4 + CBAM; three stages, each a stride-2 conv, residual blocks and a CBAM;
   widths 64, 128/256, 256/512; 3, 3 and 4 blocks) -> 512 x 2 x 8 x 8 per 16 x 64 x 64 crop.
2. **Temporal residual fusion**: conv3x3x3(cat(T0, T1)) 1024 -> 512, then
   ``sigmoid(w0) * conv_path + sigmoid(w1) * T1`` with ``w0, w1`` initialised to 0.3 and 0.7; pooled
   and passed through an MLP 512 -> 256 -> 128 (the published "global" feature).
3. **Clinical embedding** (TabTransformer style): each categorical variable gets an offset into one
   shared embedding table of width 512, projected to 128. Numeric variables (lungcore schemas may
   have them, e.g. standardised age) get a per-variable token ``value * w_v + b_v`` in the same width.
4. **Cross-modal attention fusion**: two 4-head width-128 cross-attentions (clinical queries over
   image keys/values, image queries over clinical keys/values), each with a residual and a linear
   layer; concatenated (256) -> MLP 256 -> 128 -> 2 logits; cross-entropy.

Published defects fixed here (csfnet.md): the published cross-attention mixed *different patients
of a batch* (2-D tensors into a sequence-first attention). Here attention is per patient, through
:class:`lungcore.nn.MaskedCrossAttention` (:func:`lungcore.ops.masked_cross_attention`): image
tokens = the 2 x 8 x 8 positions of the fused map (each 512 -> 128) plus the global token; clinical
tokens = one per variable, missing variables masked out of the keys and of the pooled queries; each
direction is mean-pooled over its real tokens. In eval mode a patient's prediction does not depend
on its batch-mates (tested). (In training mode BatchNorm uses batch statistics, as published.)

Variants (configuration flags, for nodules without a prior scan and for the ablation):
``t1_only=True`` encodes only T1 (no temporal fusion); ``use_clinical=False`` is image-only (the
head reads the mean of the image tokens and the global token instead of the two cross-attentions).
A missing T0 scan in the full model (``ct_mask[:, 0]`` False) is replaced by T1 ("no change").

Parameter count at the published defaults (6 categorical variables of cardinalities
``(7, 3, 2, 5, 3, 2)``): **80,486,073** -- shared spatial encoder 65,824,181 (the last stage's
3x3x3 convs at width 512 dominate), temporal fusion conv 14,156,802, everything after the fusion
(global MLP, token projection, clinical embedding, two cross-attentions, head) 505,090.
``t1_only=True``: 66,329,271; image-only (``use_clinical=False``): 80,244,025.
:func:`parameter_groups` gives the split.

Example:
    >>> import torch
    >>> from lungcore.models import create
    >>> net = create("csfnet", **CSFNetConfig.tiny_overrides()).eval()
    >>> ct = torch.randn(2, 2, 1, 8, 16, 16)
    >>> clinical = torch.tensor([[1., 0., 1., 2., 0., 1.], [0., 1., 0., 0., 1., 0.]])
    >>> present = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    >>> net(ct, clinical, present)["logits"].shape
    torch.Size([2, 2])
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lungcore import checks
from lungcore.models.registry import register_model
from lungcore.nn import MaskedCrossAttention


@dataclass
class CSFNetConfig:
    """Hyper-parameters; the defaults reproduce csfnet.md (architecture and training recipe).

    ``clinical_cardinalities``: categories per clinical variable in the dataset's column order, 0 for
    a numeric variable (``CohortSchema.cardinalities()`` gives it). The default is the paper's six
    categorical NLST variables (race, smoking, gender, binned age, screening result, isolation).
    """

    in_channels: int = 1
    stem_width: int = 4
    stage_conv_widths: tuple[int, ...] = (64, 128, 256)   # the stride-2 conv of each stage
    stage_widths: tuple[int, ...] = (64, 256, 512)        # the residual blocks of each stage
    stage_blocks: tuple[int, ...] = (3, 3, 4)
    cbam_reduction: int = 4
    cbam_kernel: int = 5
    clinical_cardinalities: tuple[int, ...] = (7, 3, 2, 5, 3, 2)
    clinical_embed_dim: int = 512
    dim: int = 128
    num_heads: int = 4
    global_hidden: int = 256          # pooled fused features: 512 -> 256 -> dim
    head_hidden: int = 128            # classifier: 2 * dim -> 128 -> 2
    fusion_init: tuple[float, float] = (0.3, 0.7)
    dropout: float = 0.0
    t1_only: bool = False
    use_clinical: bool = True         # False: the image-only ablation variant
    # training recipe of the authors' sibling code
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    scheduler: str = "cosine_warm_restarts"
    restart_epochs: int = 10          # T_0 of CosineAnnealingWarmRestarts (per epoch steps)
    batch_size: int = 4
    epochs: int = 100
    num_classes: int = 2

    def __post_init__(self) -> None:
        for name in ("stage_conv_widths", "stage_widths", "stage_blocks", "clinical_cardinalities",
                     "fusion_init", "betas"):
            setattr(self, name, tuple(getattr(self, name)))
        n = len(self.stage_widths)
        if n < 1 or len(self.stage_conv_widths) != n or len(self.stage_blocks) != n:
            raise ValueError("stage_conv_widths, stage_widths and stage_blocks must have the same non-zero length")
        if any(b < 1 for b in self.stage_blocks):
            raise ValueError(f"stage_blocks must be >= 1, got {self.stage_blocks}")
        if any(c < 0 for c in self.clinical_cardinalities):
            raise ValueError(f"clinical_cardinalities must be >= 0 (0 = numeric), got {self.clinical_cardinalities}")
        if self.use_clinical and not self.clinical_cardinalities:
            raise ValueError("use_clinical=True needs at least one clinical variable")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if len(self.fusion_init) != 2:
            raise ValueError(f"fusion_init must be two numbers, got {self.fusion_init}")
        checks.one_of("scheduler", self.scheduler, ("cosine_warm_restarts", "none"))

    @staticmethod
    def tiny_overrides() -> dict[str, Any]:
        """A few-thousand-parameter configuration for tests (crops of 8 x 16 x 16)."""
        return dict(stem_width=4, cbam_reduction=1, stage_conv_widths=(4, 4, 8), stage_widths=(4, 8, 8), stage_blocks=(1, 1, 1),
                    clinical_cardinalities=(2, 3, 2, 4, 2, 2), clinical_embed_dim=16, dim=16, num_heads=4,
                    global_hidden=16, head_hidden=16)


# ------------------------------------------------------------------------------ building blocks
def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


class ResidualCBAM3d(nn.Module):
    """Residual CBAM: ``x + spatial_att(y) * y`` with ``y = channel_att(x) * x``.

    Channel attention: avg- and max-pooled descriptors through one shared MLP C -> C/r -> C, summed,
    sigmoid. Spatial attention: channel max and mean -> Conv3d(2 -> 1, k) -> sigmoid.
    """

    def __init__(self, channels: int, reduction: int = 4, kernel: int = 5) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Conv3d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        avg = x.mean(dim=(2, 3, 4))
        mx = x.amax(dim=(2, 3, 4))
        ca = torch.sigmoid(self.mlp(avg) + self.mlp(mx))[:, :, None, None, None]
        y = x * ca
        desc = torch.cat([y.amax(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)], dim=1)
        return x + torch.sigmoid(self.spatial(desc)) * y


class ResidualBlock3d(nn.Module):
    """Two 3x3x3 conv-BN(-ReLU) layers plus a 1x1x1 conv-BN projection shortcut when widths differ."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(cin, cout), nn.Conv3d(cout, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm3d(cout))
        self.shortcut = (nn.Identity() if cin == cout else
                         nn.Sequential(nn.Conv3d(cin, cout, 1, bias=False), nn.BatchNorm3d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class SpatialEncoder(nn.Module):
    """The shared-weight 3D residual CBAM CNN: (N, C, D, H, W) -> (N, stage_widths[-1], D/8, H/8, W/8)."""

    def __init__(self, cfg: CSFNetConfig) -> None:
        super().__init__()
        w = cfg.stem_width
        layers: list[nn.Module] = [_conv_bn_relu(cfg.in_channels, w), _conv_bn_relu(w, w),
                                   ResidualCBAM3d(w, cfg.cbam_reduction, cfg.cbam_kernel)]
        cin = w
        for conv_w, width, blocks in zip(cfg.stage_conv_widths, cfg.stage_widths, cfg.stage_blocks):
            layers.append(_conv_bn_relu(cin, conv_w, stride=2))
            layers.extend(ResidualBlock3d(conv_w if b == 0 else width, width) for b in range(blocks))
            layers.append(ResidualCBAM3d(width, cfg.cbam_reduction, cfg.cbam_kernel))
            cin = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TemporalResidualFusion(nn.Module):
    """``sigmoid(w0) * conv(cat(f0, f1)) + sigmoid(w1) * f1`` (w0, w1 scalars, init 0.3 / 0.7)."""

    def __init__(self, channels: int, init: tuple[float, float] = (0.3, 0.7)) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(2 * channels, channels)
        self.w0 = nn.Parameter(torch.tensor(float(init[0])))
        self.w1 = nn.Parameter(torch.tensor(float(init[1])))

    def forward(self, f0: Tensor, f1: Tensor) -> Tensor:
        return torch.sigmoid(self.w0) * self.conv(torch.cat([f0, f1], dim=1)) + torch.sigmoid(self.w1) * f1


class ClinicalEmbedding(nn.Module):
    """One token per clinical variable: categorical codes index one shared table through per-variable
    offsets (TabTransformer); numeric values give ``value * w_v + b_v``; then a linear to ``dim``."""

    def __init__(self, cardinalities: tuple[int, ...], embed_dim: int, dim: int) -> None:
        super().__init__()
        cards = torch.tensor(cardinalities, dtype=torch.long)
        offsets = torch.cumsum(cards, 0) - cards
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("cardinalities", cards, persistent=False)
        self.register_buffer("categorical", cards > 0, persistent=False)
        self.table = nn.Embedding(max(int(cards.sum()), 1), embed_dim)
        n_numeric = int((cards == 0).sum())
        self.numeric_weight = nn.Parameter(torch.randn(n_numeric, embed_dim) * 0.02) if n_numeric else None
        self.numeric_bias = nn.Parameter(torch.zeros(n_numeric, embed_dim)) if n_numeric else None
        self.proj = nn.Linear(embed_dim, dim)

    def forward(self, clinical: Tensor, clinical_mask: Tensor) -> Tensor:
        # missing values (mask False) are coded 0 by the data layer; clamp keeps any junk in range,
        # and those tokens are masked downstream anyway
        cat = self.categorical
        codes = clinical.round().long().clamp(min=0)
        codes = torch.minimum(codes, (self.cardinalities - 1).clamp(min=0)) + self.offsets
        tokens = self.table(torch.where(cat, codes, torch.zeros_like(codes)))
        if self.numeric_weight is not None:
            num = clinical[:, ~cat].to(tokens.dtype) * clinical_mask[:, ~cat].to(tokens.dtype)
            numeric = num[..., None] * self.numeric_weight + self.numeric_bias
            tokens = tokens.clone()
            tokens[:, ~cat] = numeric
        return self.proj(tokens)


def _masked_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean over axis 1 of (B, L, C) over the tokens where ``mask`` (B, L) is True (zeros if none)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


# ------------------------------------------------------------------------------------- network
@register_model("csfnet")
class CSFNet(nn.Module):
    """CSF-Net malignancy classifier (see the module docstring for the architecture and fixes).

    ``forward(ct, clinical, clinical_mask, ct_mask=None) -> {"logits": (B, 2)}`` with ``ct``
    (B, 2, C, D, H, W) float (T0 first; the published crop is 16 x 64 x 64, any size divisible by
    8 works), ``clinical`` (B, V) float codes, ``clinical_mask`` (B, V) bool, optional ``ct_mask``
    (B, 2) bool (a missing T0 is replaced by T1). Training contract of
    :mod:`lungcore.models.registry`: ``task = "classification"``, ``stages = ("train",)``,
    ``loss(batch, stage)``, ``predict(batch)``; :meth:`make_optimizer` builds the paper's optimiser.

    Parameters at the defaults: 80,486,073 (see the module docstring).
    """

    config_class = CSFNetConfig
    task = "classification"
    stages = ("train",)
    needs_images = True

    @classmethod
    def config_from_cohort(cls, schema: Any, settings: Any, overrides: Optional[dict[str, Any]] = None
                           ) -> dict[str, Any]:
        """Config fields for a nodule cohort: ``overrides`` (the user's, they win) over the cohort's.

        The cohort sets ``clinical_cardinalities`` (the fitted schema's variables in column order,
        numeric and categorical in any order) and, for a cohort without clinical variables,
        ``use_clinical=False``. It checks the time points (two image columns, T0 then T1) and the
        input size (the preprocessing ``crop``: multiples of 8, three stride-2 stages). A user value
        that contradicts the cohort raises ``ValueError`` naming both.

        Example:
            >>> from lungcore.data import CohortSchema, ClinicalVariable, PreprocessSettings
            >>> s = CohortSchema(kind="nodules", clinical=[ClinicalVariable("age"),
            ...                  ClinicalVariable("smoking", "categorical", ["no", "yes"])])
            >>> CSFNet.config_from_cohort(s, PreprocessSettings.csfnet())
            {'clinical_cardinalities': (0, 2)}
        """
        from lungcore.models.registry import contradiction

        user = dict(overrides or {})
        if len(schema.image_columns) != 2:
            raise ValueError(f"CSF-Net reads two time points (T0, T1): the schema's image_columns must name two "
                             f"columns, got {list(schema.image_columns)}")
        crop = tuple(int(c) for c in settings.crop)
        if any(c % 8 for c in crop) or min(crop) < 8:
            raise ValueError(f"data.preprocess.crop {crop}: CSF-Net needs multiples of 8 (three stride-2 stages)")
        cards = tuple(schema.cardinalities())
        if "clinical_cardinalities" in user and tuple(user["clinical_cardinalities"]) != cards:
            raise contradiction("clinical_cardinalities", user["clinical_cardinalities"],
                                "the cohort schema's variables", cards, "the clinical embeddings follow the schema")
        cohort: dict[str, Any] = {"clinical_cardinalities": cards}
        if not cards:
            if user.get("use_clinical"):
                raise contradiction("use_clinical", True, "the cohort schema's clinical variables", "none",
                                    "there is nothing to fuse")
            cohort["use_clinical"] = False
        return {**cohort, **user}

    def __init__(self, config: Optional[CSFNetConfig] = None) -> None:
        super().__init__()
        cfg = config if config is not None else CSFNetConfig()
        if not isinstance(cfg, CSFNetConfig):
            raise TypeError(f"config must be a CSFNetConfig, got {type(cfg).__name__}")
        self.config = cfg
        feat = cfg.stage_widths[-1]
        self.encoder = SpatialEncoder(cfg)
        self.fusion = None if cfg.t1_only else TemporalResidualFusion(feat, cfg.fusion_init)
        self.global_mlp = nn.Sequential(nn.Linear(feat, cfg.global_hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(cfg.dropout), nn.Linear(cfg.global_hidden, cfg.dim))
        self.token_proj = nn.Linear(feat, cfg.dim)
        if cfg.use_clinical:
            self.clinical_embed = ClinicalEmbedding(cfg.clinical_cardinalities, cfg.clinical_embed_dim, cfg.dim)
            self.clinical_to_image = MaskedCrossAttention(cfg.dim, cfg.num_heads, attn_dropout=cfg.dropout)
            self.image_to_clinical = MaskedCrossAttention(cfg.dim, cfg.num_heads, attn_dropout=cfg.dropout)
            self.clinical_out = nn.Linear(cfg.dim, cfg.dim)
            self.image_out = nn.Linear(cfg.dim, cfg.dim)
        self.head = nn.Sequential(nn.Linear(2 * cfg.dim, cfg.head_hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(cfg.dropout), nn.Linear(cfg.head_hidden, cfg.num_classes))

    # -------------------------------------------------------------------------------- forward
    def _check(self, ct: Tensor, clinical: Tensor, clinical_mask: Tensor, ct_mask: Optional[Tensor]) -> None:
        cfg = self.config
        checks.tensor("ct", ct, ndim=6)
        if not ct.is_floating_point():
            raise TypeError(f"ct must be a floating tensor, got {ct.dtype}")
        b = ct.shape[0]
        checks.shape("ct", ct, (b, 2, cfg.in_channels, None, None, None))
        if any(s % 8 for s in ct.shape[-3:]) or min(ct.shape[-3:]) < 8:
            raise ValueError(f"ct spatial size must be multiples of 8 (three stride-2 stages), got {tuple(ct.shape[-3:])}")
        v = len(cfg.clinical_cardinalities)
        checks.tensor("clinical", clinical, ndim=2, device=ct.device)
        checks.shape("clinical", clinical, (b, v))
        checks.tensor("clinical_mask", clinical_mask, ndim=2, dtypes=(torch.bool,), device=ct.device)
        checks.shape("clinical_mask", clinical_mask, (b, v))
        if ct_mask is not None:
            checks.tensor("ct_mask", ct_mask, ndim=2, dtypes=(torch.bool,), device=ct.device)
            checks.shape("ct_mask", ct_mask, (b, 2))

    def image_features(self, ct: Tensor, ct_mask: Optional[Tensor] = None) -> Tensor:
        """(B, 2, C, D, H, W) -> fused feature map (B, F, D/8, H/8, W/8)."""
        t0, t1 = ct[:, 0], ct[:, 1]
        if self.fusion is None:
            return self.encoder(t1)
        if ct_mask is not None:
            t0 = torch.where(ct_mask[:, 0, None, None, None, None], t0, t1)
        f = self.encoder(torch.cat([t0, t1], dim=0))  # shared weights: one pass over both time points
        f0, f1 = f.chunk(2, dim=0)
        return self.fusion(f0, f1)

    def forward(self, ct: Tensor, clinical: Tensor, clinical_mask: Tensor,
                ct_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        self._check(ct, clinical, clinical_mask, ct_mask)
        fused = self.image_features(ct, ct_mask)
        spatial = self.token_proj(fused.flatten(2).transpose(1, 2))          # (B, P, dim)
        glob = self.global_mlp(fused.mean(dim=(2, 3, 4)))[:, None]           # (B, 1, dim)
        image = torch.cat([spatial, glob], dim=1)                             # (B, P + 1, dim)
        if not self.config.use_clinical:
            pooled = torch.cat([image.mean(dim=1), glob[:, 0]], dim=-1)
            return {"logits": self.head(pooled)}
        clin = self.clinical_embed(clinical, clinical_mask)                   # (B, V, dim)
        clin_att = clin + self.clinical_to_image(clin, image, query_mask=clinical_mask)
        img_att = image + self.image_to_clinical(image, clin, key_mask=clinical_mask)
        pooled = torch.cat([_masked_mean(self.clinical_out(clin_att), clinical_mask),
                            _masked_mean(self.image_out(img_att), None)], dim=-1)
        return {"logits": self.head(pooled)}

    # ------------------------------------------------------------------------ training contract
    def _inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        dev = next(self.parameters()).device
        for key in ("ct", "clinical", "clinical_mask"):
            if key not in batch:
                raise ValueError(f"batch lacks {key!r} (a nodule batch of lungcore.data.CohortDataset)")
        ct_mask = batch.get("ct_mask")
        if ct_mask is not None and ct_mask.dim() != 2:
            ct_mask = None
        return (batch["ct"].to(dev, non_blocking=True), batch["clinical"].to(dev, non_blocking=True),
                batch["clinical_mask"].to(dev, non_blocking=True),
                None if ct_mask is None else ct_mask.to(dev, non_blocking=True))

    def loss(self, batch: dict[str, Any], stage: str = "train") -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy over the nodules with a label (``label_mask``); returns (loss, logs)."""
        checks.one_of("stage", stage, self.stages)
        if "label" not in batch:
            raise ValueError("batch lacks 'label'")
        ct, clinical, clinical_mask, ct_mask = self._inputs(batch)
        logits = self(ct, clinical, clinical_mask, ct_mask)["logits"]
        label = batch["label"].to(logits.device)
        keep = batch.get("label_mask")
        keep = (label >= 0) if keep is None else keep.to(logits.device) & (label >= 0)
        n = int(keep.sum())
        if n == 0:
            loss = logits.sum() * 0.0  # keeps the graph (and DDP) intact for an all-unlabelled batch
            return loss, {"loss": 0.0, "accuracy": float("nan"), "n": 0.0}
        loss = F.cross_entropy(logits[keep], label[keep])
        acc = (logits[keep].argmax(-1) == label[keep]).float().mean()
        return loss, {"loss": float(loss.detach()), "accuracy": float(acc), "n": float(n)}

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Eval-mode outputs per nodule: ``{"logits": (B, 2), "probability": (B,)}`` (P(malignant))."""
        was_training = self.training
        self.eval()
        try:
            logits = self(*self._inputs(batch))["logits"]
        finally:
            self.train(was_training)
        return {"logits": logits, "probability": torch.softmax(logits.float(), dim=-1)[:, 1]}

    def make_optimizer(self, steps_per_epoch: int = 1) -> tuple[torch.optim.Optimizer, Any]:
        """The paper's recipe: Adam(lr, betas) and CosineAnnealingWarmRestarts(T_0 = restart_epochs
        epochs), stepped once per optimiser step (``scheduler.step()``); scheduler None if "none"."""
        cfg = self.config
        opt = torch.optim.Adam(self.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        sched = None
        if cfg.scheduler == "cosine_warm_restarts":
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                opt, T_0=max(1, cfg.restart_epochs * max(1, steps_per_epoch)))
        return opt, sched

    def paper_recipe(self) -> dict[str, Any]:
        """The paper's optimiser as ``lungcore.train`` settings (``recipe: paper``): Adam with this
        config's lr, betas and weight decay, cosine warm restarts every ``restart_epochs`` (or a
        constant rate with ``scheduler="none"``), no warm-up, no gradient clipping.

        Example:
            >>> CSFNet(CSFNetConfig(**CSFNetConfig.tiny_overrides())).paper_recipe()["betas"]
            (0.5, 0.999)
        """
        cfg = self.config
        return {"optimizer": "adam", "lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay,
                "schedule": "restarts" if cfg.scheduler == "cosine_warm_restarts" else "constant",
                "restart_epochs": float(cfg.restart_epochs), "warmup_epochs": 0.0, "min_lr_ratio": 0.0,
                "grad_clip": 0.0}


def parameter_groups(model: CSFNet) -> dict[str, int]:
    """Parameter count per top-level part (``encoder``, ``fusion``, ...) plus ``total``."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        out[part] = out.get(part, 0) + p.numel()
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


__all__ = ["CSFNet", "CSFNetConfig", "parameter_groups"]
