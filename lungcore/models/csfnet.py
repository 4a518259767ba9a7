"""CSF-Net (network B): nodule malignancy from two follow-up CT crops plus clinical variables.

Shen et al., "CSF-Net: Cross-Modal Spatiotemporal Fusion Network for Pulmonary Nodule Malignancy
Predicting", arXiv 2501.16400; see ``shared/papers/csfnet.md``. The architecture below follows the
authors' public model code (GitHub hdusyz/CSF-NET, ``models/res_cnn.py`` class ``ConvRes_table`` and
``models/camf.py`` class ``CMFA``, read line by line; that code does not run as published: its first
line is a stray ``-import typing`` and it imports two modules the repository lacks).

From the authors' code (the defaults reproduce it):

1. **Spatial encoder**, one set of weights for T0 and T1. Stem: two 3x3x3 conv-BN-ReLU (1 -> 4 -> 4)
   and a residual CBAM. Then the published layer list ``stages = ((64, 64, 64), (128, 128, 256),
   (256, 256, 256, 512))``: each stage opens with a stride-2 3x3x3 conv-BN-ReLU (no bias) that
   *keeps its input width* (4 -> 4, 64 -> 64, 256 -> 256), then one residual block per entry whose
   output width is the entry, then a residual CBAM. 16 x 64 x 64 -> 512 x 2 x 8 x 8 per scan;
   28,455,964 parameters.

   - Residual block: two 3x3x3 conv-BN-ReLU; the shortcut is *always* a 1x1x1 conv-BN-ReLU (also
     when the widths match); a plain sum, no activation after it. Convs carry a bias, as published.
   - Residual CBAM: channel weights ``sigmoid(MLP(avgpool x) + MLP(maxpool x))`` with one shared MLP
     C -> C/4 -> C, no bias and no activation between the two linears; the channel-attended map
     ``y`` gives the spatial map ``s = sigmoid(conv5x5x5([max_c y, mean_c y]))`` (no bias), and the
     output is ``s * x + x``: the spatial map multiplies the layer's *input*.
2. **Temporal residual fusion**: ``cat(T0, T1)`` (1024 channels) -> trilinear upsample x2
   (``align_corners=True``) -> adaptive average pool back to T1's size (the published fixed
   2 x 8 x 8) -> 3x3x3 conv 1024 -> 512 (bias, no BN, no activation) -> ``sigmoid(w0) * that +
   sigmoid(w1) * T1`` with ``w0, w1`` initialised to 0.3 and 0.7. Then the average over positions
   and an MLP 512 -> 256 (ReLU) -> 128: the image vector. (The published module defines two more
   3x3x3 convs, 14,156,800 parameters, and a pool that its forward never uses: not built here.)
3. **Clinical embedding** (TabTransformer style): each categorical variable indexes one shared
   table of width 512 through a per-variable offset, projected 512 -> 128. (The published table has
   two extra "special token" rows that nothing indexes: not built here.)
4. **Head**: 256 -> 128 (ReLU) -> 2 logits; cross-entropy.
5. ``fusion="published"``: the published cross-modal fusion (``CMFA``) of the image vector ``i``
   and the clinical vector ``t`` (the mean of the variables' embeddings): ``i' = relu(fc(i))``,
   ``t' = relu(fc(t))``; values, keys and queries ``relu(fc(.))`` of each; ``V = attn(q_t, k_i,
   v_i) + i'``, ``T = attn(q_i, k_t, v_t) + t'`` (4 heads, width 128); output ``cat(fc(V), fc(T))``.

lungcore's choices (not in the authors' code):

- **Default fusion, ``fusion="tokens"``**. The published ``CMFA`` feeds (batch, 128) matrices to a
  sequence-first ``nn.MultiheadAttention``, which reads them as one sequence of *patients*: each
  patient attends over the other patients of its batch, so a prediction depends on its batch-mates
  (a defect). Attended per patient, as ``fusion="published"`` does here, each attention has one key,
  whose softmax weight is 1: the query and key paths receive no gradient (tested) and the fusion is
  a fixed map of each modality's own vector -- ``V`` depends on the image only and ``T`` on the
  clinical record only, so nothing is fused until the head. The token fusion attends within each
  patient over many keys: image tokens = the 2 x 8 x 8 positions of the fused map (each 512 ->
  128) plus the image vector; clinical tokens = one per variable. Two 4-head width-128
  cross-attentions (clinical over image, image over clinical, through
  :class:`lungcore.nn.MaskedCrossAttention`), each with a residual and a linear layer, each
  mean-pooled over its real tokens, concatenated (256) into the published head. On a synthetic cohort
  whose clinical record scales the image effects it learns those interactions and beats the
  published fusion by about 0.02-0.03 AUC; where effects only add up, the published fusion is
  ahead by about 0.01 (``experiments/results/csfnet_interaction.md``, ``csfnet_fusion_seeds.md``).
- Missing data: missing clinical variables are masked out of the keys, queries and means (the
  published code has no missing values); a missing T0 (``ct_mask[:, 0]`` False) is replaced by T1
  ("no change"). Numeric variables (standardised age, say) get a token ``value * w_v + b_v``.
- Clinical variables: the default cardinalities are the paper's six NLST variables; the published
  data loader (``data/dataset.py``) reads four (race, smoking, gender, age).
- ``dropout`` (default 0) applies to the attention weights and the two MLPs; the published ``CMFA``
  uses 0.2 on its attention weights and no dropout elsewhere.
- The temporal pool targets T1's size instead of a fixed 2 x 8 x 8, so other crop sizes (multiples
  of 8) work; at 16 x 64 x 64 it is the published computation.
- Variants: ``t1_only=True`` encodes only T1 (no temporal fusion); ``use_clinical=False`` is image
  only (the head reads the mean of the image tokens and the image vector). Widths are configurable
  (``stem_width``, ``stages``, optional ``stage_conv_widths``) so tests run at a few thousand
  parameters.
- Training recipe. The CSF-Net repository has no training script; the defaults of ``lr``, ``betas``,
  ``scheduler``, ``min_lr_ratio``, ``epochs`` and ``batch_size`` copy the authors' sibling
  repository (hdusyz/Med-STLPN ``train_cls.py``, which keeps this encoder's layer list in a
  comment): Adam lr 1e-4 with torch's default betas (0.9, 0.999), no weight decay, the rate
  decayed by a cosine from 1 to 0.1 over 25 epochs, batch 1, 4-fold cross-validation (not a model
  setting). That script selects the epoch on its test fold; lungcore selects on a validation split.

Parameters at the defaults (6 categorical variables of cardinalities ``(7, 3, 2, 5, 3, 2)``):
**43,117,344** -- shared spatial encoder 28,455,964, temporal fusion 14,156,290, everything after
it (image vector MLP, token projection, clinical embedding, two cross-attentions, head) 505,090.
``fusion="published"``: 43,150,752 (its fusion 264,192: the published ``CMFA``'s 297,216 less the
two key FCs); ``t1_only=True``: 28,961,054; image only (``use_clinical=False``): 42,875,296.
:func:`parameter_groups` gives the split. (lungcore's earlier, unfaithful encoder had 65,824,181.)

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

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lungcore import checks
from lungcore.models.registry import register_model
from lungcore.nn import MaskedCrossAttention

PUBLISHED_STAGES: tuple[tuple[int, ...], ...] = ((64, 64, 64), (128, 128, 256), (256, 256, 256, 512))
"""The published encoder layer list (``ConvRes_table([[64, 64, 64], [128, 128, 256], [256, 256, 256, 512]], ...)``)."""

FUSIONS = ("tokens", "published")


@dataclass
class CSFNetConfig:
    """Hyper-parameters; the defaults reproduce the authors' code (see :mod:`lungcore.models.csfnet`).

    ``stages``: output width of every residual block, one tuple per stride-2 stage (the published
    layer list). ``stage_conv_widths``: width of each stage's stride-2 opening conv; None (published)
    keeps the stage's input width. ``stage_widths`` with ``stage_blocks``: shorthand for ``stages``
    when every block of a stage has one width (``stages[i] = (stage_widths[i],) * stage_blocks[i]``);
    normalised into ``stages`` (and reset to None) on construction.
    ``clinical_cardinalities``: categories per clinical variable in the dataset's column order, 0 for
    a numeric variable (``CohortSchema.cardinalities()`` gives it). The default is the paper's six
    categorical NLST variables (race, smoking, gender, binned age, screening result, isolation).
    ``fusion``: ``"tokens"`` (lungcore's per-patient token cross-attention, the default) or
    ``"published"`` (the published vector fusion, attended per patient).
    ``scheduler``: ``"cosine"`` (per optimiser step from ``lr`` to ``lr * min_lr_ratio`` over
    ``epochs``, the authors' schedule), ``"cosine_warm_restarts"`` (restart every
    ``restart_epochs``) or ``"none"``.

    Example:
        >>> cfg = CSFNetConfig(stage_widths=(8, 16), stage_blocks=(2, 1), dim=32)
        >>> cfg.stages, cfg.feature_width       # the shorthand, normalised into stages
        (((8, 8), (16,)), 16)
        >>> CSFNetConfig(dim=30, num_heads=4)
        Traceback (most recent call last):
        ...
        ValueError: dim (30) must be divisible by num_heads (4)
    """

    in_channels: int = 1
    stem_width: int = 4
    stages: tuple[tuple[int, ...], ...] = PUBLISHED_STAGES
    stage_conv_widths: Optional[tuple[int, ...]] = None
    stage_widths: Optional[tuple[int, ...]] = None
    stage_blocks: Optional[tuple[int, ...]] = None
    cbam_reduction: int = 4
    cbam_kernel: int = 5
    clinical_cardinalities: tuple[int, ...] = (7, 3, 2, 5, 3, 2)
    clinical_embed_dim: int = 512
    dim: int = 128
    num_heads: int = 4
    global_hidden: int = 256          # pooled fused features: 512 -> 256 -> dim
    head_hidden: int = 128            # classifier: 2 * dim -> 128 -> 2
    fusion_init: tuple[float, float] = (0.3, 0.7)
    fusion: str = "tokens"
    dropout: float = 0.0
    t1_only: bool = False
    use_clinical: bool = True         # False: the image-only ablation variant
    # training recipe of the authors' sibling script (hdusyz/Med-STLPN train_cls.py)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.1
    restart_epochs: int = 10          # T_0 of CosineAnnealingWarmRestarts (scheduler "cosine_warm_restarts")
    batch_size: int = 1
    epochs: int = 25
    num_classes: int = 2

    def __post_init__(self) -> None:
        self.t1_only = checks.boolean("t1_only", self.t1_only)
        self.use_clinical = checks.boolean("use_clinical", self.use_clinical)
        for name in ("clinical_cardinalities", "fusion_init", "betas"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.stage_widths is not None or self.stage_blocks is not None:
            if self.stage_widths is None or self.stage_blocks is None:
                raise ValueError("stage_widths and stage_blocks go together (or give stages)")
            widths, blocks = tuple(self.stage_widths), tuple(self.stage_blocks)
            if len(widths) != len(blocks):
                raise ValueError(f"stage_widths {widths} and stage_blocks {blocks} must have the same length")
            if any(int(b) < 1 for b in blocks):
                raise ValueError(f"stage_blocks must be >= 1, got {blocks}")
            if tuple(tuple(s) for s in self.stages) != PUBLISHED_STAGES:
                raise ValueError("give either stages or stage_widths/stage_blocks, not both")
            self.stages = tuple((int(w),) * int(b) for w, b in zip(widths, blocks))
            self.stage_widths = self.stage_blocks = None
        self.stages = tuple(tuple(int(w) for w in s) for s in self.stages)
        if not self.stages or any(not s for s in self.stages) or any(w < 1 for s in self.stages for w in s):
            raise ValueError(f"stages must be non-empty tuples of positive widths, got {self.stages}")
        if self.stage_conv_widths is not None:
            self.stage_conv_widths = tuple(int(w) for w in self.stage_conv_widths)
            if len(self.stage_conv_widths) != len(self.stages) or min(self.stage_conv_widths) < 1:
                raise ValueError(f"stage_conv_widths must give one positive width per stage ({len(self.stages)}), "
                                 f"got {self.stage_conv_widths}")
        if any(c < 0 for c in self.clinical_cardinalities):
            raise ValueError(f"clinical_cardinalities must be >= 0 (0 = numeric), got {self.clinical_cardinalities}")
        if self.use_clinical and not self.clinical_cardinalities:
            raise ValueError("use_clinical=True needs at least one clinical variable")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if len(self.fusion_init) != 2:
            raise ValueError(f"fusion_init must be two numbers, got {self.fusion_init}")
        checks.one_of("fusion", self.fusion, FUSIONS)
        checks.one_of("scheduler", self.scheduler, ("cosine", "cosine_warm_restarts", "none"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @property
    def feature_width(self) -> int:
        """Channels of the encoder's output (the last block's width; 512 published)."""
        return self.stages[-1][-1]

    @staticmethod
    def tiny_overrides() -> dict[str, Any]:
        """A few-thousand-parameter configuration for tests (crops of 8 x 16 x 16)."""
        return dict(stem_width=4, cbam_reduction=1, stages=((4,), (8,), (8,)),
                    clinical_cardinalities=(2, 3, 2, 4, 2, 2), clinical_embed_dim=16, dim=16, num_heads=4,
                    global_hidden=16, head_hidden=16)


# ------------------------------------------------------------------------------ building blocks
def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = True) -> nn.Sequential:
    """Conv3d (same padding) -> BatchNorm3d -> ReLU, the published ``make_conv3d``."""
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias),
                         nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class ResidualCBAM3d(nn.Module):
    """Residual CBAM as published: ``s * x + x`` with ``s = spatial_att(channel_att(x) * x)``.

    Channel attention: avg- and max-pooled descriptors through one shared bias-free MLP
    C -> C/r -> C (no activation between), summed, sigmoid. Spatial attention of the channel-attended
    map: channel max and mean -> Conv3d(2 -> 1, k, no bias) -> sigmoid; it multiplies the input ``x``.
    """

    def __init__(self, channels: int, reduction: int = 4, kernel: int = 5) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.Linear(hidden, channels, bias=False))
        self.spatial = nn.Conv3d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        ca = torch.sigmoid(self.mlp(x.mean(dim=(2, 3, 4))) + self.mlp(x.amax(dim=(2, 3, 4))))
        y = x * ca[:, :, None, None, None]
        desc = torch.cat([y.amax(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(desc)) * x + x


class ResidualBlock3d(nn.Module):
    """Published residual block: two 3x3x3 conv-BN-ReLU plus a 1x1x1 conv-BN-ReLU shortcut, summed."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))
        self.shortcut = _conv_bn_relu(cin, cout, kernel=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


class SpatialEncoder(nn.Module):
    """The shared-weight 3D residual CBAM CNN: (N, C, D, H, W) -> (N, stages[-1][-1], D/2^s, H/2^s, W/2^s)
    for ``s = len(stages)`` stride-2 stages. ``stem`` and each of ``stages`` are separate modules
    (:meth:`stage_outputs` returns every one's output)."""

    def __init__(self, cfg: CSFNetConfig) -> None:
        super().__init__()
        w = cfg.stem_width
        self.stem = nn.Sequential(_conv_bn_relu(cfg.in_channels, w), _conv_bn_relu(w, w),
                                  ResidualCBAM3d(w, cfg.cbam_reduction, cfg.cbam_kernel))
        stages: list[nn.Module] = []
        cin = w
        for i, widths in enumerate(cfg.stages):
            opener = cin if cfg.stage_conv_widths is None else cfg.stage_conv_widths[i]
            layers: list[nn.Module] = [_conv_bn_relu(cin, opener, stride=2, bias=False)]
            cin = opener
            for width in widths:
                layers.append(ResidualBlock3d(cin, width))
                cin = width
            layers.append(ResidualCBAM3d(cin, cfg.cbam_reduction, cfg.cbam_kernel))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """Outputs of the stem and of every stage, in order."""
        outs = [self.stem(x)]
        for stage in self.stages:
            outs.append(stage(outs[-1]))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


class TemporalResidualFusion(nn.Module):
    """``sigmoid(w0) * conv(pool(upsample(cat(f0, f1)))) + sigmoid(w1) * f1`` (published).

    Trilinear x2 upsampling (``align_corners=True``), adaptive average pooling back to ``f1``'s size,
    a 3x3x3 conv 2C -> C with bias (no BN, no activation); scalars ``w0, w1`` initialised 0.3 / 0.7.
    """

    def __init__(self, channels: int, init: tuple[float, float] = (0.3, 0.7)) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2 * channels, channels, 3, padding=1)
        self.w0 = nn.Parameter(torch.tensor(float(init[0])))
        self.w1 = nn.Parameter(torch.tensor(float(init[1])))

    def forward(self, f0: Tensor, f1: Tensor) -> Tensor:
        x = F.interpolate(torch.cat([f0, f1], dim=1), scale_factor=2, mode="trilinear", align_corners=True)
        x = self.conv(F.adaptive_avg_pool3d(x, f1.shape[-3:]))
        return torch.sigmoid(self.w0) * x + torch.sigmoid(self.w1) * f1


