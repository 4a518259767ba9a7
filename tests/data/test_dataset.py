"""Datasets: exactly the tensors of DESIGN.md, schema re-applied from a checkpoint, augmentation, splits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lungcore.data import (
    Augmentation,
    CohortDataset,
    CohortSchema,
    PreprocessSettings,
    read_manifest,
    split_by_patient,
    synth_cohort,
)

SMALL = PreprocessSettings(spacing=(4.0, 3.0, 3.0), crop=(8, 16, 16), window=(-1000.0, 400.0))


@pytest.fixture(scope="module")
def survival(tmp_path_factory):
    d = tmp_path_factory.mktemp("survival")
    return read_manifest(synth_cohort("survival", d, n=8, preset="tiny", seed=5)["manifest"])


@pytest.fixture(scope="module")
def nodules(tmp_path_factory):
    d = tmp_path_factory.mktemp("nodules")
    return read_manifest(synth_cohort("nodules", d, n=6, preset="tiny", seed=6)["manifest"])


def _batch(ds, n):
    return next(iter(torch.utils.data.DataLoader(ds, batch_size=n, shuffle=False)))


def test_survival_batch_is_exactly_the_design_tensors(survival, tmp_path):
    schema = survival.fit_schema()
    b = _batch(CohortDataset(survival, schema, SMALL, cache_dir=tmp_path), 8)
    assert set(b) == {"id", "ct", "ct_mask", "clinical", "clinical_mask", "pfs_time", "pfs_event", "pfs_mask",
                      "os_time", "os_event", "os_mask"}
    assert b["ct"].shape == (8, 1, 8, 16, 16) and b["ct"].dtype == torch.float32
    assert b["ct_mask"].dtype == torch.bool and b["ct_mask"].tolist() == [i != 3 for i in range(8)]
    assert torch.all(b["ct"][3] == 0)  # the patient without a CT
    assert b["clinical"].shape == (8, 6) and b["clinical"].dtype == torch.float32
    assert b["clinical_mask"].dtype == torch.bool and not b["clinical_mask"].all()
    assert torch.all(b["clinical"][~b["clinical_mask"]] == 0)
    for e in ("pfs", "os"):
        assert b[f"{e}_time"].dtype == torch.float32 and b[f"{e}_event"].dtype == torch.float32
        assert b[f"{e}_mask"].dtype == torch.bool
    assert not b["pfs_mask"][1]  # the synthetic cohort's patient without PFS
    np.testing.assert_allclose(b["os_time"].numpy(), survival.endpoints["os_time"], rtol=1e-6)
    assert b["id"] == survival.ids


def test_nodule_batch_is_exactly_the_design_tensors(nodules):
    b = _batch(CohortDataset(nodules, nodules.fit_schema(), PreprocessSettings.csfnet()), 6)
    assert set(b) == {"id", "ct", "ct_mask", "clinical", "clinical_mask", "label", "label_mask"}
    assert b["ct"].shape == (6, 2, 1, 16, 64, 64)
    assert b["ct_mask"].shape == (6, 2) and b["ct_mask"].all()
    assert b["label"].dtype == torch.long and b["label"].tolist() == nodules.label.tolist()
    # categorical codes (every variable but age) are exact integers in float32
    cat = b["clinical"][:, 1:][b["clinical_mask"][:, 1:]]
    assert torch.equal(cat, cat.round())


def test_standardisation_from_train_and_schema_reapplied_from_a_checkpoint(survival, tmp_path):
    train = survival.subset([0, 1, 2, 3, 4, 5])
    fitted = train.fit_schema()
    age = np.array([float(c) for c in train.clinical_raw["age"] if c])
    assert fitted.variable("age").mean == pytest.approx(age.mean())
    assert fitted.variable("age").std == pytest.approx(age.std())
    values, mask = fitted.encode(train.clinical_raw)
    assert values[mask[:, 0], 0].mean() == pytest.approx(0.0, abs=1e-5)
    # the checkpoint holds plain JSON; a new manifest is coded identically
    restored = CohortSchema.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert restored == fitted
    new = survival.subset([6, 7])
    v1, m1 = fitted.encode(new.clinical_raw)
    v2, m2 = restored.encode(new.clinical_raw)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(m1, m2)
    with pytest.raises(ValueError, match="schema must be fitted"):
        CohortDataset(survival, survival.schema, SMALL)


def test_augmentation_reaches_the_batch(nodules, tmp_path):
    schema = nodules.fit_schema()
    plain = CohortDataset(nodules, schema, PreprocessSettings.csfnet(), cache_dir=tmp_path)
    aug = CohortDataset(nodules, schema, PreprocessSettings.csfnet(), cache_dir=tmp_path, augment=Augmentation())
    torch.manual_seed(0)
    a, b, p = _batch(aug, 6)["ct"], _batch(aug, 6)["ct"], _batch(plain, 6)["ct"]
    assert a.shape == p.shape
    assert not torch.allclose(a, p) and not torch.allclose(a, b)
    # geometric transforms are shared by T0 and T1: identical inputs stay identical
    flip_only = Augmentation(flip=1.0, rotate_deg=0, scale=0, shift=0, noise=0)
    x = torch.rand(2, 1, 4, 6, 6)
    x[1] = x[0]
    y = flip_only(x)
    assert torch.equal(y[0], y[1]) and torch.equal(y[0], x[0].flip(-3).flip(-2).flip(-1))
    rot = Augmentation(flip=0, rotate_deg=10, scale=0, shift=0, noise=0)(x)
    assert rot.shape == x.shape and torch.equal(rot[0], rot[1]) and not torch.allclose(rot, x)


def test_seeded_augmentation_is_the_same_in_any_worker(nodules, tmp_path):
    """With ``augment_seed`` a sample's augmentation depends on (seed, index) alone: DataLoader
    workers (0 or 2, shuffled or not) give the same tensors, another seed others, and torch's global
    RNG is left untouched (the model's dropout draws the same numbers with any worker count)."""
    ds = CohortDataset(nodules, nodules.fit_schema(), PreprocessSettings.csfnet(), cache_dir=tmp_path,
                       augment=Augmentation(), augment_seed=11)
    n = len(ds)

    def by_id(workers, shuffle=False):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, shuffle=shuffle,
                                             generator=torch.Generator().manual_seed(0))
        return {i: ct for b in loader for i, ct in zip(b["id"], b["ct"])}

    torch.manual_seed(123)
    main = by_id(0)
    after = torch.rand(())
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(()))  # the global RNG drew nothing
    for workers, shuffle in ((2, False), (2, True), (0, True)):
        other = by_id(workers, shuffle)
        assert sorted(other) == sorted(main) and all(torch.equal(other[k], main[k]) for k in main)
    ds.augment_seed = 12
    assert not any(torch.equal(ct, main[k]) for k, ct in by_id(0).items())
    plain = CohortDataset(nodules, nodules.fit_schema(), PreprocessSettings.csfnet(), cache_dir=tmp_path)
    assert not torch.equal(plain[0]["ct"], main[nodules.ids[0]])
    for bad in (-1, 1.5, "7", True):
        with pytest.raises(ValueError, match=f"augment_seed must be None or an integer >= 0, got {bad!r}"):
            CohortDataset(nodules, nodules.fit_schema(), PreprocessSettings.csfnet(), cache_dir=tmp_path,
                          augment=Augmentation(), augment_seed=bad)


