"""CT volume resampling to a new voxel spacing, and its fused crop/window variant.

Public API (stable; the data layer builds on it):

    resample_volume(volume, spacing, new_spacing, *, order=1, fill=-1024.0, out_dtype=None)
        -> the whole volume on the new grid, same kind as ``volume`` (numpy, torch CPU/CUDA, CuPy)
    resample_crop(volume, spacing, new_spacing, centers, size, *, order=1, fill=-1024.0,
                  window=None, out_dtype=None)
        -> (N, D, H, W): N boxes of ``size`` output voxels around ``centers`` (input voxel indices
           (z, y, x)), resampled, optionally HU-windowed to [0, 1], in one pass; writes only the crops
    resampled_shape(shape, spacing, new_spacing) -> (D, H, W) of the full output grid
    resampled_affine(affine, spacing, new_spacing) -> the 4x4 output affine (index (z, y, x) -> world)
    crop_starts(centers, shape, spacing, new_spacing, size) -> (N, 3) int64 first output index of each box
    resample_volume_reference / resample_crop_reference: the float64 PyTorch oracles

Grid convention (DESIGN.md "Spatial conventions"), per array axis (z, y, x) with
``s = new_spacing / spacing``:

* output size ``m = floor(n * spacing / new_spacing + 0.5)`` (at least 1);
* output index ``j`` samples input continuous index ``i = (j + 0.5) * s - 0.5`` (voxel centres
  aligned, physical extent kept), computed as ``s * j + (0.5 * s - 0.5)`` in float64 exactly like
  ``scipy.ndimage.affine_transform(matrix=diag(s), offset=0.5 * s - 0.5)``;
* every output voxel of the full grid lies inside the input's physical extent; where its centre
  falls in the outer half voxel of the input, the edge voxel is used (scipy ``mode="nearest"``),
  so a resampled CT never gains a frame of ``fill``;
* a crop box voxel outside the full output grid (a box hanging over the volume's edge) is
  ``fill`` (then windowed, when a window is given): the crop equals resample-then-crop with the
  resampled volume padded by ``fill``. A box whose centre lies outside the volume is an error.

Orders: 0 (nearest; ties round up, as scipy), 1 (trilinear) and 3 (cubic B-spline, scipy's recipe
for mode="nearest": edge-pad by 12 voxels, prefilter with mirror ends, sample the padded spline;
it overshoots at sharp edges like scipy's, so HU may leave the input range).
Backends (``lungcore.backend``): ``cpu`` = the OpenMP C++ core ``lungcore._C``, ``cupy`` = CUDA C++
(``csrc/cuda/resample.cu``) compiled at run time through CuPy NVRTC (CUDA torch tensors go through
DLPack, no host round trip), ``reference`` = the PyTorch oracle.

Example:
    >>> import numpy as np
    >>> from lungcore.ops import resample_volume, resample_crop
    >>> ct = np.full((40, 64, 64), -1000, dtype=np.int16)
    >>> resample_volume(ct, (2.5, 0.7, 0.7), (1.0, 1.0, 1.0)).shape
    (100, 45, 45)
    >>> resample_crop(ct, (2.5, 0.7, 0.7), 1.0, [[20, 32, 32]], (16, 32, 32),
    ...               window=(-1200.0, 600.0)).shape
    (1, 16, 32, 32)
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungcore import backend, checks

__all__ = [
    "resample_volume",
    "resample_crop",
    "resampled_shape",
    "resampled_affine",
    "crop_starts",
    "resample_volume_reference",
    "resample_crop_reference",
    "cuda_source_dir",
]

backend.register_op("resample_volume", ("cpu", "cupy"),
                    preference={"cpu": ("cpu", "reference"), "cuda": ("cupy", "reference")})
backend.register_op("resample_crop", ("cpu", "cupy"),
                    preference={"cpu": ("cpu", "reference"), "cuda": ("cupy", "reference")})

_IN_DTYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64)
_C_TYPES = {np.dtype(np.int8): "signed char", np.dtype(np.uint8): "unsigned char",
            np.dtype(np.int16): "short", np.dtype(np.uint16): "unsigned short",
            np.dtype(np.int32): "int", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_MAX_OUTPUT_VOXELS = 2**34


# ----------------------------------------------------------------------------- geometry
def _spacing3(name: str, value: Any, allow_scalar: bool) -> tuple[float, float, float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if np.isscalar(value) and not isinstance(value, (str, bytes)):
        if not allow_scalar:
            raise ValueError(f"{name} must be 3 numbers (z, y, x) in mm, got a scalar {value!r}")
        value = (value, value, value)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be 3 numbers (z, y, x) in mm, got {value!r}") from exc
    if arr.shape != (3,):
        raise ValueError(f"{name} must be 3 numbers (z, y, x) in mm, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and > 0 on every axis, got {tuple(arr.tolist())}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def _scale_offset(spacing, new_spacing) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale = tuple(float(new) / float(old) for old, new in zip(spacing, new_spacing))
    offset = tuple(0.5 * s - 0.5 for s in scale)
    return scale, offset


def resampled_shape(shape: Sequence[int], spacing: Any, new_spacing: Any) -> tuple[int, int, int]:
    """The full output grid ``round(n * spacing / new_spacing)`` per axis (half up, at least 1).

    Example:
        >>> resampled_shape((160, 512, 512), (2.5, 0.7, 0.7), 1.0)
        (400, 358, 358)
    """
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries (z, y, x), got {tuple(shape)}")
    spacing = _spacing3("spacing", spacing, allow_scalar=False)
    new_spacing = _spacing3("new_spacing", new_spacing, allow_scalar=True)
    return tuple(max(1, int(math.floor(int(n) * old / new + 0.5)))
                 for n, old, new in zip(shape, spacing, new_spacing))  # type: ignore[return-value]


def resampled_affine(affine: Any, spacing: Any, new_spacing: Any) -> np.ndarray:
    """The 4x4 affine of the resampled grid: output index (z, y, x, 1) -> the same world frame.

    ``affine`` maps input indices (z, y, x) to world millimetres; the output affine is
    ``affine @ T`` with ``T`` the index map ``i = s * j + (0.5 * s - 0.5)``, so voxel centres
    and the physical extent (corners at index -0.5) are those of the input.

    Example:
        >>> import numpy as np
        >>> resampled_affine(np.diag([2.5, 0.7, 0.7, 1.0]), (2.5, 0.7, 0.7), 1.0)[:3, 3]
        array([ 0.75, -0.15, -0.15])
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    spacing = _spacing3("spacing", spacing, allow_scalar=False)
    new_spacing = _spacing3("new_spacing", new_spacing, allow_scalar=True)
    scale, offset = _scale_offset(spacing, new_spacing)
    t = np.eye(4)
    t[:3, :3] = np.diag(scale)
    t[:3, 3] = offset
    return a @ t


