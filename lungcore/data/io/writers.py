"""Writers of CT volumes in lungcore's conventions: NIfTI (:func:`write_nifti`) and an axial DICOM
series (:func:`write_dicom_series`), both atomic (a reader never sees half a file or series).

Example:
    >>> import tempfile
    >>> import numpy as np
    >>> from lungcore.data.io import read_ct
    >>> d = tempfile.mkdtemp()
    >>> volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) - 1000
    >>> from lungcore.data.io.image import XYZ_TO_ZYX
    >>> affine = np.diag([0.5, 0.5, 2.0, 1.0]) @ XYZ_TO_ZYX    # axial: 0.5 mm in-plane, 2 mm slices
    >>> [bool((read_ct(p).array == volume).all()) for p in (write_nifti(f"{d}/ct.nii.gz", volume, affine),
    ...                                                       write_dicom_series(f"{d}/ct", volume, affine))]
    [True, True]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lungcore.data.io.image import RAS_TO_LPS, XYZ_TO_ZYX


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, *, dtype: type = np.int16) -> Path:
    """Write a (z, y, x) HU volume with a (z, y, x) -> LPS affine as NIfTI (RAS on disk), atomically.

    ``dtype``: the stored type; an integer type rounds and clips the values to its range (int16,
    the default, holds every HU value). ``.nii.gz`` is compressed, ``.nii`` not. Returns ``path``.

    Example:
        >>> import tempfile
        >>> from lungcore.data.io import read_ct
        >>> affine = np.diag([0.5, 0.5, 2.0, 1.0]) @ XYZ_TO_ZYX   # (z, y, x) index -> LPS mm, 2 x 0.5 x 0.5 mm
        >>> volume = np.array([-1000.4, 35.6, 40000.0]).reshape(3, 1, 1)
        >>> path = write_nifti(f"{tempfile.mkdtemp()}/ct.nii.gz", volume, affine)
        >>> ct = read_ct(path, dtype=None)                     # the stored type, as stored
        >>> path.name, ct.array.dtype, ct.array.ravel().tolist(), ct.spacing
        ('ct.nii.gz', dtype('int16'), [-1000, 36, 32767], (2.0, 0.5, 0.5))
    """
    import nibabel as nib

    path = Path(path)
    data = np.asarray(array)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    data = data.astype(dtype).transpose(2, 1, 0)
    ras = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64) @ XYZ_TO_ZYX  # both are involutions
    img = nib.Nifti1Image(data, ras)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(ras, code=1)
    img.header.set_sform(ras, code=1)
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def write_dicom_series(folder: str | Path, array: np.ndarray, affine: np.ndarray, *, patient_id: str = "anonymous",
                       series_uid: str | None = None, study_uid: str | None = None) -> Path:
    """Write a (z, y, x) HU volume as an axial CT DICOM series (one file per slice).

    The affine must map (z, y, x) to LPS with in-plane axes along the affine's y and x columns.
    Pixels are stored as uint16 with ``RescaleIntercept`` -1024 and slope 1, as scanners do.
    The folder is written under a temporary name and renamed, so a reader never sees half a series.
    Returns ``folder`` (an existing one is replaced).

    Example:
        >>> import tempfile
        >>> import pydicom
        >>> affine = np.diag([0.5, 0.5, 2.0, 1.0]) @ XYZ_TO_ZYX   # (z, y, x) index -> LPS mm, 2 x 0.5 x 0.5 mm
        >>> volume = np.full((2, 3, 4), -1000.0)
        >>> folder = write_dicom_series(f"{tempfile.mkdtemp()}/series", volume, affine, patient_id="P007")
        >>> sorted(p.name for p in folder.iterdir())
        ['slice_0000.dcm', 'slice_0001.dcm']
        >>> ds = pydicom.dcmread(folder / "slice_0001.dcm")
        >>> ds.PatientID, int(ds.InstanceNumber), [float(v) for v in ds.ImagePositionPatient], (ds.Rows, ds.Columns)
        ('P007', 2, [0.0, 0.0, 2.0], (3, 4))
        >>> int(ds.pixel_array[0, 0]), float(ds.RescaleIntercept)     # stored value + intercept = HU
        (24, -1024.0)
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    affine = np.asarray(affine, dtype=np.float64)
    sz, sy, sx = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir = affine[:3, 2] / sx   # along a row = increasing x index
    col_dir = affine[:3, 1] / sy   # down a column = increasing y index
    stored = np.clip(np.rint(np.asarray(array, dtype=np.float64) + 1024.0), 0, 65535).astype(np.uint16)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(tmp / f"slice_{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = k + 1
        position = affine[:3, 3] + k * affine[:3, 0]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{sz:.6f}"
        ds.SpacingBetweenSlices = f"{sz:.6f}"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        pydicom.dcmwrite(str(tmp / f"slice_{k:04d}.dcm"), ds, enforce_file_format=True)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
