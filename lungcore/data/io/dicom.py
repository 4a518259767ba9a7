"""The native DICOM reader: each slice's tags read by the tag walker of
:mod:`~lungcore.data.io.dicom_tags` (uncompressed little-endian files), or by pydicom's ``dcmread``
for a series the walker refuses, the pixels taken from the buffer, slices sorted by their position
along the slice normal; what MONAI's PydicomReader returns (values, dtype, affine), with the series
checks of :mod:`lungcore.data.io`.

Example:
    >>> from pydicom.data import get_testdata_file
    >>> from pathlib import Path
    >>> array, affine = read_dicom(Path(get_testdata_file("CT_small.dcm")), None)
    >>> array.shape, array.dtype
    ((1, 128, 128), dtype('float32'))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lungcore.data.io.dicom_tags import WalkerRefused, read_tags
from lungcore.data.io.image import NativeReaderUnsupported, dicom_files, result_dtype, slice_thickness

_UNCOMPRESSED_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
# No thread pool: for a 160-slice 512 x 512 series, pydicom's parsing (pure Python, GIL-bound)
# dominated (dcmread of the 160 files 150 ms of a 200 ms read, 2.8 GHz Xeon); the tag walker reads
# each file whole (one read call) and walks its elements in a few tens of microseconds, and the
# pixels go from the file's bytes into the volume in one numpy pass.


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


_HEAD = 1 << 16  # bytes of each file read to walk its tags: a CT slice's header is 1-4 KB


def _walked(files: list[Path]) -> list[tuple[Any, Path]] | None:
    """``(tags, file)`` of every DICOM file of the series by the tag walker (files without the
    ``DICM`` prefix skipped, as pydicom refuses them), from the head of each file (the whole file
    if the head is not enough) into one reused buffer: the pixels stay on disk until
    :func:`_fill_walked` reads them into place. None as soon as the walker refuses a file (pydicom
    then reads the series)."""
    out = []
    head = bytearray(_HEAD)
    for name in files:
        try:
            with open(name, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                n = _read_into(f, memoryview(head)[:min(size, _HEAD)])
                if n < 132 or head[128:132] != b"DICM":
                    continue  # not a DICOM file: pydicom raises InvalidDicomError, skipped as well
                try:  # a file that fits in the head is kept whole (bytes); else only its head is
                    tags = read_tags(bytes(head[:n]) if n == size else memoryview(head)[:n], size)
                except WalkerRefused:
                    if n == size:
                        raise
                    f.seek(0)  # a header longer than the head, or data after the pixels: the whole file
                    tags = read_tags(f.read())
        except (OSError, WalkerRefused):
            return None  # pydicom's path reads the series (and names the file in its error)
        rows, cols = getattr(tags, "Rows", 0), getattr(tags, "Columns", 0)
        bits = getattr(tags, "BitsAllocated", 0)
        length = tags.pixel_span[1] if "pixel_span" in tags else len(tags.PixelData)
        if (bits not in (8, 16, 32) or getattr(tags, "SamplesPerPixel", 1) != 1 or getattr(tags, "NumberOfFrames", 1) > 1
                or "ImagePositionPatient" not in tags or "ImageOrientationPatient" not in tags
                or length < rows * cols * (bits // 8) or not rows or not cols):
            return None  # what only pydicom's decoders (or its errors) handle
        out.append((tags, name))
    return out


def _read_into(f: Any, view: memoryview) -> int:
    """Fill ``view`` from the unbuffered file ``f`` (short reads continued); the bytes read."""
    n = 0
    while n < len(view):
        k = f.readinto(view[n:])
        if not k:
            break
        n += k
    return n


def _series(path: Path, datasets: list[tuple[Any, Path]]) -> list[tuple[Any, Path]]:
    """``datasets`` checked: at least one image; :class:`NativeReaderUnsupported` for what the
    native reader does not read (multi-frame files, files without geometry)."""
    if not datasets:
        raise ValueError(f"DICOM {'folder' if path.is_dir() else 'file'} {path} holds no DICOM image")
    for ds, name in datasets:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise NativeReaderUnsupported(f"DICOM file {name} is multi-frame: the native reader reads one slice "
                                          "per file")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"):
            if tag not in ds:
                raise NativeReaderUnsupported(f"DICOM file {name} lacks {tag}: no geometry for the native reader")
    return datasets


def _parsed(files: list[Path]) -> list[tuple[Any, Path]]:
    """``(dataset, file)`` of every DICOM image file by pydicom's ``dcmread``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

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
    return datasets


