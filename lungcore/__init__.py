"""lungcore: GPU-first multimodal lung-CT deep learning.

Fused Triton kernels and a C++/CUDA core under a thin PyTorch model API for two published
networks: CMML (survival from CT + clinical records) and CSF-Net (nodule malignancy from two
follow-up CTs + clinical data).

Example:
    >>> import lungcore
    >>> lungcore.__version__
    '0.1.0'
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lungcore._lazy import lazy_exports
from lungcore._version import __version__

if TYPE_CHECKING:
    from lungcore import backend, checks, metrics

__all__ = ["__version__", "backend", "checks", "metrics"]
__getattr__, __dir__ = lazy_exports(__name__, {m: f"lungcore.{m}" for m in ("backend", "checks", "metrics")})
