"""A CT image in lungcore's conventions: the (z, y, x) array, the affine to LPS millimetres, and
the dtypes the readers return (see :mod:`lungcore.data.io`).

Example:
    >>> import numpy as np
    >>> affine = np.diag([0.7, 0.7, 2.5, 1.0]) @ XYZ_TO_ZYX   # (z, y, x) index -> LPS (x, y, z) mm
    >>> ct = CTImage(np.zeros((4, 8, 8), np.float32), affine)
    >>> ct.shape, ct.spacing, ct.index_to_world([1, 0, 0]).tolist()
    ((4, 8, 8), (2.5, 0.7, 0.7), [0.0, 0.0, 2.5])
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Reorders affine columns between index order (x, y, z) and (z, y, x).
XYZ_TO_ZYX = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


@dataclass
class CTImage:
    """A CT volume: ``array`` (z, y, x) HU (float32 unless read with ``dtype=None``), ``affine`` 4x4
    from (z, y, x, 1) to LPS mm.

    Example:
        >>> import numpy as np
        >>> affine = np.array([[0, 0, 0.7, -100],   # x index -> LPS x (towards the patient's left)
        ...                    [0, 0.7, 0, -50],    # y index -> LPS y (towards the back)
        ...                    [2.5, 0, 0, 20],     # z index -> LPS z (towards the head)
        ...                    [0, 0, 0, 1]])
        >>> ct = CTImage(np.full((4, 8, 8), -1000, np.float32), affine)
        >>> ct.shape, ct.spacing
        ((4, 8, 8), (2.5, 0.7, 0.7))
        >>> ct.index_to_world([1, 2, 3]).round(3).tolist()   # voxel (z, y, x) -> LPS mm (x, y, z)
        [-97.9, -48.6, 22.5]
        >>> ct.world_to_index([-97.9, -48.6, 22.5]).round(3).tolist()
        [1.0, 2.0, 3.0]
    """

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(sz, sy, sx) in mm: the lengths of the affine's index columns."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, H, W) of the array."""
        return tuple(int(s) for s in self.array.shape)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """LPS mm ``(..., 3)`` as (x, y, z) -> continuous voxel indices ``(..., 3)`` as (z, y, x)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """Voxel indices ``(..., 3)`` as (z, y, x) -> LPS mm ``(..., 3)`` as (x, y, z)."""
        zyx = np.asarray(zyx, dtype=np.float64)
        return zyx @ self.affine[:3, :3].T + self.affine[:3, 3]


def is_dicom_path(path: str | Path) -> bool:
    """A folder (DICOM series) or a ``.dcm`` file."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in (".dcm", ".dicom", ".ima")


def source_files(path: Path) -> list[Path]:
    """The files of a CT source: the file itself, or a folder's files (not those named ``.*``), sorted."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


def dicom_files(path: Path) -> list[Path]:
    """:func:`source_files` of a DICOM series; an empty folder is a ValueError."""
    files = source_files(path)
    if not files:
        raise ValueError(f"DICOM folder {path} holds no files")
    return files


_STORED_KEPT = (np.dtype(np.float32), np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32))


class NativeReaderUnsupported(ValueError):
    """A file the native reader does not handle (multi-frame DICOM, DICOM without geometry tags):
    ``reader="auto"`` hands it to MONAI when MONAI is installed; ``reader="native"`` raises it. The
    message names the file and what it lacks.

    Example:
        >>> import tempfile
        >>> import pydicom
        >>> from pydicom.data import get_testdata_file
        >>> from lungcore.data.io import read_ct
        >>> ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        >>> del ds.ImagePositionPatient                      # no slice position: no geometry
        >>> path = f"{tempfile.mkdtemp()}/slice.dcm"
        >>> ds.save_as(path)
        >>> try:
        ...     read_ct(path, reader="native")
        ... except NativeReaderUnsupported as exc:
        ...     print(isinstance(exc, ValueError), exc)
        True DICOM file .../slice.dcm lacks ImagePositionPatient: no geometry for the native reader
    """


def result_dtype(stored: np.dtype, dtype: Any) -> np.dtype:
    """The dtype :func:`read_ct` returns for data that comes out of the reader as ``stored``."""
    if dtype is not None:
        return canonical(np.dtype(dtype))
    stored = canonical(np.dtype(stored))
    return stored if stored in _STORED_KEPT else np.dtype(np.float32)


def canonical(dtype: np.dtype) -> np.dtype:
    """numpy's builtin dtype object for ``dtype``'s type, in native byte order."""
    return np.dtype(dtype.type) if dtype.kind in "biuf" else dtype


def slice_thickness(ds: Any) -> float:
    """Depth spacing of a lone DICOM slice: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    return float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", 1.0) or 1.0)
