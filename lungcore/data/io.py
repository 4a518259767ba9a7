"""CT readers: NIfTI files and DICOM series in lungcore's conventions, natively or through MONAI.

:func:`read_ct` returns the array in (z, y, x) = (depth, height, width) order and an affine that
maps the index column ``(z, y, x, 1)`` to world LPS millimetres ``(x, y, z, 1)`` (the DICOM/ITK
frame that nodule annotations use). Values are Hounsfield units: DICOM ``RescaleSlope`` /
``RescaleIntercept`` and the NIfTI ``scl_slope`` / ``scl_inter`` are applied. A single DICOM
slice becomes a one-slice volume whose depth spacing is its ``SliceThickness``.

Two readers give the same result (array values, dtype, affine; tests/data/test_io_native.py):

* ``reader="native"`` (what ``"auto"``, the default, uses): nibabel's header + one read of the
  voxels, which are already in (z, y, x) C order (``.nii.gz``: the file memory-mapped and inflated
  by python-isal, else zlib-ng, else zlib, straight into the array: see :func:`_gunzip`);
  pydicom's ``dcmread`` per slice, the pixels taken from the buffer, slices sorted by their
  position along the slice normal. No MONAI needed (the GPU machine has none).
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


READERS = ("auto", "native", "monai")
_STORED_KEPT = (np.dtype(np.float32), np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32))


class NativeReaderUnsupported(ValueError):
    """A file the native reader does not handle (multi-frame DICOM, DICOM without geometry tags):
    ``reader="auto"`` hands it to MONAI when MONAI is installed."""


def _result_dtype(stored: np.dtype, dtype: Any) -> np.dtype:
    """The dtype :func:`read_ct` returns for data that comes out of the reader as ``stored``."""
    if dtype is not None:
        return _canonical(np.dtype(dtype))
    stored = _canonical(np.dtype(stored))
    return stored if stored in _STORED_KEPT else np.dtype(np.float32)


def _canonical(dtype: np.dtype) -> np.dtype:
    """numpy's builtin dtype object for ``dtype``'s type, in native byte order."""
    return np.dtype(dtype.type) if dtype.kind in "biuf" else dtype


def read_ct(path: str | Path, *, dtype: type | None = np.float32, contiguous: bool = True,
            reader: str = "auto", int16: bool = False) -> CTImage:
    """Read a NIfTI file or a DICOM series (a folder, or one ``.dcm``) as a :class:`CTImage`.

    Returns the array in (z, y, x) order and the affine from (z, y, x, 1) to LPS mm (see the
    module docstring). ``dtype=None`` keeps the stored type when it already holds HU (an int16
    NIfTI without scaling; DICOM with ``RescaleSlope``/``RescaleIntercept`` is always float32):
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
                array, affine = _read_dicom_native(path, dtype, int16)
            else:
                array, affine = _read_nifti_native(path, dtype)
        except NativeReaderUnsupported:
            if reader == "native" or not _monai_available():
                raise
        else:
            if contiguous:
                array = np.ascontiguousarray(array)
            return CTImage(array=array, affine=affine)
    return _read_monai(path, dtype, contiguous)


def _monai_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("monai") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (blocked), a broken spec
        return False


