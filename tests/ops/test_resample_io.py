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
from lungcore.cuda_kernels.resample import cuda_source_dir, kernel_names as _kernel_names

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
    assert (tmp_path / "lungcore" / "cuda_kernels" / "resample.py").is_file()


def test_monai_spacing_peer_agrees_on_values(rng):
    """MONAI Spacing (the slow peer) and lungcore both sample a linear field exactly at their own
    grids (trilinear is exact on linear data): lungcore's voxel-centre-aligned grid (DESIGN.md),
    MONAI's first-voxel-anchored one (one slice fewer), both with edge clamping."""
    pytest.importorskip("monai")
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    n, old = (8, 20, 20), (2.0, 0.5, 0.5)
    coef = rng.normal(size=3) * 10
    field = lambda z, y, x: coef[0] * z + coef[1] * y + coef[2] * x + 5.0  # noqa: E731
    volume = field(*np.meshgrid(*(np.arange(k, dtype=np.float64) for k in n), indexing="ij")).astype(np.float32)
    out = resample_volume(volume, old, 1.0)
    image = MetaTensor(torch.from_numpy(volume)[None], affine=torch.diag(torch.tensor([*old, 1.0], dtype=torch.float64)))
    monai_out = Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear", padding_mode="border")(image)[0].numpy()
    assert monai_out.shape == (15, 10, 10) and out.shape == (16, 10, 10)
    s = 1.0 / np.asarray(old)

    def expected(shape, first):  # input index of output index j on each axis, clamped to the voxel centres
        axes = [np.clip(first[a] + s[a] * np.arange(shape[a]), 0, n[a] - 1) for a in range(3)]
        return field(*np.meshgrid(*axes, indexing="ij"))

    np.testing.assert_allclose(out, expected(out.shape, 0.5 * s - 0.5), atol=1e-3)
    np.testing.assert_allclose(monai_out, expected(monai_out.shape, np.zeros(3)), atol=1e-3)


HOST_HARNESS = r"""
#define __host__
#define __device__
#define __forceinline__ inline
#define LC_HOST_ONLY
#include "SOURCE"

template <typename In, typename Out>
static int run(const void* src_, void* dst_, const long long* starts, long long nbox, long long D, long long H,
               long long W, const long long* n, const long long* st, const long long* m, const double* s,
               const double* o, int order, double fill, int window, double lo, double hi) {
    typedef typename lc_acc<In, Out>::type Acc;
    const In* src = (const In*)src_;
    Out* dst = (Out*)dst_;
    int bad = 0;
    for (long long b = 0; b < nbox; ++b)
        for (long long kz = 0; kz < D; ++kz)
            for (long long ky = 0; ky < H; ++ky)
                for (long long kx = 0; kx < W; ++kx) {
                    Acc v = lc_sample<In, Out>(src, starts, b, kz, ky, kx, n[0], n[1], n[2], st[0], st[1], st[2],
                                               m[0], m[1], m[2], s[0], s[1], s[2], o[0], o[1], o[2], order, fill,
                                               window, lo, hi);
                    if (!std::isfinite((double)v)) bad = 1;
                    dst[((b * D + kz) * H + ky) * W + kx] = lc_store<Out, Acc>::apply(v);
                }
    return bad;
}
#define LC_ENTRY(name, In, Out)                                                                              \
    extern "C" int name(const void* src, void* dst, const long long* starts, long long nbox, long long D,      \
                        long long H, long long W, const long long* n, const long long* st, const long long* m, \
                        const double* s, const double* o, int order, double fill, int window, double lo,     \
                        double hi) {                                                                         \
        return run<In, Out>(src, dst, starts, nbox, D, H, W, n, st, m, s, o, order, fill, window, lo, hi);   \
    }
LC_ENTRY(lc_i16_f32, short, float)
LC_ENTRY(lc_f32_f32, float, float)
LC_ENTRY(lc_f64_f64, double, double)
LC_ENTRY(lc_i16_i16, short, short)
LC_ENTRY(lc_f32_i16, float, short)
extern "C" void lc_prefilter(double* c, long long outer, long long n, long long inner) {
    for (long long line = 0; line < outer * inner; ++line)
        lc_prefilter_line<double>(c + (line / inner) * n * inner + line % inner, n, inner);
}
extern "C" void lc_prefilter_adjoint(double* c, long long outer, long long n, long long inner) {
    for (long long line = 0; line < outer * inner; ++line)
        lc_prefilter_line_adjoint<double>(c + (line / inner) * n * inner + line % inner, n, inner);
}
struct host_add { void operator()(double* p, double v) const { *p += v; } };
// the backward kernel's per-voxel code (lc_sample_backward), one voxel after another
extern "C" void lc_backward(const double* grad, const double* src, double* dst, const long long* starts, long long nbox,
                            long long D, long long H, long long W, const long long* n, const long long* m,
                            const double* s, const double* o, int order, int window, double lo, double hi) {
    for (long long b = 0; b < nbox; ++b)
        for (long long kz = 0; kz < D; ++kz)
            for (long long ky = 0; ky < H; ++ky)
                for (long long kx = 0; kx < W; ++kx)
                    lc_sample_backward<double>(src, dst, starts, grad[((b * D + kz) * H + ky) * W + kx], b, kz, ky, kx,
                                               n[0], n[1], n[2], n[1] * n[2], n[2], 1, m[0], m[1], m[2], s[0], s[1],
                                               s[2], o[0], o[1], o[2], order, window, lo, hi, host_add());
}
"""


