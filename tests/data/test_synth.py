"""Synthetic cohorts: written to disk in the real formats, deterministic, with the planned gaps."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lungcore.cli import main
from lungcore.data import read_ct, read_manifest, synth_cohort
from lungcore.data.synth.phantom import PRESETS


@pytest.mark.parametrize("kind", ["survival", "nodules"])
def test_cohort_on_disk(kind, tmp_path):
    info = synth_cohort(kind, tmp_path, n=8, preset="tiny", seed=0)
    m = read_manifest(info["manifest"], images="full")  # every image read back through MONAI
    assert len(m) == 8 and (tmp_path / "manifest.schema.json").is_file()
    paths = [p for row in m.images for p in row if p is not None]
    assert any(p.is_dir() for p in paths) and any(p.name.endswith(".nii.gz") for p in paths)  # DICOM + NIfTI
    assert any("" in cells for cells in m.clinical_raw.values())  # missing clinical values
    ct = read_ct(paths[0])
    assert ct.shape == (24, 48, 48)
    assert ct.array.min() == -1024.0  # air outside the body
    lungs = (ct.array > -950) & (ct.array < -700)
    assert 0.05 < lungs.mean() < 0.5
    assert np.median(ct.array[ct.array > -500]) == pytest.approx(40, abs=40)  # soft tissue
    truth = list(csv.DictReader(open(tmp_path / "truth.csv")))
    assert len(truth) == 8
    if kind == "survival":
        assert not m.endpoints["pfs_mask"].all() and m.images[3] == [None]
        assert set(info["oracle"]) == {"os_cindex", "pfs_cindex"}
    else:
        assert 0.5 <= info["oracle"]["auc"] <= 1.0
        growth = [float(r["diameter_t1_mm"]) / float(r["diameter_t0_mm"]) for r in truth]
        assert max(growth) > 1.05  # nodules grow between T0 and T1


def test_deterministic_by_seed(tmp_path):
    a = synth_cohort("nodules", tmp_path / "a", n=3, preset="tiny", seed=7)
    b = synth_cohort("nodules", tmp_path / "b", n=3, preset="tiny", seed=7)
    c = synth_cohort("nodules", tmp_path / "c", n=3, preset="tiny", seed=8)
    text = [(tmp_path / x / "manifest.csv").read_text() for x in "abc"]
    assert text[0] == text[1] != text[2]
    assert a["oracle"] == b["oracle"]
    ma, mb = read_manifest(a["manifest"]), read_manifest(b["manifest"])
    for pa, pb in zip(ma.images[1], mb.images[1]):
        np.testing.assert_array_equal(read_ct(pa).array, read_ct(pb).array)


def test_reuse_only_what_the_same_arguments_wrote(tmp_path, monkeypatch):
    import lungcore.data.synth.cohort as synth

    first = synth_cohort("survival", tmp_path, n=6, preset="tiny", seed=2, reuse=True)
    again = synth_cohort("survival", tmp_path, n=6, preset="tiny", seed=2, reuse=True)
    assert not first["reused"] and again["reused"] and again["oracle"] == first["oracle"]
    assert not synth_cohort("survival", tmp_path, n=7, preset="tiny", seed=2, reuse=True)["reused"]
    assert len(read_manifest(tmp_path / "manifest.csv")) == 7
    monkeypatch.setattr(synth, "GENERATOR_VERSION", synth.GENERATOR_VERSION + 1)  # a newer generator rewrites
    assert not synth_cohort("survival", tmp_path, n=7, preset="tiny", seed=2, reuse=True)["reused"]


def test_oracle_signal_on_a_larger_cohort(tmp_path):
    """The planted model is strong enough to learn from (checked on 120 tiny patients, seconds)."""
    info = synth_cohort("survival", tmp_path, n=120, preset="tiny", seed=1, dicom_every=0)
    assert info["oracle"]["os_cindex"] > 0.68 and info["oracle"]["pfs_cindex"] > 0.62


def test_survival_variables_depend_on_each_other(tmp_path):
    """The planted dependencies a masked variable can be completed from (cross-modal and within the
    record), and a tumour-size effect that is not clipped away: checked on the truth the files hold."""
    import pandas as pd

    synth_cohort("survival", tmp_path, n=300, preset="tiny", seed=3, dicom_every=0)
    d = pd.read_csv(tmp_path / "manifest.csv").merge(pd.read_csv(tmp_path / "truth.csv"), on="patient_id")
    big = d.diameter_mm > d.diameter_mm.median()
    stage4 = d.stage == "IV"
    assert stage4[big].mean() > stage4[~big].mean() + 0.2  # stage with tumour size
    ok = d.pdl1_tps.notna()
    assert np.corrcoef(d.pdl1_tps[ok], d.texture[ok])[0, 1] > 0.4  # PD-L1 with tumour texture
    ok = d.ecog.notna() & d.age.notna()
    assert np.corrcoef(d.ecog[ok], d.age[ok])[0, 1] > 0.2  # ECOG with age
    # tumour sizes spread evenly in log over what the lung holds, not piled up at a clip
    logd = np.log(d.diameter_mm)
    assert logd.std() > 0.25 and (d.diameter_mm > d.diameter_mm.max() - 0.5).mean() < 0.05
    assert np.corrcoef(logd, d.eta)[0, 1] > 0.4  # size carries a large part of the hazard


def test_synth_command(tmp_path, capsys):
    assert main(["synth", "--kind", "csfnet", "--n", "3", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 nodules rows" in out and "oracle auc" in out
    assert main(["validate", "--manifest", str(tmp_path / "manifest.csv")]) == 0


@pytest.mark.parametrize("kind, manifest_sha1, voxel_sum", [
    ("survival", "610180d31076457c0f7e5a468f11c06c8ddfb9ae", -33795473.0),
    ("nodules", "0a9bfa9edeb05fadde0851bdf28f9d83333c0f7d", -33808160.0),
])
def test_linear_cohorts_are_unchanged(kind, manifest_sha1, voxel_sum, tmp_path):
    """The ``linear`` cohorts are byte-for-byte those generator version 2 wrote before the package split
    and the ``morphology`` option (manifest hash and first CT's voxel sum recorded from that code)."""
    import hashlib

    info = synth_cohort(kind, tmp_path, n=6, seed=5, dicom_every=0)
    assert hashlib.sha1(info["manifest"].read_bytes()).hexdigest() == manifest_sha1
    m = read_manifest(info["manifest"])
    first = next(p for row in m.images for p in row if p is not None)
    assert float(read_ct(first).array.astype(np.float64).sum()) == voxel_sum


@pytest.mark.parametrize("kind", ["survival", "nodules"])
def test_morphology_cohort_on_disk(kind, tmp_path):
    info = synth_cohort(kind, tmp_path, n=6, preset="tiny", seed=1, effects="morphology", dicom_every=0)
    assert info["effects"] == "morphology"
    truth = list(csv.DictReader(open(tmp_path / "truth.csv")))
    if kind == "survival":
        assert {"margin", "solid_fraction", "cavity", "pleural", "eta_image", "feat_sphericity"} <= set(truth[0])
    else:
        assert {"margin_t0", "margin_t1", "solid_t0", "solid_t1", "feat_t0_solid_fraction",
                "feat_t1_solid_fraction"} <= set(truth[0])
    again = synth_cohort(kind, tmp_path, n=6, preset="tiny", seed=1, effects="morphology", dicom_every=0, reuse=True)
    assert again["reused"]
    assert not synth_cohort(kind, tmp_path, n=6, preset="tiny", seed=1, dicom_every=0, reuse=True)["reused"]
    with pytest.raises(ValueError, match="effects must be one of"):
        synth_cohort(kind, tmp_path, n=6, effects="quadratic")


@pytest.mark.parametrize("kind", ["survival", "nodules"])
def test_interaction_cohort_is_the_linear_one_with_other_outcomes(kind, tmp_path):
    """Same images and clinical records as the linear cohort of that seed; only the outcomes and the
    planted risk differ."""
    import pandas as pd

    lin = synth_cohort(kind, tmp_path / "linear", n=8, preset="tiny", seed=3, dicom_every=0)
    inter = synth_cohort(kind, tmp_path / "inter", n=8, preset="tiny", seed=3, dicom_every=0, effects="interaction")
    assert inter["effects"] == "interaction"
    a, b = pd.read_csv(lin["manifest"], dtype=str), pd.read_csv(inter["manifest"], dtype=str)
    outcomes = ["label"] if kind == "nodules" else ["pfs_time", "pfs_event", "os_time", "os_event"]
    same = [c for c in a.columns if c not in outcomes]
    pd.testing.assert_frame_equal(a[same], b[same])
    for rel in a[[c for c in same if c in ("ct", "ct_t0", "ct_t1")]].stack().dropna():
        assert (tmp_path / "linear" / rel).read_bytes() == (tmp_path / "inter" / rel).read_bytes()
    risk = "logit" if kind == "nodules" else "eta"
    ta, tb = (pd.read_csv(tmp_path / d / "truth.csv") for d in ("linear", "inter"))
    assert not np.allclose(ta[risk], tb[risk])


def test_interaction_risk_needs_the_clinical_record():
    """The planted imaging risk of ``interaction`` is not additive: a least-squares fit on the image
    and clinical main effects leaves part of it unexplained, which their products explain."""
    from lungcore.data.synth.nodules import nodule_draw
    from lungcore.data.synth.survival import survival_patient

    def r2(x, y):
        x = np.column_stack([np.ones(len(y)), *x])
        resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        return 1.0 - resid.var() / y.var()

    draws = [survival_patient(np.random.default_rng([4, i]), max_diameter=30.0, min_diameter=8.0,
                              effects="interaction") for i in range(3000)]
    y = np.array([d["eta_image"] for d in draws])
    size, texture = np.log([d["diameter"] for d in draws]), np.array([d["texture"] for d in draws])
    low = np.array([d["pdl1"] < 50 for d in draws], dtype=float)
    assert r2([size, texture, low], y) < 0.9
    assert r2([size, texture, low, size * low], y) == pytest.approx(1.0)

    rng = np.random.default_rng(0)
    records = [{"age": 62.0, "gender": "F", "smoking": str(rng.choice(["former", "current"])),
                "screen_result": str(rng.choice(["negative", "positive"])), "isolation": "no"} for _ in range(3000)]
    nods = [nodule_draw(np.random.default_rng([5, i]), r, d_floor=4.0, max_d=30.0, effects="interaction")
            for i, r in enumerate(records)]
    y = np.array([d["logit_image"] for d in nods])
    d0, growth = np.array([d["d0"] for d in nods]), np.array([d["growth"] for d in nods])
    smoker = np.array([r["smoking"] == "current" for r in records], dtype=float)
    positive = np.array([r["screen_result"] == "positive" for r in records], dtype=float)
    assert r2([d0, growth, smoker, positive], y) < 0.9
    assert r2([d0, growth, smoker, positive, d0 * positive, growth * smoker], y) == pytest.approx(1.0)


def test_a_cohort_written_before_the_effects_option_is_reused(tmp_path):
    import json

    synth_cohort("survival", tmp_path, n=3, seed=0, dicom_every=0)
    saved = json.loads((tmp_path / "synth.json").read_text())
    del saved["effects"]
    (tmp_path / "synth.json").write_text(json.dumps(saved))
    assert synth_cohort("survival", tmp_path, n=3, seed=0, dicom_every=0, reuse=True)["reused"]


def test_morphology_risk_is_not_linear_in_size_and_density():
    """The planted imaging log-hazard: exactly linear in size and texture for ``linear``; for
    ``morphology`` a least-squares fit on size, texture, solid fraction and cavity (what size,
    density and spread summaries stand for) leaves a large part unexplained."""
    from lungcore.data.synth.survival import survival_patient

    def r2(effects):
        draws = [survival_patient(np.random.default_rng([9, i]), max_diameter=30.0, min_diameter=8.0,
                                  effects=effects) for i in range(3000)]
        x = np.array([[1.0, np.log(d["diameter"]), d["texture"], d.get("solid_fraction", 0.0),
                       float(d.get("cavity", 0.0) > 0)] for d in draws])
        y = np.array([d["eta_image"] for d in draws])
        resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        return 1.0 - resid.var() / y.var()

    assert r2("linear") == pytest.approx(1.0)
    assert r2("morphology") < 0.6


def test_lesion_morphology_shows_in_the_features():
    """Each morphology parameter moves the feature a radiomics pipeline reads for it."""
    from lungcore.data.synth import Lesion, lesion_features

    sp = np.array([1.0, 1.0, 1.0])

    def features(**kw):
        vol = np.full((48, 48, 48), -850.0, dtype=np.float32)
        box, mask = Lesion((0.0, 0.0, 0.0), 7.0, shape_seed=3, **kw).paint(vol, sp, np.random.default_rng(0))
        return lesion_features(vol, box, mask, sp)

    smooth, spiculated = features(margin="smooth"), features(margin="spiculated")
    lobulated = features(margin="lobulated")
    assert spiculated["sphericity"] < smooth["sphericity"] - 0.1
    assert lobulated["sphericity"] < smooth["sphericity"]
    assert features(solid_fraction=0.2)["solid_fraction"] < 0.4 < 0.6 < features(solid_fraction=0.8)["solid_fraction"]
    assert features(cavity=0.5)["p10_hu"] < smooth["p10_hu"] - 300
    assert smooth["diameter_mm"] == pytest.approx(14.0, rel=0.08)
    with pytest.raises(ValueError, match="margin must be one of"):
        Lesion((0.0, 0.0, 0.0), 5.0, margin="jagged")


def test_pleural_lesions_touch_the_chest_wall():
    from lungcore.data.synth.lesions import pleural_site
    from lungcore.data.synth.phantom import LUNG_HU, chest_phantom

    shape, sp = (48, 128, 128), np.array([2.0, 1.0, 1.0])
    rng = np.random.default_rng(4)
    for _ in range(5):
        site = pleural_site(shape, sp, 5.0, rng)
        empty = chest_phantom(shape, sp, np.random.default_rng(0), noise_hu=0.0)
        from lungcore.data.synth import Lesion

        masks: list = []
        chest_phantom(shape, sp, np.random.default_rng(0), noise_hu=0.0, lesions=[Lesion(tuple(site), 5.0)],
                      masks=masks)
        box, mask = masks[0]
        under = empty[box][mask]
        assert (under == LUNG_HU).mean() > 0.3 and (under != LUNG_HU).mean() > 0.05  # in the lung, into the wall


def _synth(capsys, *args):
    capsys.readouterr()
    rc = main(["synth", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
def test_synth_into_a_folder_that_cannot_be_created(capsys):
    rc, out, err = _synth(capsys, "--kind", "survival", "--n", "4", "--out", "/proc/lungcore-x", "--quiet")
    assert rc == 2 and not out
    assert err.startswith("lungcore synth: --out /proc/lungcore-x") and len(err.splitlines()) == 1
    assert not Path("/proc/lungcore-x").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_synth_that_fails_midway_leaves_nothing_behind(tmp_path, capsys, monkeypatch, existing):
    import errno

    import lungcore.data.synth as synth

    out = tmp_path / "new" / "cohort"
    if existing:  # an empty folder the user made: it stays, empty
        out.mkdir(parents=True)

    def full_disk(kind, folder, n, **kwargs):
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "P0001.nii.gz").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "manifest.csv"))

    monkeypatch.setattr(synth, "synth_cohort", full_disk)
    rc, _, err = _synth(capsys, "--kind", "survival", "--n", "4", "--out", out, "--quiet")
    assert rc == 1
    assert f"--out {out}: cannot write the cohort: No space left on device" in err and "nothing was kept" in err
    if existing:
        assert out.is_dir() and not any(out.iterdir())
    else:
        assert not (tmp_path / "new").exists()


