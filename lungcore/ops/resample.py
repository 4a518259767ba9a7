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
Backends (``lungcore.backend``): ``cpu`` = the OpenMP C++ core ``lungcore._C`` (csrc/cpu/resample.cpp),
``cupy`` = CUDA C++ (csrc/cuda/resample.cu) launched by ``lungcore.cuda_kernels.resample`` through
CuPy NVRTC, ``reference`` = the float64 PyTorch oracles below. Every input kind (numpy, torch CPU or
CUDA, CuPy) goes through the one registered op ``lungcore::resample_boxes`` (numpy by sharing
memory, CuPy through DLPack: no copies) and its registered backward op, which runs the forward's
transpose as a kernel on each backend (C++ without atomics, CUDA with atomicAdd). The public
functions choose the backend and pass it to the op, so the backward runs on the forward's backend.

torch.compile: for a torch tensor ``volume`` whose other arguments are Python numbers, lists or
tuples and torch dtypes (or None), :func:`resample_volume` and :func:`resample_crop` trace with
``fullgraph=True`` (results and gradients equal eager's bit for bit; tested on CPU): the checks
are plain Python, the backend choice is traced (dynamo guards on it: forcing another backend
recompiles) and the op is one opaque node, forward and backward. numpy or CuPy volumes, and
spacings, centres, sizes or dtypes given as numpy values, tensors or strings, are checked with
numpy: they compile only with graph breaks (``fullgraph=False``). Box starts are placed by a
plain-Python loop while tracing and for a few boxes, by numpy in eager calls with many (10,000
boxes: ~0.5 ms instead of ~30 ms): the same starts and the same errors either way.

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

import math
from collections.abc import Sequence
from typing import Any, Optional

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
]

for _op in ("resample_volume", "resample_crop"):
    backend.register_op(_op, ("cpu", "cupy"), preference={"cpu": ("cpu", "reference"), "cuda": ("cupy", "reference")})

_MAX_OUTPUT_VOXELS = 2**34
_SPLINE_PAD = 12  # scipy's pad for mode="nearest" before the spline prefilter (|z|^12 ~ 1e-7)


# ----------------------------------------------------------------------------- geometry
def _scale_offset(spacing, new_spacing) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale = tuple(float(new) / float(old) for old, new in zip(spacing, new_spacing))
    offset = tuple(0.5 * s - 0.5 for s in scale)
    return scale, offset


def _grid(shape: Sequence[int], spacing: Any, new_spacing: Any):
    """(full output grid, scale, offset) of a volume of ``shape``; the spacings checked."""
    spacing = checks.spacing3("spacing", spacing)
    new_spacing = checks.spacing3("new_spacing", new_spacing, allow_scalar=True)
    scale, offset = _scale_offset(spacing, new_spacing)
    return resampled_shape(shape, spacing, new_spacing), scale, offset