def _slice_thickness(ds: Any) -> float:
    """Depth spacing of a lone DICOM slice: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    return float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", 1.0) or 1.0)


def _read_monai(path: Path, dtype: Any, contiguous: bool) -> CTImage:
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
            normal = np.cross(affine[:3, 0], affine[:3, 1])
            affine[:3, 2] = normal / np.linalg.norm(normal) * _slice_thickness(ds)
    if array.ndim != 3:
        raise ValueError(f"CT image {path} must be a 3-D volume, got shape {array.shape}")
    array = array.transpose(2, 1, 0)
    if contiguous:
        array = np.ascontiguousarray(array)
    affine = affine @ XYZ_TO_ZYX
    return CTImage(array=array, affine=affine)


# ---------------------------------------------------------------------------------------------
# Native readers: nibabel / pydicom directly, no MONAI. Each mirrors what MONAI's reader + the
# conversion in _read_monai produce (values, dtype, affine); tests/data/test_io_native.py checks it.

def _nifti_affine(img: Any) -> np.ndarray:
    """``img.affine`` after MONAI's ``correct_nifti_header_if_necessary``: when the header's
    pixdim disagrees with the affine's column norms, the sform is replaced by a qform that agrees
    (or the reverse); the affine read is nibabel's best affine of the corrected header."""
    header = img.header
    if header.get("dim") is None:
        return np.array(img.affine, dtype=np.float64)
    d = int(header["dim"][0])
    if d >= 5:
        return np.array(img.affine, dtype=np.float64)

    def norms(a: np.ndarray, r: int) -> np.ndarray:
        s = np.sqrt(np.sum(np.asarray(a, dtype=float)[:r, :r] ** 2, axis=0))
        s[s == 0] = 1.0
        return s

    pixdim = np.asarray(header.get_zooms())[:d]
    if np.allclose(pixdim, norms(img.affine, d)) or not hasattr(img, "get_sform"):
        return np.array(img.affine, dtype=np.float64)
    sform, qform = img.get_sform(), img.get_qform()
    sform_ok, qform_ok = np.allclose(norms(sform, d), pixdim), np.allclose(norms(qform, d), pixdim)
    if header["sform_code"] != 0:
        if sform_ok:
            return np.array(img.affine, dtype=np.float64)
        if qform_ok:  # MONAI sets the sform to the qform: the best affine is then that sform
            return np.array(qform, dtype=np.float64)
    if header["qform_code"] != 0:
        if qform_ok:
            return np.array(img.affine, dtype=np.float64)
        if sform_ok:  # the qform becomes the sform; the best affine is the (unchanged) sform or qform
            hdr = header.copy()
            hdr.set_qform(sform)
            return np.array(hdr.get_best_affine(), dtype=np.float64)
    return np.array(img.affine, dtype=np.float64)  # MONAI only rewrites pixdim: the affine stays


# gzip inflaters, fastest first (measured on a 160 x 512 x 512 int16 .nii.gz, 2 cores: python-isal
# about 1.6-2x zlib, zlib-ng between; benchmarks/bench_cohort_scale.py measures them again on every
# run). LUNGCORE_INFLATER=isal|zlib-ng|zlib forces one (tests, benchmarks).
INFLATERS = ("isal", "zlib-ng", "zlib")


def _inflater() -> tuple[str, Any]:
    """(name, module) of the inflater ``_gunzip`` uses: the first of :data:`INFLATERS` installed,
    or the one ``LUNGCORE_INFLATER`` names (an error if that one is not installed)."""
    import os

    forced = os.environ.get("LUNGCORE_INFLATER", "")
    if forced and forced not in INFLATERS:
        raise ValueError(f"LUNGCORE_INFLATER must be one of {INFLATERS}, got {forced!r}")
    for name in ((forced,) if forced else INFLATERS):
        try:
            if name == "isal":
                from isal import isal_zlib as module
            elif name == "zlib-ng":
                from zlib_ng import zlib_ng as module
            else:
                import zlib as module
        except ImportError:
            if forced:
                raise ValueError(f"LUNGCORE_INFLATER={forced}: that package is not installed") from None
            continue
        return name, module
    raise AssertionError("zlib is always there")


