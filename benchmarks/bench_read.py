"""Reading one CT: lungcore's native reader vs MONAI's ``LoadImage`` (and nibabel alone).

A realistic chest CT (160 x 512 x 512 int16 HU, 1.25 x 0.7 x 0.7 mm) is written once, in the
case setup, to a temporary folder (never to git) with :func:`lungcore.data.io.write_nifti` and
:func:`lungcore.data.io.write_dicom_series`: ``.nii.gz``, ``.nii`` and a 160-file DICOM series.
Every provider reads it the way preprocessing does (``dtype=None, contiguous=False``: int16
as stored for NIfTI, float32 HU for DICOM). Providers:

* ``monai``: ``read_ct(reader="monai")``: MONAI's NibabelReader / PydicomReader (the baseline).
* ``native``: ``read_ct(reader="native")``: nibabel's header + one inflate pass (python-isal) /
  one read for NIfTI; for DICOM the tag walker (:mod:`lungcore.data.io.dicom_tags`: the tags
  lungcore uses and the pixels, no per-slice pydicom parse), the source's sha256 not computed.
* ``nibabel``: ``np.asanyarray(nib.load(path, mmap=False).dataobj)`` in (x, y, z) order, no
  affine work: what reading with nibabel alone costs (NIfTI only; ``mmap=False`` so that an
  uncompressed file is really read, not mapped).

The check asserts native == MONAI (values, dtype, affine to 1e-6 mm) before anything is timed.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import Case, synthetic_ct
from lungcore.data.io import read_ct, write_dicom_series, write_nifti

NAME = "read"
SHAPE = (160, 512, 512)
SPACING = (1.25, 0.7, 0.7)
_ROOT: Path | None = None


def _files() -> dict[str, Path]:
    """The CT (``synthetic_ct``) written once per process."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="lungcore-bench-read-"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    paths = {"NIfTI .nii.gz": _ROOT / "ct.nii.gz", "NIfTI .nii": _ROOT / "ct.nii", "DICOM series": _ROOT / "series"}
    if all(p.exists() for p in paths.values()):
        return paths
    hu = synthetic_ct(SHAPE)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = SPACING[0], SPACING[1], SPACING[2], 1.0
    affine[:3, 3] = [-179.0, -179.0, -300.0]  # (z, y, x) index -> LPS mm; the origin is (x, y, z)
    write_nifti(paths["NIfTI .nii.gz"], hu, affine)
    write_nifti(paths["NIfTI .nii"], hu, affine)
    write_dicom_series(paths["DICOM series"], hu, affine)
    return paths


def _case(label: str, path: Path) -> Case:
    def native():
        return read_ct(path, dtype=None, contiguous=False, reader="native")

    providers = {"native": native}
    baseline = "native"
    try:
        import monai  # noqa: F401

        def monai_read():
            return read_ct(path, dtype=None, contiguous=False, reader="monai")

        providers = {"monai": monai_read, **providers}
        baseline = "monai"
    except ImportError:
        monai_read = None
    if label.startswith("NIfTI"):
        import nibabel as nib

        providers["nibabel"] = lambda: np.asanyarray(nib.load(str(path), mmap=False).dataobj)

    def check():
        got = native()
        assert got.shape == SHAPE
        if monai_read is not None:
            ref = monai_read()
            assert got.array.dtype == ref.array.dtype
            np.testing.assert_array_equal(got.array, ref.array)
            np.testing.assert_allclose(got.affine, ref.affine, rtol=0, atol=1e-6)

    mb = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir())) / 2**20
    return Case(shape=f"{label} {SHAPE}, {mb:.0f} MB on disk", providers=providers, baseline=baseline,
                size=float(np.prod(SHAPE)), check=check, note="dtype=None, contiguous=False (the preprocessing read)")


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        return []  # reading happens on the host whatever the device
    return [_case(label, path) for label, path in _files().items()]
