"""CT readers: NIfTI files and DICOM series in lungcore's conventions, natively or through MONAI.

:func:`read_ct` returns the array in (z, y, x) = (depth, height, width) order and an affine that
maps the index column ``(z, y, x, 1)`` to world LPS millimetres ``(x, y, z, 1)`` (the DICOM/ITK
frame that nodule annotations use). Values are Hounsfield units: DICOM ``RescaleSlope`` /
``RescaleIntercept`` and the NIfTI ``scl_slope`` / ``scl_inter`` are applied. A single DICOM
slice becomes a one-slice volume whose depth spacing is its ``SliceThickness``.

Two readers give the same result (array values, dtype, affine; tests/data/test_io_native.py):

* ``reader="native"`` (what ``"auto"``, the default, uses): nibabel's header + one read of the
  voxels, which are already in (z, y, x) C order (``.nii.gz``: the file memory-mapped and inflated
  by python-isal, else zlib-ng, else zlib, straight into the array: see :func:`gunzip`);
  DICOM slices' tags read by a tag walker over each file's bytes (uncompressed little-endian
  files; :mod:`~lungcore.data.io.dicom_tags`), pydicom's ``dcmread`` for a series it refuses,
  the pixels taken from the buffer, slices sorted by their position along the slice normal. No
  MONAI needed (the GPU machine has none).
* ``reader="monai"``: MONAI's ``LoadImage`` (NibabelReader / PydicomReader), whose (x, y, z)
  array and RAS affine are converted once: the reference. MONAI stacks a DICOM series by
  ``InstanceNumber``; the native reader stacks by position and then orders the stack so that
  ``InstanceNumber`` increases, so the two agree whenever MONAI's answer is right (and the
  native reader is still right for shuffled or missing instance numbers).

DICOM series checks (native): one ``SeriesInstanceUID``, one ``ImageOrientationPatient`` and one
slice size per folder, no two slices at one position, and even slice spacing: a step that
differs from the mean step by more than 1 % (at least 0.01 mm) is an error naming the two files
(a missing slice would otherwise misplace every slice after it; MONAI silently uses the mean).

Example:
    >>> from pydicom.data import get_testdata_file
    >>> from lungcore.data import read_ct
    >>> ct = read_ct(get_testdata_file("CT_small.dcm"))
    >>> ct.array.shape, [round(s, 3) for s in ct.spacing], float(ct.array.min())
    ((1, 128, 128), [5.0, 0.661, 0.661], -896.0)

One module per job: :mod:`~lungcore.data.io.image` (CTImage, conventions, dtypes),
:mod:`~lungcore.data.io.read` (:func:`read_ct`), :mod:`~lungcore.data.io.nifti`,
:mod:`~lungcore.data.io.dicom` (with :mod:`~lungcore.data.io.dicom_tags`) and
:mod:`~lungcore.data.io.monai_reader` (the readers),
:mod:`~lungcore.data.io.inflate` (``.nii.gz`` inflation), :mod:`~lungcore.data.io.digest` (the
source files' content digest, fed by the readers), :mod:`~lungcore.data.io.headers`
(:func:`read_ct_header`), :mod:`~lungcore.data.io.writers` (NIfTI and DICOM writers).
"""
from lungcore.data.io.digest import SourceHash, source_digest
from lungcore.data.io.headers import read_ct_header
from lungcore.data.io.image import CTImage, NativeReaderUnsupported, is_dicom_path
from lungcore.data.io.inflate import INFLATERS, gunzip, inflater
from lungcore.data.io.read import READERS, read_ct
from lungcore.data.io.writers import write_dicom_series, write_nifti

_inflater = inflater  # the name benchmarks/bench_cohort_scale.py imports

__all__ = ["CTImage", "INFLATERS", "NativeReaderUnsupported", "READERS", "SourceHash", "gunzip", "inflater", "is_dicom_path",
           "read_ct", "read_ct_header", "source_digest", "write_dicom_series", "write_nifti"]