def _centers(centers: Any, shape: Sequence[int]) -> np.ndarray:
    if isinstance(centers, torch.Tensor):
        centers = centers.detach().cpu().numpy()
    elif hasattr(centers, "__cuda_array_interface__") and hasattr(centers, "get"):
        centers = centers.get()
    try:
        c = np.asarray(centers, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"centers must be numbers of shape (N, 3), got {type(centers).__name__}") from exc
    if c.ndim == 1 and c.shape[0] == 3:
        c = c[None]
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"centers must have shape (N, 3) (z, y, x input voxel indices), got {c.shape}")
    bad = ~np.isfinite(c).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"centers[{i}] is {c[i].tolist()}: centers must be finite")
    n = np.asarray(shape, dtype=np.float64)
    outside = ((c < -0.5) | (c > n - 0.5)).any(axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"centers[{i}] = {c[i].tolist()} lies outside the volume of shape {tuple(shape)} "
                         f"(valid input indices are [-0.5, n - 0.5] per axis)")
    return c


def _size3(size: Any) -> tuple[int, int, int]:
    if isinstance(size, (int, np.integer)):
        size = (size, size, size)
    try:
        s = tuple(int(v) for v in size)
        ok = all(float(v) == int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"size must be 3 positive integers (D, H, W), got {size!r}") from exc
    if len(s) != 3 or not ok or min(s) < 1:
        raise ValueError(f"size must be 3 positive integers (D, H, W) in output voxels, got {size!r}")
    return s  # type: ignore[return-value]


