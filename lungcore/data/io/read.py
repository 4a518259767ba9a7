"""``read_ct``: a NIfTI file or a DICOM series, by the native readers or MONAI's (see
:mod:`lungcore.data.io` for the conventions and the two readers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lungcore.data.io.dicom import read_dicom
from lungcore.data.io.digest import SourceHash
from lungcore.data.io.image import CTImage, NativeReaderUnsupported, is_dicom_path
from lungcore.data.io.monai_reader import monai_available, read_monai
from lungcore.data.io.nifti import read_nifti

READERS = ("auto", "native", "monai")


def read_ct(path: str | Path, *, dtype: type | None = np.float32, contiguous: bool = True,
            reader: str = "auto", int16: bool = False, source_hash: SourceHash | None = None) -> CTImage:
    """Read a NIfTI file or a DICOM series (a folder, or one ``.dcm``) as a :class:`CTImage`.

    Returns the array in (z, y, x) order and the affine from (z, y, x, 1) to LPS mm (the
    conventions: :mod:`lungcore.data.io`). ``dtype=None`` keeps the stored type when it already
    holds HU (an int16 NIfTI without scaling; DICOM with ``RescaleSlope``/``RescaleIntercept`` is always float32):
    half the memory. ``contiguous=False`` may return the (z, y, x) array as a strided view instead
    of copying it (what the preprocessing hot path uses; ``resample_crop`` takes any strides).

    ``int16`` (with ``dtype=None``, native reader): a DICOM series whose rescale is slope 1 and an
    integer intercept (what CT scanners write) comes back as int16 HU, the same values as the
    float32 array (float32 if a value does not fit int16): half the memory, and the resampler,
    which takes int16, converts only the voxels it samples (what the preprocessing hot path uses).

    ``reader``: ``"native"`` reads with nibabel/pydicom directly (no MONAI needed; on a
    160 x 512 x 512 CT 2.7x faster for ``.nii.gz``, 5x for a DICOM series, 47x for ``.nii``: see
    ``benchmarks/bench_read.py``), ``"monai"`` through MONAI's ``LoadImage`` (the reference
    the native reader is tested to equal: same values, dtype and affine), ``"auto"`` (default):
    native, and MONAI only for what native does not handle (multi-frame DICOM, DICOM lacking
    ``ImagePositionPatient``/``ImageOrientationPatient``; :class:`NativeReaderUnsupported`).

    ``source_hash`` (a :class:`~lungcore.data.io.digest.SourceHash` of ``path``): the native reader
    feeds it the source's bytes as it reads them (a ``.nii.gz``'s mapped file, each DICOM file), so
    ``source_hash.hexdigest()`` afterwards gives :func:`~lungcore.data.io.digest.source_digest`
    without a second pass over the source (it reads what was not fed).

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> ct = read_ct(get_testdata_file("CT_small.dcm"), reader="native")
        >>> ct.shape, ct.array.dtype, [round(s, 3) for s in ct.spacing]
        ((1, 128, 128), dtype('float32'), [5.0, 0.661, 0.661])
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CT image {path} does not exist")
    if reader != "monai":
        try:
            if is_dicom_path(path):
                array, affine = read_dicom(path, dtype, int16, source_hash)
            else:
                array, affine = read_nifti(path, dtype, source_hash)
        except NativeReaderUnsupported:
            if reader == "native" or not monai_available():
                raise
        else:
            if contiguous:
                array = np.ascontiguousarray(array)
            return CTImage(array=array, affine=affine)
    return read_monai(path, dtype, contiguous)
