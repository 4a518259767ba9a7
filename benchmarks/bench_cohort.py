"""Cohort preprocessing per CT: cold (read + resample/window/crop + cache write) vs cached, vs MONAI.

One synthetic CT written to disk (NIfTI, and a DICOM series) is preprocessed the way training
does it. Providers:

* ``monai``: MONAI's own chain: ``LoadImage`` -> ``Spacing`` (to the target spacing) ->
  ``ScaleIntensityRange`` (the HU window to [0, 1]) -> ``SpatialCrop`` around the lesion: the
  baseline a MONAI user has today (``Spacing`` resamples the *whole* volume).
* ``lungcore_cold``: :class:`lungcore.data.Preprocessor` with an empty cache: MONAI read, content
  hash, the fused ``resample_crop`` (only the crop is computed), atomic cache write.
* ``lungcore_cached``: the same with the cache filled (a second epoch): no read, no resampling.
* ``read_only`` / ``resample_crop_only``: the two halves of the cold path (the read as the hot
  path does it: stored dtype, no transpose copy), to show where the time goes.

The check asserts cold == cached bit for bit before anything is timed.
"""
from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import Case
from lungcore.data import PreprocessSettings, Preprocessor, read_ct, synth_cohort
from lungcore.data.preprocess import canonical_orientation

NAME = "cohort"
_ROOT = Path(tempfile.mkdtemp(prefix="lungcore-bench-cohort-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)  # realistic cohorts are hundreds of MB


def _monai_chain(path: Path, centre_world: np.ndarray, settings: PreprocessSettings):
    from monai.transforms import LoadImage, ScaleIntensityRange, Spacing, SpatialCrop

    img = LoadImage(image_only=True, ensure_channel_first=True)(str(path))  # (1, x, y, z), RAS
    sx, sy, sz = settings.spacing[2], settings.spacing[1], settings.spacing[0]
    img = Spacing(pixdim=(sx, sy, sz), mode="bilinear", padding_mode="border")(img)
    lo, hi = settings.window
    img = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(img)
    ras = np.array([-centre_world[0], -centre_world[1], centre_world[2], 1.0])
    idx = np.linalg.inv(np.asarray(img.affine)) @ ras
    size = (settings.crop[2], settings.crop[1], settings.crop[0])
    return SpatialCrop(roi_center=[int(round(v)) for v in idx[:3]], roi_size=size)(img)


def _cases_for(kind: str, preset: str, dicom: bool, settings: PreprocessSettings, label: str) -> Case:
    out = _ROOT / f"{kind}-{preset}-{'dicom' if dicom else 'nifti'}"
    if not (out / "manifest.csv").is_file():
        synth_cohort(kind, out, n=2, preset=preset, seed=0, dicom_every=1 if dicom else 0)
    from lungcore.data import read_manifest

    m = read_manifest(out / "manifest.csv", images="exists")
    row = 1 if dicom else 0  # dicom_every=1 writes row 1 (its T1 for nodules) as DICOM
    t = (len(m.schema.image_columns) - 1) if dicom else 0
    path, centre = m.images[row][t], m.centres[row, t]
    counter = itertools.count()
    warm_dir = out / "cache-warm"
    Preprocessor(settings, cache_dir=warm_dir).crop(path, centre)

    def cold():
        return Preprocessor(settings, cache_dir=out / f"cache-cold-{next(counter)}").crop(path, centre)

    def cached():
        return Preprocessor(settings, cache_dir=warm_dir).crop(path, centre)

    image = canonical_orientation(read_ct(path))
    idx = image.world_to_index(centre)[None]

    def resample_only():
        from lungcore.ops import resample_crop

        return resample_crop(image.array, image.spacing, settings.spacing, idx, settings.crop, window=settings.window)

    def check():
        np.testing.assert_array_equal(cold(), cached())

    providers = {"lungcore_cold": cold, "lungcore_cached": cached,
                 "read_only": lambda: read_ct(path, dtype=None, contiguous=False),
                 "resample_crop_only": resample_only}
    try:
        import monai  # noqa: F401

        providers = {"monai": lambda: _monai_chain(path, centre, settings), **providers}
        baseline = "monai"
    except ImportError:
        baseline = "lungcore_cold"
    shape = f"{label} {'DICOM' if dicom else 'NIfTI'} {image.shape} -> crop {settings.crop}"
    return Case(shape=shape, providers=providers, baseline=baseline, size=float(np.prod(image.shape)), check=check,
                note=f"spacing {tuple(round(s, 2) for s in image.spacing)} -> {settings.spacing}")


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        return []  # the data layer's GPU path is resample_crop's (bench_resample); reading is on the host
    out = [_cases_for("survival", "demo", False, PreprocessSettings.cmml(), "CMML"),
           _cases_for("nodules", "demo", True, PreprocessSettings.csfnet(), "CSF-Net")]
    if not quick:
        out.append(_cases_for("survival", "realistic", False, PreprocessSettings.cmml(), "CMML"))
        out.append(_cases_for("nodules", "realistic", True, PreprocessSettings.csfnet(), "CSF-Net"))
    return out