def crop_starts(centers: Any, shape: Sequence[int], spacing: Any, new_spacing: Any,
                size: Any) -> np.ndarray:
    """First output-grid index (z, y, x) of each box, as an (N, 3) int64 array.

    A centre ``c`` (input voxel index) sits at output index ``u = (c + 0.5) / s - 0.5``; the box
    starts at ``floor(u + 0.5) - size // 2``, i.e. the output voxel nearest the centre is at
    position ``size // 2`` of the box (the exact middle for odd sizes).

    Example:
        >>> crop_starts([[80.0, 256.0, 256.0]], (160, 512, 512), (2.5, 0.7, 0.7), 1.0, (16, 64, 64))
        array([[193, 147, 147]])
    """
    spacing = _spacing3("spacing", spacing, allow_scalar=False)
    new_spacing = _spacing3("new_spacing", new_spacing, allow_scalar=True)
    c = _centers(centers, shape)
    size = _size3(size)
    scale, _ = _scale_offset(spacing, new_spacing)
    u = (c + 0.5) / np.asarray(scale) - 0.5
    return (np.floor(u + 0.5).astype(np.int64) - np.asarray(size, dtype=np.int64) // 2)


# ----------------------------------------------------------------------------- inputs
def _kind(volume: Any) -> str:
    if isinstance(volume, torch.Tensor):
        return "torch"
    if isinstance(volume, np.ndarray):
        return "numpy"
    if hasattr(volume, "__cuda_array_interface__") and type(volume).__module__.startswith("cupy"):
        return "cupy"
    raise TypeError(f"volume must be a numpy array, a torch tensor or a CuPy array, got {type(volume).__name__}")


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return np.dtype(torch.empty((), dtype=dtype).numpy().dtype) if dtype != torch.bfloat16 else np.dtype("float32")
    return np.dtype(dtype)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _in_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype the kernels read (bool -> uint8, float16 -> float32); TypeError for others."""
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype not in [np.dtype(d) for d in _IN_DTYPES]:
        raise TypeError(f"volume dtype must be one of int8, uint8, int16, uint16, int32, float16, float32, "
                        f"float64 or bool, got {dtype}")
    return dtype


def _out_dtype(out_dtype: Any, in_dtype: np.dtype, order: int, window: Any) -> np.dtype:
    if out_dtype is None:
        if order == 0 and window is None:
            return in_dtype
        return np.dtype(np.float64) if in_dtype == np.float64 else np.dtype(np.float32)
    try:
        dt = _np_dtype(out_dtype)
    except TypeError as exc:
        raise TypeError(f"out_dtype must be a numpy/torch dtype, got {out_dtype!r}") from exc
    if dt not in (np.dtype(np.float32), np.dtype(np.float64), in_dtype):
        raise TypeError(f"out_dtype must be float32, float64 or the volume's dtype ({in_dtype}), got {dt}")
    if window is not None and not np.issubdtype(dt, np.floating):
        raise TypeError(f"out_dtype must be floating when a window is given (values in [0, 1]), got {dt}")
    return dt


def _window(window: Any) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"window must be (low, high) in HU, got {window!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"window must be finite (low, high) with low < high, got {window!r}")
    return lo, hi


def _order(order: Any) -> int:
    if isinstance(order, bool):
        raise ValueError(f"order must be one of (0, 1, 3), got {order!r}")
    return int(checks.one_of("order", order, (0, 1, 3)))


def _fill(fill: Any) -> float:
    try:
        f = float(fill)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"fill must be a number (HU), got {fill!r}") from exc
    if not math.isfinite(f):
        raise ValueError(f"fill must be finite, got {fill!r}")
    return f


# ----------------------------------------------------------------------------- reference
_SPLINE_PAD = 12  # scipy's pad for mode="nearest" before the spline prefilter (|z|^12 ~ 1e-7)


def _axis_table(start: int, size: int, grid: int, n: int, scale: float, offset: float, order: int):
    """(idx (size, K), weights (size, K), valid (size,)) for one axis; K = 1, 2, 4 taps for order 0, 1, 3."""
    j = np.arange(start, start + size, dtype=np.int64)
    valid = (j >= 0) & (j < grid)
    x = scale * j.astype(np.float64) + offset
    if order == 0:
        i0 = np.clip(np.floor(x + 0.5), 0, n - 1).astype(np.int64)
        return i0[:, None], np.ones((size, 1)), valid
    f = np.floor(x)
    u = x - f
    a = f.astype(np.int64)
    if order == 1:
        u = np.where((a < 0) | (a >= n - 1), 0.0, u)
        i0 = np.clip(a, 0, n - 1)
        return np.stack([i0, np.minimum(i0 + 1, n - 1)], 1), np.stack([1 - u, u], 1), valid
    w = np.stack([(1 - u) ** 3 / 6, (4 - 6 * u ** 2 + 3 * u ** 3) / 6, (1 + 3 * u + 3 * u ** 2 - 3 * u ** 3) / 6,
                  u ** 3 / 6], 1)
    return np.clip(a[:, None] + np.arange(-1, 3), 0, n - 1), w, valid


def _spline_coefficients_reference(vol: torch.Tensor) -> torch.Tensor:
    """Edge-pad by 12, then solve (c[k-1] + 4 c[k] + c[k+1]) / 6 = x[k] (mirror ends) per axis, densely."""
    for axis in range(3):
        n = vol.shape[axis]
        idx = torch.clamp(torch.arange(-_SPLINE_PAD, n + _SPLINE_PAD, device=vol.device), 0, n - 1)
        vol = vol.index_select(axis, idx)
        m = vol.shape[axis]
        mat = torch.zeros(m, m, dtype=torch.float64, device=vol.device)
        k = torch.arange(m, device=vol.device)
        mat[k, k] = 4 / 6
        mat[k[1:], k[:-1]] = 1 / 6
        mat[k[:-1], k[1:]] = 1 / 6
        mat[0, 1] = mat[m - 1, m - 2] = 2 / 6  # mirror: c[-1] = c[1], c[m] = c[m-2]
        inv = torch.linalg.inv(mat)
        vol = torch.movedim(torch.tensordot(inv, torch.movedim(vol, axis, 0), dims=1), 0, axis)
    return vol


def _boxes_reference(volume: torch.Tensor, starts: np.ndarray, size: Sequence[int], grid: Sequence[int],
                     scale: Sequence[float], offset: Sequence[float], order: int, fill: float,
                     window: tuple[float, float] | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Gather formulation in float64 (differentiable in ``volume``): sum over the K^3 taps."""
    vol = volume.to(torch.float64)
    dev = volume.device
    if order == 3:
        vol = _spline_coefficients_reference(vol)
        offset = [o + _SPLINE_PAD for o in offset]
    outs = []
    for b in range(starts.shape[0]):
        tabs = [_axis_table(int(starts[b, a]), int(size[a]), int(grid[a]), int(vol.shape[a]),
                            scale[a], offset[a], order) for a in range(3)]
        (iz, wz, vz), (iy, wy, vy), (ix, wx, vx) = [
            (torch.as_tensor(i, device=dev), torch.as_tensor(w, device=dev, dtype=torch.float64),
             torch.as_tensor(v, device=dev)) for i, w, v in tabs]
        out = torch.zeros(tuple(int(v) for v in size), dtype=torch.float64, device=dev)
        for qz in range(iz.shape[1]):
            for qy in range(iy.shape[1]):
                for qx in range(ix.shape[1]):
                    weight = wz[:, qz, None, None] * wy[None, :, qy, None] * wx[None, None, :, qx]
                    out = out + weight * vol[iz[:, qz, None, None], iy[None, :, qy, None], ix[None, None, :, qx]]
        valid = vz[:, None, None] & vy[None, :, None] & vx[None, None, :]
        out = torch.where(valid, out, torch.full_like(out, fill))
        if window is not None:
            out = (out.clamp(window[0], window[1]) - window[0]) / (window[1] - window[0])
        outs.append(out)
    result = torch.stack(outs) if outs else vol.new_empty((0, *size))
    if not out_dtype.is_floating_point:
        info = torch.iinfo(out_dtype)
        result = torch.round(result).clamp(info.min, info.max)
    return result.to(out_dtype)


def resample_volume_reference(volume: torch.Tensor, spacing: Any, new_spacing: Any, *, order: int = 1,
                              fill: float = -1024.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch float64 oracle of :func:`resample_volume` (torch tensor in and out).

    Example:
        >>> import torch
        >>> resample_volume_reference(torch.zeros(4, 5, 6), (2.0, 1.0, 1.0), 1.0).shape
        torch.Size([8, 5, 6])
    """
    checks.tensor("volume", volume, ndim=3)
    spacing = _spacing3("spacing", spacing, allow_scalar=False)
    new_spacing = _spacing3("new_spacing", new_spacing, allow_scalar=True)
    order = _order(order)
    grid = resampled_shape(volume.shape, spacing, new_spacing)
    scale, offset = _scale_offset(spacing, new_spacing)
    dt = _torch_dtype(_out_dtype(out_dtype, _in_dtype(_np_dtype(volume.dtype)), order, None))
    return _boxes_reference(volume, np.zeros((1, 3), np.int64), grid, grid, scale, offset, order,
                            _fill(fill), None, dt)[0]


def resample_crop_reference(volume: torch.Tensor, spacing: Any, new_spacing: Any, centers: Any, size: Any, *,
                            order: int = 1, fill: float = -1024.0, window: Any = None,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch float64 oracle of :func:`resample_crop` (torch tensor in and out)."""
    checks.tensor("volume", volume, ndim=3)
    spacing = _spacing3("spacing", spacing, allow_scalar=False)
    new_spacing = _spacing3("new_spacing", new_spacing, allow_scalar=True)
    order = _order(order)
    win = _window(window)
    size = _size3(size)
    starts = crop_starts(centers, volume.shape, spacing, new_spacing, size)
    grid = resampled_shape(volume.shape, spacing, new_spacing)
    scale, offset = _scale_offset(spacing, new_spacing)
    dt = _torch_dtype(_out_dtype(out_dtype, _in_dtype(_np_dtype(volume.dtype)), order, win))
    return _boxes_reference(volume, starts, size, grid, scale, offset, order, _fill(fill), win, dt)


# ----------------------------------------------------------------------------- CPU (C++)
def _cpu_boxes(vol: np.ndarray, starts: np.ndarray, size, grid, scale, offset, order, fill, window,
               out_dtype: np.dtype) -> np.ndarray:
    from lungcore import _C

    if order == 3:  # scipy's recipe for mode="nearest": edge-pad by 12, prefilter, sample the padded spline
        coef_dtype = np.float64 if np.float64 in (vol.dtype, out_dtype) or vol.dtype == np.int32 else np.float32
        vol = np.pad(vol.astype(coef_dtype, copy=False), _SPLINE_PAD, mode="edge")
        _C.spline_prefilter3(vol, torch.get_num_threads())
        offset = tuple(o + _SPLINE_PAD for o in offset)
    out = np.empty((starts.shape[0], *size), dtype=out_dtype)
    finite = _C.resample_boxes(vol, out, np.ascontiguousarray(starts, dtype=np.int64), tuple(grid),
                               tuple(scale), tuple(offset), order, fill, window,
                               torch.get_num_threads())  # the threads torch uses (1 in DataLoader workers)
    backend.record_launch("resample.cpu_boxes")
    if not finite:
        raise ValueError("volume holds NaN or inf values where it is sampled")
    return out


# ----------------------------------------------------------------------------- CUDA (CuPy)
def cuda_source_dir() -> Path:
    """Folder holding the CUDA sources: ``lungcore/_cuda`` in a wheel, ``csrc/cuda`` in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_cuda", here.parent / "csrc" / "cuda"):
        if (candidate / "resample.cu").is_file():
            return candidate
    try:  # editable installs map the package lungcore._cuda onto csrc/cuda
        import importlib.resources

        root = importlib.resources.files("lungcore._cuda")
        if root.joinpath("resample.cu").is_file():
            return Path(str(root))
    except (ModuleNotFoundError, TypeError):
        pass
    raise FileNotFoundError("CUDA sources (resample.cu) not found next to lungcore or in csrc/cuda")


@functools.lru_cache(maxsize=None)
def _cuda_module():
    import cupy

    source = (cuda_source_dir() / "resample.cu").read_text()
    names = _kernel_names()
    # CuPy caches the compiled module on disk (~/.cupy/kernel_cache), so NVRTC runs once per machine
    return cupy.RawModule(code=source, options=("--std=c++14",), name_expressions=names)


def _kernel_names() -> list[str]:
    """Every kernel instantiation the CuPy module compiles (the nvcc test compiles the same)."""
    names = [_kernel_name(i, o) for i in map(np.dtype, _IN_DTYPES)
             for o in dict.fromkeys([np.dtype(np.float32), np.dtype(np.float64), i])]
    names += [_kernel_name(np.dtype(c), np.dtype(o)) for c in (np.float32, np.float64) for o in _IN_DTYPES
              if not np.issubdtype(o, np.floating)]  # order 3: float coefficients -> integer output
    return names + [f"lungcore_spline_prefilter3<{t}>" for t in ("float", "double")]


def _kernel_name(in_dtype: np.dtype, out_dtype: np.dtype) -> str:
    return f"lungcore_resample_boxes<{_C_TYPES[in_dtype]}, {_C_TYPES[out_dtype]}>"


def _cupy_boxes(vol, starts: np.ndarray, size, grid, scale, offset, order, fill, window, out_dtype: np.dtype):
    import cupy

    in_dtype = np.dtype(vol.dtype)
    n_box = int(starts.shape[0])
    d, h, w = (int(v) for v in size)
    out = cupy.empty((n_box, d, h, w), dtype=out_dtype)
    if out.size == 0:
        return out
    if h > 65535:
        raise ValueError(f"size: the CUDA kernel supports at most 65535 rows per slice, got {h}")
    module = _cuda_module()
    if order == 3:  # scipy's recipe for mode="nearest": edge-pad by 12, prefilter, sample the padded spline
        coef = np.float64 if np.float64 in (in_dtype, out_dtype) or in_dtype == np.int32 else np.float32
        vol = cupy.pad(vol.astype(coef, copy=False), _SPLINE_PAD, mode="edge")
        prefilter = module.get_function(f"lungcore_spline_prefilter3<{_C_TYPES[np.dtype(coef)]}>")
        n0, n1, n2 = vol.shape
        for outer, n, inner in ((1, n0, n1 * n2), (n0, n1, n2), (n0 * n1, n2, 1)):
            prefilter(((outer * inner + 255) // 256,), (256,), (vol, np.int64(outer), np.int64(n), np.int64(inner)))
        backend.record_launch("resample.cupy_prefilter")
        offset = tuple(o + _SPLINE_PAD for o in offset)
        in_dtype = np.dtype(coef)
    kernel = module.get_function(_kernel_name(in_dtype, out_dtype))
    starts_dev = cupy.asarray(np.ascontiguousarray(starts, dtype=np.int64))
    bad = cupy.zeros(1, dtype=np.int32)
    bx = 32
    while bx < w and bx < 128:
        bx *= 2
    strides = [s // vol.itemsize for s in vol.strides]
    lo, hi = window if window is not None else (0.0, 1.0)
    i64, f64 = np.int64, np.float64
    args = (vol, out, starts_dev, i64(n_box), i64(d), i64(h), i64(w),
            *(i64(v) for v in vol.shape), *(i64(v) for v in strides), *(i64(v) for v in grid),
            *(f64(v) for v in scale), *(f64(v) for v in offset),
            np.int32(order), f64(fill), np.int32(window is not None), f64(lo), f64(hi), bad)
    kernel(((w + bx - 1) // bx, h, min(n_box * d, 65535)), (bx, 1, 1), args)
    backend.record_launch("resample.cupy_boxes")
    if np.issubdtype(in_dtype, np.floating) and int(bad.get()[0]):  # 4-byte readback, only for float input
        raise ValueError("volume holds NaN or inf values where it is sampled")
    return out


# ----------------------------------------------------------------------------- dispatch
def _run_boxes(vol: Any, kind: str, starts: np.ndarray, size, grid, scale, offset, order, fill, window,
               out_dtype: np.dtype, op: str) -> Any:
    """Run the boxes on ``vol`` (already a supported dtype) with the backend of ``op``; same kind out."""
    if kind == "torch":
        return torch.ops.lungcore.resample_boxes(vol, starts.reshape(-1).tolist(), list(size), list(grid),
                                                 list(scale), list(offset), order, fill,
                                                 None if window is None else list(window),
                                                 _torch_dtype(out_dtype))
    if kind == "cupy":
        which = backend.backend_for(op, "cuda")
        if which == "cupy":
            return _cupy_boxes(vol, starts, size, grid, scale, offset, order, fill, window, out_dtype)
        import cupy

        host = _run_boxes(cupy.asnumpy(vol), "numpy", starts, size, grid, scale, offset, order, fill, window,
                          out_dtype, op)
        return cupy.asarray(host)
    which = backend.backend_for(op, "cpu")
    if which == "cpu":
        return _cpu_boxes(vol, starts, size, grid, scale, offset, order, fill, window, out_dtype)
    out = _checked(_boxes_reference(torch.from_numpy(vol), starts, size, grid, scale, offset, order, fill,
                                    window, _torch_dtype(out_dtype)), vol.dtype)
    return out.numpy()


def _checked(out: torch.Tensor, in_dtype: Any) -> torch.Tensor:
    """The reference path raises on NaN/inf like the kernels do (float inputs only)."""
    if np.issubdtype(_np_dtype(in_dtype), np.floating) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise ValueError("volume holds NaN or inf values where it is sampled")
    return out


@torch.library.custom_op("lungcore::resample_boxes", mutates_args=())
def _resample_boxes_op(volume: torch.Tensor, starts: list[int], size: list[int], grid: list[int],
                       scale: list[float], offset: list[float], order: int, fill: float,
                       window: list[float] | None, out_dtype: torch.dtype) -> torch.Tensor:
    st = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    win = None if window is None else (float(window[0]), float(window[1]))
    odt = _np_dtype(out_dtype)
    device_type = volume.device.type
    which = backend.backend_for("resample_crop", device_type)
    if which == "reference":
        return _checked(_boxes_reference(volume, st, size, grid, scale, offset, order, fill, win, out_dtype),
                        volume.dtype)
    if device_type == "cuda" and which == "cupy":
        import cupy

        with cupy.cuda.Device(volume.device.index), \
                cupy.cuda.ExternalStream(torch.cuda.current_stream(volume.device).cuda_stream):
            out = _cupy_boxes(cupy.from_dlpack(volume.detach()), st, size, grid, scale, offset, order, fill,
                              win, odt)
        return torch.from_dlpack(out)
    host = volume.detach().cpu()
    out = _cpu_boxes(host.numpy(), st, size, grid, scale, offset, order, fill, win, odt)
    return torch.from_numpy(out).to(volume.device)


@_resample_boxes_op.register_fake
def _(volume, starts, size, grid, scale, offset, order, fill, window, out_dtype):
    return volume.new_empty((len(starts) // 3, *size), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    volume, starts, size, grid, scale, offset, order, fill, window, _ = inputs
    ctx.shape, ctx.dtype, ctx.device = volume.shape, volume.dtype, volume.device
    ctx.params = (starts, size, grid, scale, offset, order, window)
    ctx.save_for_backward(volume if window is not None else None)


def _backward(ctx, grad):
    starts, size, grid, scale, offset, order, window = ctx.params
    if not ctx.dtype.is_floating_point:
        return (None,) * 10
    (saved,) = ctx.saved_tensors
    with torch.enable_grad():
        probe = (saved.detach() if saved is not None else torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device))
        probe = probe.to(torch.float64).requires_grad_(True)
        out = _boxes_reference(probe, np.asarray(starts, np.int64).reshape(-1, 3), size, grid, scale, offset,
                               order, 0.0, None if window is None else tuple(window), torch.float64)
        (g,) = torch.autograd.grad(out, probe, grad.to(torch.float64))
    return (g.to(ctx.dtype),) + (None,) * 9


_resample_boxes_op.register_autograd(_backward, setup_context=_setup_context)


def _prepare(volume: Any) -> tuple[Any, str, np.dtype]:
    kind = _kind(volume)
    if kind == "torch":
        if type(volume) is not torch.Tensor:  # e.g. MONAI MetaTensor: its affine would be stale after resampling
            volume = volume.as_subclass(torch.Tensor)
        if volume.dim() != 3:
            raise ValueError(f"volume must be 3-D (z, y, x), got shape {tuple(volume.shape)}")
        if volume.dtype in (torch.float16, torch.bfloat16):
            volume = volume.float()
        elif volume.dtype == torch.bool:
            volume = volume.to(torch.uint8)
        in_dtype = _in_dtype(_np_dtype(volume.dtype))
        return volume, kind, in_dtype
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {tuple(volume.shape)}")
    in_dtype = _in_dtype(np.dtype(volume.dtype))
    if in_dtype != volume.dtype:
        volume = volume.astype(in_dtype)
    if any(s % volume.itemsize for s in volume.strides):
        volume = volume.copy()
    if min(volume.shape) < 1:
        raise ValueError(f"volume must not be empty, got shape {tuple(volume.shape)}")
    return volume, kind, in_dtype


def resample_volume(volume: Any, spacing: Any, new_spacing: Any, *, order: int = 1, fill: float = -1024.0,
                    out_dtype: Any = None) -> Any:
    """Resample a CT ``volume`` (z, y, x) from ``spacing`` to ``new_spacing`` (mm, array-axis order).

    Args:
        volume: 3-D numpy array, torch tensor (CPU or CUDA) or CuPy array; int8/uint8/int16/uint16/
            int32/float16/float32/float64/bool, any strides. The result is of the same kind and
            device (CUDA: DLPack in and out, no host round trip); a torch subclass such as MONAI's
            MetaTensor comes back as a plain tensor (its affine would be stale: use
            :func:`resampled_affine`).
        spacing: (sz, sy, sx) of ``volume`` in mm.
        new_spacing: target (sz, sy, sx) in mm, or one number for isotropic voxels.
        order: 0 nearest, 1 trilinear, 3 cubic B-spline (equal to scipy's order 3, mode "nearest").
        fill: value outside the input (HU); the full grid never needs it (edge voxels are
            extended by half a voxel), crops hanging over the edge do.
        out_dtype: float32, float64 or the input dtype (integers round to nearest and saturate).
            Default: the input dtype for order 0, else float32 (float64 for float64 input).

    Returns:
        The volume on the grid of shape :func:`resampled_shape`; its affine is
        :func:`resampled_affine`.

    Example:
        >>> import torch
        >>> resample_volume(torch.zeros(10, 20, 20), (2.0, 0.5, 0.5), (1.0, 1.0, 1.0)).shape
        torch.Size([20, 10, 10])
    """
    spacing = _spacing3("spacing", spacing, allow_scalar=False)
    new_spacing = _spacing3("new_spacing", new_spacing, allow_scalar=True)
    order = _order(order)
    fill = _fill(fill)
    vol, kind, in_dtype = _prepare(volume)
    odt = _out_dtype(out_dtype, in_dtype, order, None)
    grid = resampled_shape(vol.shape, spacing, new_spacing)
    if math.prod(grid) > _MAX_OUTPUT_VOXELS:
        raise ValueError(f"new_spacing {new_spacing} gives an output of shape {grid}: too large")
    scale, offset = _scale_offset(spacing, new_spacing)
    out = _run_boxes(vol, kind, np.zeros((1, 3), np.int64), grid, grid, scale, offset, order, fill, None,
                     odt, "resample_volume")
    return out[0]


def resample_crop(volume: Any, spacing: Any, new_spacing: Any, centers: Any, size: Any, *, order: int = 1,
                  fill: float = -1024.0, window: Any = None, out_dtype: Any = None) -> Any:
    """Resample, HU-window and crop N fixed-size boxes in one pass, writing only the crops.

    Box ``b`` covers output-grid indices ``crop_starts(...)[b] + [0, size)``; it equals
    ``resample_volume`` then a crop, the resampled volume padded with ``fill`` where the box hangs
    over the edge; with ``window=(low, high)`` every value (fill included) becomes
    ``(clip(v, low, high) - low) / (high - low)`` in [0, 1].

    Args:
        volume, spacing, new_spacing, order, fill: as in :func:`resample_volume`.
        centers: (N, 3) or (3,) box centres in *input* voxel indices (z, y, x), floats allowed;
            each must lie inside the volume ([-0.5, n - 0.5] per axis).
        size: (D, H, W) of every box in output voxels (one int for a cube).
        window: optional HU window (low, high), e.g. (-1200, 600) for the lung window.
        out_dtype: as in :func:`resample_volume` (floating when a window is given).

    Returns:
        (N, D, H, W), same kind and device as ``volume``.

    Example:
        >>> import numpy as np
        >>> ct = np.full((60, 128, 128), -800, dtype=np.int16)
        >>> boxes = resample_crop(ct, (2.5, 0.7, 0.7), 1.0, [[30, 64, 64], [10, 20, 100]],
        ...                       (16, 64, 64), window=(-1200, 600))
        >>> boxes.shape, float(boxes[0, 8, 32, 32])
        ((2, 16, 64, 64), 0.2222222089767456)
    """
    spacing = _spacing3("spacing", spacing, allow_scalar=False)
    new_spacing = _spacing3("new_spacing", new_spacing, allow_scalar=True)
    order = _order(order)
    fill = _fill(fill)
    win = _window(window)
    size = _size3(size)
    vol, kind, in_dtype = _prepare(volume)
    odt = _out_dtype(out_dtype, in_dtype, order, win)
    starts = crop_starts(centers, vol.shape, spacing, new_spacing, size)
    grid = resampled_shape(vol.shape, spacing, new_spacing)
    scale, offset = _scale_offset(spacing, new_spacing)
    return _run_boxes(vol, kind, starts, size, grid, scale, offset, order, fill, win, odt, "resample_crop")
