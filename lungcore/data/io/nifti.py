"""The native NIfTI reader: nibabel's header and one read of the voxels, which are already in
(z, y, x) C order; what MONAI's NibabelReader returns (values, dtype, affine), faster.

Example:
    >>> import tempfile
    >>> import numpy as np
    >>> from lungcore.data.io.writers import write_nifti
    >>> path = write_nifti(f"{tempfile.mkdtemp()}/ct.nii.gz", np.full((2, 3, 4), -1000.0), np.eye(4))
    >>> array, affine = read_nifti(path, None)
    >>> array.shape, array.dtype, int(array[0, 0, 0])
    ((2, 3, 4), dtype('int16'), -1000)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lungcore.data.io.image import RAS_TO_LPS, XYZ_TO_ZYX, canonical, result_dtype
from lungcore.data.io.inflate import gunzip

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


def read_nifti(path: Path, dtype: Any, source_hash: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI (or anything nibabel loads) -> ((z, y, x) array, LPS affine of (z, y, x) indices);
    a ``.nii.gz`` read on the fast path feeds its compressed bytes to ``source_hash``."""
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
            raw = gunzip(path, int(proxy.offset), count * stored.itemsize, source_hash).view(stored)
        else:
            raw = np.fromfile(path, dtype=stored, count=count, offset=int(proxy.offset))
            if raw.size < count:
                raise ValueError(f"CT image {path} is truncated: {raw.size} of {count} voxels")
        # numpy's own dtype object for the type (not the header's equal '<i2'): what MONAI's path
        # returns, and what code comparing dtypes by identity expects
        raw = raw.view(canonical(stored)) if stored.isnative else raw.astype(canonical(stored))
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
        final = result_dtype(raw.dtype, dtype)
        if raw.dtype == final and raw.dtype.isnative:
            return (raw if raw.dtype is final else raw.view(final)), affine
        return raw.astype(final), affine
    final = result_dtype(probe.dtype, dtype)
    out = np.empty(raw.shape, dtype=final)
    for k in range(raw.shape[0]):  # slab by slab: no full-size float64 temporary
        out[k] = apply_read_scaling(raw[k], slope, inter)
    return out, affine