def resampled_shape(shape: Sequence[int], spacing: Any, new_spacing: Any) -> tuple[int, int, int]:
    """The full output grid ``round(n * spacing / new_spacing)`` per axis (half up, at least 1).

    Example:
        >>> resampled_shape((160, 512, 512), (2.5, 0.7, 0.7), 1.0)
        (400, 358, 358)
    """
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries (z, y, x), got {tuple(shape)}")
    spacing = checks.spacing3("spacing", spacing)
    new_spacing = checks.spacing3("new_spacing", new_spacing, allow_scalar=True)
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
        array([-0.75,  0.15,  0.15])
    """
    a = checks.to_host("affine", affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    spacing = checks.spacing3("spacing", spacing)
    new_spacing = checks.spacing3("new_spacing", new_spacing, allow_scalar=True)
    scale, offset = _scale_offset(spacing, new_spacing)
    t = np.eye(4)
    t[:3, :3] = np.diag(scale)
    t[:3, 3] = offset
    return a @ t


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
    return np.asarray(_starts(centers, shape, spacing, new_spacing, size), dtype=np.int64).reshape(-1, 3)


# From this many boxes on, eager calls check and place the boxes with numpy (~40 us fixed, ~0.05 us
# a box); fewer take the plain-Python loop (~13 us fixed, ~3 us a box), faster there: the two cross
# at 10-12 boxes (1 thread, AMD EPYC, numpy array and list centres). Both give the same starts and
# the same errors (tests/ops/test_resample.py).
_VECTORISE_FROM = 12


def _vectorised(centers: Any) -> bool:
    """Take the numpy path: not while torch.compile traces (numpy there would break the graph) and
    only for enough boxes (the count is read from the shape or length, nothing is converted)."""
    if torch.compiler.is_compiling():
        return False
    shape = getattr(centers, "shape", None)
    try:
        count = (int(shape[0]) if len(shape) == 2 else 1) if shape is not None else len(centers)
    except TypeError:  # a number, an object without a length: the checks word the error
        return False
    return count >= _VECTORISE_FROM


def _crop_starts(centers: Any, shape: Sequence[int], spacing: Any, new_spacing: Any, size: Any) -> list[int]:
    """:func:`crop_starts` flattened (z0, y0, x0, z1, ...) as Python ints (what the op takes)."""
    starts = _starts(centers, shape, spacing, new_spacing, size)
    return starts.reshape(-1).tolist() if isinstance(starts, np.ndarray) else starts


def _starts(centers: Any, shape: Sequence[int], spacing: Any, new_spacing: Any,
            size: Any) -> np.ndarray | list[int]:
    """The starts by the path that fits (:func:`_vectorised`): (N, 3) int64 from numpy, or the loop's
    flat list of Python ints."""
    if _vectorised(centers):
        starts = _crop_starts_array(centers, shape, spacing, new_spacing, size)
        if starts is not None:
            return starts
    return _crop_starts_rows(centers, shape, spacing, new_spacing, size)


def _crop_starts_rows(centers: Any, shape: Sequence[int], spacing: Any, new_spacing: Any, size: Any) -> list[int]:
    """:func:`crop_starts` flattened, in plain Python floats (the float64 steps numpy takes, so the
    same starts), box by box (~2.5 us a box): torch.compile traces it for centres given as Python
    numbers."""
    spacing = checks.spacing3("spacing", spacing)
    new_spacing = checks.spacing3("new_spacing", new_spacing, allow_scalar=True)
    rows = checks.point_rows("centers", centers, shape)
    size = checks.size3("size", size)
    scale, _ = _scale_offset(spacing, new_spacing)
    return [math.floor((c + 0.5) / s - 0.5 + 0.5) - n // 2 for row in rows for c, s, n in zip(row, scale, size)]


def _crop_starts_array(centers: Any, shape: Sequence[int], spacing: Any, new_spacing: Any,
                       size: Any) -> np.ndarray | None:
    """:func:`crop_starts` vectorised: the same checks in the same order (same errors), the same
    float64 operations in the same order (same starts). None where the Python loop would not end in
    int64 starts (a scale that underflows to 0, a start beyond +-2**62): it then runs and says why."""
    spacing = checks.spacing3("spacing", spacing)
    new_spacing = checks.spacing3("new_spacing", new_spacing, allow_scalar=True)
    points = checks.points_in_volume("centers", centers, shape)
    size = checks.size3("size", size)
    scale, _ = _scale_offset(spacing, new_spacing)
    if 0.0 in scale or max(size) >= 2**62:
        return None
    with np.errstate(all="ignore"):
        nearest = np.floor((points + 0.5) / np.asarray(scale) - 0.5 + 0.5)
    if not (np.abs(nearest) < 2.0**62).all():  # NaN fails too
        return None
    return nearest.astype(np.int64) - np.asarray(size, dtype=np.int64) // 2


# ----------------------------------------------------------------------------- dtypes
def _out_dtype(out_dtype: Any, in_dtype: Any, order: int, window: Any, kind: str) -> torch.dtype:
    """The output torch dtype: default the input's for order 0 without a window, else float32
    (float64 for float64 input); float16/bfloat16 are computed in float32 and rounded once.
    Torch dtypes (and None) are decided without numpy, so torch.compile traces this; numpy
    spells other dtypes and words the errors."""
    read = checks.volume_torch_dtype("volume", in_dtype)
    if out_dtype is None:
        if order == 0 and window is None:
            return read
        return torch.float64 if read == torch.float64 else torch.float32
    if out_dtype in (torch.bfloat16, "bfloat16"):
        if kind != "torch":
            raise TypeError(f"out_dtype=bfloat16 needs a torch tensor volume ({kind} arrays have no bfloat16)")
        return torch.bfloat16
    if isinstance(out_dtype, torch.dtype) and out_dtype in (torch.float16, torch.float32, torch.float64, read):
        dt = out_dtype
    else:
        np_dt, np_read = checks.numpy_dtype("out_dtype", out_dtype), checks.numpy_dtype("volume", read)
        if np_dt not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np_read):
            raise TypeError(f"out_dtype must be float16, bfloat16, float32, float64 or the volume's dtype ({np_read}), "
                            f"got {np_dt}")
        dt = checks.torch_dtype(np_dt)
    if window is not None and not dt.is_floating_point:
        raise TypeError(f"out_dtype must be floating when a window is given (values in [0, 1]), "
                        f"got {checks.numpy_dtype('out_dtype', dt)}")
    return dt


_KERNEL_OUT = (torch.float16, torch.bfloat16)  # computed in float32 by the kernels, then rounded


# ----------------------------------------------------------------------------- reference
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
    order = checks.interpolation_order("order", order)
    grid, scale, offset = _grid(volume.shape, spacing, new_spacing)
    dt = _out_dtype(out_dtype, volume.dtype, order, None, "torch")
    return _boxes_reference(volume, np.zeros((1, 3), np.int64), grid, grid, scale, offset, order,
                            checks.finite_number("fill", fill), None, dt)[0]


def resample_crop_reference(volume: torch.Tensor, spacing: Any, new_spacing: Any, centers: Any, size: Any, *,
                            order: int = 1, fill: float = -1024.0, window: Any = None,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch float64 oracle of :func:`resample_crop` (torch tensor in and out).

    Example:
        >>> import torch
        >>> resample_crop_reference(torch.zeros(4, 5, 6), (2.0, 1.0, 1.0), 1.0, [[2, 2, 3]], 3).shape
        torch.Size([1, 3, 3, 3])
    """
    checks.tensor("volume", volume, ndim=3)
    order = checks.interpolation_order("order", order)
    win = checks.hu_window("window", window)
    size = checks.size3("size", size)
    starts = crop_starts(centers, volume.shape, spacing, new_spacing, size)
    grid, scale, offset = _grid(volume.shape, spacing, new_spacing)
    dt = _out_dtype(out_dtype, volume.dtype, order, win, "torch")
    return _boxes_reference(volume, starts, size, grid, scale, offset, order, checks.finite_number("fill", fill),
                            win, dt)


