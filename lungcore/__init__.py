"""lungcore: GPU-first multimodal lung-CT deep learning.

Fused Triton kernels and a C++/CUDA core under a thin PyTorch model API for two published
networks: CMML (survival from CT + clinical records) and CSF-Net (nodule malignancy from two
follow-up CTs + clinical data).

Example:
    >>> import lungcore
    >>> lungcore.__version__
    '0.1.0'
"""
from lungcore._version import __version__
from lungcore import backend, checks, metrics

__all__ = ["__version__", "backend", "checks", "metrics"]
