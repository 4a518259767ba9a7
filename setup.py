"""Build lungcore and its C++ extension ``lungcore._C``.

The extension is plain pybind11 over the numpy buffer protocol: it is never linked against
libtorch, so one build serves every torch version. Every ``csrc/**/*.cpp`` file is compiled in;
a file registers its Python bindings itself (``LUNGCORE_BINDINGS`` in ``csrc/bindings.h``), so
adding an op never edits a shared list. CUDA sources under ``csrc/cuda`` are not built here: they
are compiled at run time through CuPy (NVRTC) by their launchers in ``cuda_kernels/`` (installed
as ``lungcore.cuda_kernels``, beside ``triton_kernels/`` -> ``lungcore.triton_kernels``); they ship
as package data of ``lungcore._cuda`` (a package_dir mapping of csrc/cuda), so a wheel carries them
and an editable install finds them in the checkout.

    pip install -e .            # g++ (with OpenMP) is all it needs; no CUDA toolkit, no GPU
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent


def _version() -> str:
    text = (ROOT / "lungcore" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _sources() -> list[str]:
    files = sorted(p for p in (ROOT / "csrc").rglob("*.cpp") if "cuda" not in p.parts)
    return [str(p.relative_to(ROOT)) for p in files]


def _openmp_flags() -> tuple[list[str], list[str]]:
    if os.environ.get("LUNGCORE_NO_OPENMP") == "1":
        return [], []
    if sys.platform == "darwin":  # Apple clang: needs libomp from Homebrew
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


omp_compile, omp_link = _openmp_flags()
ext = Pybind11Extension(
    "lungcore._C",
    _sources(),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", *omp_compile],
    extra_link_args=omp_link,
)

setup(
    name="lungcore",
    version=_version(),
    description="GPU-first multimodal lung-CT deep learning: fused Triton kernels, C++ core, CMML and CSF-Net",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "lungcore",
        "lungcore.ops",
        "lungcore.nn",
        "lungcore.models",
        "lungcore.data",
        "lungcore.data.io",
        "lungcore.data.preprocess",
        "lungcore.data.synth",
        "lungcore.metrics",
        "lungcore.train",
        "lungcore.triton_kernels",
        "lungcore.cuda_kernels",
        "lungcore._cuda",
    ],
    package_dir={"lungcore.triton_kernels": "triton_kernels", "lungcore.cuda_kernels": "cuda_kernels",
                 "lungcore._cuda": "csrc/cuda"},
    package_data={"lungcore._cuda": ["*.cu", "*.cuh"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.4",
        "triton>=3.3; platform_system == 'Linux'",
        "numpy>=1.24",
        "pandas>=2.0",
        "scipy>=1.10",
        "lifelines>=0.27",
        "monai>=1.3",
        "nibabel>=5.0",
        # .nii.gz inflated about 2x faster than zlib, straight into the array (lungcore/data/io.py;
        # benchmarks/bench_cohort_scale.py); zlib when absent (the GPU machine installs --no-deps)
        "isal>=1.6",
        "pydicom>=2.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "cuda": ["cupy-cuda12x>=13.0"],
        "cuda13": ["cupy-cuda13x>=13.0"],
        "test": ["pytest>=7.4", "pytest-xdist>=3.3", "scikit-survival>=0.22", "scipy>=1.10"],
        "bench": ["scikit-survival>=0.22", "scipy>=1.10", "SimpleITK>=2.2"],
    },
    entry_points={"console_scripts": ["lungcore = lungcore.cli:main"]},
)