def _check_series(path: Path, datasets: list[tuple[Any, Path]]) -> tuple[np.ndarray, int, int, list[float]]:
    """One series, one orientation, one pixel spacing, one slice size: ``(orientation, rows, columns,
    pixel spacing)`` of the series, else a ValueError naming the file that differs."""
    first = datasets[0][0]
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for ds, _ in datasets}
    if len(uids) > 1:
        raise ValueError(f"DICOM folder {path} mixes {len(uids)} series (SeriesInstanceUID): one series per folder")
    iop = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    rows, cols = int(first.Rows), int(first.Columns)
    pixel_spacing = [float(v) for v in getattr(first, "PixelSpacing", None) or (1.0, 1.0)]
    first_iop = iop.tolist()
    for ds, name in datasets[1:]:
        other = [float(v) for v in ds.ImageOrientationPatient]
        if other != first_iop and not np.allclose(np.array(other, dtype=np.float64), iop, atol=1e-4):
            other = np.array(other, dtype=np.float64)
            raise ValueError(f"DICOM folder {path} mixes orientations: {name.name} has ImageOrientationPatient "
                             f"{other.round(4).tolist()}, {datasets[0][1].name} {iop.round(4).tolist()}")
        other = [float(v) for v in getattr(ds, "PixelSpacing", None) or (1.0, 1.0)]
        if other != pixel_spacing and not np.allclose(other, pixel_spacing, rtol=0, atol=1e-4):
            raise ValueError(f"DICOM folder {path} mixes pixel spacings: {name.name} has PixelSpacing {other}, "
                             f"{datasets[0][1].name} {pixel_spacing}")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(f"DICOM folder {path} mixes slice sizes: {name.name} is {int(ds.Rows)} x "
                             f"{int(ds.Columns)}, {datasets[0][1].name} {rows} x {cols}")
    return iop, rows, cols, pixel_spacing


def _stack(path: Path, datasets: list[tuple[Any, Path]], iop: np.ndarray,
           pixel_spacing: list[float]) -> tuple[list[tuple[Any, Path]], np.ndarray]:
    """The slices in stacking order and the affine of (z, y, x) indices to LPS mm. Slices are sorted
    by their position along the slice normal, then ordered so that ``InstanceNumber`` increases (as
    MONAI stacks them); uneven spacing (a missing slice?) is an error naming the two files."""
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    dr, dc = pixel_spacing[:2]  # between rows (along col_dir), between columns (along row_dir)
    affine = np.eye(4)
    affine[:3, 1] = col_dir * dr
    affine[:3, 2] = row_dir * dc
    n = len(datasets)
    if n == 1:
        first = datasets[0][0]
        affine[:3, 3] = [float(v) for v in first.ImagePositionPatient]
        affine[:3, 0] = normal / np.linalg.norm(normal) * slice_thickness(first)
        return datasets, affine
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
    return datasets, affine


def _fill_volume(datasets: list[tuple[Any, Path]], rows: int, cols: int, dtype: Any, int16: bool) -> np.ndarray:
    """The (z, y, x) volume of the stacked slices in HU (their rescale applied)."""
    scales = [_rescale(ds) for ds, _ in datasets]
    first_pixels = _dicom_slice(datasets[0][0], datasets[0][1])
    if first_pixels.shape != (rows, cols):
        raise ValueError(f"DICOM file {datasets[0][1]} has pixels of shape {first_pixels.shape}, not one "
                         f"{rows} x {cols} slice")
    rescaled = any(s is not None for s in scales)
    final = result_dtype(np.float64 if rescaled else first_pixels.dtype, dtype)
    if int16 and dtype is None and rescaled and _integer_shift(scales, first_pixels.dtype):
        final = np.dtype(np.int16)
    out = np.empty((len(datasets), rows, cols), dtype=final)

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
    return out


