"""The one relative-error helper and DESIGN.md's tolerance table, shared by every op test.

DESIGN.md "Tolerances": relative error ||out - ref|| / ||ref|| against a float64 reference;
fp32 elementwise/scan ops < 1e-5; fp32 kernels with ``tl.dot`` on a GPU (tf32) < 2e-3;
fp16/bf16 < 2e-2; NaN or inf never passes. (``tests/conftest.py`` puts this folder on sys.path.)

Example:
    >>> import torch
    >>> rel_error(torch.ones(3), torch.ones(3)) < tolerance(torch.float32)
    True
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

FP32 = 1e-5          # fp32 elementwise / scan ops (and fp32 GEMMs off the GPU)
FP32_DOT_GPU = 2e-3  # fp32 kernels with tl.dot on a GPU (tf32 inputs)
HALF = 2e-2          # fp16 / bf16
LOW_PRECISION = (torch.float16, torch.bfloat16)


def tolerance(dtype: Any, *, dot: bool = False, device: Any = "cpu") -> float:
    """The DESIGN.md bound for a result computed in ``dtype`` (``dot``: by ``tl.dot`` kernels)."""
    if dtype in LOW_PRECISION or dtype in ("float16", "bfloat16", np.float16):
        return HALF
    if dot and str(getattr(device, "type", device)).startswith("cuda"):
        return FP32_DOT_GPU
    return FP32


def _float64(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    if hasattr(x, "__cuda_array_interface__") and hasattr(x, "get"):  # CuPy
        x = x.get()
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def rel_error(out: Any, ref: Any) -> float:
    """||out - ref|| / ||ref|| in float64 (||out|| when ref is all zeros); a NaN/inf in ``out``
    fails the calling test. Takes torch tensors (any device), numpy or CuPy arrays, numbers."""
    a, b = _float64(out), _float64(ref)
    assert a.numel() == b.numel(), f"shape {tuple(a.shape)} != reference shape {tuple(b.shape)}"
    b = b.reshape(a.shape)
    assert torch.isfinite(a).all(), "NaN/inf in the result"
    scale = b.norm()
    return float((a - b).norm() / scale) if scale > 0 else float(a.norm())
