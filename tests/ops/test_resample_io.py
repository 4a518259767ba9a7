"""resample_volume on real files read by MONAI, the CUDA source compiled by nvcc, and packaging.

* A NIfTI with a rotated, anisotropic, flipped affine and pydicom's real ``CT_small.dcm``, read by
  MONAI's readers ((x, y, z) + affine), transposed once to (z, y, x) as the data layer does: the
  resampled volume with :func:`resampled_affine` puts structures at the same world position.
* ``csrc/cuda/resample.cu`` compiles with nvcc for every instantiation CuPy asks NVRTC for (so CI
  catches a broken kernel without a GPU), and ships inside the package (wheel: ``lungcore/_cuda``).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lungcore.ops import resample_volume, resampled_affine, resampled_shape
from lungcore.ops.resample import _kernel_names, cuda_source_dir

ndi = pytest.importorskip("scipy.ndimage")
ROOT = Path(__file__).resolve().parents[2]


def _to_zyx(image) -> tuple[np.ndarray, np.ndarray]:
    """MONAI (x, y, z) array + affine -> (z, y, x) array + the affine of (z, y, x) indices."""
    array = np.asarray(image)
    affine = np.asarray(image.affine, dtype=np.float64)
    return np.ascontiguousarray(array.transpose(2, 1, 0)), affine[:, [2, 1, 0, 3]]


def _spacing(affine_zyx: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.linalg.norm(affine_zyx[:3, :3], axis=0))


def _centroid_world(volume: np.ndarray, affine: np.ndarray, threshold: float) -> np.ndarray:
    w = np.clip(volume.astype(np.float64) - threshold, 0, None)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")).reshape(3, -1)
    c = (idx * w.reshape(-1)).sum(axis=1) / w.sum()
    return (affine @ np.r_[c, 1.0])[:3]


def test_nifti_with_nontrivial_affine(tmp_path, rng):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    from monai.transforms import LoadImage

    # (x, y, z) data with spacing (0.7, 0.8, 2.5), rotated about z and with a flipped y axis
    shape_xyz, spacing_xyz = (41, 37, 17), np.array([0.7, 0.8, 2.5])
    theta = 0.4
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    rot = rot @ np.diag([1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing_xyz
    affine[:3, 3] = [-12.0, 30.0, -80.0]
    blob_xyz = np.array([15.3, 20.6, 7.2])
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape_xyz], indexing="ij"), axis=-1)
    mm = (g - blob_xyz) * spacing_xyz
    data = -900 + 1400 * np.exp(-(mm ** 2).sum(-1) / (2 * 3.0 ** 2))
    data = (data + rng.normal(scale=5.0, size=data.shape)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    image = LoadImage(image_only=True, reader="NibabelReader")(str(path))
    volume, affine_zyx = _to_zyx(image)
    spacing = _spacing(affine_zyx)
    np.testing.assert_allclose(spacing, spacing_xyz[::-1], rtol=1e-5)
    world_blob = (affine @ np.r_[blob_xyz, 1.0])[:3]  # straight from the file's affine

    out = resample_volume(volume, spacing, 1.0)
    out_affine = resampled_affine(affine_zyx, spacing, 1.0)
    assert out.shape == resampled_shape(volume.shape, spacing, 1.0) == (43, 30, 29)
    np.testing.assert_allclose(np.linalg.norm(out_affine[:3, :3], axis=0), 1.0, rtol=1e-6)
    # orientation kept: the output axes point where the input axes point
    np.testing.assert_allclose(out_affine[:3, :3] / 1.0, affine_zyx[:3, :3] / np.asarray(spacing), atol=1e-6)
    # same structure at the same world position (both centroids), and extent corner shared
    np.testing.assert_allclose(_centroid_world(volume, affine_zyx, -500), world_blob, atol=0.3)
    np.testing.assert_allclose(_centroid_world(out, out_affine, -500), world_blob, atol=0.3)
    np.testing.assert_allclose(out_affine @ [-0.5, -0.5, -0.5, 1], affine_zyx @ [-0.5, -0.5, -0.5, 1], atol=1e-9)
    # values: scipy with the same index mapping
    s = 1.0 / np.asarray(spacing)
    expected = ndi.affine_transform(volume.astype(np.float64), np.diag(s), offset=0.5 * s - 0.5,
                                    output_shape=out.shape, order=1, mode="nearest")
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-4


def test_pydicom_ct_small(rng):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("monai")
    from monai.transforms import LoadImage

    path = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = LoadImage(image_only=True, reader="PydicomReader")(path)
    assert image.ndim == 2  # one real slice (x, y) in HU
    array = np.asarray(image)[:, :, None]  # (x, y, z=1)
    affine = np.asarray(image.affine, dtype=np.float64).copy()
    thickness = float(ds.SliceThickness)
    affine[:3, 2] = affine[:3, 2] / np.linalg.norm(affine[:3, 2]) * thickness  # z column from the header
    volume = np.ascontiguousarray(array.transpose(2, 1, 0))  # (1, rows, cols)
    affine_zyx = affine[:, [2, 1, 0, 3]]
    spacing = _spacing(affine_zyx)
    np.testing.assert_allclose(spacing, [thickness, *map(float, ds.PixelSpacing)], rtol=1e-5)
    # the transposed affine agrees with the DICOM geometry (MONAI gives RAS: flip x and y of LPS)
    row, col = 10, 100
    lps = (np.asarray(ds.ImagePositionPatient, dtype=np.float64)
           + col * float(ds.PixelSpacing[1]) * np.asarray(ds.ImageOrientationPatient[:3], dtype=np.float64)
           + row * float(ds.PixelSpacing[0]) * np.asarray(ds.ImageOrientationPatient[3:], dtype=np.float64))
    np.testing.assert_allclose((affine_zyx @ [0, row, col, 1])[:3], lps * [-1, -1, 1], atol=1e-3)
    assert volume[0, row, col] == float(ds.pixel_array[row, col]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    out = resample_volume(volume, spacing, 1.0)
    out_affine = resampled_affine(affine_zyx, spacing, 1.0)
    assert out.shape == (5, 85, 85)
    assert -1024 <= out.min() and out.max() <= volume.max()
    np.testing.assert_allclose(_centroid_world(out, out_affine, 0.0), _centroid_world(volume, affine_zyx, 0.0),
                               atol=0.5)
    s = 1.0 / np.asarray(spacing)
    expected = ndi.affine_transform(volume.astype(np.float64), np.diag(s), offset=0.5 * s - 0.5,
                                    output_shape=out.shape, order=1, mode="nearest")
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-4


def test_cuda_sources_found():
    folder = cuda_source_dir()
    assert (folder / "resample.cu").is_file()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    """Every instantiation CuPy requests from NVRTC, compiled by nvcc (no GPU needed)."""
    source = cuda_source_dir() / "resample.cu"
    driver = tmp_path / "check.cu"
    refs = ",\n    ".join(f"(void*)&{name}" for name in _kernel_names())
    driver.write_text(f'#include "{source}"\nvoid* lungcore_all_kernels[] = {{\n    {refs}\n}};\n')
    result = subprocess.run(["nvcc", "-std=c++14", "-arch=sm_80", "-Werror", "all-warnings", "-c", str(driver),
                             "-o", str(tmp_path / "check.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_cuda_sources_ship_in_the_package(tmp_path):
    """setup.py maps csrc/cuda onto lungcore._cuda: build_py (what a wheel holds) carries resample.cu."""
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "lungcore" / "_cuda" / "resample.cu").is_file()
    assert (tmp_path / "lungcore" / "ops" / "resample.py").is_file()


def test_monai_spacing_peer_agrees_on_extent(rng):
    """MONAI Spacing (the slow peer) gives the same values in the interior for an axis-aligned volume."""
    pytest.importorskip("monai")
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    volume = (rng.normal(size=(8, 20, 20)) * 100).astype(np.float32)
    old = (2.0, 0.5, 0.5)
    out = resample_volume(volume, old, 1.0)
    image = MetaTensor(torch.from_numpy(volume)[None], affine=torch.diag(torch.tensor([*old, 1.0], dtype=torch.float64)))
    monai_out = Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear", padding_mode="border")(image)
    assert tuple(monai_out.shape[1:]) == (15, 10, 10)  # MONAI keeps the first voxel centre: one slice fewer
    assert out.shape == (16, 10, 10)
