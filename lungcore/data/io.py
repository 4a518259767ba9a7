"""CT readers: NIfTI files and DICOM series through MONAI's ``LoadImage``, in lungcore's conventions.

MONAI returns the array in (x, y, z) order with an affine to RAS millimetres. :func:`read_ct`
converts once: the array becomes (z, y, x) = (depth, height, width) and the affine maps the
index column ``(z, y, x, 1)`` to world LPS millimetres ``(x, y, z, 1)`` (the DICOM/ITK frame that
nodule annotations use). Values are Hounsfield units as float32: MONAI's DICOM reader applies
``RescaleSlope``/``RescaleIntercept``, nibabel applies the NIfTI ``scl_slope``/``scl_inter``.
A single DICOM slice becomes a one-slice volume whose depth spacing is its ``SliceThickness``.

Example:
    >>> from pydicom.data import get_testdata_file
    >>> from lungcore.data import read_ct
    >>> ct = read_ct(get_testdata_file("CT_small.dcm"))
    >>> ct.array.shape, [round(s, 3) for s in ct.spacing], float(ct.array.min())
    ((1, 128, 128), [5.0, 0.661, 0.661], -896.0)
"""
from __future__ import annotations

import warnings
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
    from (z, y, x, 1) to LPS mm."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(sz, sy, sx) in mm: the lengths of the affine's index columns."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
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


def _dicom_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"DICOM folder {path} holds no files")
        return files
    return [path]


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


def read_ct(path: str | Path, *, dtype: type | None = np.float32, contiguous: bool = True) -> CTImage:
    """Read a NIfTI file or a DICOM series (a folder, or one ``.dcm``) through MONAI.

    Returns a :class:`CTImage` in lungcore's conventions (see the module docstring).
    ``dtype=None`` keeps the stored type when it already holds HU (an int16 NIfTI without
    scaling; DICOM is always rescaled to float32): half the memory and about twice as fast on a
    512 x 512 x 300 CT. ``contiguous=False`` returns the (z, y, x) array as a transposed view
    instead of copying it (what the preprocessing hot path uses; ``resample_crop`` takes any
    strides).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CT image {path} does not exist")
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

            ds = pydicom.dcmread(str(_dicom_files(path)[0]), stop_before_pixels=True)
            thickness = float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", 1.0) or 1.0)
            normal = np.cross(affine[:3, 0], affine[:3, 1])
            affine[:3, 2] = normal / np.linalg.norm(normal) * thickness
    if array.ndim != 3:
        raise ValueError(f"CT image {path} must be a 3-D volume, got shape {array.shape}")
    array = array.transpose(2, 1, 0)
    if contiguous:
        array = np.ascontiguousarray(array)
    affine = affine @ XYZ_TO_ZYX
    return CTImage(array=array, affine=affine)


def read_ct_header(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray | None]:
    """Cheap check that ``path`` is a readable image: parse its header only.

    Returns (shape in (z, y, x) order, affine or None). Raises on an unreadable file. For an
    uncompressed NIfTI it also checks that the file holds all of its voxels.
    """
    path = Path(path)
    if is_dicom_path(path):
        import pydicom

        files = _dicom_files(path)
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


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, *, dtype: type = np.int16) -> Path:
    """Write a (z, y, x) HU volume with a (z, y, x) -> LPS affine as NIfTI (RAS on disk), atomically."""
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