def _gunzip(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """Bytes ``[offset, offset + nbytes)`` of the gzip file ``path`` decompressed into a fresh,
    writable uint8 array (multi-member files too).

    Copies: the file is memory-mapped (its compressed bytes are never copied); python-isal and
    zlib-ng inflate straight into the returned array (their C gzip reader's ``readinto``): each
    byte of the volume is written once. The zlib fallback inflates 256 KiB of input at a time into
    a bytes object and copies that into place: one extra pass over the volume, no full-size
    temporary.
    """
    import mmap

    name, module = _inflater()
    out = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ValueError(f"CT image {path} is truncated: the file is empty")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = memoryview(mapped)
    try:
        if hasattr(module, "_GzipReader"):
            filled = _inflate_reader(module, data, out, offset, path)
        else:
            filled = _inflate_chunks(module, data, out, offset, path)
    finally:
        data.release()
        try:
            mapped.close()
        except BufferError:  # a view still alive (an exception's frame): unmapped when it is collected
            pass
    if filled < nbytes:
        raise ValueError(f"CT image {path} is truncated: {offset + filled} bytes of data after decompression, "
                         f"the header needs {offset + nbytes}")
    return out


def _inflate_reader(module: Any, data: memoryview, out: np.ndarray, offset: int, path: Path) -> int:
    """python-isal / zlib-ng: their C gzip reader over the mapped file, ``readinto`` the array."""
    reader = module._GzipReader(data)
    target = memoryview(out)
    try:
        head = memoryview(bytearray(offset)) if offset else None
        skipped = 0
        while head is not None and skipped < offset:
            k = reader.readinto(head[skipped:])
            if not k:
                return 0
            skipped += k
        filled = 0
        while filled < len(out):
            k = reader.readinto(target[filled:])
            if not k:
                break
            filled += k
        tail = memoryview(bytearray(1 << 16))
        while reader.readinto(tail):  # to the end of the stream: its CRC checks (the trailer is 8 bytes)
            pass
        return filled
    except EOFError:  # the stream ends before its end-of-stream marker
        raise ValueError(f"CT image {path} is truncated: its gzip stream ends early") from None
    except (OSError, module.error) as exc:  # BadGzipFile (an OSError), a corrupt deflate stream
        raise ValueError(f"CT image {path}: corrupt gzip data: {exc}") from None
    finally:
        target.release()
        reader.close()
        del reader


def _inflate_chunks(module: Any, data: memoryview, out: np.ndarray, offset: int, path: Path) -> int:
    """zlib (no gzip reader in C): ``decompressobj`` fed 256 KiB at a time, each piece copied into place."""
    nbytes = len(out)
    skip, filled, pos, step = offset, 0, 0, 1 << 18
    d = module.decompressobj(31)
    while pos < len(data):  # to the end of the input: every member's CRC checks (after the volume: bytes)
        with data[pos:pos + step] as piece:  # released at once: the mapping closes only without views
            try:
                block = d.decompress(piece)
            except module.error as exc:
                raise ValueError(f"CT image {path}: corrupt gzip data: {exc}") from None
            pos += len(piece)
        if d.eof:  # end of a gzip member: the rest of the input starts the next one
            pos -= len(d.unused_data)
            d = module.decompressobj(31)
        if skip:
            cut = min(skip, len(block))
            block, skip = block[cut:], skip - cut
        take = min(len(block), nbytes - filled)
        if take:
            out[filled:filled + take] = np.frombuffer(block, dtype=np.uint8, count=take)
            filled += take
    return filled


def _read_nifti_native(path: Path, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI (or anything nibabel loads) -> ((z, y, x) array, LPS affine of (z, y, x) indices)."""
    import nibabel as nib
    from nibabel.arrayproxy import ArrayProxy
    from nibabel.volumeutils import apply_read_scaling

    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a bad file
        raise ValueError(f"CT image {path} is not an image nibabel can read: {type(exc).__name__}: {exc}") from exc
    affine = RAS_TO_LPS @ _nifti_affine(img) @ XYZ_TO_ZYX
    proxy = img.dataobj
    shape_xyz = [int(s) for s in img.shape]
    image_file = getattr(img, "file_map", {}).get("image")
    fast = (type(proxy) is ArrayProxy and proxy.order == "F" and image_file is not None
            and image_file.filename == str(path) and str(path).endswith((".nii", ".nii.gz")))
    if fast:
        stored = np.dtype(proxy.dtype)
        count = int(np.prod(shape_xyz))
        if str(path).endswith(".gz"):
            raw = _gunzip(path, int(proxy.offset), count * stored.itemsize).view(stored)
        else:
            raw = np.fromfile(path, dtype=stored, count=count, offset=int(proxy.offset))
            if raw.size < count:
                raise ValueError(f"CT image {path} is truncated: {raw.size} of {count} voxels")
        # numpy's own dtype object for the type (not the header's equal '<i2'): what MONAI's path
        # returns, and what code comparing dtypes by identity expects
        raw = raw.view(_canonical(stored)) if stored.isnative else raw.astype(_canonical(stored))
        raw = raw.reshape(shape_xyz[::-1])  # F-ordered (x, y, z, ...) = C-ordered (..., z, y, x)
        # the scaling of ArrayProxy.__array__ (_get_scaled with dtype None), applied per slab
        slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
        if np.can_cast(slope, slope.dtype):
            slope = slope.astype(slope.dtype)
        if np.can_cast(inter, slope.dtype):
            inter = inter.astype(slope.dtype)
        probe = apply_read_scaling(raw.reshape(-1)[:1], slope, inter)
        scaled = probe.dtype != raw.dtype or not np.shares_memory(probe, raw)
    else:
        raw = np.asanyarray(proxy)  # nibabel's own read, scaling included (MONAI does the same)
        raw = raw.transpose(tuple(range(raw.ndim))[::-1])
        scaled = False
    while len(shape_xyz) > 3 and shape_xyz[-1] == 1:
        shape_xyz.pop()
        raw = raw[0]
    if len(shape_xyz) == 2:
        raw = raw[None]
    elif len(shape_xyz) != 3:
        raise ValueError(f"CT image {path} must be a 3-D volume, got shape {tuple(int(s) for s in img.shape)}")
    if not scaled:
        final = _result_dtype(raw.dtype, dtype)
        if raw.dtype == final and raw.dtype.isnative:
            return (raw if raw.dtype is final else raw.view(final)), affine
        return raw.astype(final), affine
    final = _result_dtype(probe.dtype, dtype)
    out = np.empty(raw.shape, dtype=final)
    for k in range(raw.shape[0]):  # slab by slab: no full-size float64 temporary
        out[k] = apply_read_scaling(raw[k], slope, inter)
    return out, affine


_UNCOMPRESSED_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
# No thread pool: for a 160-slice 512 x 512 series (about 100 ms), pydicom's parsing (pure
# Python, GIL-bound: about half) and reading the files element by element dominate; the pixel
# conversion (numpy, releases the GIL) is about 20 ms. Measured on 2 shared cores: threads for the
# conversion, for dcmread + conversion, or prefetching the bytes in a thread were no faster (2 to 4
# threads: 100-175 ms against 100-140 ms), and parsing from memory (BytesIO) was twice as slow.


def _dicom_slice(ds: Any, name: Path) -> np.ndarray:
    """The stored pixels of one slice exactly as pydicom's ``pixel_array`` gives them: read from
    the buffer for uncompressed little-endian data (unused high bits corrected as pydicom does),
    through ``pixel_array`` (its decoders) otherwise."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "")) if meta is not None else ""
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = int(getattr(ds, "BitsAllocated", 0))
    if (syntax in _UNCOMPRESSED_LE and bits in (8, 16, 32) and int(getattr(ds, "SamplesPerPixel", 1)) == 1
            and "PixelData" in ds):
        signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
        stored = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        buf = ds.PixelData
        if len(buf) >= rows * cols * stored.itemsize:
            arr = np.frombuffer(buf, dtype=stored, count=rows * cols).reshape(rows, cols)
            shift = bits - int(getattr(ds, "BitsStored", bits))
            if shift > 0:
                arr = np.right_shift(np.left_shift(arr, shift), shift)
            return arr
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types (missing decoder, bad data)
        raise ValueError(f"DICOM file {name}: cannot decode the pixels: {type(exc).__name__}: {exc}") from exc


def _rescale(ds: Any) -> tuple[float, float] | None:
    """(slope, intercept) when the slice has either tag (MONAI rescales then), else None."""
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        return None
    return float(getattr(ds, "RescaleSlope", 1.0)), float(getattr(ds, "RescaleIntercept", 0.0))


def _fill_slice(out: np.ndarray, pixels: np.ndarray, rescale: tuple[float, float] | None) -> None:
    """``out[...] = pixels * slope + intercept`` with MONAI's arithmetic: pixels to float32, then
    times pydicom's DSfloat slope (a float64 operation), plus the intercept, cast to ``out``.
    Integer pixels with slope 1 and an integer intercept are exact in float32: one pass."""
    if rescale is None:
        out[...] = pixels
        return
    slope, intercept = rescale
    if (slope == 1.0 and float(intercept).is_integer() and abs(intercept) < 2 ** 23 and pixels.dtype.kind in "iu"
            and pixels.dtype.itemsize <= 2 and out.dtype in (np.float32, np.float64)):
        np.add(pixels, out.dtype.type(intercept), out=out, dtype=out.dtype)
        return
    out[...] = pixels.astype(np.float32) * np.float64(slope) + np.float64(intercept)


def _read_dicom_native(path: Path, dtype: Any, int16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series folder (or one file) -> ((z, y, x) array, LPS affine of (z, y, x) indices);
    ``int16`` (with ``dtype`` None): int16 HU where the rescale keeps the values integers that fit."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = _dicom_files(path)
    datasets = []
    for name in files:
        try:
            ds = pydicom.dcmread(str(name))
        except InvalidDicomError:  # not a DICOM file (no preamble): skipped, as MONAI skips it
            continue
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"DICOM file {name} is unreadable: {type(exc).__name__}: {exc}") from exc
        if str(getattr(ds, "SOPClassUID", "")) == "1.2.840.10008.1.3.10":  # a DICOMDIR
            continue
        datasets.append((ds, name))
    if not datasets:
        raise ValueError(f"DICOM {'folder' if path.is_dir() else 'file'} {path} holds no DICOM image")
    for ds, name in datasets:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise NativeReaderUnsupported(f"DICOM file {name} is multi-frame: the native reader reads one slice "
                                          "per file")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"):
            if tag not in ds:
                raise NativeReaderUnsupported(f"DICOM file {name} lacks {tag}: no geometry for the native reader")
    first = datasets[0][0]
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for ds, _ in datasets}
    if len(uids) > 1:
        raise ValueError(f"DICOM folder {path} mixes {len(uids)} series (SeriesInstanceUID): one series per folder")
    iop = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    rows, cols = int(first.Rows), int(first.Columns)
    pixel_spacing = [float(v) for v in getattr(first, "PixelSpacing", None) or (1.0, 1.0)]
    for ds, name in datasets[1:]:
        other = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        if not np.allclose(other, iop, atol=1e-4):
            raise ValueError(f"DICOM folder {path} mixes orientations: {name.name} has ImageOrientationPatient "
                             f"{other.round(4).tolist()}, {datasets[0][1].name} {iop.round(4).tolist()}")
        other = [float(v) for v in getattr(ds, "PixelSpacing", None) or (1.0, 1.0)]
        if not np.allclose(other, pixel_spacing, rtol=0, atol=1e-4):
            raise ValueError(f"DICOM folder {path} mixes pixel spacings: {name.name} has PixelSpacing {other}, "
                             f"{datasets[0][1].name} {pixel_spacing}")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(f"DICOM folder {path} mixes slice sizes: {name.name} is {int(ds.Rows)} x "
                             f"{int(ds.Columns)}, {datasets[0][1].name} {rows} x {cols}")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    dr, dc = pixel_spacing[:2]  # between rows (along col_dir), between columns (along row_dir)
    affine = np.eye(4)
    affine[:3, 1] = col_dir * dr
    affine[:3, 2] = row_dir * dc
    n = len(datasets)
    if n > 1:
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds, _ in datasets])
        order = np.argsort(positions @ normal, kind="stable")
        instance = [getattr(datasets[k][0], "InstanceNumber", None) for k in order]
        if instance[0] is not None and instance[-1] is not None and int(instance[-1]) < int(instance[0]):
            order = order[::-1]  # scanner order (InstanceNumber increasing), as MONAI stacks them
        positions = positions[order]
        datasets = [datasets[k] for k in order]
        steps = np.diff(positions, axis=0)
        step = (positions[-1] - positions[0]) / (n - 1)
        gap = float(np.linalg.norm(step))
        if gap < 1e-6:
            raise ValueError(f"DICOM folder {path}: its {n} slices share one position (a mixed or duplicated series)")
        worst = float(np.abs(steps - step).max())
        if worst > max(0.01, 0.01 * gap):
            k = int(np.abs(steps - step).max(axis=1).argmax())
            raise ValueError(f"DICOM folder {path} has uneven slice spacing: {datasets[k][1].name} -> "
                             f"{datasets[k + 1][1].name} steps {np.linalg.norm(steps[k]):.4f} mm, the series "
                             f"averages {gap:.4f} mm (a missing slice?); the affine would misplace slices")
        affine[:3, 0] = step
        affine[:3, 3] = positions[0]
    else:
        affine[:3, 3] = [float(v) for v in first.ImagePositionPatient]
        affine[:3, 0] = normal / np.linalg.norm(normal) * _slice_thickness(first)
    scales = [_rescale(ds) for ds, _ in datasets]
    first_pixels = _dicom_slice(datasets[0][0], datasets[0][1])
    if first_pixels.shape != (rows, cols):
        raise ValueError(f"DICOM file {datasets[0][1]} has pixels of shape {first_pixels.shape}, not one "
                         f"{rows} x {cols} slice")
    rescaled = any(s is not None for s in scales)
    final = _result_dtype(np.float64 if rescaled else first_pixels.dtype, dtype)
    if int16 and dtype is None and rescaled and _integer_shift(scales, first_pixels.dtype):
        final = np.dtype(np.int16)
    out = np.empty((n, rows, cols), dtype=final)

    for k, (ds, name) in enumerate(datasets):
        pixels = first_pixels if k == 0 else _dicom_slice(ds, name)
        if pixels.shape != (rows, cols):
            raise ValueError(f"DICOM file {name} has pixels of shape {pixels.shape}, not {rows} x {cols}")
        scale = scales[k] if scales[k] is not None or not rescaled else (1.0, 0.0)
        if out.dtype == np.int16 and not _fill_slice_int16(out[k], pixels, scale[1],
                                                           int(getattr(ds, "BitsStored", 16) or 16)):
            # HU outside int16 (rare: a 16-bit unsigned scanner value near 65535): float32 from here on
            widened = np.empty(out.shape, dtype=np.float32)
            widened[:k] = out[:k]
            out = widened
        if out.dtype != np.int16:
            _fill_slice(out[k], pixels, scale)
    return out, affine


