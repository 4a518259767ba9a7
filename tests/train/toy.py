"""Tiny networks following the training contract of lungcore.models.registry (tests only).

``toy_survival``: two stages (pretrain: reconstruct the pooled CT; finetune: Cox on PFS + OS).
``toy_classifier``: one stage, cross-entropy. ``nan_after`` makes the loss NaN after that many
calls (NaN test).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lungcore.models.registry import register_model
from lungcore.nn.survival import CoxPHLoss


@dataclass
class ToyConfig:
    cardinalities: list[int] = field(default_factory=list)
    hidden: int = 8
    pool: int = 4
    nan_after: int = -1


class _Base(nn.Module):
    config_class = ToyConfig
    needs_images = True

    @classmethod
    def config_from_cohort(cls, schema, settings, overrides=None):
        return {"cardinalities": list(schema.cardinalities()), **(overrides or {})}

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        v = len(config.cardinalities)
        self.image = nn.Linear(config.pool ** 3, config.hidden)
        self.clin = nn.Linear(2 * v, config.hidden)
        self.calls = 0

    def features(self, batch):
        ct = batch["ct"].float()
        ct = ct.reshape(-1, *ct.shape[-3:])
        pooled = F.adaptive_avg_pool3d(ct.unsqueeze(1), self.config.pool).flatten(1)
        pooled = pooled.reshape(batch["clinical"].shape[0], -1, pooled.shape[-1]).mean(1)
        clin = torch.cat([batch["clinical"] * batch["clinical_mask"], batch["clinical_mask"].float()], 1)
        return torch.tanh(self.image(pooled) + self.clin(clin)), pooled

    def _tick(self, loss):
        self.calls += 1
        if self.config.nan_after >= 0 and self.training and self.calls > self.config.nan_after:
            loss = loss * float("nan")
        return loss


@register_model("toy_survival")
class ToySurvival(_Base):
    task = "survival"
    stages = ("pretrain", "finetune")

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.decoder = nn.Linear(config.hidden, config.pool ** 3)
        self.heads = nn.Linear(config.hidden, 2)
        self.cox = CoxPHLoss()

    def forward(self, batch):
        h, _ = self.features(batch)
        r = self.heads(h)
        return {"pfs": r[:, 0], "os": r[:, 1]}

    def loss(self, batch, stage):
        h, pooled = self.features(batch)
        if stage == "pretrain":
            loss = F.mse_loss(self.decoder(h), pooled)
            return self._tick(loss), {"recon": float(loss.detach())}
        r = self.heads(h)
        pfs = self.cox(r[:, 0], batch["pfs_time"], batch["pfs_event"], mask=batch["pfs_mask"])
        os_ = self.cox(r[:, 1], batch["os_time"], batch["os_event"], mask=batch["os_mask"])
        return self._tick(pfs + os_), {"cox_pfs": float(pfs.detach()), "cox_os": float(os_.detach())}

    def predict(self, batch):
        return self.forward(batch)


@register_model("toy_classifier")
class ToyClassifier(_Base):
    task = "classification"
    stages = ("train",)

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.head = nn.Linear(config.hidden, 2)

    def forward(self, batch):
        return {"logits": self.head(self.features(batch)[0])}

    def loss(self, batch, stage):
        logits = self.forward(batch)["logits"]
        keep = batch["label_mask"]
        loss = F.cross_entropy(logits[keep], batch["label"][keep]) if keep.any() else logits.sum() * 0
        return self._tick(loss), {}

    def predict(self, batch):
        logits = self.forward(batch)["logits"]
        return {"logits": logits, "probability": logits.float().softmax(-1)[:, 1]}