def _stored(tags: Any) -> np.dtype:
    """The dtype of a walked file's stored pixels (what :func:`_dicom_slice` gives)."""
    return np.dtype(f"<{'i' if getattr(tags, 'PixelRepresentation', 0) == 1 else 'u'}{tags.BitsAllocated // 8}")


def _fill_walked(files: list[Path], datasets: list[tuple[Any, Path]], rows: int, cols: int, dtype: Any, int16: bool,
                 source_hash: Any) -> np.ndarray:
    """:func:`_fill_volume` for the walker's series: the same values and dtype, the files visited in
    name order (so that each file's bytes are fed to ``source_hash`` in its order, non-DICOM files
    included), each file's pixels read into one reused buffer and converted from there into their
    slice of the volume (``datasets`` is in stacking order)."""
    scales = [_rescale(ds) for ds, _ in datasets]
    first = _stored(datasets[0][0])
    rescaled = any(s is not None for s in scales)
    final = result_dtype(np.float64 if rescaled else first, dtype)
    if int16 and dtype is None and rescaled and _integer_shift(scales, first):
        final = np.dtype(np.int16)
    out = np.empty((len(datasets), rows, cols), dtype=final)
    slot = {name: k for k, (_, name) in enumerate(datasets)}
    spans = [ds.pixel_span[1] for ds, _ in datasets if "pixel_span" in ds]
    buffer = memoryview(bytearray(max(spans, default=0)))
    for name in files:
        k = slot.get(name)
        if k is None:  # a file pydicom would skip: only hashed
            if source_hash is not None:
                source_hash.update(name, name.read_bytes())
            continue
        ds = datasets[k][0]
        if "pixel_span" in ds:
            offset, length = ds.pixel_span
            with open(name, "rb", buffering=0) as f:
                f.seek(offset)
                if _read_into(f, buffer[:length]) != length:
                    raise ValueError(f"DICOM file {name} changed while it was read: its pixel data ends early")
            data = buffer[:length]
            if source_hash is not None:
                source_hash.update(name, ds.head, data)
        else:
            data = ds.PixelData
            if source_hash is not None:
                source_hash.update(name, data.obj)
        stored = _stored(ds)
        pixels = np.frombuffer(data, dtype=stored, count=rows * cols).reshape(rows, cols)
        shift = ds.BitsAllocated - int(getattr(ds, "BitsStored", ds.BitsAllocated))
        if shift > 0:  # unused high bits, corrected as pydicom does (see _dicom_slice)
            pixels = np.right_shift(np.left_shift(pixels, shift), shift)
        scale = scales[k] if scales[k] is not None or not rescaled else (1.0, 0.0)
        if out.dtype == np.int16 and not _fill_slice_int16(out[k], pixels, scale[1],
                                                           int(getattr(ds, "BitsStored", 16) or 16)):
            out = out.astype(np.float32)  # HU outside int16: float32 (slices filled so far are exact)
        if out.dtype != np.int16:
            _fill_slice(out[k], pixels, scale)
    return out


def read_dicom(path: Path, dtype: Any, int16: bool = False, source_hash: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series folder (or one file) -> ((z, y, x) array, LPS affine of (z, y, x) indices);
    ``int16`` (with ``dtype`` None): int16 HU where the rescale keeps the values integers that fit;
    the files' bytes fed to ``source_hash`` (a SourceHash) as the walker's path reads them."""
    files = dicom_files(path)
    walked = _walked(files)
    datasets = _series(path, walked if walked is not None else _parsed(files))
    iop, rows, cols, pixel_spacing = _check_series(path, datasets)
    datasets, affine = _stack(path, datasets, iop, pixel_spacing)
    if walked is not None:
        return _fill_walked(files, datasets, rows, cols, dtype, int16, source_hash), affine
    return _fill_volume(datasets, rows, cols, dtype, int16), affine


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