@pytest.fixture(scope="module")
def cuda_math_on_host(tmp_path_factory):
    """csrc/cuda/resample.cu's per-voxel code (lc_sample, lc_prefilter_line) built for the CPU with g++."""
    import ctypes

    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    folder = tmp_path_factory.mktemp("cuda_host")
    cpp = folder / "harness.cpp"
    cpp.write_text(HOST_HARNESS.replace("SOURCE", str(cuda_source_dir() / "resample.cu")))
    lib = folder / "harness.so"
    result = subprocess.run(["g++", "-O1", "-std=c++14", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                             str(cpp), "-o", str(lib)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(str(lib))


def _host_boxes(lib, fn: str, vol: np.ndarray, starts: np.ndarray, size, grid, scale, offset, order, fill, window,
                out_dtype) -> tuple[np.ndarray, int]:
    import ctypes

    out = np.full((len(starts), *size), np.nan if np.issubdtype(out_dtype, np.floating) else 7, dtype=out_dtype)
    ll = lambda v: np.ascontiguousarray(v, dtype=np.int64)  # noqa: E731
    dd = lambda v: np.ascontiguousarray(v, dtype=np.float64)  # noqa: E731
    starts, n, st, m = ll(starts), ll(vol.shape), ll([s // vol.itemsize for s in vol.strides]), ll(grid)
    s, o = dd(scale), dd(offset)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    lo, hi = window if window is not None else (0.0, 1.0)
    bad = getattr(lib, fn)(ptr(vol), ptr(out), ptr(starts), ctypes.c_longlong(len(starts)),
                           *(ctypes.c_longlong(v) for v in size), ptr(n), ptr(st), ptr(m), ptr(s), ptr(o),
                           ctypes.c_int(order), ctypes.c_double(fill), ctypes.c_int(window is not None),
                           ctypes.c_double(lo), ctypes.c_double(hi))
    return out, bad


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("fn,in_dtype,out_dtype,window", [
    ("lc_i16_f32", np.int16, np.float32, None),
    ("lc_i16_f32", np.int16, np.float32, (-1200.0, 600.0)),
    ("lc_f64_f64", np.float64, np.float64, None),
    ("lc_i16_i16", np.int16, np.int16, None),
])
def test_cuda_kernel_math_on_host_matches_cpp(cuda_math_on_host, rng, order, fn, in_dtype, out_dtype, window):
    """The CUDA kernel's per-voxel code, run on the CPU, equals the C++ core (same grid, fill, window, rounding)."""
    from lungcore import backend as lc_backend
    from lungcore import _C
    from lungcore.ops import crop_starts, resample_crop
    from lungcore.ops.resample import _SPLINE_PAD, _scale_offset

    volume = (rng.normal(size=(7, 12, 10)) * 400 - 200).astype(in_dtype)
    old, new, size = (2.5, 0.7, 0.9), (1.0, 1.0, 0.6), (6, 9, 11)
    n = np.asarray(volume.shape)
    centers = np.concatenate([rng.uniform(-0.5, n - 0.5, size=(5, 3)), [[0.0, 0.0, 0.0]]])
    if order == 3 and not np.issubdtype(in_dtype, np.floating):
        fn = fn.replace("i16_", "f32_")
    with lc_backend.use_backend("cpu"):
        expected = resample_crop(volume, old, new, centers, size, order=order, window=window, out_dtype=out_dtype)
    starts = crop_starts(centers, volume.shape, old, new, size)
    scale, offset = _scale_offset(old, new)
    data = volume
    if order == 3:
        data = np.pad(volume.astype(np.float64 if in_dtype == np.float64 else np.float32), _SPLINE_PAD, mode="edge")
        _C.spline_prefilter3(data)
        offset = tuple(o + _SPLINE_PAD for o in offset)
    strided = np.empty((data.shape[2], data.shape[1], data.shape[0]), data.dtype).transpose(2, 1, 0)
    strided[...] = data  # non-contiguous source: the kernel's stride arithmetic is exercised
    got, bad = _host_boxes(cuda_math_on_host, fn, strided, starts, size, resampled_shape(volume.shape, old, new),
                           scale, offset, order, -1024.0, window, out_dtype)
    assert bad == 0
    if order == 0 or not np.issubdtype(out_dtype, np.floating):
        tol = 0 if order == 0 else 1
        assert np.abs(got.astype(np.int64 if tol else got.dtype) - expected.astype(np.int64 if tol else got.dtype)).max() <= tol
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 if window is None else 1e-6)


def test_cuda_prefilter_on_host_matches_cpp(cuda_math_on_host, rng):
    import ctypes

    from lungcore import _C

    data = rng.normal(size=(26, 29, 31))
    ours = data.copy()
    _C.spline_prefilter3(ours)
    theirs = data.copy()
    p = theirs.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
    n0, n1, n2 = theirs.shape
    for outer, n, inner in ((1, n0, n1 * n2), (n0, n1, n2), (n0 * n1, n2, 1)):
        cuda_math_on_host.lc_prefilter(p, ctypes.c_longlong(outer), ctypes.c_longlong(n), ctypes.c_longlong(inner))
    np.testing.assert_allclose(theirs, ours, rtol=1e-12, atol=1e-12)
    # and it is the B-spline interpolation condition: (c[k-1] + 4 c[k] + c[k+1]) / 6 = x[k] inside
    c = ours
    recon = c.copy()
    for axis in range(3):
        c_m = np.roll(recon, 1, axis)
        c_p = np.roll(recon, -1, axis)
        recon = (c_m + 4 * recon + c_p) / 6
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(recon[inner], data[inner], atol=1e-9)


def test_monai_metatensor_comes_back_plain():
    """A MetaTensor's affine would be stale after resampling: the result is a plain tensor."""
    pytest.importorskip("monai")
    from monai.data import MetaTensor

    image = MetaTensor(torch.zeros(4, 5, 6), affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)))
    out = resample_volume(image, (2.0, 1.0, 1.0), 1.0)
    assert type(out) is torch.Tensor and out.shape == (8, 5, 6)


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("window", [None, (-0.4, 0.6)])
def test_cuda_backward_math_on_host_matches_cpp(cuda_math_on_host, rng, order, window):
    """The CUDA backward kernel's per-voxel code (lc_sample_backward, lc_prefilter_line_adjoint), run on
    the CPU through the same host steps as the CUDA path (ops.resample: order-3 padding, adjoint
    prefilter axes in reverse, edge fold), equals the C++ backward kernel."""
    import ctypes

    import torch

    from lungcore import backend as lc_backend
    from lungcore.ops import crop_starts, resample_crop
    from lungcore.ops.resample import _SPLINE_PAD, _edge_pad, _fold_edge_pad, _scale_offset

    volume = torch.from_numpy(rng.normal(size=(6, 9, 8)))
    old, new, size = (2.0, 0.9, 1.1), (1.0, 1.2, 0.6), (5, 6, 7)
    centers = np.concatenate([rng.uniform(-0.5, np.asarray(volume.shape) - 0.5, size=(3, 3)), [[0.0, 8.5, 7.0]]])
    grad = torch.from_numpy(rng.normal(size=(len(centers), *size)))
    v = volume.clone().requires_grad_(True)
    with lc_backend.use_backend("cpu"), lc_backend.count_launches() as launches:
        (resample_crop(v, old, new, centers, size, order=order, window=window) * grad).sum().backward()
    assert launches["resample_crop.cpu_backward"] == 1

    starts = crop_starts(centers, volume.shape, old, new, size)
    scale, offset = _scale_offset(old, new)
    src = volume
    if order == 3:
        src = _edge_pad(volume, _SPLINE_PAD).numpy().copy()
        for args in _lines(src, forward=True):  # the forward's coefficients
            cuda_math_on_host.lc_prefilter(*args)
        offset = tuple(o + _SPLINE_PAD for o in offset)
        src = torch.from_numpy(src)
    src = np.ascontiguousarray(src.numpy())
    dst = np.zeros(src.shape)
    ll = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
    dd = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    g, st, n, m, s, o = (dd(grad.numpy()), ll(starts), ll(src.shape), ll(resampled_shape(volume.shape, old, new)),
                         dd(scale), dd(offset))
    lo, hi = window if window is not None else (0.0, 1.0)
    cuda_math_on_host.lc_backward(ptr(g), ptr(src), ptr(dst), ptr(st), ctypes.c_longlong(len(st)),
                                  *(ctypes.c_longlong(k) for k in size), ptr(n), ptr(m), ptr(s), ptr(o),
                                  ctypes.c_int(order), ctypes.c_int(window is not None), ctypes.c_double(lo),
                                  ctypes.c_double(hi))
    if order == 3:
        for args in _lines(dst, forward=False):
            cuda_math_on_host.lc_prefilter_adjoint(*args)
        dst = _fold_edge_pad(torch.from_numpy(dst), _SPLINE_PAD).numpy()
    np.testing.assert_allclose(dst, v.grad.numpy(), rtol=1e-10, atol=1e-12)


def _lines(c: np.ndarray, forward: bool):
    """ctypes arguments of the prefilter (or, reversed, its adjoint) along each axis, as the CUDA launcher runs them."""
    import ctypes

    n0, n1, n2 = c.shape
    axes = [(1, n0, n1 * n2), (n0, n1, n2), (n0 * n1, n2, 1)]
    ptr = c.ctypes.data_as(ctypes.c_void_p)
    return [(ptr, *(ctypes.c_longlong(v) for v in a)) for a in (axes if forward else axes[::-1])]
