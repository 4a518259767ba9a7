"""The survival cohort (CMML's shape): one tumour per patient, a clinical record, PFS and OS.

Example:
    >>> import numpy as np
    >>> p = survival_patient(np.random.default_rng(0), max_diameter=30.0, min_diameter=10.0, effects="morphology")
    >>> sorted(k for k in p if k not in ("age", "sex", "ecog", "stage", "pdl1", "smoking"))[:4]
    ['cavity', 'diameter', 'eta', 'eta_image']
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


def survival_schema() -> CohortSchema:
    """The schema of :func:`synth_cohort` ``kind="survival"``."""
    return CohortSchema(kind="survival", centre_frame="world", clinical=[
        ClinicalVariable("age", "numeric"),
        ClinicalVariable("sex", "categorical", ["F", "M"]),
        ClinicalVariable("ecog", "categorical", ["0", "1", "2"]),
        ClinicalVariable("stage", "categorical", ["IIIB", "IV"]),
        ClinicalVariable("pdl1_tps", "numeric"),
        ClinicalVariable("smoking", "categorical", ["never", "former", "current"]),
    ])


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def survival_patient(rng: np.random.Generator, *, max_diameter: float, min_diameter: float,
                     effects: str = "linear") -> dict[str, Any]:
    """One patient of the survival cohort: tumour, clinical record and the true log-hazard ``eta``.

    The variables depend on each other the way they do in a clinic, so a masked one can be
    completed from the rest (what CMML's masked pretraining learns):

    - tumour diameter: log-uniform over what the patient's lung holds (``z_size`` = the
      standardised log-diameter); texture uniform on [0, 1] (0: a hazy ground-glass lesion, 1: a
      solid, heterogeneous one; see ``_paint_lesion``);
    - stage IV is likelier for larger tumours (``P = sigmoid(0.9 + 1.5 z_size)``);
    - ECOG rises with age (ordinal latent ``0.06 (age - 65) + N(0, 1)``);
    - smoking depends on sex and age; PD-L1 TPS rises with tumour heterogeneity and with smoking;
    - ``eta`` = 1.0 z_size + 0.7 z_texture + 0.3 z_age + ECOG (0 / 0.5 / 1.0) + 0.4 [stage IV]
      - 0.5 z_pdl1 (z: standardised over the cohort's distribution), so the CT carries about
      as much of the hazard as the clinical record.

    ``effects="morphology"`` keeps every draw above and the clinical part of ``eta``, then draws
    what a radiologist reads (:class:`lungcore.data.synth.lesions.Lesion`): margin (smooth 40 %,
    lobulated 30 %, spiculated 30 %), solid fraction of the core (uniform on [0, 1]; ground glass
    at -750 to -450 HU around it), a central cavity (in a quarter of the lesions with solid
    fraction >= 0.6) and a pleural site (30 %), and replaces the imaging part of ``eta`` by
    ``eta_image`` = 0.5 z_size + 0.3 [lobulated] + 0.8 [spiculated] + 0.9 [solid fraction >= 0.5]
    + 1.0 [pleural contact] + 0.6 [cavity] + 0.7 z_size z_texture (texture: the heterogeneity of
    the solid core, mattering more in large tumours). Size, density and spread summaries see the
    size term and part of the rest; the margin class, the threshold, the pleura and the
    interaction are what a linear model on them misses.

    ``effects="interaction"`` makes the same draws as ``linear`` (same images and clinical records;
    only ``eta`` differs) and lets the clinical record set how much the tumour matters:
    ``eta_image`` = (0.2 + 1.4 [PD-L1 TPS < 50]) z_size + 0.7 z_texture (tumour burden counts
    little in the PD-L1-high patients who respond to immunotherapy): what a model adding image and
    clinical evidence misses, and a fusion of the two modalities can learn.
    """
    lo, hi = math.log(min_diameter), math.log(max(max_diameter, min_diameter * 1.5))
    u = float(rng.uniform(-1.0, 1.0))
    diameter = math.exp((lo + hi) / 2 + u * (hi - lo) / 2)
    z_size = u * math.sqrt(3.0)  # a uniform on [-1, 1] has variance 1/3
    texture = float(rng.uniform(0.0, 1.0))
    z_texture = (texture - 0.5) * math.sqrt(12.0)
    age = float(np.clip(rng.normal(65, 9), 35, 90))
    sex = str(rng.choice(["F", "M"], p=[0.4, 0.6]))
    latent = 0.06 * (age - 65) + rng.normal()
    ecog = "0" if latent < -0.25 else ("1" if latent < 1.1 else "2")
    stage = "IV" if rng.uniform() < sigmoid(0.9 + 1.5 * z_size) else "IIIB"
    smoke = rng.normal() + 0.6 * (sex == "M") + 0.03 * (age - 65)
    smoking = "never" if smoke < -0.6 else ("former" if smoke < 0.9 else "current")
    pdl1 = 100.0 * sigmoid(-0.6 + 0.9 * z_texture + 0.6 * (smoking == "current") + 0.8 * rng.normal())
    z_pdl1 = (pdl1 - 40.0) / 30.0
    eta_clinical = 0.3 * (age - 65) / 9 + {"0": 0.0, "1": 0.5, "2": 1.0}[ecog] + (0.4 if stage == "IV" else 0.0) \
        - 0.5 * z_pdl1
    out = {"diameter": diameter, "texture": texture, "age": age, "sex": sex, "ecog": ecog, "stage": stage,
           "pdl1": pdl1, "smoking": smoking}
    if effects == "linear":
        eta_image = 1.0 * z_size + 0.7 * z_texture
    elif effects == "interaction":  # the linear draws; PD-L1 scales the tumour-burden effect
        out.update(pdl1_low=bool(pdl1 < 50.0))  # true, even where the cell is blank
        eta_image = (0.2 + 1.4 * (pdl1 < 50.0)) * z_size + 0.7 * z_texture
    elif effects == "morphology":
        margin = str(rng.choice(["smooth", "lobulated", "spiculated"], p=[0.4, 0.3, 0.3]))
        solid = float(rng.uniform(0.0, 1.0))
        cavity = float(rng.uniform(0.3, 0.55)) if solid >= 0.6 and rng.uniform() < 0.25 else 0.0
        pleural = bool(rng.uniform() < 0.3)
        out.update(margin=margin, solid_fraction=solid, ground_glass_hu=float(rng.uniform(-750.0, -450.0)),
                   cavity=cavity, pleural=pleural, shape_seed=int(rng.integers(2**31)))
        eta_image = (0.5 * z_size + 0.3 * (margin == "lobulated") + 0.8 * (margin == "spiculated")
                     + 0.9 * (solid >= 0.5) + 1.0 * pleural + 0.6 * (cavity > 0) + 0.7 * z_size * z_texture)
    else:
        raise ValueError(f"effects must be one of {EFFECTS}, got {effects!r}")
    return {**out, "eta_image": eta_image, "eta": eta_clinical + eta_image}


def _survival_case(out: Path, i: int, n: int, preset: Preset, seed: int, dicom_every: int, missing: float,
                   effects: str, schema: CohortSchema) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """One patient: CT written, manifest row, truth row, and the figures the oracle needs."""
    rng = np.random.default_rng([seed, i])
    pid = f"P{i + 1:04d}"
    sp = patient_geometry(preset, rng)
    flip = i % 3 == 2
    affine = scan_affine(preset.shape, sp, rng, flip_z=flip)
    draw = survival_patient(rng, max_diameter=1.2 * float(lungs(preset.shape, sp)[0][1].min()),
                            min_diameter=max(8.0, 2.5 * float(sp.max())), effects=effects)
    diameter, texture, eta = draw["diameter"], draw["texture"], draw["eta"]
    if draw.get("pleural"):
        site = pleural_site(preset.shape, sp, diameter / 2, rng)
    else:
        site = lesion_site(preset.shape, sp, diameter / 2, rng)
    # Weibull PH: S(t) = exp(-(t / scale)^k * exp(eta)); inverse-transform sampling
    k = 1.3
    t_pfs = 7.0 * (-math.log(rng.uniform()) / math.exp(eta)) ** (1 / k)
    t_os = t_pfs + 9.0 * (-math.log(rng.uniform()) / math.exp(0.8 * eta)) ** (1 / k)
    censor = min(rng.uniform(12.0, 48.0), rng.exponential(80.0))
    obs_pfs, ev_pfs = min(t_pfs, censor), int(t_pfs <= censor)
    obs_os, ev_os = min(t_os, censor), int(t_os <= censor)

    if effects == "morphology":
        lesion: Any = Lesion(tuple(site), diameter / 2, margin=draw["margin"], solid_fraction=draw["solid_fraction"],
                             ground_glass_hu=draw["ground_glass_hu"], texture=texture, cavity=draw["cavity"],
                             shape_seed=draw["shape_seed"])
    else:
        lesion = (site, diameter / 2, texture)
    masks: list = []
    vol = chest_phantom(preset.shape, sp, rng, lesions=[lesion], anatomy_seed=seed * 100003 + i, masks=masks)
    idx = site / sp + (np.asarray(preset.shape) - 1) / 2
    if flip:
        idx[0] = preset.shape[0] - 1 - idx[0]
    world = affine[:3, :3] @ idx + affine[:3, 3]
    no_ct = n >= 6 and i == 3  # one patient without a CT exercises ct_mask
    rel = "" if no_ct else write_ct(out, pid, to_stored(vol, flip), affine,
                                    dicom_every > 0 and i % dicom_every == 1 % dicom_every, seed, i)
    row = {"patient_id": pid, "ct": rel, "centre_x": fmt(world[0]) if rel else "",
           "centre_y": fmt(world[1]) if rel else "", "centre_z": fmt(world[2]) if rel else "",
           "age": fmt(draw["age"]), "sex": draw["sex"], "ecog": draw["ecog"], "stage": draw["stage"],
           "pdl1_tps": fmt(draw["pdl1"]), "smoking": draw["smoking"],
           "pfs_time": fmt(obs_pfs), "pfs_event": str(ev_pfs), "os_time": fmt(obs_os), "os_event": str(ev_os)}
    for name in schema.clinical_names:
        if blank(rng, missing) or (n >= 4 and i == 2 and name == "pdl1_tps"):
            row[name] = ""
    has_pfs = not (blank(rng, 0.05) or (n >= 4 and i == 1))
    if not has_pfs:
        row["pfs_time"] = row["pfs_event"] = ""
    truth = {"patient_id": pid, "eta": fmt(eta), "eta_image": fmt(draw["eta_image"]), "diameter_mm": fmt(diameter),
             "texture": fmt(texture), "centre_index_z": fmt(idx[0]), "centre_index_y": fmt(idx[1]),
             "centre_index_x": fmt(idx[2]), "spacing_z": fmt(sp[0]), "spacing_y": fmt(sp[1]),
             "spacing_x": fmt(sp[2]), "flip_z": str(int(flip)), "pfs_true": fmt(t_pfs), "os_true": fmt(t_os)}
    if effects == "interaction":
        truth.update(pdl1_low=str(int(draw["pdl1_low"])))
    if effects == "morphology":
        truth.update(margin=draw["margin"], solid_fraction=fmt(draw["solid_fraction"]),
                     cavity=fmt(draw["cavity"]), pleural=str(int(draw["pleural"])))
    features = {} if no_ct else lesion_features(vol, *masks[0], sp)  # no CT written: nothing to measure
    truth.update({f"feat_{k}": fmt(features[k]) if features else "" for k in FEATURES})
    return row, truth, {"eta": eta, "pfs": (obs_pfs, ev_pfs, has_pfs), "os": (obs_os, ev_os)}


def _synth_survival(out: Path, n: int, preset: Preset, seed: int, dicom_every: int, missing: float,
                    verbose: bool, effects: str = "linear") -> dict[str, Any]:
    schema = survival_schema()
    header = ["patient_id", "ct", "centre_x", "centre_y", "centre_z", *schema.clinical_names,
              "pfs_time", "pfs_event", "os_time", "os_event"]
    rows, truth = [], []
    eta_all, pfs_t, pfs_e, os_t, os_e, pfs_m = [], [], [], [], [], []
    bar = progress(verbose, n, "synth survival")
    for i in range(n):
        row, true, case = _survival_case(out, i, n, preset, seed, dicom_every, missing, effects, schema)
        rows.append(row)
        truth.append(true)
        eta_all.append(case["eta"])
        (t, e, m), (t_os, e_os) = case["pfs"], case["os"]
        pfs_t.append(t), pfs_e.append(e), pfs_m.append(m), os_t.append(t_os), os_e.append(e_os)
        bar.update()
    bar.close()
    write_csv(out / "manifest.csv", header, rows)
    write_csv(out / "truth.csv", list(truth[0]), truth)
    schema.save(out / "manifest.schema.json")
    from lungcore.metrics import concordance_index

    eta_a, m = np.asarray(eta_all), np.asarray(pfs_m)
    oracle: dict[str, float] = {}  # an endpoint without a comparable pair has no oracle (key left out)
    if sum(os_e) > 0 and n > 1:
        oracle["os_cindex"] = float(concordance_index(eta_a, np.asarray(os_t), np.asarray(os_e), no_pairs="nan"))
    if np.asarray(pfs_e)[m].sum() > 0 and m.sum() > 1:
        oracle["pfs_cindex"] = float(concordance_index(eta_a[m], np.asarray(pfs_t)[m], np.asarray(pfs_e)[m],
                                                       no_pairs="nan"))
    oracle = {k: v for k, v in oracle.items() if np.isfinite(v)}
    return {"oracle": oracle, "events": {"os": int(sum(os_e)), "pfs": int(np.asarray(pfs_e)[m].sum())}}

