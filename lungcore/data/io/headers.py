"""Header-only reading: is a CT file readable, what is its shape (the manifest checks use it).

Example:
    >>> from pydicom.data import get_testdata_file
    >>> read_ct_header(get_testdata_file("CT_small.dcm"))
    ((1, 128, 128), None)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lungcore.data.io.image import RAS_TO_LPS, XYZ_TO_ZYX, dicom_files, is_dicom_path

def read_ct_header(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray | None]:
    """Cheap check that ``path`` is a readable image: parse its header only.

    Returns (shape in (z, y, x) order, affine or None). Raises on an unreadable file. For an
    uncompressed NIfTI it also checks that the file holds all of its voxels.
    """
    path = Path(path)
    if is_dicom_path(path):
        import pydicom

        files = dicom_files(path)
        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        for tag in ("Rows", "Columns", "PixelSpacing"):
            if tag not in ds:
                raise ValueError(f"{files[0].name} lacks {tag}")
        return (len(files), int(ds.Rows), int(ds.Columns)), None
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape[:3])
    if len(img.shape) < 3:
        raise ValueError(f"not a 3-D volume: shape {img.shape}")
    if str(path).endswith(".nii"):
        header = img.header
        needed = int(getattr(img.dataobj, "offset", header.get_data_offset())) + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < needed:
            raise ValueError(f"truncated: {size} bytes, the header needs {needed}")
    affine = RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64) @ XYZ_TO_ZYX
    return (shape[2], shape[1], shape[0]), affine
