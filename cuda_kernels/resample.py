"""Launchers of ``csrc/cuda/resample.cu`` (CuPy RawModule, compiled by NVRTC, cached on disk).

Every launcher takes torch CUDA tensors (exchanged with CuPy through DLPack on torch's current
stream: no copy, no host round trip) and records ``<op>.<kernel>`` in the launch counter.
The host logic around them (order-3 padding, the window, dtype choice) is shared with the C++
path in ``lungcore.ops.resample``.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch

from lungcore.triton_kernels._launch import record

_C_TYPES = {torch.int8: "signed char", torch.uint8: "unsigned char", torch.int16: "short",
            torch.uint16: "unsigned short", torch.int32: "int", torch.float32: "float", torch.float64: "double"}
_FLOATS = (torch.float32, torch.float64)


def cuda_source_dir() -> Path:
    """Folder holding the CUDA sources: ``lungcore/_cuda`` in a wheel, ``csrc/cuda`` in a checkout.

    Example:
        >>> (cuda_source_dir() / "resample.cu").is_file()
        True
    """
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_cuda", here / "csrc" / "cuda", here.parent / "csrc" / "cuda"):
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


def kernel_name(in_dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    """The instantiation of the forward kernel for these dtypes."""
    return f"lungcore_resample_boxes<{_C_TYPES[in_dtype]}, {_C_TYPES[out_dtype]}>"


def kernel_names() -> list[str]:
    """Every kernel instantiation the CuPy module compiles (the compile gate compiles the same)."""
    names = [kernel_name(i, o) for i in _C_TYPES for o in dict.fromkeys([torch.float32, torch.float64, i])]
    names += [kernel_name(c, o) for c in _FLOATS for o in _C_TYPES if not o.is_floating_point]  # order 3 -> ints
    for t in ("float", "double"):
        names += [f"lungcore_spline_prefilter3<{t}>", f"lungcore_resample_boxes_backward<{t}>",
                  f"lungcore_spline_prefilter3_adjoint<{t}>"]
    return names


@functools.lru_cache(maxsize=None)
def _module():
    import cupy

    source = (cuda_source_dir() / "resample.cu").read_text()
    return cupy.RawModule(code=source, options=("--std=c++14",), name_expressions=kernel_names())


@contextlib.contextmanager
def _on_stream(t: torch.Tensor):
    import cupy

    with cupy.cuda.Device(t.device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream):
        yield cupy


def _geometry(vol: torch.Tensor, starts: np.ndarray, grid, scale, offset):
    i64, f64 = np.int64, np.float64
    return ((*(i64(v) for v in vol.shape), *(i64(v) for v in grid)),
            (*(f64(v) for v in scale), *(f64(v) for v in offset)))


def _launch_shape(n_box: int, d: int, h: int, w: int):
    if h > 65535:
        raise ValueError(f"size: the CUDA kernel supports at most 65535 rows per slice, got {h}")
    bx = 32
    while bx < w and bx < 128:
        bx *= 2
    return ((w + bx - 1) // bx, h, min(n_box * d, 65535)), (bx, 1, 1)


def boxes(vol: torch.Tensor, starts: np.ndarray, size, grid, scale, offset, order: int, fill: float,
          window, out_dtype: torch.dtype, op: str, flips=()) -> tuple[torch.Tensor, bool]:
    """Resample the boxes of ``vol`` (CUDA; any element strides) read mirrored along ``flips``
    (a negative-stride view, no copy); returns (out, all values finite)."""
    n_box = int(starts.shape[0])
    out = torch.empty((n_box, *size), dtype=out_dtype, device=vol.device)
    if out.numel() == 0:
        return out, True
    grid_dims, block = _launch_shape(n_box, *size)
    with _on_stream(vol) as cupy:
        kernel = _module().get_function(kernel_name(vol.dtype, out_dtype))
        bad = cupy.zeros(1, dtype=np.int32)
        shape, geometry = _geometry(vol, starts, grid, scale, offset)
        lo, hi = window if window is not None else (0.0, 1.0)
        i64 = np.int64
        src = cupy.from_dlpack(vol.detach())
        src = cupy.flip(src, axis=tuple(flips)) if flips else src
        args = (src, cupy.from_dlpack(out), cupy.asarray(starts.astype(np.int64)),
                i64(n_box), *(i64(v) for v in size), *shape[:3], *(i64(s // src.itemsize) for s in src.strides),
                *shape[3:],
                *geometry, np.int32(order), np.float64(fill), np.int32(window is not None), np.float64(lo),
                np.float64(hi), bad)
        kernel(grid_dims, block, args)
        record(f"{op}.cupy_forward")
        finite = not (vol.is_floating_point() and int(bad.get()[0]))  # 4-byte readback, float input only
    return out, finite


def _lines(c: torch.Tensor, name: str, op: str) -> None:
    with _on_stream(c) as cupy:
        kernel = _module().get_function(f"{name}<{_C_TYPES[c.dtype]}>")
        arr = cupy.from_dlpack(c)
        n0, n1, n2 = c.shape
        axes = ((1, n0, n1 * n2), (n0, n1, n2), (n0 * n1, n2, 1))
        for outer, n, inner in (axes if name.endswith("prefilter3") else axes[::-1]):
            kernel(((outer * inner + 255) // 256,), (256,), (arr, np.int64(outer), np.int64(n), np.int64(inner)))
        record(f"{op}.cupy_{name.removeprefix('lungcore_spline_')}")


def prefilter(c: torch.Tensor, op: str) -> None:
    """In place: samples -> cubic B-spline coefficients (C-contiguous float CUDA tensor)."""
    _lines(c, "lungcore_spline_prefilter3", op)


def prefilter_adjoint(g: torch.Tensor, op: str) -> None:
    """In place: the transpose of :func:`prefilter` (the backward of order 3)."""
    _lines(g, "lungcore_spline_prefilter3_adjoint", op)


def boxes_backward(grad: torch.Tensor, src: torch.Tensor | None, shape, starts: np.ndarray, grid, scale, offset,
                   order: int, window, op: str) -> torch.Tensor:
    """The gradient of :func:`boxes` for ``grad`` (N, D, H, W), a volume of ``shape`` in grad's dtype
    (atomicAdd into zeros); ``src`` (the sampled volume, C-contiguous) is read only with a window."""
    n_box = int(grad.shape[0])
    grad_volume = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    if grad.numel() == 0:
        return grad_volume
    grid_dims, block = _launch_shape(n_box, *grad.shape[1:])
    with _on_stream(grad) as cupy:
        kernel = _module().get_function(f"lungcore_resample_boxes_backward<{_C_TYPES[grad.dtype]}>")
        shape, geometry = _geometry(grad_volume, starts, grid, scale, offset)
        lo, hi = window if window is not None else (0.0, 1.0)
        i64 = np.int64
        source = cupy.from_dlpack(src.detach()) if src is not None else cupy.from_dlpack(grad_volume)
        args = (cupy.from_dlpack(grad.contiguous()), source, cupy.from_dlpack(grad_volume),
                cupy.asarray(starts.astype(np.int64)), i64(n_box), *(i64(v) for v in grad.shape[1:]), *shape,
                *geometry, np.int32(order), np.int32(window is not None), np.float64(lo), np.float64(hi))
        kernel(grid_dims, block, args)
        record(f"{op}.cupy_backward")
    return grad_volume
