"""The chest phantom of the synthetic cohorts: body, lungs, vessels, spine, lesions, noise, geometry.

Example:
    >>> import numpy as np
    >>> vol = chest_phantom((24, 48, 48), (4.0, 3.0, 3.0), np.random.default_rng(0))
    >>> vol.shape, float(vol.min())
    ((24, 48, 48), -1024.0)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Preset:
    shape: tuple[int, int, int]          # (z, y, x)
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm, nominal: per patient sz x1 or x1.25, sy = sx
                                         # x U(0.9, 1.1) (patient_geometry; truth.csv records each scan's)


PRESETS: dict[str, Preset] = {
    "tiny": Preset((24, 48, 48), (4.0, 3.0, 3.0)),        # seconds for a cohort: CI
    "fine": Preset((48, 128, 128), (2.0, 1.0, 1.0)),      # tiny's field of view at 1 mm: margins visible
    "demo": Preset((64, 128, 128), (2.5, 1.8, 1.8)),      # the README's job on 2 CPU cores
    "realistic": Preset((300, 512, 512), (1.0, 0.7, 0.7)),  # clinical size, for benchmarks
}
# what sets the imaging part of a cohort's risk (survival.survival_patient, nodules.nodule_draw)
EFFECTS = ("linear", "morphology", "interaction")
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


def lungs(shape: tuple[int, int, int], spacing: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre mm (z, y, x), semi-axes mm) of the right and left lung."""
    fov = np.asarray(shape, dtype=np.float64) * spacing
    semi = np.array([0.55 * fov[0], 0.22 * fov[1], 0.15 * fov[2]])
    return [(np.array([0.05 * fov[0], -0.02 * fov[1], side * 0.2 * fov[2]]), semi) for side in (-1.0, 1.0)]