def test_synth_says_when_the_oracle_is_undefined(tmp_path, capsys):
    rc, out, _ = _synth(capsys, "--kind", "survival", "--n", "1", "--out", tmp_path / "one", "--quiet",
                        "--dicom-every", "0")
    assert rc == 0 and out.rstrip().endswith("oracle os_cindex n/a, pfs_cindex n/a (undefined: needs at least "
                                             "2 patients and an event before a later follow-up)")
    rc, out, _ = _synth(capsys, "--kind", "nodules", "--n", "1", "--out", tmp_path / "nod", "--quiet",
                        "--dicom-every", "0")
    assert rc == 0 and "oracle auc n/a (undefined: needs a benign and a malignant nodule)" in out
    # two patients without a comparable pair (seed 8): no oracle, no crash after the manifest was written
    rc, out, _ = _synth(capsys, "--kind", "survival", "--n", "2", "--seed", "8", "--out", tmp_path / "two", "--quiet",
                        "--dicom-every", "0")
    assert rc == 0 and "os_cindex n/a" in out and (tmp_path / "two" / "synth.json").is_file()


def test_preset_help_says_how_the_spacing_varies_and_the_files_agree(tmp_path, capsys):
    """``--preset tiny`` is nominally 4x3x3 mm; each scan is 4 or 5 mm thick and 2.7-3.3 mm in-plane, as
    ``synth --help`` says, and what ``read_ct`` reads is what ``truth.csv`` records."""
    from lungcore.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = " ".join(sub.choices["synth"].format_help().split())
    assert "tiny 24x48x48 at 4x3x3 mm" in text and "4 or 5 mm by 2.7-3.3 mm" in text
    synth_cohort("survival", tmp_path, n=8, preset="tiny", seed=0, dicom_every=3)
    truth = {r["patient_id"]: r for r in csv.DictReader(open(tmp_path / "truth.csv"))}
    m = read_manifest(tmp_path / "manifest.csv")
    for pid, row in zip(m.ids, m.images):
        if row[0] is None:
            continue
        spacing = read_ct(row[0]).spacing
        recorded = [float(truth[pid][f"spacing_{a}"]) for a in "zyx"]
        assert np.allclose(spacing, recorded, atol=1e-4)  # truth.csv: 4 decimals
        assert spacing[0] in (4.0, 5.0) and 2.7 <= spacing[1] == spacing[2] <= 3.3


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pleural_lesions_lie_whole_inside_the_scan(preset):
    """The lungs reach beyond the field of view at the apex and base: generator version 2 put about
    1 pleural lesion in 1,500 outside the scan (a manifest centre that validate refuses; found at
    6,400 nodules) and 1 in 400 across its edge. Every draw now lies whole inside, a voxel to spare,
    and a draw that was inside is the same draw as before (the rng is not consumed differently)."""
    import math

    from lungcore.data.synth.lesions import pleural_site
    from lungcore.data.synth.phantom import lungs

    p = PRESETS[preset]
    rng = np.random.default_rng(7)
    moved = 0
    for _ in range(4000):
        sp = np.asarray(p.spacing) * np.array([rng.choice([1.0, 1.25]), *rng.uniform(0.9, 1.1, 1).repeat(2)])
        radius = float(rng.uniform(2.0, 0.1 * (np.asarray(p.shape) * sp).min()))  # nodules reach 0.075 fov
        seed = int(rng.integers(2**31))
        site = pleural_site(p.shape, sp, radius, np.random.default_rng(seed))
        assert (np.abs(site) + radius + sp <= np.asarray(p.shape) * sp / 2 + 1e-9).all(), (sp, radius, site)
        # the first draw, as version 2 made it: kept whenever it was inside
        r = np.random.default_rng(seed)
        centre, semi = lungs(p.shape, sp)[int(r.integers(2))]
        u = r.normal(size=3)
        u[0] *= 0.25
        u /= np.linalg.norm(u)
        surface = u / math.sqrt(float(((u / semi) ** 2).sum()))
        first = centre + surface * (1.0 - 0.55 * radius / float(np.linalg.norm(surface)))
        if (np.abs(first) + radius + sp <= np.asarray(p.shape) * sp / 2).all():
            assert np.array_equal(site, first)
        else:
            moved += 1
    assert moved < 200  # a redraw is rare