def _integer_shift(scales: list[tuple[float, float] | None], stored: np.dtype) -> bool:
    """Every slice's rescale is slope 1 and an integer intercept on integer pixels of at most 16 bits:
    the HU values are integers (exactly what the float32 path computes)."""
    return stored.kind in "iu" and stored.itemsize <= 2 and all(
        s is None or (s[0] == 1.0 and float(s[1]).is_integer() and abs(s[1]) < 2 ** 23) for s in scales)


def _fill_slice_int16(out: np.ndarray, pixels: np.ndarray, intercept: float, bits_stored: int) -> bool:
    """``out[...] = pixels + intercept`` in int16 when every value fits (then True), else False and
    ``out`` untouched. The bound comes from ``BitsStored`` where that is enough (12-bit data), else
    from the slice's max (or min) on the side that could overflow. The sum is computed in int16
    with wrap-around, which is exact whenever the true sum fits int16 (it is then the true sum
    modulo 2**16): one vectorised pass, no int32 temporary."""
    shift = int(intercept)
    if not -32768 <= shift <= 32767:
        return False
    bits = min(bits_stored, pixels.dtype.itemsize * 8)
    signed = pixels.dtype.kind == "i"
    lo = (-(1 << (bits - 1)) if signed else 0) + shift
    hi = ((1 << (bits - 1)) - 1 if signed else (1 << bits) - 1) + shift
    if hi > 32767 and int(pixels.max()) + shift > 32767:
        return False
    if lo < -32768 and int(pixels.min()) + shift < -32768:
        return False
    wrapped = pixels.view(np.int16) if pixels.dtype.itemsize == 2 else pixels
    if shift == 0:
        out[...] = wrapped
    else:
        np.add(wrapped, np.int16(shift), out=out, casting="unsafe")
    return True


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
