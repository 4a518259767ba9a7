"""CSF-Net configured by its cohort (``CSFNet.config_from_cohort``): variables in any order, time
points and crop checked, contradictions named."""
from __future__ import annotations

import pytest
import torch

from lungcore.data import ClinicalVariable, CohortSchema, PreprocessSettings
from lungcore.models import create
from lungcore.models.csfnet import CSFNet, CSFNetConfig


def _schema(clinical, **kw) -> CohortSchema:
    return CohortSchema(kind="nodules", clinical=clinical, **kw)


def test_cardinalities_in_schema_order_and_any_order_runs():
    schema = _schema([ClinicalVariable("smoking", "categorical", ["no", "yes", "ex"]), ClinicalVariable("age")])
    cfg = CSFNet.config_from_cohort(schema, PreprocessSettings.csfnet())
    assert cfg == {"clinical_cardinalities": (3, 0)}
    net = create("csfnet", **{**CSFNetConfig.tiny_overrides(), **cfg}).eval()
    clinical = torch.tensor([[2.0, 0.7], [0.0, -1.2]])
    present = torch.ones(2, 2, dtype=torch.bool)
    ct = torch.randn(2, 2, 1, 8, 16, 16)
    out = net(ct, clinical, present)["logits"]
    assert torch.isfinite(out).all()
    changed = clinical.clone()
    changed[:, 1] += 1.0  # the numeric variable after the categorical one reaches the output
    assert not torch.allclose(net(ct, changed, present)["logits"], out)


def test_cohort_checks_and_contradictions():
    settings = PreprocessSettings.csfnet()
    schema = _schema([ClinicalVariable("age")])
    with pytest.raises(ValueError, match=r"model_overrides.clinical_cardinalities = \(2,\) contradicts"):
        CSFNet.config_from_cohort(schema, settings, {"clinical_cardinalities": [2]})
    with pytest.raises(ValueError, match="two time points"):
        CSFNet.config_from_cohort(_schema([], image_columns=["ct_t1"], centre_columns={}), settings)
    with pytest.raises(ValueError, match=r"crop \(12, 64, 64\): CSF-Net needs multiples of 8"):
        CSFNet.config_from_cohort(schema, PreprocessSettings(crop=(12, 64, 64)))
    # no clinical variables: the image-only variant, unless the user insists on fusion
    assert CSFNet.config_from_cohort(_schema([]), settings) == {"clinical_cardinalities": (), "use_clinical": False}
    with pytest.raises(ValueError, match="use_clinical"):
        CSFNet.config_from_cohort(_schema([]), settings, {"use_clinical": True})
    # a user value that agrees, or an ablation flag, passes through
    assert CSFNet.config_from_cohort(schema, settings, {"t1_only": True})["t1_only"] is True