def chest_phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator, *,
                  lesions: Sequence[Any] = (), noise_hu: float = 20.0, anatomy_seed: int = 0,
                  masks: list[tuple[tuple[slice, ...], np.ndarray]] | None = None) -> np.ndarray:
    """A chest-like HU volume (z, y, x) float32 in canonical orientation (y posterior, x left).

    ``lesions``: (centre in mm from the volume centre (z, y, x), radius mm, texture in [0, 1]) per
    lesion; each is a slightly lobulated sphere with partial-volume edges. Its texture sets its
    density and heterogeneity: 0 is a hazy ground-glass lesion ``GROUND_GLASS_HU`` below solid
    tissue, 1 a solid one with a smooth random field of ``HETEROGENEITY_HU`` std (blobs a few
    voxels across: visible after resampling, unlike voxel noise). ``anatomy_seed`` fixes body, lungs and vessels (a rescan of the same
    patient reuses it); ``rng`` draws the noise and the lesion texture.

    A lesion may instead be an object with ``paint(vol, spacing, rng) -> (box, mask)`` (e.g.
    :class:`lungcore.data.synth.lesions.Lesion`: margin, solid core, cavity); with ``masks`` a list,
    every lesion's true mask (its box in the volume and the boolean mask inside it) is appended
    to it, for features computed on the final, noisy volume.
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
    for centre, semi in lungs(shape, sp):
        lung_mask |= ((z - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + \
                     ((x - centre[2]) / semi[2]) ** 2 <= 1.0
    vol[lung_mask] = LUNG_HU

    # vessels: segments from each hilum outwards, radius shrinking along the tree
    for centre, semi in lungs(shape, sp):
        hilum = centre + np.array([0.0, 0.0, -np.sign(centre[2]) * 0.6 * semi[2]])
        for _ in range(6):
            direction = anat.normal(size=3)
            direction[2] = abs(direction[2]) * np.sign(centre[2])
            direction /= np.linalg.norm(direction)
            end = hilum + direction * semi * anat.uniform(0.5, 0.9)
            paint_segment(vol, lung_mask, sp, hilum, end, radius=anat.uniform(1.5, 3.0), hu=SOFT_HU)
            mid = (hilum + end) / 2
            branch = end + anat.normal(size=3) * semi * 0.25
            paint_segment(vol, lung_mask, sp, mid, branch, radius=anat.uniform(0.8, 1.5), hu=SOFT_HU)

    for lesion in lesions:
        if hasattr(lesion, "paint"):
            painted = lesion.paint(vol, sp, rng)
            if masks is not None:
                masks.append(painted)
            continue
        centre, radius, texture = lesion
        painted = (None, np.zeros((0, 0, 0), dtype=bool))
        if radius > 0:
            painted = _paint_lesion(vol, sp, np.asarray(centre, dtype=np.float64), float(radius), float(texture), rng)
        if masks is not None:
            masks.append(painted)

    inside = vol > AIR_HU
    vol[inside] += rng.normal(0.0, noise_hu, size=int(inside.sum())).astype(np.float32)
    return vol


def box_mm(shape: tuple[int, ...], sp: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, ...] | None:
    n = np.asarray(shape)
    lo = np.maximum(np.floor(lo_mm / sp + (n - 1) / 2).astype(int), 0)
    hi = np.minimum(np.ceil(hi_mm / sp + (n - 1) / 2).astype(int) + 1, n)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def box_coords(shape: tuple[int, ...], sp: np.ndarray, box: tuple[slice, ...]) -> list[np.ndarray]:
    return [((np.arange(s.start, s.stop, dtype=np.float64) - (n - 1) / 2) * d).reshape(
        [-1 if a == k else 1 for a in range(3)]) for k, (s, n, d) in enumerate(zip(box, shape, sp))]


def paint_segment(vol: np.ndarray, within: np.ndarray, sp: np.ndarray, a: np.ndarray, b: np.ndarray,
                   radius: float, hu: float) -> None:
    box = box_mm(vol.shape, sp, np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if box is None:
        return
    pz, py, px = box_coords(vol.shape, sp, box)
    ab = b - a
    t = ((pz - a[0]) * ab[0] + (py - a[1]) * ab[1] + (px - a[2]) * ab[2]) / max(float(ab @ ab), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    d2 = (pz - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (px - a[2] - t * ab[2]) ** 2
    hit = (d2 <= radius ** 2) & within[box]
    vol[box][hit] = hu


def _paint_lesion(vol: np.ndarray, sp: np.ndarray, c: np.ndarray, radius: float, texture: float,
                  rng: np.random.Generator) -> tuple[tuple[slice, ...] | None, np.ndarray]:
    """Blend one ``linear``-generator lesion into ``vol``; return its box and true mask there."""
    margin = radius * 1.3 + sp.max()
    box = box_mm(vol.shape, sp, c - margin, c + margin)
    if box is None:
        return None, np.zeros((0, 0, 0), dtype=bool)
    pz, py, px = box_coords(vol.shape, sp, box)
    dz, dy, dx = pz - c[0], py - c[1], px - c[2]
    d = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
    # lobulation: radius modulated by a few low-order angular terms
    u = rng.normal(size=3)
    lobes = 1.0 + 0.12 * np.tanh((dz * u[0] + dy * u[1] + dx * u[2]) / max(radius, 1e-6))
    edge = np.clip((radius * lobes - d) / sp.min() + 0.5, 0.0, 1.0)  # partial volume over ~one voxel
    # texture 0: a hazy ground-glass lesion; 1: solid and heterogeneous (blobs a few voxels across)
    inner = LESION_HU - GROUND_GLASS_HU * (1.0 - texture) + texture * HETEROGENEITY_HU * blobs(d.shape, sp, rng)
    region = vol[box]
    vol[box] = (1.0 - edge) * region + edge * inner
    return box, np.broadcast_to(edge >= 0.5, region.shape).copy()


def blobs(shape: tuple[int, ...], sp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A unit-variance random field with a ~4 mm correlation length: intra-tumour heterogeneity
    (denser and necrotic-looking regions a few voxels across), not voxel noise, which resampling
    averages away and a masked autoencoder learns to ignore."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma=BLOB_MM / sp, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def scan_affine(shape: tuple[int, int, int], spacing: np.ndarray, rng: np.random.Generator, *, flip_z: bool,
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


def to_stored(vol: np.ndarray, flip_z: bool) -> np.ndarray:
    return vol[::-1].copy() if flip_z else vol


def lesion_site(shape: tuple[int, int, int], sp: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A lesion centre (mm from the volume centre, (z, y, x)) well inside a lung."""
    centre, semi = lungs(shape, sp)[int(rng.integers(2))]
    room = np.maximum(semi - radius - 2.0 * sp, 0.0)
    for _ in range(100):
        u = rng.uniform(-0.7, 0.7, size=3)
        if (u ** 2).sum() <= 0.49:
            return centre + u * room
    return centre


def patient_geometry(preset: Preset, rng: np.random.Generator) -> np.ndarray:
    sp = np.asarray(preset.spacing, dtype=np.float64)
    inplane = rng.uniform(0.9, 1.1)
    return np.array([sp[0] * rng.choice([1.0, 1.25]), sp[1] * inplane, sp[2] * inplane])