# ----------------------------------------------------------------------------- kernels
# Host logic shared by the C++ and CUDA paths; only the four kernel calls differ per backend.
def _cpu_threads() -> int:
    return torch.get_num_threads()  # the threads torch uses (1 in DataLoader workers)


class _CppKernels:
    """The C++ kernels of csrc/cpu/resample.cpp on CPU tensors (numpy views share their memory)."""

    @staticmethod
    def boxes(vol, starts, size, grid, scale, offset, order, fill, window, out_dtype, op, flips=()):
        from lungcore import _C

        out = torch.empty((starts.shape[0], *size), dtype=out_dtype)
        array = np.flip(vol.numpy(), axis=tuple(flips)) if flips else vol.numpy()  # a view: the kernel takes any strides
        finite = _C.resample_boxes(array, out.numpy(), starts, tuple(grid), tuple(scale), tuple(offset),
                                   order, fill, window, _cpu_threads())
        backend.record_launch(f"{op}.cpu_forward")
        return out, finite

    @staticmethod
    def prefilter(c, op):
        from lungcore import _C

        _C.spline_prefilter3(c.numpy(), _cpu_threads())
        backend.record_launch(f"{op}.cpu_prefilter")

    @staticmethod
    def prefilter_adjoint(g, op):
        from lungcore import _C

        _C.spline_prefilter3_adjoint(g.numpy(), _cpu_threads())
        backend.record_launch(f"{op}.cpu_prefilter_adjoint")

    @staticmethod
    def boxes_backward(grad, src, shape, starts, grid, scale, offset, order, window, op):
        from lungcore import _C

        grad_volume = torch.empty(shape, dtype=grad.dtype)  # the kernel zeroes each plane it owns
        _C.resample_boxes_backward(grad.numpy(), None if src is None else src.numpy(), grad_volume.numpy(),
                                   starts, tuple(grid), tuple(scale), tuple(offset), order, window, _cpu_threads())
        backend.record_launch(f"{op}.cpu_backward")
        return grad_volume


def _kernels(which: str):
    if which == "cupy":
        from lungcore.cuda_kernels import resample as cuda

        return cuda
    return _CppKernels


def _coefficient_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (in_dtype, out_dtype) or in_dtype == torch.int32 else torch.float32


def _edge_pad(vol: torch.Tensor, pad: int) -> torch.Tensor:
    """``vol`` edge-padded by ``pad`` voxels on every side (any dtype and device), C-contiguous."""
    for axis in range(3):
        n = vol.shape[axis]
        vol = vol.index_select(axis, torch.arange(-pad, n + pad, device=vol.device).clamp_(0, n - 1))
    return vol.contiguous()


