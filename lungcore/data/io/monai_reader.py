"""The MONAI reader (``reader="monai"``): MONAI's ``LoadImage`` (NibabelReader / PydicomReader),
whose (x, y, z) array and RAS affine are converted once to lungcore's conventions. The reference
the native readers are tested to equal (tests/data/test_io_native.py).

Example:
    >>> monai_available() in (True, False)
    True
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lungcore.data.io.image import RAS_TO_LPS, XYZ_TO_ZYX, CTImage, dicom_files, is_dicom_path, slice_thickness

_LOADERS: dict[tuple[str, Any], Any] = {}


def _loader(path: Path, dtype: Any):
    """One MONAI ``LoadImage`` per reader kind and dtype, built on first use: building one
    instantiates every registered reader (and logs MONAI's nvImageCodec warning) each time."""
    kind = ("dicom_dir" if path.is_dir() else "dicom_file") if is_dicom_path(path) else "nifti"
    key = (kind, dtype)
    if key not in _LOADERS:
        from monai.data import NibabelReader, PydicomReader
        from monai.transforms import LoadImage

        reader = {"dicom_dir": lambda: PydicomReader(fname_regex=None), "dicom_file": PydicomReader,
                  "nifti": NibabelReader}[kind]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _LOADERS[key] = LoadImage(reader=reader, image_only=True, dtype=dtype)
    return _LOADERS[key]


def monai_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("monai") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (blocked), a broken spec
        return False


def slice_thickness(ds: Any) -> float:
    """Depth spacing of a lone DICOM slice: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    return float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", 1.0) or 1.0)


def read_monai(path: Path, dtype: Any, contiguous: bool) -> CTImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = _loader(path, dtype)(str(path))
    array = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    elif not (array.dtype == np.float32 or array.dtype in (np.int16, np.uint16, np.int32)):
        array = array.astype(np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    space = str(img.meta.get("space", "RAS")).upper() if hasattr(img, "meta") else "RAS"
    if space.endswith("RAS"):
        affine = RAS_TO_LPS @ affine
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:  # one DICOM slice: a depth axis of one, spacing = slice thickness
        array = array[..., None]
        if is_dicom_path(path):
            import pydicom

            ds = pydicom.dcmread(str(dicom_files(path)[0]), stop_before_pixels=True)
            normal = np.cross(affine[:3, 0], affine[:3, 1])
            affine[:3, 2] = normal / np.linalg.norm(normal) * slice_thickness(ds)
    if array.ndim != 3:
        raise ValueError(f"CT image {path} must be a 3-D volume, got shape {array.shape}")
    array = array.transpose(2, 1, 0)
    if contiguous:
        array = np.ascontiguousarray(array)
    affine = affine @ XYZ_TO_ZYX
    return CTImage(array=array, affine=affine)
