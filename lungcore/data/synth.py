"""Synthetic chest-CT cohorts written to disk (NIfTI + DICOM series + manifest + schema).

No public CT cohort is reachable here, so these generators exercise the *real* path: image files
on disk read back through MONAI, a manifest validated at load, world-coordinate centres converted
with each scan's affine. Each volume is a chest phantom: air (-1024 HU) outside an elliptic body of
soft tissue (~40 HU) with a fat rim (~-100 HU), two lungs (~-850 HU) with branching vessels (~40 HU),
a spine (~400 HU), Gaussian noise, clinical spacing that varies between patients, and an affine
with a table offset (and, for some patients, slices stored from head to feet). The signal:

- ``survival`` (CMML shape): a tumour whose volume and texture, with age, ECOG, stage and PD-L1,
  set a log-hazard ``eta``; PFS and OS times come from Weibull proportional-hazards models with
  administrative and random censoring, so the oracle C-index (of ``eta``) is known. The clinical
  variables depend on each other and on the tumour (stage on its size, PD-L1 on its texture, ECOG
  on age, smoking on sex and age; see ``_survival_patient``), so a masked one can be completed.
- ``nodules`` (CSF-Net shape): a nodule at T0 and T1 (a rescan months later, patient shifted on
  the table); malignant-leaning nodules are larger, grow between the scans, and current smokers,
  older patients, women, positive screens and isolated nodules carry more risk; the label is drawn
  from a known logistic model (oracle AUC known).
  Several nodules may belong to one patient: they sit in the same T0 and T1 scans.

Some patients have missing clinical values, a missing endpoint or (survival) no CT; every fourth
patient's CT is a DICOM series (uint16, RescaleIntercept -1024) instead of a NIfTI file. Output is
deterministic for a seed. ``truth.csv`` beside the manifest holds the planted ground truth
(lesion centre in voxel indices, diameters, the linear predictor).

Example:
    >>> import tempfile
    >>> from lungcore.data.synth import synth_cohort
    >>> info = synth_cohort("nodules", tempfile.mkdtemp(), n=4, preset="tiny", seed=0)
    >>> info["manifest"].name, info["n"]
    ('manifest.csv', 4)
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungcore.data.io import write_dicom_series, write_nifti
from lungcore.data.schema import ClinicalVariable, CohortSchema, canonical_kind


GENERATOR_VERSION = 2  # bump when the same arguments would write a different cohort


@dataclass(frozen=True)
class Preset:
    shape: tuple[int, int, int]          # (z, y, x)
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm, varied +-10 % in-plane per patient


PRESETS: dict[str, Preset] = {
    "tiny": Preset((24, 48, 48), (4.0, 3.0, 3.0)),        # seconds for a cohort: CI
    "demo": Preset((64, 128, 128), (2.5, 1.8, 1.8)),      # the README's job on 2 CPU cores
    "realistic": Preset((300, 512, 512), (1.0, 0.7, 0.7)),  # clinical size, for benchmarks
}

AIR_HU = -1024.0
LUNG_HU = -850.0
SOFT_HU = 40.0
FAT_HU = -100.0
BONE_HU = 400.0
LESION_HU = 30.0
HETEROGENEITY_HU = 100.0  # std of the intra-tumour field at texture 1
BLOB_MM = 2.0             # its Gaussian smoothing (mm): blobs about 4-5 mm across
GROUND_GLASS_HU = 300.0   # how much less dense than solid tissue the lesion is at texture 0


def _grid(shape: tuple[int, int, int], spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open grids of voxel-centre coordinates in mm relative to the volume centre, (z, y, x)."""
    z, y, x = (((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s) for n, s in zip(shape, spacing))
    return z[:, None, None], y[None, :, None], x[None, None, :]


def _lungs(shape: tuple[int, int, int], spacing: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre mm (z, y, x), semi-axes mm) of the right and left lung."""
    fov = np.asarray(shape, dtype=np.float64) * spacing
    semi = np.array([0.55 * fov[0], 0.22 * fov[1], 0.15 * fov[2]])
    return [(np.array([0.05 * fov[0], -0.02 * fov[1], side * 0.2 * fov[2]]), semi) for side in (-1.0, 1.0)]


def chest_phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator, *,
                  lesions: Sequence[tuple[np.ndarray, float, float]] = (), noise_hu: float = 20.0,
                  anatomy_seed: int = 0) -> np.ndarray:
    """A chest-like HU volume (z, y, x) float32 in canonical orientation (y posterior, x left).

    ``lesions``: (centre in mm from the volume centre (z, y, x), radius mm, texture in [0, 1]) per
    lesion; each is a slightly lobulated sphere with partial-volume edges. Its texture sets its
    density and heterogeneity: 0 is a hazy ground-glass lesion ``GROUND_GLASS_HU`` below solid
    tissue, 1 a solid one with a smooth random field of ``HETEROGENEITY_HU`` std (blobs a few
    voxels across: visible after resampling, unlike voxel noise). ``anatomy_seed`` fixes body, lungs and vessels (a rescan of the same
    patient reuses it); ``rng`` draws the noise and the lesion texture.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    z, y, x = _grid(shape, sp)
    fov = np.asarray(shape, dtype=np.float64) * sp
    anat = np.random.default_rng(anatomy_seed)
    ax, ay = 0.46 * fov[2] * anat.uniform(0.95, 1.02), 0.36 * fov[1] * anat.uniform(0.95, 1.02)
    body_r = (x / ax) ** 2 + ((y - 0.03 * fov[1]) / ay) ** 2  # (1, Y, X)
    vol = np.full(shape, AIR_HU, dtype=np.float32)
    body = np.broadcast_to(body_r <= 1.0, shape)
    vol[body] = SOFT_HU
    rim = np.broadcast_to((body_r <= 1.0) & (body_r > 0.8), shape)
    vol[rim] = FAT_HU
    spine = np.broadcast_to((x / (0.05 * fov[2])) ** 2 + ((y - 0.24 * fov[1]) / (0.05 * fov[1])) ** 2 <= 1.0, shape)
    vol[spine] = BONE_HU

    lung_mask = np.zeros(shape, dtype=bool)
    for centre, semi in _lungs(shape, sp):
        lung_mask |= ((z - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + \
                     ((x - centre[2]) / semi[2]) ** 2 <= 1.0
    vol[lung_mask] = LUNG_HU

    # vessels: segments from each hilum outwards, radius shrinking along the tree
    for centre, semi in _lungs(shape, sp):
        hilum = centre + np.array([0.0, 0.0, -np.sign(centre[2]) * 0.6 * semi[2]])
        for _ in range(6):
            direction = anat.normal(size=3)
            direction[2] = abs(direction[2]) * np.sign(centre[2])
            direction /= np.linalg.norm(direction)
            end = hilum + direction * semi * anat.uniform(0.5, 0.9)
            _paint_segment(vol, lung_mask, sp, hilum, end, radius=anat.uniform(1.5, 3.0), hu=SOFT_HU)
            mid = (hilum + end) / 2
            branch = end + anat.normal(size=3) * semi * 0.25
            _paint_segment(vol, lung_mask, sp, mid, branch, radius=anat.uniform(0.8, 1.5), hu=SOFT_HU)

    for centre, radius, texture in lesions:
        if radius > 0:
            _paint_lesion(vol, sp, np.asarray(centre, dtype=np.float64), float(radius), float(texture), rng)

    inside = vol > AIR_HU
    vol[inside] += rng.normal(0.0, noise_hu, size=int(inside.sum())).astype(np.float32)
    return vol


def _box(shape: tuple[int, ...], sp: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, ...] | None:
    n = np.asarray(shape)
    lo = np.maximum(np.floor(lo_mm / sp + (n - 1) / 2).astype(int), 0)
    hi = np.minimum(np.ceil(hi_mm / sp + (n - 1) / 2).astype(int) + 1, n)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _coords(shape: tuple[int, ...], sp: np.ndarray, box: tuple[slice, ...]) -> list[np.ndarray]:
    return [((np.arange(s.start, s.stop, dtype=np.float64) - (n - 1) / 2) * d).reshape(
        [-1 if a == k else 1 for a in range(3)]) for k, (s, n, d) in enumerate(zip(box, shape, sp))]


def _paint_segment(vol: np.ndarray, within: np.ndarray, sp: np.ndarray, a: np.ndarray, b: np.ndarray,
                   radius: float, hu: float) -> None:
    box = _box(vol.shape, sp, np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if box is None:
        return
    pz, py, px = _coords(vol.shape, sp, box)
    ab = b - a
    t = ((pz - a[0]) * ab[0] + (py - a[1]) * ab[1] + (px - a[2]) * ab[2]) / max(float(ab @ ab), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    d2 = (pz - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (px - a[2] - t * ab[2]) ** 2
    hit = (d2 <= radius ** 2) & within[box]
    vol[box][hit] = hu


def _paint_lesion(vol: np.ndarray, sp: np.ndarray, c: np.ndarray, radius: float, texture: float,
                  rng: np.random.Generator) -> None:
    margin = radius * 1.3 + sp.max()
    box = _box(vol.shape, sp, c - margin, c + margin)
    if box is None:
        return
    pz, py, px = _coords(vol.shape, sp, box)
    dz, dy, dx = pz - c[0], py - c[1], px - c[2]
    d = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
    # lobulation: radius modulated by a few low-order angular terms
    u = rng.normal(size=3)
    lobes = 1.0 + 0.12 * np.tanh((dz * u[0] + dy * u[1] + dx * u[2]) / max(radius, 1e-6))
    edge = np.clip((radius * lobes - d) / sp.min() + 0.5, 0.0, 1.0)  # partial volume over ~one voxel
    # texture 0: a hazy ground-glass lesion; 1: solid and heterogeneous (blobs a few voxels across)
    inner = LESION_HU - GROUND_GLASS_HU * (1.0 - texture) + texture * HETEROGENEITY_HU * _blobs(d.shape, sp, rng)
    region = vol[box]
    vol[box] = (1.0 - edge) * region + edge * inner


def _blobs(shape: tuple[int, ...], sp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A unit-variance random field with a ~4 mm correlation length: intra-tumour heterogeneity
    (denser and necrotic-looking regions a few voxels across), not voxel noise, which resampling
    averages away and a masked autoencoder learns to ignore."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma=BLOB_MM / sp, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _affine(shape: tuple[int, int, int], spacing: np.ndarray, rng: np.random.Generator, *, flip_z: bool,
            shift_mm: np.ndarray | None = None) -> np.ndarray:
    """(z, y, x) -> LPS affine of an axial scan, centred near the origin with a table offset."""
    a = np.zeros((4, 4))
    a[3, 3] = 1.0
    a[0, 2] = spacing[2]          # x index -> patient left
    a[1, 1] = spacing[1]          # y index -> posterior
    a[2, 0] = -spacing[0] if flip_z else spacing[0]
    centre = np.array([rng.uniform(-15, 15), rng.uniform(-30, 30) + 120.0, rng.uniform(-400, -200)])
    if shift_mm is not None:
        centre = centre + shift_mm
    middle = (np.asarray(shape) - 1) / 2.0
    a[:3, 3] = centre - a[:3, :3] @ middle
    return a


def _canonical_to_stored(vol: np.ndarray, flip_z: bool) -> np.ndarray:
    return vol[::-1].copy() if flip_z else vol


def _lesion_site(shape: tuple[int, int, int], sp: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A lesion centre (mm from the volume centre, (z, y, x)) well inside a lung."""
    centre, semi = _lungs(shape, sp)[int(rng.integers(2))]
    room = np.maximum(semi - radius - 2.0 * sp, 0.0)
    for _ in range(100):
        u = rng.uniform(-0.7, 0.7, size=3)
        if (u ** 2).sum() <= 0.49:
            return centre + u * room
    return centre


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    pos, neg = score[label == 1], score[label == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _blank(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.uniform() < p)


def _fmt(x: float) -> str:
    return f"{x:.4f}".rstrip("0").rstrip(".")


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


def synth_cohort(kind: str, out: str | Path, n: int, *, preset: str = "tiny", seed: int = 0,
                 dicom_every: int = 4, missing: float = 0.08, verbose: bool = False,
                 reuse: bool = False) -> dict[str, Any]:
    """Write a synthetic cohort to ``out``: images, ``manifest.csv``, ``manifest.schema.json``, ``truth.csv``.

    ``kind``: ``survival`` (alias ``cmml``) or ``nodules`` (alias ``csfnet``); ``n`` patients
    (survival) or nodules (nodules); ``preset``: ``tiny``, ``demo`` or ``realistic``; every
    ``dicom_every``-th CT is a DICOM series (0: none); ``missing``: the probability of a blank
    clinical cell. ``reuse``: return the summary of a cohort already in ``out`` instead of
    writing it again when it was written with the same arguments by the same generator version
    (``synth.json`` says; anything else is rewritten). Returns a summary with the oracle metric
    (C-index of the true log-hazard for PFS and OS, or the AUC of the true logit) and ``reused``.
    """
    kind = canonical_kind(kind)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    out = Path(out)
    wanted = {"kind": kind, "preset": preset, "seed": seed, "n": n, "dicom_every": dicom_every, "missing": missing,
              "generator_version": GENERATOR_VERSION}
    if reuse and (out / "synth.json").is_file() and (out / "manifest.csv").is_file():
        try:
            saved = json.loads((out / "synth.json").read_text())
        except json.JSONDecodeError:
            saved = {}
        if all(saved.get(k) == v for k, v in wanted.items()):
            return {**saved, "manifest": out / "manifest.csv", "schema": out / "manifest.schema.json", "reused": True}
    (out / "images").mkdir(parents=True, exist_ok=True)
    if kind == "survival":
        info = _synth_survival(out, n, PRESETS[preset], seed, dicom_every, missing, verbose)
    else:
        info = _synth_nodules(out, n, PRESETS[preset], seed, dicom_every, missing, verbose)
    info.update(wanted, manifest=out / "manifest.csv", schema=out / "manifest.schema.json")
    (out / "synth.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in info.items()},
                                               indent=1) + "\n")
    return {**info, "reused": False}


def _write_ct(out: Path, name: str, vol: np.ndarray, affine: np.ndarray, dicom: bool, seed: int, i: int) -> str:
    if dicom:
        from pydicom.uid import generate_uid

        rel = f"images/{name}_dicom"
        write_dicom_series(out / rel, vol, affine, patient_id=name,
                           series_uid=generate_uid(entropy_srcs=[str(seed), name, "series"]),
                           study_uid=generate_uid(entropy_srcs=[str(seed), name, "study"]))
    else:
        rel = f"images/{name}.nii.gz"
        write_nifti(out / rel, vol, affine)
    return rel


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _progress(verbose: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not verbose, unit="CT")


def _patient_geometry(preset: Preset, rng: np.random.Generator) -> np.ndarray:
    sp = np.asarray(preset.spacing, dtype=np.float64)
    inplane = rng.uniform(0.9, 1.1)
    return np.array([sp[0] * rng.choice([1.0, 1.25]), sp[1] * inplane, sp[2] * inplane])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _survival_patient(rng: np.random.Generator, *, max_diameter: float, min_diameter: float) -> dict[str, Any]:
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
    stage = "IV" if rng.uniform() < _sigmoid(0.9 + 1.5 * z_size) else "IIIB"
    smoke = rng.normal() + 0.6 * (sex == "M") + 0.03 * (age - 65)
    smoking = "never" if smoke < -0.6 else ("former" if smoke < 0.9 else "current")
    pdl1 = 100.0 * _sigmoid(-0.6 + 0.9 * z_texture + 0.6 * (smoking == "current") + 0.8 * rng.normal())
    z_pdl1 = (pdl1 - 40.0) / 30.0
    eta = (1.0 * z_size + 0.7 * z_texture + 0.3 * (age - 65) / 9 + {"0": 0.0, "1": 0.5, "2": 1.0}[ecog]
           + (0.4 if stage == "IV" else 0.0) - 0.5 * z_pdl1)
    return {"diameter": diameter, "texture": texture, "age": age, "sex": sex, "ecog": ecog, "stage": stage,
            "pdl1": pdl1, "smoking": smoking, "eta": eta}


def _synth_survival(out: Path, n: int, preset: Preset, seed: int, dicom_every: int, missing: float,
                    verbose: bool) -> dict[str, Any]:
    schema = survival_schema()
    header = ["patient_id", "ct", "centre_x", "centre_y", "centre_z", *schema.clinical_names,
              "pfs_time", "pfs_event", "os_time", "os_event"]
    rows, truth = [], []
    eta_all, pfs_t, pfs_e, os_t, os_e, pfs_m = [], [], [], [], [], []
    bar = _progress(verbose, n, "synth survival")
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        pid = f"P{i + 1:04d}"
        sp = _patient_geometry(preset, rng)
        flip = i % 3 == 2
        affine = _affine(preset.shape, sp, rng, flip_z=flip)
        draw = _survival_patient(rng, max_diameter=1.2 * float(_lungs(preset.shape, sp)[0][1].min()),
                                 min_diameter=max(8.0, 2.5 * float(sp.max())))
        diameter, texture, eta = draw["diameter"], draw["texture"], draw["eta"]
        age, sex, ecog, stage, pdl1, smoking = (draw[k] for k in ("age", "sex", "ecog", "stage", "pdl1", "smoking"))
        site = _lesion_site(preset.shape, sp, diameter / 2, rng)
        # Weibull PH: S(t) = exp(-(t / scale)^k * exp(eta)); inverse-transform sampling
        k = 1.3
        t_pfs = 7.0 * (-math.log(rng.uniform()) / math.exp(eta)) ** (1 / k)
        t_os = t_pfs + 9.0 * (-math.log(rng.uniform()) / math.exp(0.8 * eta)) ** (1 / k)
        censor = min(rng.uniform(12.0, 48.0), rng.exponential(80.0))
        obs_pfs, ev_pfs = min(t_pfs, censor), int(t_pfs <= censor)
        obs_os, ev_os = min(t_os, censor), int(t_os <= censor)

        vol = chest_phantom(preset.shape, sp, rng, lesions=[(site, diameter / 2, texture)],
                            anatomy_seed=seed * 100003 + i)
        idx_canonical = site / sp + (np.asarray(preset.shape) - 1) / 2
        idx = idx_canonical.copy()
        if flip:
            idx[0] = preset.shape[0] - 1 - idx[0]
        world = affine[:3, :3] @ idx + affine[:3, 3]
        no_ct = n >= 6 and i == 3  # one patient without a CT exercises ct_mask
        rel = "" if no_ct else _write_ct(out, pid, _canonical_to_stored(vol, flip), affine,
                                         dicom_every > 0 and i % dicom_every == 1 % dicom_every, seed, i)
        row = {"patient_id": pid, "ct": rel, "centre_x": _fmt(world[0]) if rel else "",
               "centre_y": _fmt(world[1]) if rel else "", "centre_z": _fmt(world[2]) if rel else "",
               "age": _fmt(age), "sex": sex, "ecog": ecog, "stage": stage, "pdl1_tps": _fmt(pdl1), "smoking": smoking,
               "pfs_time": _fmt(obs_pfs), "pfs_event": str(ev_pfs), "os_time": _fmt(obs_os), "os_event": str(ev_os)}
        for name in schema.clinical_names:
            if _blank(rng, missing) or (n >= 4 and i == 2 and name == "pdl1_tps"):
                row[name] = ""
        has_pfs = not (_blank(rng, 0.05) or (n >= 4 and i == 1))
        if not has_pfs:
            row["pfs_time"] = row["pfs_event"] = ""
        rows.append(row)
        truth.append({"patient_id": pid, "eta": _fmt(eta), "diameter_mm": _fmt(diameter), "texture": _fmt(texture),
                      "centre_index_z": _fmt(idx[0]), "centre_index_y": _fmt(idx[1]), "centre_index_x": _fmt(idx[2]),
                      "spacing_z": _fmt(sp[0]), "spacing_y": _fmt(sp[1]), "spacing_x": _fmt(sp[2]),
                      "flip_z": str(int(flip)), "pfs_true": _fmt(t_pfs), "os_true": _fmt(t_os)})
        eta_all.append(eta)
        pfs_t.append(obs_pfs), pfs_e.append(ev_pfs), os_t.append(obs_os), os_e.append(ev_os), pfs_m.append(has_pfs)
        bar.update()
    bar.close()
    _write_csv(out / "manifest.csv", header, rows)
    _write_csv(out / "truth.csv", list(truth[0]), truth)
    schema.save(out / "manifest.schema.json")
    from lungcore.metrics import concordance_index

    eta_a, m = np.asarray(eta_all), np.asarray(pfs_m)
    oracle: dict[str, float] = {}
    if sum(os_e) > 0 and n > 1:
        oracle["os_cindex"] = float(concordance_index(eta_a, np.asarray(os_t), np.asarray(os_e)))
    if np.asarray(pfs_e)[m].sum() > 0 and m.sum() > 1:
        oracle["pfs_cindex"] = float(concordance_index(eta_a[m], np.asarray(pfs_t)[m], np.asarray(pfs_e)[m]))
    return {"oracle": oracle, "events": {"os": int(sum(os_e)), "pfs": int(np.asarray(pfs_e)[m].sum())}}


def _synth_nodules(out: Path, n: int, preset: Preset, seed: int, dicom_every: int, missing: float,
                   verbose: bool) -> dict[str, Any]:
    schema = nodules_schema()
    header = ["nodule_id", "patient_id", "ct_t0", "ct_t1", "t0_centre_x", "t0_centre_y", "t0_centre_z",
              "t1_centre_x", "t1_centre_y", "t1_centre_z", *schema.clinical_names, "label"]
    rows, truth, logits, labels = [], [], [], []
    bar = _progress(verbose, n, "synth nodules")
    patient = 0
    while len(rows) < n:
        prng = np.random.default_rng([seed, 10_000 + patient])
        pid = f"S{patient + 1:04d}"
        # about one patient in four has a second nodule: both are in the same T0 and T1 scans
        count = min(2 if prng.uniform() < 0.25 else 1, n - len(rows))
        age = float(np.clip(prng.normal(62, 6), 55, 80))
        gender = prng.choice(["F", "M"], p=[0.42, 0.58])
        race = prng.choice(["white", "black", "asian", "other"], p=[0.8, 0.1, 0.06, 0.04])
        smoking = prng.choice(["former", "current"], p=[0.5, 0.5])
        screen = prng.choice(["negative", "positive"], p=[0.4, 0.6])
        isolation = prng.choice(["no", "yes"], p=[0.7, 0.3])
        clinical = {"age": _fmt(age), "gender": gender, "race": race, "smoking": smoking, "screen_result": screen,
                    "isolation": isolation}
        for name in schema.clinical_names:
            if _blank(prng, missing) or (n >= 4 and patient == 2 and name == "smoking"):
                clinical[name] = ""
        sp = _patient_geometry(preset, prng)
        lung_semi = _lungs(preset.shape, sp)[0][1]
        max_d = float(1.0 * lung_semi.min())
        nodules = []
        for k in range(count):
            rng = np.random.default_rng([seed, patient, k])
            # a nodule narrower than two voxels is invisible at this spacing: the preset sets the floor
            d0 = float(np.clip(rng.lognormal(math.log(9.0), 0.4), max(4.0, 2 * sp.max()), 0.7 * max_d))
            growth = float(rng.normal(0.15, 0.35))  # log volume ratio T1/T0
            # the clinical part (SD about 1.4) is large enough for a model to gain measurably from it
            logit = (-3.0 + 1.4 * (d0 - 9.0) / 4.0 + 2.2 * growth / 0.35 + 1.5 * (smoking == "current")
                     + 1.0 * (age - 62) / 6 + 1.0 * (screen == "positive") + 0.8 * (isolation == "yes")
                     + 0.6 * (gender == "F"))
            label = int(rng.uniform() < 1 / (1 + math.exp(-logit)))
            d1 = float(np.clip(d0 * math.exp(max(growth, -0.3) / 3), 3.0, max_d))
            for _ in range(50):  # keep two nodules of a scan apart
                site = _lesion_site(preset.shape, sp, d1 / 2, rng)
                if all(np.linalg.norm(site - other["site"]) > (d1 + other["d1"]) / 2 + 4.0 for other in nodules):
                    break
            nodules.append({"d0": d0, "d1": d1, "growth": growth, "logit": logit, "label": label, "site": site})
        flip = patient % 3 == 2
        base = np.random.default_rng([seed, 10_000 + patient, 7])
        shift = base.normal(0, 6, size=3)  # the patient lies differently on the table at T1
        affine_seed = int(base.integers(2**31))
        idx = [n_["site"] / sp + (np.asarray(preset.shape) - 1) / 2 for n_ in nodules]
        if flip:
            for v in idx:
                v[0] = preset.shape[0] - 1 - v[0]
        paths, worlds = [], []
        for t in (0, 1):
            affine = _affine(preset.shape, sp, np.random.default_rng(affine_seed), flip_z=flip,
                             shift_mm=None if t == 0 else shift)
            lesions = [(n_["site"], n_["d0" if t == 0 else "d1"] / 2, 0.9) for n_ in nodules]  # solid nodules
            vol = chest_phantom(preset.shape, sp, np.random.default_rng([seed, patient, 100 + t]), lesions=lesions,
                                anatomy_seed=seed * 100003 + patient)
            dicom = dicom_every > 0 and patient % dicom_every == 1 % dicom_every and t == 1
            paths.append(_write_ct(out, f"{pid}_t{t}", _canonical_to_stored(vol, flip), affine, dicom, seed, patient))
            worlds.append([affine[:3, :3] @ v + affine[:3, 3] for v in idx])
        for k, nod in enumerate(nodules):
            nid = f"{pid}_N{k + 1}"
            row: dict[str, str] = {"nodule_id": nid, "patient_id": pid, "ct_t0": paths[0], "ct_t1": paths[1]}
            for t in (0, 1):
                for a, axis in enumerate("xyz"):
                    row[f"t{t}_centre_{axis}"] = _fmt(worlds[t][k][a])
            row.update(clinical)
            row["label"] = str(nod["label"])
            rows.append(row)
            truth.append({"nodule_id": nid, "logit": _fmt(nod["logit"]), "label": str(nod["label"]),
                          "diameter_t0_mm": _fmt(nod["d0"]), "diameter_t1_mm": _fmt(nod["d1"]),
                          "log_growth": _fmt(nod["growth"]),
                          "t0_index_z": _fmt(idx[k][0]), "t0_index_y": _fmt(idx[k][1]), "t0_index_x": _fmt(idx[k][2]),
                          "t1_index_z": _fmt(idx[k][0]), "t1_index_y": _fmt(idx[k][1]), "t1_index_x": _fmt(idx[k][2]),
                          "spacing_z": _fmt(sp[0]), "spacing_y": _fmt(sp[1]), "spacing_x": _fmt(sp[2]),
                          "flip_z": str(int(flip))})
            logits.append(nod["logit"])
            labels.append(nod["label"])
            bar.update()
        patient += 1
    bar.close()
    _write_csv(out / "manifest.csv", header, rows)
    _write_csv(out / "truth.csv", list(truth[0]), truth)
    schema.save(out / "manifest.schema.json")
    return {"oracle": {"auc": _auc(np.asarray(logits), np.asarray(labels))},
            "positives": int(sum(labels)), "patients": patient}