def test_augmentation_leaves_missing_scans_alone(nodules, tmp_path):
    """A missing scan stays exactly zeros (no noise, no intensity jitter), and a sample without any
    scan is not augmented at all (a clinical-only cohort pays nothing for augmentation)."""
    m = nodules.subset([0, 1])
    m.images[0] = [None, m.images[0][1]]
    m.images[1] = [None, None]
    ds = CohortDataset(m, nodules.fit_schema(), PreprocessSettings.csfnet(), cache_dir=tmp_path,
                       augment=Augmentation())
    one, none = ds[0], ds[1]
    assert one["ct_mask"].tolist() == [False, True] and none["ct_mask"].tolist() == [False, False]
    assert torch.count_nonzero(one["ct"][0]) == 0 and torch.count_nonzero(one["ct"][1]) > 0
    assert torch.count_nonzero(none["ct"]) == 0


def test_dataloader_workers(nodules, tmp_path):
    ds = CohortDataset(nodules, nodules.fit_schema(), PreprocessSettings.csfnet(), cache_dir=tmp_path,
                       augment=Augmentation())
    batches = list(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2))
    assert [b["ct"].shape[0] for b in batches] == [3, 3]


def test_splits_by_patient(tmp_path):
    m = read_manifest(synth_cohort("nodules", tmp_path, n=40, preset="tiny", seed=2, dicom_every=0)["manifest"],
                      images="exists")
    splits = split_by_patient(m, (0.6, 0.2, 0.2), seed=1)
    rows = sorted(r for s in splits.values() for r in s)
    assert rows == list(range(len(m)))
    owners = {}
    for name, idx in splits.items():
        for i in idx:
            assert owners.setdefault(m.patient_ids[i], name) == name, "a patient straddles splits"
    assert len(set(m.patient_ids)) < len(m)  # the cohort really has patients with several nodules
    rate = m.label.mean()
    for name, idx in splits.items():
        assert abs(m.label[idx].mean() - rate) < 0.25, name
    assert split_by_patient(m, (0.6, 0.2, 0.2), seed=1) == splits
    with pytest.raises(ValueError, match="fractions"):
        split_by_patient(m, (0.5, 0.2))