def _fold_edge_pad(g: torch.Tensor, pad: int) -> torch.Tensor:
    """Transpose of :func:`_edge_pad`: each padded slab summed onto the edge it copies."""
    for axis in range(3):
        n = g.shape[axis] - 2 * pad
        idx = torch.arange(-pad, n + pad, device=g.device).clamp_(0, n - 1)
        shape = list(g.shape)
        shape[axis] = n
        g = g.new_zeros(shape).index_add_(axis, idx, g)
    return g


def _spline_coefficients(vol: torch.Tensor, out_dtype: torch.dtype, which: str, op: str) -> torch.Tensor:
    """scipy's recipe for order 3, mode="nearest": edge-pad by 12, prefilter in place."""
    coef = _edge_pad(vol.to(_coefficient_dtype(vol.dtype, out_dtype)), _SPLINE_PAD)
    _kernels(which).prefilter(coef, op)
    return coef


def _forward(which, vol, starts, size, grid, scale, offset, order, fill, window, out_dtype, op,
             flips: Sequence[int] = ()) -> torch.Tensor:
    """The boxes of ``vol`` flipped along ``flips`` (a numpy/CuPy view with negative strides, sampled
    in place by the kernels: no copy)."""
    kern_out = torch.float32 if out_dtype in _KERNEL_OUT else out_dtype
    if order == 3:  # the coefficients are a new array anyway
        vol = _spline_coefficients(vol.flip(list(flips)) if flips else vol, kern_out, which, op)
        offset = tuple(o + _SPLINE_PAD for o in offset)
        flips = ()
    out, finite = _kernels(which).boxes(vol, starts, size, grid, scale, offset, order, fill, window, kern_out, op,
                                        tuple(flips))
    if not finite:
        raise ValueError("volume holds NaN or inf values where it is sampled")
    return out.to(out_dtype)


def _backward(which, grad, volume, shape, dtype, starts, grid, scale, offset, order, window, op) -> torch.Tensor:
    """d(volume) for ``grad`` (N, D, H, W): the forward's transpose, computed in ``dtype``."""
    src = None
    if order == 3:
        if window is not None:
            src = _spline_coefficients(volume.to(dtype), dtype, which, op)
        shape = tuple(n + 2 * _SPLINE_PAD for n in shape)
        offset = tuple(o + _SPLINE_PAD for o in offset)
    elif window is not None:
        src = volume.to(dtype).contiguous()
    kernels = _kernels(which)
    g = kernels.boxes_backward(grad.to(dtype).contiguous(), src, shape, starts, grid, scale, offset, order, window, op)
    if order == 3:
        kernels.prefilter_adjoint(g, op)
        g = _fold_edge_pad(g, _SPLINE_PAD)
    return g


def _checked(out: torch.Tensor, in_dtype: torch.dtype) -> torch.Tensor:
    """The reference path raises on NaN/inf like the kernels do (float inputs only)."""
    if in_dtype.is_floating_point and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise ValueError("volume holds NaN or inf values where it is sampled")
    return out


# ----------------------------------------------------------------------------- the registered op
@torch.library.custom_op("lungcore::resample_boxes", mutates_args=())
def _resample_boxes_op(volume: torch.Tensor, starts: list[int], size: list[int], grid: list[int],
                       scale: list[float], offset: list[float], order: int, fill: float,
                       window: Optional[list[float]], out_dtype: torch.dtype, op: str, which: str,
                       flips: list[int]) -> torch.Tensor:
    """``which``: the backend, chosen by the caller (so torch.compile guards on the choice and the
    backward runs on the forward's backend). ``flips``: axes along which ``volume`` is read
    mirrored (numpy/CuPy views with negative strides arrive as their positive-stride base plus
    these axes; never set for autograd inputs)."""
    st = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    win = None if window is None else (float(window[0]), float(window[1]))
    if which == "reference":
        volume = volume.flip(flips) if flips else volume
        return _checked(_boxes_reference(volume, st, size, grid, scale, offset, order, fill, win, out_dtype),
                        volume.dtype)
    host = volume.detach() if which == "cupy" else volume.detach().cpu()  # "cpu" forced on a CUDA tensor
    out = _forward(which, host, st, size, grid, scale, offset, order, fill, win, out_dtype, op, flips)
    return out.to(volume.device)