class ClinicalEmbedding(nn.Module):
    """One token per clinical variable: categorical codes index one shared table through per-variable
    offsets (TabTransformer, as published); numeric values give ``value * w_v + b_v`` (lungcore);
    then a linear to ``dim`` (published 512 -> 128)."""

    def __init__(self, cardinalities: tuple[int, ...], embed_dim: int, dim: int) -> None:
        super().__init__()
        cards = torch.tensor(cardinalities, dtype=torch.long)
        offsets = torch.cumsum(cards, 0) - cards
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("cardinalities", cards, persistent=False)
        self.register_buffer("categorical", cards > 0, persistent=False)
        self.table = nn.Embedding(max(sum(cardinalities), 1), embed_dim)
        n_numeric = sum(1 for c in cardinalities if c == 0)
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


class PublishedFusion(nn.Module):
    """The published cross-modal fusion (``CMFA``) of one image and one clinical vector, per patient.

    ``i' = relu(fc(i))``, ``t' = relu(fc(t))``; ``q, v = relu(fc(.))`` of each; ``V = attn(q_t -> v_i) + i'``,
    ``T = attn(q_i -> v_t) + t'``; returns ``cat(fc(V), fc(T))`` (B, 2 * dim). Each attention has one
    key per patient (its softmax weight is 1), so ``V`` is a fixed map of the image vector and ``T`` of
    the clinical vector; the query path gets no gradient. (The published separate key FCs are not
    built: :class:`~lungcore.nn.MaskedCrossAttention` projects keys and values from one context, and
    a single key cannot change the output.) ``present`` (B,) False masks a patient's clinical vector
    out of both attentions (their outputs are then zero).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_in, self.clinical_in = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.image_value, self.clinical_value = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.image_query, self.clinical_query = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.clinical_to_image = MaskedCrossAttention(dim, num_heads, attn_dropout=dropout)
        self.image_to_clinical = MaskedCrossAttention(dim, num_heads, attn_dropout=dropout)
        self.image_out, self.clinical_out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, image: Tensor, clinical: Tensor, present: Tensor) -> Tensor:
        i, t = F.relu(self.image_in(image))[:, None], F.relu(self.clinical_in(clinical))[:, None]
        mask = present[:, None]
        v = self.clinical_to_image(F.relu(self.clinical_query(t)), F.relu(self.image_value(i)), query_mask=mask) + i
        c = self.image_to_clinical(F.relu(self.image_query(i)), F.relu(self.clinical_value(t)), key_mask=mask) + t
        return torch.cat([self.image_out(v[:, 0]), self.clinical_out(c[:, 0])], dim=-1)


def _masked_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean over axis 1 of (B, L, C) over the tokens where ``mask`` (B, L) is True (zeros if none)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


# ------------------------------------------------------------------------------------- network
@register_model("csfnet")
class CSFNet(nn.Module):
    """CSF-Net malignancy classifier (:mod:`lungcore.models.csfnet` says what is published and what is lungcore's).

    ``forward(ct, clinical, clinical_mask, ct_mask=None) -> {"logits": (B, 2)}`` with ``ct``
    (B, 2, C, D, H, W) float (T0 first; the published crop is 16 x 64 x 64, any size divisible by
    ``2 ** len(stages)`` works), ``clinical`` (B, V) float codes, ``clinical_mask`` (B, V) bool,
    optional ``ct_mask`` (B, 2) bool (a missing T0 is replaced by T1). Training contract of
    :mod:`lungcore.models.registry`: ``task = "classification"``, ``stages = ("train",)``,
    ``loss(batch, stage)``, ``predict(batch)``; :meth:`paper_recipe` is the authors' optimiser and
    schedule, as ``lungcore.train`` settings (``recipe: paper``).

    Parameters at the defaults: 43,117,344 (the split: :mod:`lungcore.models.csfnet`).

    Example:
        >>> import torch
        >>> net = CSFNet(CSFNetConfig(**CSFNetConfig.tiny_overrides()))
        >>> sum(p.numel() for p in net.parameters())
        19532
        >>> batch = {"ct": torch.randn(2, 2, 1, 8, 16, 16),              # (B, T0/T1, C, D, H, W)
        ...          "clinical": torch.tensor([[1., 0, 1, 2, 0, 1], [0., 1, 0, 0, 1, 0]]),
        ...          "clinical_mask": torch.tensor([[True] * 6, [True, False, True, True, False, True]]),
        ...          "label": torch.tensor([1, 0])}
        >>> loss, logs = net.loss(batch)                                 # cross-entropy over labelled nodules
        >>> sorted(logs)
        ['accuracy', 'loss', 'n']
        >>> out = net.predict(batch)                                     # eval mode, no gradient
        >>> out["logits"].shape, out["probability"].shape                # probability = P(malignant)
        (torch.Size([2, 2]), torch.Size([2]))
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
        input size (the preprocessing ``crop``: multiples of 8 with the three published stride-2 stages). A user value
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
        arch = {k: v for k, v in user.items() if k in ("stages", "stage_widths", "stage_blocks")}
        n_stages = len(CSFNetConfig(**arch).stages)
        if any(c % 2 ** n_stages for c in crop) or min(crop) < 2 ** n_stages:
            raise ValueError(f"data.preprocess.crop {crop}: CSF-Net needs multiples of {2 ** n_stages} "
                             f"({n_stages} stride-2 stages)")
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
        feat = cfg.feature_width
        self.encoder = SpatialEncoder(cfg)
        self.fusion = None if cfg.t1_only else TemporalResidualFusion(feat, cfg.fusion_init)
        self.global_mlp = nn.Sequential(nn.Linear(feat, cfg.global_hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(cfg.dropout), nn.Linear(cfg.global_hidden, cfg.dim))
        published = cfg.use_clinical and cfg.fusion == "published"
        self.token_proj = None if published else nn.Linear(feat, cfg.dim)
        if cfg.use_clinical:
            self.clinical_embed = ClinicalEmbedding(cfg.clinical_cardinalities, cfg.clinical_embed_dim, cfg.dim)
        if published:
            self.cross_fusion = PublishedFusion(cfg.dim, cfg.num_heads, cfg.dropout)
        elif cfg.use_clinical:
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
        k = 2 ** len(cfg.stages)
        if any(s % k for s in ct.shape[-3:]) or min(ct.shape[-3:]) < k:
            raise ValueError(f"ct spatial size must be multiples of {k} ({len(cfg.stages)} stride-2 stages), "
                             f"got {tuple(ct.shape[-3:])}")
        v = len(cfg.clinical_cardinalities)
        checks.tensor("clinical", clinical, ndim=2, device=ct.device)
        checks.shape("clinical", clinical, (b, v))
        checks.tensor("clinical_mask", clinical_mask, ndim=2, dtypes=(torch.bool,), device=ct.device)
        checks.shape("clinical_mask", clinical_mask, (b, v))
        if ct_mask is not None:
            checks.tensor("ct_mask", ct_mask, ndim=2, dtypes=(torch.bool,), device=ct.device)
            checks.shape("ct_mask", ct_mask, (b, 2))

    def image_features(self, ct: Tensor, ct_mask: Optional[Tensor] = None) -> Tensor:
        """(B, 2, C, D, H, W) -> fused feature map (B, F, D/2^s, H/2^s, W/2^s), ``s = len(stages)`` (3 published)."""
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
        """Malignancy logits ``{"logits": (B, 2)}`` (class 1 = malignant).

        ``ct`` (B, 2, C, D, H, W) float, T0 then T1; ``clinical`` (B, V) float codes;
        ``clinical_mask`` (B, V) bool, False = missing; ``ct_mask`` (B, 2) bool, a missing T0 is
        replaced by T1. :meth:`loss` and :meth:`predict` (the class example) call it on a batch dict.
        """
        self._check(ct, clinical, clinical_mask, ct_mask)
        cfg = self.config
        fused = self.image_features(ct, ct_mask)
        glob = self.global_mlp(fused.mean(dim=(2, 3, 4)))                     # (B, dim): the image vector
        if cfg.use_clinical and cfg.fusion == "published":
            clin = _masked_mean(self.clinical_embed(clinical, clinical_mask), clinical_mask)
            return {"logits": self.head(self.cross_fusion(glob, clin, clinical_mask.any(dim=1)))}
        spatial = self.token_proj(fused.flatten(2).transpose(1, 2))          # (B, P, dim)
        image = torch.cat([spatial, glob[:, None]], dim=1)                    # (B, P + 1, dim)
        if not cfg.use_clinical:
            return {"logits": self.head(torch.cat([image.mean(dim=1), glob], dim=-1))}
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
        # at least fp32 (bf16/fp16 logits are widened), a float64 model keeps float64
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return {"logits": logits, "probability": torch.softmax(wide, dim=-1)[:, 1]}

    def paper_recipe(self) -> dict[str, Any]:
        """The authors' optimiser as ``lungcore.train`` settings (``recipe: paper``): Adam with this
        config's lr, betas and weight decay; a cosine to ``min_lr_ratio`` over the stage (or warm
        restarts every ``restart_epochs``, or a constant rate); no warm-up, no gradient clipping.
        (Epochs, batch size and the 4-fold cross-validation of the authors' script are run settings,
        not optimiser settings: set them in the run's config.)

        Example:
            >>> r = CSFNet(CSFNetConfig(**CSFNetConfig.tiny_overrides())).paper_recipe()
            >>> r["optimizer"], r["betas"], r["schedule"], r["min_lr_ratio"]
            ('adam', (0.9, 0.999), 'cosine', 0.1)
        """
        cfg = self.config
        schedule = {"cosine": "cosine", "cosine_warm_restarts": "restarts", "none": "constant"}[cfg.scheduler]
        return {"optimizer": "adam", "lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay,
                "schedule": schedule, "restart_epochs": float(cfg.restart_epochs), "warmup_epochs": 0.0,
                "min_lr_ratio": cfg.min_lr_ratio if cfg.scheduler == "cosine" else 0.0, "grad_clip": 0.0}


def parameter_groups(model: CSFNet) -> dict[str, int]:
    """Parameter count per top-level part (``encoder``, ``fusion``, ...) plus ``total``.

    Example:
        >>> parameter_groups(CSFNet())["encoder"]
        28455964
    """
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        out[part] = out.get(part, 0) + p.numel()
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


__all__ = ["CSFNet", "CSFNetConfig", "PUBLISHED_STAGES", "parameter_groups"]
