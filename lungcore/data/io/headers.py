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
    uncompressed NIfTI it also checks that the file holds all of its voxels; every error names the
    file. A DICOM series gives no affine (its first file's header alone does not place the slices):
    ``(slices, rows, columns), None``.

    Example:
        >>> import tempfile
        >>> from lungcore.data.io import write_nifti
        >>> affine = np.diag([0.5, 0.5, 2.0, 1.0]) @ XYZ_TO_ZYX   # (z, y, x) index -> LPS mm, 2 x 0.5 x 0.5 mm
        >>> path = write_nifti(f"{tempfile.mkdtemp()}/ct.nii", np.zeros((3, 4, 5)), affine)
        >>> shape, header_affine = read_ct_header(path)
        >>> shape, bool((header_affine == affine).all())
        ((3, 4, 5), True)
        >>> _ = path.write_bytes(path.read_bytes()[:-10])        # a copy cut short
        >>> read_ct_header(path)
        Traceback (most recent call last):
        ...
        ValueError: CT image .../ct.nii is truncated: 462 bytes, the header needs 472
    """
    path = Path(path)
    if is_dicom_path(path):
        import pydicom

        files = dicom_files(path)
        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        for tag in ("Rows", "Columns", "PixelSpacing"):
            if tag not in ds:
                raise ValueError(f"CT image {path}: DICOM file {files[0].name} lacks {tag}")
        return (len(files), int(ds.Rows), int(ds.Columns)), None
    import nibabel as nib

    img = nib.load(str(path))
    # the readers' rule: trailing axes of one are dropped, one slice (2-D) is a depth of one
    shape = [int(s) for s in img.shape]
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) == 2:
        shape.append(1)
    if len(shape) != 3:
        raise ValueError(f"CT image {path} must be a 3-D volume, got shape {tuple(int(s) for s in img.shape)}")
    if str(path).endswith(".nii"):
        header = img.header
        needed = int(getattr(img.dataobj, "offset", header.get_data_offset())) + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < needed:
            raise ValueError(f"CT image {path} is truncated: {size} bytes, the header needs {needed}")
    affine = RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64) @ XYZ_TO_ZYX
    return (shape[2], shape[1], shape[0]), affine
