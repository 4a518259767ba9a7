"""The nodule cohort (CSF-Net's shape): nodules at T0 and a rescan T1, a clinical record, a label.

Example:
    >>> import numpy as np
    >>> nod = nodule_draw(np.random.default_rng(0), {"age": 62.0, "gender": "F", "smoking": "current",
    ...                   "screen_result": "positive", "isolation": "no"}, d_floor=4.0, max_d=20.0,
    ...                   effects="morphology")
    >>> nod["label"] in (0, 1), nod["margin_t1"] in ("smooth", "lobulated", "spiculated")
    (True, True)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lungcore.data.schema import ClinicalVariable, CohortSchema
from lungcore.data.synth.lesions import FEATURES, Lesion, lesion_features, pleural_site
from lungcore.data.synth.phantom import (EFFECTS, Preset, chest_phantom, lesion_site, lungs, patient_geometry,
                                         scan_affine, to_stored)
from lungcore.data.synth.writing import blank, fmt, progress, write_csv, write_ct


def nodules_schema() -> CohortSchema:
    """The schema of :func:`synth_cohort` ``kind="nodules"``."""
    return CohortSchema(kind="nodules", centre_frame="world", clinical=[
        ClinicalVariable("age", "numeric"),
        ClinicalVariable("gender", "categorical", ["F", "M"]),
        ClinicalVariable("race", "categorical", ["white", "black", "asian", "other"]),
        ClinicalVariable("smoking", "categorical", ["former", "current"]),
        ClinicalVariable("screen_result", "categorical", ["negative", "positive"]),
        ClinicalVariable("isolation", "categorical", ["no", "yes"]),
    ])


def nodule_draw(rng: np.random.Generator, clinical: dict[str, Any], *, d_floor: float, max_d: float,
                effects: str = "linear") -> dict[str, Any]:
    """One nodule: diameters at T0 and T1, its true malignancy logit and the drawn label.

    ``linear``: logit = -3.0 + 1.4 (d0 - 9) / 4 + 2.2 growth / 0.35 + the clinical part (1.5
    [current smoker] + 1.0 (age - 62) / 6 + 1.0 [positive screen] + 0.8 [isolated] + 0.6 [female];
    SD about 1.4), ``growth`` the log volume ratio T1 / T0 ~ N(0.15, 0.35).
    ``morphology`` keeps those draws and the clinical part and adds what a radiologist compares
    between the scans: the solid fraction of the core at T0 (uniform on [0, 1]) and its change (a
    growing solid component, +0.15 to +0.45, in 30 % of the nodules; otherwise N(0, 0.04)), the
    margin (smooth 50 %, lobulated 30 %, spiculated 20 % at T0; 15 % of the others become
    spiculated at T1) and a pleural site (25 %); its imaging part is -3.4 + 0.4 (d0 - 9) / 4 +
    0.4 growth / 0.35 + 1.2 [solid fraction grew by >= 0.15] + 1.0 [spiculated at T1] + 2.0
    [pleural] + 2.0 [part-solid at T0, 0.2 <= f <= 0.8] growth / 0.35 (weights chosen so that a
    logistic model on 42 true-mask radiomics features of both scans falls >= 0.06 AUC short of the
    oracle; the linear cohort's falls 0.012 short).
    ``interaction`` makes the same draws as ``linear`` (same images, same clinical records, only
    the labels differ) and lets the clinical record set how much the images matter: the imaging
    part is -3.0 + (0.4 + 2.0 [positive screen]) (d0 - 9) / 4 + (0.4 + 3.6 [current smoker])
    growth / 0.35 (on average about the linear weights): what a model adding image and clinical
    evidence misses, and a fusion of the two modalities can learn.

    Example:
        >>> import numpy as np
        >>> record = {"age": 62.0, "gender": "F", "smoking": "current", "screen_result": "positive",
        ...           "isolation": "no"}
        >>> a = nodule_draw(np.random.default_rng(0), record, d_floor=4.0, max_d=30.0)
        >>> b = nodule_draw(np.random.default_rng(0), record, d_floor=4.0, max_d=30.0, effects="interaction")
        >>> (a["d0"], a["growth"]) == (b["d0"], b["growth"]), round(b["logit_image"] - a["logit_image"], 3)
        (True, 0.65)
    """
    d0 = float(np.clip(rng.lognormal(math.log(9.0), 0.4), d_floor, 0.7 * max_d))
    growth = float(rng.normal(0.15, 0.35))  # log volume ratio T1/T0
    clin = (1.5 * (clinical["smoking"] == "current") + 1.0 * (clinical["age"] - 62) / 6
            + 1.0 * (clinical["screen_result"] == "positive") + 0.8 * (clinical["isolation"] == "yes")
            + 0.6 * (clinical["gender"] == "F"))
    out: dict[str, Any] = {"d0": d0, "growth": growth}
    if effects == "linear":
        # the clinical part (SD about 1.4) is large enough for a model to gain measurably from it
        image = -3.0 + 1.4 * (d0 - 9.0) / 4.0 + 2.2 * growth / 0.35
    elif effects == "interaction":  # the linear draws; the clinical record scales the image effects
        positive, smoker = clinical["screen_result"] == "positive", clinical["smoking"] == "current"
        out.update(positive_screen=bool(positive), current_smoker=bool(smoker))  # true, even where a cell is blank
        image = -3.0 + (0.4 + 2.0 * positive) * (d0 - 9.0) / 4.0 + (0.4 + 3.6 * smoker) * growth / 0.35
    elif effects == "morphology":
        f0 = float(rng.uniform(0.0, 1.0))
        grows = rng.uniform() < 0.3
        df = float(rng.uniform(0.15, 0.45)) if grows else float(rng.normal(0.0, 0.04))
        f1 = float(np.clip(f0 + df, 0.0, 1.0))
        margin0 = str(rng.choice(["smooth", "lobulated", "spiculated"], p=[0.5, 0.3, 0.2]))
        margin1 = "spiculated" if margin0 == "spiculated" or rng.uniform() < 0.15 else margin0
        pleural = bool(rng.uniform() < 0.25)
        out.update(solid_t0=f0, solid_t1=f1, margin_t0=margin0, margin_t1=margin1, pleural=pleural,
                   ground_glass_hu=float(rng.uniform(-750.0, -450.0)), texture=float(rng.uniform(0.2, 0.8)),
                   shape_seed=int(rng.integers(2**31)))
        image = (-3.4 + 0.4 * (d0 - 9.0) / 4.0 + 0.4 * growth / 0.35 + 1.2 * (f1 - f0 >= 0.15)
                 + 1.0 * (margin1 == "spiculated") + 2.0 * pleural + 2.0 * (0.2 <= f0 <= 0.8) * growth / 0.35)
    else:
        raise ValueError(f"effects must be one of {EFFECTS}, got {effects!r}")
    logit = image + clin
    out.update(logit=logit, logit_image=image, label=int(rng.uniform() < 1 / (1 + math.exp(-logit))),
               d1=float(np.clip(d0 * math.exp(max(growth, -0.3) / 3), 3.0, max_d)))
    return out


def _lesion(nod: dict[str, Any], t: int, effects: str) -> Any:
    radius = nod["d0" if t == 0 else "d1"] / 2
    if effects != "morphology":
        return nod["site"], radius, 0.9  # solid nodules
    return Lesion(tuple(nod["site"]), radius, margin=nod[f"margin_t{t}"], solid_fraction=nod[f"solid_t{t}"],
                  ground_glass_hu=nod["ground_glass_hu"], texture=nod["texture"], shape_seed=nod["shape_seed"])


def _patient_record(prng: np.random.Generator, schema: CohortSchema, missing: float, blank_smoking: bool
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    age = float(np.clip(prng.normal(62, 6), 55, 80))
    values = {"age": age, "gender": prng.choice(["F", "M"], p=[0.42, 0.58]),
              "race": prng.choice(["white", "black", "asian", "other"], p=[0.8, 0.1, 0.06, 0.04]),
              "smoking": prng.choice(["former", "current"], p=[0.5, 0.5]),
              "screen_result": prng.choice(["negative", "positive"], p=[0.4, 0.6]),
              "isolation": prng.choice(["no", "yes"], p=[0.7, 0.3])}
    cells = {k: fmt(v) if k == "age" else str(v) for k, v in values.items()}
    for name in schema.clinical_names:
        if blank(prng, missing) or (blank_smoking and name == "smoking"):
            cells[name] = ""
    return values, cells


def _nodule_patient(out: Path, patient: int, remaining: int, n: int, preset: Preset, seed: int, dicom_every: int,
                    missing: float, effects: str, schema: CohortSchema
                    ) -> list[tuple[dict[str, str], dict[str, str], dict[str, Any]]]:
    """One patient's T0 and T1 scans written; (manifest row, truth row, nodule) per nodule."""
    prng = np.random.default_rng([seed, 10_000 + patient])
    pid = f"S{patient + 1:04d}"
    # about one patient in four has a second nodule: both are in the same T0 and T1 scans
    count = min(2 if prng.uniform() < 0.25 else 1, remaining)
    values, cells = _patient_record(prng, schema, missing, n >= 4 and patient == 2)
    sp = patient_geometry(preset, prng)
    max_d = float(lungs(preset.shape, sp)[0][1].min())
    nodules: list[dict[str, Any]] = []
    for k in range(count):
        rng = np.random.default_rng([seed, patient, k])
        # a nodule narrower than two voxels is invisible at this spacing: the preset sets the floor
        nod = nodule_draw(rng, values, d_floor=max(4.0, 2 * sp.max()), max_d=max_d, effects=effects)
        for _ in range(50):  # keep two nodules of a scan apart
            if nod.get("pleural"):
                site = pleural_site(preset.shape, sp, nod["d1"] / 2, rng)
            else:
                site = lesion_site(preset.shape, sp, nod["d1"] / 2, rng)
            if all(np.linalg.norm(site - other["site"]) > (nod["d1"] + other["d1"]) / 2 + 4.0 for other in nodules):
                break
        nodules.append({**nod, "site": site})
    flip = patient % 3 == 2
    base = np.random.default_rng([seed, 10_000 + patient, 7])
    shift = base.normal(0, 6, size=3)  # the patient lies differently on the table at T1
    affine_seed = int(base.integers(2**31))
    idx = [nod["site"] / sp + (np.asarray(preset.shape) - 1) / 2 for nod in nodules]
    if flip:
        for v in idx:
            v[0] = preset.shape[0] - 1 - v[0]
    paths, worlds, features = [], [], []
    for t in (0, 1):
        affine = scan_affine(preset.shape, sp, np.random.default_rng(affine_seed), flip_z=flip,
                             shift_mm=None if t == 0 else shift)
        masks: list = []
        vol = chest_phantom(preset.shape, sp, np.random.default_rng([seed, patient, 100 + t]),
                            lesions=[_lesion(nod, t, effects) for nod in nodules],
                            anatomy_seed=seed * 100003 + patient, masks=masks)
        features.append([lesion_features(vol, box, mask, sp) for box, mask in masks])
        dicom = dicom_every > 0 and patient % dicom_every == 1 % dicom_every and t == 1
        paths.append(write_ct(out, f"{pid}_t{t}", to_stored(vol, flip), affine, dicom, seed, patient))
        worlds.append([affine[:3, :3] @ v + affine[:3, 3] for v in idx])
    result = []
    for k, nod in enumerate(nodules):
        nid = f"{pid}_N{k + 1}"
        row: dict[str, str] = {"nodule_id": nid, "patient_id": pid, "ct_t0": paths[0], "ct_t1": paths[1]}
        for t in (0, 1):
            for a, axis in enumerate("xyz"):
                row[f"t{t}_centre_{axis}"] = fmt(worlds[t][k][a])
        row.update(cells)
        row["label"] = str(nod["label"])
        truth = {"nodule_id": nid, "logit": fmt(nod["logit"]), "logit_image": fmt(nod["logit_image"]),
                 "label": str(nod["label"]), "diameter_t0_mm": fmt(nod["d0"]), "diameter_t1_mm": fmt(nod["d1"]),
                 "log_growth": fmt(nod["growth"]),
                 **{f"t{t}_index_{a}": fmt(idx[k][j]) for t in (0, 1) for j, a in enumerate("zyx")},
                 "spacing_z": fmt(sp[0]), "spacing_y": fmt(sp[1]), "spacing_x": fmt(sp[2]), "flip_z": str(int(flip))}
        if effects == "interaction":
            truth.update(positive_screen=str(int(nod["positive_screen"])),
                         current_smoker=str(int(nod["current_smoker"])))
        if effects == "morphology":
            truth.update({key: fmt(nod[key]) if isinstance(nod[key], float) else str(nod[key])
                          for key in ("solid_t0", "solid_t1", "margin_t0", "margin_t1")}, pleural=str(int(nod["pleural"])))
        for t in (0, 1):
            truth.update({f"feat_t{t}_{f}": fmt(features[t][k][f]) for f in FEATURES})
        result.append((row, truth, nod))
    return result


def _synth_nodules(out: Path, n: int, preset: Preset, seed: int, dicom_every: int, missing: float,
                   verbose: bool, effects: str = "linear") -> dict[str, Any]:
    from lungcore.metrics import roc_auc

    schema = nodules_schema()
    header = ["nodule_id", "patient_id", "ct_t0", "ct_t1", "t0_centre_x", "t0_centre_y", "t0_centre_z",
              "t1_centre_x", "t1_centre_y", "t1_centre_z", *schema.clinical_names, "label"]
    rows, truth, logits, labels = [], [], [], []
    bar = progress(verbose, n, "synth nodules")
    patient = 0
    while len(rows) < n:
        for row, true, nod in _nodule_patient(out, patient, n - len(rows), n, preset, seed, dicom_every, missing,
                                              effects, schema):
            rows.append(row)
            truth.append(true)
            logits.append(nod["logit"])
            labels.append(nod["label"])
            bar.update()
        patient += 1
    bar.close()
    write_csv(out / "manifest.csv", header, rows)
    write_csv(out / "truth.csv", list(truth[0]), truth)
    schema.save(out / "manifest.schema.json")
    auc = roc_auc(labels, logits) if 0 < sum(labels) < len(labels) else float("nan")
    return {"oracle": {"auc": auc}, "positives": int(sum(labels)), "patients": patient}