@_resample_boxes_op.register_fake
def _(volume, starts, size, grid, scale, offset, order, fill, window, out_dtype, op, which, flips):
    return volume.new_empty((len(starts) // 3, *size), dtype=out_dtype)


@torch.library.custom_op("lungcore::resample_boxes_backward", mutates_args=())
def _resample_boxes_backward_op(grad: torch.Tensor, volume: torch.Tensor, starts: list[int], grid: list[int],
                                scale: list[float], offset: list[float], order: int,
                                window: Optional[list[float]], op: str, which: str) -> torch.Tensor:
    """d(volume) of lungcore::resample_boxes from the kernels of backend ``which`` (``volume`` is
    read only with a window: its values decide where the window clamps)."""
    st = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    win = None if window is None else (float(window[0]), float(window[1]))
    dtype = torch.float64 if volume.dtype == torch.float64 else torch.float32
    device = grad.device if which == "cupy" else torch.device("cpu")  # "cpu" forced on a CUDA tensor
    g = _backward(which, grad.to(device), volume.detach().to(device), tuple(volume.shape), dtype, st, grid, scale,
                  offset, order, win, op)
    return g.to(device=volume.device, dtype=volume.dtype)


@_resample_boxes_backward_op.register_fake
def _(grad, volume, starts, grid, scale, offset, order, window, op, which):
    return volume.new_empty(volume.shape)


def _setup_context(ctx, inputs, output):
    volume, starts, size, grid, scale, offset, order, fill, window, _, op, which, flips = inputs
    if flips and volume.requires_grad:
        raise RuntimeError("resample: flipped views are numpy/CuPy inputs only (not differentiable)")
    ctx.params = (starts, grid, scale, offset, order, window, op, which)
    ctx.save_for_backward(volume)  # shape/dtype always; its values only with a window


def _backward_rule(ctx, grad):
    (volume,) = ctx.saved_tensors
    if not volume.dtype.is_floating_point:
        return (None,) * 13
    starts, grid, scale, offset, order, window, op, which = ctx.params
    if which == "reference":  # the forward's backend: the oracle's own autograd, in float64
        with torch.enable_grad():
            probe = volume.detach().to(torch.float64).requires_grad_(True)
            out = _boxes_reference(probe, np.asarray(starts, np.int64).reshape(-1, 3), grad.shape[1:], grid, scale,
                                   offset, order, 0.0, None if window is None else tuple(window), torch.float64)
            (g,) = torch.autograd.grad(out, probe, grad.to(torch.float64))
        return (g.to(volume.dtype),) + (None,) * 12
    return (_resample_boxes_backward_op(grad, volume, *ctx.params),) + (None,) * 12


_resample_boxes_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public functions
def _as_tensor(volume: Any) -> tuple[torch.Tensor, str, list[int]]:
    """``volume`` as a 3-D torch tensor of a dtype the kernels read, sharing memory where it can;
    its kind ("torch", "numpy", "cupy") to convert the result back; and the axes along which a
    numpy/CuPy view runs backwards (negative strides: the tensor is its unflipped base, no copy)."""
    if isinstance(volume, torch.Tensor):
        kind = "torch"
        if type(volume) is not torch.Tensor:  # e.g. MONAI MetaTensor: its affine would be stale after resampling
            volume = volume.as_subclass(torch.Tensor)
    elif isinstance(volume, np.ndarray):
        kind = "numpy"
    elif hasattr(volume, "__cuda_array_interface__") and type(volume).__module__.startswith("cupy"):
        kind = "cupy"
    else:
        raise TypeError(f"volume must be a numpy array, a torch tensor or a CuPy array, got {type(volume).__name__}")
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {tuple(volume.shape)}")
    if min(volume.shape) < 1:
        raise ValueError(f"volume must not be empty, got shape {tuple(volume.shape)}")
    if kind == "torch":  # no numpy on this path: torch.compile traces it
        target = checks.volume_torch_dtype("volume", volume.dtype)
        return (volume if volume.dtype == target else volume.to(target)), kind, []
    read = checks.volume_dtype("volume", volume.dtype)
    if volume.dtype != read:
        volume = volume.astype(read)
    if any(s % volume.itemsize for s in volume.strides):
        volume = volume.copy()
    flips = [a for a in range(3) if volume.strides[a] < 0]
    if flips:  # e.g. preprocess.canonical_orientation's flipped views: the base, read mirrored
        volume = volume[tuple(slice(None, None, -1) if a in flips else slice(None) for a in range(3))]
    return (torch.from_numpy(volume) if kind == "numpy" else torch.from_dlpack(volume)), kind, flips


def _from_tensor(out: torch.Tensor, kind: str) -> Any:
    if kind == "numpy":
        return out.numpy()
    if kind == "cupy":
        import cupy

        return cupy.from_dlpack(out)
    return out


def _run(volume: Any, centers: Any, size: Any, spacing: Any, new_spacing: Any, order: Any, fill: Any,
         window: Any, out_dtype: Any, op: str) -> Any:
    order = checks.interpolation_order("order", order)
    fill = checks.finite_number("fill", fill)
    window = checks.hu_window("window", window)
    vol, kind, flips = _as_tensor(volume)
    grid, scale, offset = _grid(vol.shape, spacing, new_spacing)
    odt = _out_dtype(out_dtype, volume.dtype, order, window, kind)
    if centers is None:  # the whole volume: one box covering the full grid
        if math.prod(grid) > _MAX_OUTPUT_VOXELS:
            raise ValueError(f"new_spacing {new_spacing} gives an output of shape {grid}: too large")
        size, starts = grid, [0, 0, 0]
    else:
        size = checks.size3("size", size)
        starts = _crop_starts(centers, vol.shape, spacing, new_spacing, size)
    which = backend.backend_for(op, vol.device)  # here, not in the op: torch.compile guards on the choice
    out = torch.ops.lungcore.resample_boxes(vol, starts, list(size), list(grid), list(scale),
                                            list(offset), order, fill, None if window is None else list(window),
                                            odt, op, which, flips)
    return _from_tensor(out, kind)


def resample_volume(volume: Any, spacing: Any, new_spacing: Any, *, order: int = 1, fill: float = -1024.0,
                    out_dtype: Any = None) -> Any:
    """Resample a CT ``volume`` (z, y, x) from ``spacing`` to ``new_spacing`` (mm, array-axis order).

    Args:
        volume: 3-D numpy array, torch tensor (CPU or CUDA) or CuPy array; int8/uint8/int16/uint16/
            int32/float16/bfloat16/float32/float64/bool, any strides. The result is of the same
            kind and device (numpy shares memory with the op, CuPy goes through DLPack: no host
            round trip); a torch subclass such as MONAI's MetaTensor comes back as a plain tensor
            (its affine would be stale: use :func:`resampled_affine`). Differentiable in a
            floating torch ``volume`` (the backward is the forward's transpose, as a kernel).
        spacing: (sz, sy, sx) of ``volume`` in mm.
        new_spacing: target (sz, sy, sx) in mm, or one number for isotropic voxels.
        order: 0 nearest, 1 trilinear, 3 cubic B-spline (equal to scipy's order 3, mode "nearest").
        fill: value outside the input (HU); the full grid never needs it (edge voxels are
            extended by half a voxel), crops hanging over the edge do.
        out_dtype: float32, float64, float16, bfloat16 (torch volumes only; both computed in
            float32 and rounded once) or the input dtype (integers round to nearest and
            saturate). Default: the input dtype for order 0, else float32 (float64 for float64).

    Returns:
        The volume on the grid of shape :func:`resampled_shape`; its affine is
        :func:`resampled_affine`.

    Under ``torch.compile(fullgraph=True)`` it traces for a torch ``volume`` with the other
    arguments as Python numbers/sequences and torch dtypes (module docstring, "torch.compile").

    Example:
        >>> import torch
        >>> resample_volume(torch.zeros(10, 20, 20), (2.0, 0.5, 0.5), (1.0, 1.0, 1.0)).shape
        torch.Size([20, 10, 10])
    """
    return _run(volume, None, None, spacing, new_spacing, order, fill, None, out_dtype, "resample_volume")[0]


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

    Under ``torch.compile(fullgraph=True)`` it traces for a torch ``volume`` with ``centers``,
    ``size`` and the rest as Python numbers/sequences (module docstring, "torch.compile").

    Example:
        >>> import numpy as np
        >>> ct = np.full((60, 128, 128), -800, dtype=np.int16)
        >>> boxes = resample_crop(ct, (2.5, 0.7, 0.7), 1.0, [[30, 64, 64], [10, 20, 100]],
        ...                       (16, 64, 64), window=(-1200, 600))
        >>> boxes.shape, float(boxes[0, 8, 32, 32])
        ((2, 16, 64, 64), 0.2222222238779068)
    """
    return _run(volume, centers, size, spacing, new_spacing, order, fill, window, out_dtype, "resample_crop")
