"""Lesions a radiologist reads, and the handcrafted features a radiomics pipeline measures on them.

The ``morphology`` effects of the synthetic cohorts (``synth_cohort(..., effects="morphology")``)
paint each tumour or nodule as a :class:`Lesion`: a ground-glass body with a solid core of a
given volume fraction, a smooth, lobulated or spiculated margin, optionally a central cavity, and
(chosen by the cohort generator) a site against the pleura. Those are what a clinician reads on
a CT; :func:`lesion_features` measures what a pyradiomics-style pipeline computes from the same
voxels inside the *true* lesion mask (shape: volume, equivalent diameter, surface, sphericity,
elongation, flatness; first order: mean, SD, 10th/90th percentiles, skewness, kurtosis, entropy,
solid fraction above -300 HU), the strongest honest handcrafted baseline: no segmentation error.

Example:
    >>> import numpy as np
    >>> vol = np.full((24, 48, 48), -850.0, dtype=np.float32)
    >>> box, mask = Lesion((0.0, 0.0, 0.0), 8.0, margin="spiculated", solid_fraction=0.5).paint(
    ...     vol, np.array([2.0, 1.0, 1.0]), np.random.default_rng(0))
    >>> f = lesion_features(vol, box, mask, (2.0, 1.0, 1.0))
    >>> round(f["diameter_mm"]), 0.2 < f["solid_fraction"] < 0.7, f["sphericity"] < 0.8
    (17, True, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lungcore.data.synth.phantom import AIR_HU, HETEROGENEITY_HU, LESION_HU, blobs, box_coords, box_mm, lungs

MARGINS = ("smooth", "lobulated", "spiculated")
SOLID_THRESHOLD_HU = -300.0  # solid component vs ground glass (the usual radiological threshold)
SPICULE_HU = 0.0             # fibrotic strands radiating from a spiculated margin
FEATURES = ("volume_mm3", "diameter_mm", "surface_mm2", "sphericity", "elongation", "flatness", "mean_hu", "sd_hu",
            "p10_hu", "p90_hu", "skewness", "kurtosis", "entropy", "solid_fraction")


@dataclass(frozen=True)
class Lesion:
    """One lesion of the ``morphology`` generator (distances in mm from the volume centre, (z, y, x)).

    ``solid_fraction``: volume fraction of the solid core (0: pure ground glass at
    ``ground_glass_hu``, 1: solid); ``texture`` in [0, 1]: heterogeneity of the solid core;
    ``cavity``: radius of a central air cavity as a fraction of the core radius (0: none);
    ``shape_seed`` fixes the lobe and spicule directions (the same nodule at T0 and T1 keeps them).

    Example:
        >>> Lesion((0.0, 0.0, 0.0), 6.0, margin="lobulated").margin
        'lobulated'
    """

    centre: tuple[float, float, float]
    radius: float
    margin: str = "smooth"
    solid_fraction: float = 1.0
    ground_glass_hu: float = -600.0
    texture: float = 0.5
    cavity: float = 0.0
    shape_seed: int = 0

    def __post_init__(self) -> None:
        if self.margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {self.margin!r}")
        if not 0.0 <= self.solid_fraction <= 1.0 or not 0.0 <= self.cavity < 1.0 or self.radius <= 0:
            raise ValueError(f"need radius > 0, solid_fraction in [0, 1], cavity in [0, 1): {self}")

    def paint(self, vol: np.ndarray, spacing: np.ndarray, rng: np.random.Generator
              ) -> tuple[tuple[slice, ...] | None, np.ndarray]:
        """Blend the lesion into ``vol`` (partial-volume edges); return its box and true mask there."""
        sp = np.asarray(spacing, dtype=np.float64)
        c, r = np.asarray(self.centre, dtype=np.float64), float(self.radius)
        shape_rng = np.random.default_rng(self.shape_seed)
        spikes = self._spicules(shape_rng, c, r) if self.margin == "spiculated" else []
        reach = max([r * 1.4] + [float(np.abs(e - c).max()) + 1.0 for _, e in spikes]) + sp.max()
        box = box_mm(vol.shape, sp, c - reach, c + reach)
        if box is None:
            return None, np.zeros((0, 0, 0), dtype=bool)
        pz, py, px = box_coords(vol.shape, sp, box)
        dz, dy, dx = np.broadcast_arrays(pz - c[0], py - c[1], px - c[2])
        d = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
        edge = sp.min()
        boundary = np.full(d.shape, r)
        if self.margin == "lobulated":  # 4-6 rounded bulges over a smaller body
            bump = np.zeros(d.shape)
            for u in _directions(shape_rng, int(shape_rng.integers(4, 7))):
                cos = (dz * u[0] + dy * u[1] + dx * u[2]) / np.maximum(d, 1e-6)
                bump = np.maximum(bump, np.exp((cos - 1.0) / 0.2))
            boundary = r * (0.75 + 0.5 * bump)
        body = np.clip((boundary - d) / edge + 0.5, 0.0, 1.0)
        core_r = r * self.solid_fraction ** (1.0 / 3.0)
        core = np.clip((core_r - d) / edge + 0.5, 0.0, 1.0) if self.solid_fraction > 0 else np.zeros(d.shape)
        solid = LESION_HU + self.texture * HETEROGENEITY_HU * blobs(d.shape, sp, rng)
        inner = self.ground_glass_hu * (1.0 - core) + solid * core
        if self.cavity > 0:
            cav = np.clip((self.cavity * core_r - d) / edge + 0.5, 0.0, 1.0)
            inner = inner * (1.0 - cav) + AIR_HU * cav
        strands = np.zeros(d.shape)
        for a, b in spikes:  # tapering from 1.2 mm at the body to 0.4 mm at the tip
            ab = b - a
            t = np.clip((dz + c[0] - a[0]) * ab[0] + (dy + c[1] - a[1]) * ab[1] + (dx + c[2] - a[2]) * ab[2], 0.0,
                        None) / float(ab @ ab)
            t = np.minimum(t, 1.0)
            dist = np.sqrt((dz + c[0] - a[0] - t * ab[0]) ** 2 + (dy + c[1] - a[1] - t * ab[1]) ** 2
                           + (dx + c[2] - a[2] - t * ab[2]) ** 2)
            strands = np.maximum(strands, np.clip((1.2 - 0.8 * t - dist) / edge + 0.5, 0.0, 1.0))
        strands = strands * (1.0 - body)
        region = vol[box].astype(np.float64)
        out = region * (1.0 - body) + inner * body
        out = out * (1.0 - strands) + SPICULE_HU * strands
        vol[box] = out.astype(vol.dtype)
        return box, (body >= 0.5) | (strands >= 0.5)

    @staticmethod
    def _spicules(shape_rng: np.random.Generator, c: np.ndarray, r: float) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for u in _directions(shape_rng, int(shape_rng.integers(12, 21))):
            out.append((c + u * 0.8 * r, c + u * r * shape_rng.uniform(1.5, 2.4)))
        return out


def _directions(rng: np.random.Generator, k: int) -> np.ndarray:
    u = rng.normal(size=(k, 3))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def pleural_site(shape: tuple[int, int, int], spacing: np.ndarray, radius: float, rng: np.random.Generator
                 ) -> np.ndarray:
    """A lesion centre (mm from the volume centre) against the pleura: the lesion reaches about
    0.45 of its radius through a lung's wall (lateral, anterior, posterior or mediastinal), and lies
    whole, with a voxel to spare, inside the field of view.

    The lungs reach beyond the field of view at the apex and base, so a point of their wall may lie
    outside the scan (generator version 2 placed about 1 pleural lesion in 1,500 there, 1 in 400
    across the scan's edge); such a draw is drawn again, so every other draw is unchanged.

    Example:
        >>> from lungcore.data.synth.phantom import PRESETS
        >>> p = PRESETS["tiny"]; sp = np.asarray(p.spacing)
        >>> site = pleural_site(p.shape, sp, 6.0, np.random.default_rng(0))
        >>> bool((np.abs(site) + 6.0 + sp <= np.asarray(p.shape) * sp / 2).all())
        True
    """
    sp = np.asarray(spacing, dtype=np.float64)
    centre, semi = lungs(shape, sp)[int(rng.integers(2))]
    room = np.maximum(np.asarray(shape, dtype=np.float64) * sp / 2 - radius - sp, 0.0)
    for _ in range(100):
        u = rng.normal(size=3)
        u[0] *= 0.25  # not the apex or the base
        u /= np.linalg.norm(u)
        surface = u / math.sqrt(float(((u / semi) ** 2).sum()))
        site = centre + surface * (1.0 - 0.55 * radius / float(np.linalg.norm(surface)))
        if (np.abs(site) <= room).all():
            return site
    return np.clip(site, -room, room)  # a lesion too large for any wall point in the scan


def lesion_features(vol: np.ndarray, box: tuple[slice, ...] | None, mask: np.ndarray,
                    spacing: tuple[float, float, float] | np.ndarray) -> dict[str, float]:
    """pyradiomics-style shape and first-order features of the voxels of ``vol[box]`` inside ``mask``.

    Shape: volume (mm^3), equivalent-sphere diameter, surface (voxel faces, mm^2), sphericity
    (pi^(1/3) (6 V)^(2/3) / surface; voxel faces overestimate the surface, so a voxelised ball
    scores about 0.65-0.8, not 1), elongation and flatness (sqrt of the ratios of the principal
    moments, pyradiomics' definitions); first order in HU: mean, SD, 10th and 90th percentiles,
    skewness, kurtosis, entropy (25 HU bins), and the fraction of voxels above -300 HU (solid).
    All NaN for an empty mask.

    Example:
        >>> vol = np.zeros((5, 5, 5), dtype=np.float32)
        >>> f = lesion_features(vol, (slice(0, 5),) * 3, np.ones((5, 5, 5), bool), (1.0, 1.0, 1.0))
        >>> f["volume_mm3"], f["surface_mm2"], f["mean_hu"]
        (125.0, 150.0, 0.0)
    """
    sp = np.asarray(spacing, dtype=np.float64)
    n = int(mask.sum()) if box is not None else 0
    if n == 0:
        return {k: float("nan") for k in FEATURES}
    values = vol[box][mask].astype(np.float64)
    volume = n * float(sp.prod())
    padded = np.pad(mask, 1)
    face = (sp[1] * sp[2], sp[0] * sp[2], sp[0] * sp[1])
    surface = sum(float(np.count_nonzero(np.diff(padded, axis=a))) * face[a] for a in range(3))
    coords = np.argwhere(mask) * sp
    eig = np.sort(np.linalg.eigvalsh(np.cov(coords.T) if n > 1 else np.zeros((3, 3))))[::-1]
    eig = np.maximum(eig, 0.0)
    mean, sd = float(values.mean()), float(values.std())
    z = (values - mean) / sd if sd > 0 else np.zeros_like(values)
    counts = np.bincount(((values - values.min()) // 25.0).astype(np.int64))
    p = counts[counts > 0] / n
    features = {"volume_mm3": volume, "diameter_mm": (6.0 * volume / math.pi) ** (1.0 / 3.0), "surface_mm2": surface,
                "sphericity": math.pi ** (1.0 / 3.0) * (6.0 * volume) ** (2.0 / 3.0) / surface,
                "elongation": math.sqrt(eig[1] / eig[0]) if eig[0] > 0 else 1.0,
                "flatness": math.sqrt(eig[2] / eig[0]) if eig[0] > 0 else 1.0,
                "mean_hu": mean, "sd_hu": sd, "p10_hu": float(np.percentile(values, 10)),
                "p90_hu": float(np.percentile(values, 90)), "skewness": float((z ** 3).mean()),
                "kurtosis": float((z ** 4).mean()), "entropy": float(-(p * np.log2(p)).sum()),
                "solid_fraction": float((values > SOLID_THRESHOLD_HU).mean())}
    return {k: float(v) for k, v in features.items()}
