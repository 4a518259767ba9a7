"""resample_volume / resample_crop against scipy.ndimage and the PyTorch oracle.

The mapping under test (DESIGN.md): output index j samples input index s * j + (0.5 s - 0.5),
s = new / old spacing; inside the grid the coordinates clamp to the edge voxels (scipy
mode="nearest"); crop voxels outside the grid are ``fill``. On a CPU machine the kernel under
test is the C++ core (forced, launch counted); on a GPU machine the same tests run the CuPy
kernel on CUDA tensors.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _tolerance import rel_error, tolerance

from lungcore import backend as lc_backend
from lungcore.ops import crop_starts, resample_crop, resample_volume, resampled_affine, resampled_shape
from lungcore.ops.resample import resample_crop_reference, resample_volume_reference

ndi = pytest.importorskip("scipy.ndimage")

SPACINGS = [  # (old, new): anisotropic, up- and down-sampling, non-commensurate
    ((2.5, 0.7, 0.7), (1.0, 1.0, 1.0)),
    ((1.25, 0.93, 0.61), (0.8, 1.7, 1.0)),
    ((0.6, 2.0, 1.1), (1.9, 0.45, 1.1)),
]
SHAPES = [(7, 11, 13), (5, 9, 16), (1, 6, 5)]


def _kernel_backend(device: str) -> str:
    return "cupy" if device == "cuda" else "cpu"


def _run(fn, volume: np.ndarray, device: str, *args, **kwargs) -> np.ndarray:
    """Call ``fn`` with the kernel backend forced on ``device``; assert the kernel ran."""
    which = _kernel_backend(device)
    with lc_backend.use_backend(which), lc_backend.count_launches() as launches:
        if device == "cuda":
            out = fn(torch.from_numpy(volume).to(device), *args, **kwargs)
            assert out.device.type == "cuda"
            out = out.cpu().numpy()
        else:
            out = fn(volume, *args, **kwargs)
            assert isinstance(out, np.ndarray)
    assert launches[f"{fn.__name__}.{which}_forward"] >= 1, dict(launches)
    return out


def _scipy_resample(volume: np.ndarray, old, new, order: int) -> np.ndarray:
    s = np.asarray(new, dtype=np.float64) / np.asarray(old, dtype=np.float64)
    shape = resampled_shape(volume.shape, old, new)
    return ndi.affine_transform(volume.astype(np.float64), np.diag(s), offset=0.5 * s - 0.5,
                                output_shape=shape, order=order, mode="nearest")


_rel = rel_error


@pytest.mark.parametrize("old,new", SPACINGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_matches_scipy_affine_transform(device, rng, old, new, shape, dtype):
    volume = (rng.normal(size=shape) * 400 - 300).astype(dtype)
    for order in (0, 1):
        expected = _scipy_resample(volume, old, new, order)
        got = _run(resample_volume, volume, device, old, new, order=order, out_dtype=np.float32)
        assert got.shape == expected.shape == resampled_shape(shape, old, new)
        assert np.isfinite(got).all()
        if order == 0:
            np.testing.assert_array_equal(got, expected.astype(np.float32))
        else:
            assert _rel(got, expected) < 1e-4


@pytest.mark.parametrize("old,new", SPACINGS)
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_order3_matches_scipy(device, rng, old, new, shape):
    """Cubic B-spline: scipy pads by 12 edge voxels for mode="nearest", prefilters, samples unclamped."""
    volume = (rng.normal(size=shape) * 400 - 300).astype(np.int16)
    expected = _scipy_resample(volume, old, new, 3)
    got = _run(resample_volume, volume, device, old, new, order=3)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert _rel(got, expected) < 1e-5
    got64 = _run(resample_volume, volume.astype(np.float64), device, old, new, order=3)
    assert _rel(got64, expected) < 1e-9
    ref = resample_volume_reference(torch.from_numpy(volume), old, new, order=3).numpy()
    assert _rel(ref, expected) < 1e-6


def test_matches_scipy_map_coordinates_with_fill(device, rng):
    """A crop hanging over the edge equals map_coordinates on the same coordinates, fill outside the grid."""
    volume = rng.normal(size=(6, 10, 9)).astype(np.float32) * 100
    old, new, size = (2.0, 0.8, 0.9), (1.0, 1.1, 0.6), (9, 8, 11)
    centers = np.array([[0.2, 9.3, 0.0], [3.0, 5.0, 4.5], [5.4, 0.1, 8.4]])
    grid = resampled_shape(volume.shape, old, new)
    starts = crop_starts(centers, volume.shape, old, new, size)
    s = np.asarray(new) / np.asarray(old)
    for order in (0, 1):
        got = _run(resample_crop, volume, device, old, new, centers, size, order=order, fill=-1024.0)
        for b in range(len(centers)):
            j = np.stack(np.meshgrid(*[starts[b, a] + np.arange(size[a]) for a in range(3)], indexing="ij"))
            coords = s[:, None, None, None] * j + (0.5 * s - 0.5)[:, None, None, None]
            ref = ndi.map_coordinates(volume.astype(np.float64), coords, order=order, mode="nearest")
            inside = np.all([(j[a] >= 0) & (j[a] < grid[a]) for a in range(3)], axis=0)
            ref = np.where(inside, ref, -1024.0)
            assert (~inside).any() or b == 1
            if order == 0:
                np.testing.assert_array_equal(got[b], ref.astype(np.float32))
            else:
                assert _rel(got[b], ref) < 1e-5


def test_order0_ties_round_up_like_scipy(device):
    """Down-sampling by exactly 2 puts every sample on a tie (i = 2j + 0.5): scipy rounds up."""
    volume = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    got = _run(resample_volume, volume, device, (1.0, 1.0, 1.0), 2.0, order=0)
    np.testing.assert_array_equal(got, _scipy_resample(volume, (1, 1, 1), (2, 2, 2), 0))
    np.testing.assert_array_equal(got, volume[1::2, 1::2, 1::2])


def test_identity_and_exact_upsampling(device, rng):
    volume = rng.integers(-1024, 2000, size=(4, 5, 6)).astype(np.int16)
    for order in (0, 1):
        same = _run(resample_volume, volume, device, (1.5, 0.7, 0.7), (1.5, 0.7, 0.7), order=order)
        np.testing.assert_array_equal(same, volume.astype(same.dtype))
    up = _run(resample_volume, volume, device, (2.0, 2.0, 2.0), 1.0, order=0)
    np.testing.assert_array_equal(up, volume.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_equal_dtype_objects_are_accepted_and_byte_swapped_refused():
    """The C++ core compares dtypes by equality: an int16 view whose dtype object is not numpy's own
    (what a reader may hand over) is the same type; a big-endian array is not and is refused."""
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    distinct = volume.view(np.dtype("<i2").newbyteorder("="))
    assert distinct.dtype == np.int16
    with lc_backend.use_backend("cpu"):
        np.testing.assert_array_equal(resample_volume(distinct, (1, 1, 1), (1, 1, 1), order=0), volume)
        with pytest.raises(TypeError, match="volume dtype"):
            resample_volume(volume.astype(">i2"), (1, 1, 1), (1, 1, 1))


@pytest.mark.parametrize("in_dtype", [np.int16, np.uint8, np.int8, np.uint16, np.int32, np.float32, np.float64])
def test_dtypes_against_reference(device, rng, in_dtype):
    info = np.iinfo(in_dtype) if np.issubdtype(in_dtype, np.integer) else None
    lo, hi = (max(info.min, -2000), min(info.max, 3000)) if info else (-2000, 3000)
    volume = rng.uniform(lo, hi, size=(5, 7, 9)).astype(in_dtype)
    old, new = (1.7, 0.9, 0.8), (1.0, 1.3, 0.5)
    for order in (0, 1):
        for out_dtype in dict.fromkeys([np.float32, np.float64, in_dtype]):
            got = _run(resample_volume, volume, device, old, new, order=order, out_dtype=out_dtype)
            ref = resample_volume_reference(torch.from_numpy(volume), old, new, order=order,
                                            out_dtype=torch.from_numpy(np.empty(0, out_dtype)).dtype).numpy()
            assert got.dtype == np.dtype(out_dtype) and got.shape == ref.shape
            if np.issubdtype(out_dtype, np.integer):  # rounding of float32 vs float64 may differ by 1
                assert np.abs(got.astype(np.int64) - ref.astype(np.int64)).max() <= (0 if order == 0 else 1)
            else:
                assert _rel(got, ref) < (1e-12 if order == 0 else 2e-6)
    default = _run(resample_volume, volume, device, old, new, order=0)
    assert default.dtype == volume.dtype  # nearest keeps the dtype (label maps)
    assert _run(resample_volume, volume, device, old, new).dtype == (np.float64 if in_dtype == np.float64 else np.float32)


def test_integer_output_saturates(device):
    volume = np.array([0, 127], dtype=np.int8).reshape(1, 1, 2)
    got = _run(resample_crop, volume, device, (1, 1, 1), (1, 1, 1), [0, 0, 0], (1, 1, 3), fill=-1000.0,
               order=0, out_dtype=np.int8)
    np.testing.assert_array_equal(got.reshape(-1), [-128, 0, 127])


def test_strided_inputs(device, rng):
    base = rng.normal(size=(12, 9, 10)).astype(np.float32)
    views = [base.transpose(2, 1, 0), base[::-1, :, ::2], base[2:9:3, 1:, 3:]]
    old, new = (1.1, 0.9, 2.0), (1.0, 1.0, 1.0)
    for v in views:
        expected = _scipy_resample(np.ascontiguousarray(v), old, new, 1)
        if device == "cuda":
            got = _run(resample_volume, np.ascontiguousarray(v), device, old, new)
            t = torch.from_numpy(np.ascontiguousarray(base)).cuda().permute(2, 1, 0)
            with lc_backend.use_backend("cupy"):
                got_t = resample_volume(t, old, new).cpu().numpy()
            assert _rel(got_t, _scipy_resample(base.transpose(2, 1, 0), old, new, 1)) < 1e-4
        else:
            got = _run(resample_volume, v, device, old, new)
        assert _rel(got, expected) < 1e-4
    t = torch.from_numpy(base).permute(2, 0, 1)  # non-contiguous CPU tensor, no copy needed
    with lc_backend.use_backend("cpu"):
        np.testing.assert_allclose(resample_volume(t, old, new).numpy(),
                                   resample_volume(np.ascontiguousarray(t.numpy()), old, new), rtol=0, atol=0)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_crop_equals_resample_then_crop(device, rng, order):
    volume = (rng.normal(size=(11, 23, 19)) * 500 - 400).astype(np.int16)
    old, new, size, window, fill = (2.5, 0.7, 0.8), (1.0, 1.0, 1.0), (7, 16, 12), (-1200.0, 600.0), -1024.0
    n = np.asarray(volume.shape)
    centers = np.concatenate([rng.uniform(-0.5, n - 0.5, size=(9, 3)), [[-0.5, -0.5, -0.5], n - 0.5, [5, 11, 9]]])
    full = resample_volume(volume, old, new, order=order, out_dtype=np.float64)
    starts = crop_starts(centers, volume.shape, old, new, size)
    pad = max(size)
    padded = np.pad(full, pad, constant_values=fill)
    windowed = (np.clip(padded, *window) - window[0]) / (window[1] - window[0])
    got = _run(resample_crop, volume, device, old, new, centers, size, order=order, window=window)
    raw = _run(resample_crop, volume, device, old, new, centers, size, order=order, fill=fill)
    assert got.shape == raw.shape == (len(centers), *size) and got.dtype == np.float32
    for b in range(len(centers)):
        sl = tuple(slice(starts[b, a] + pad, starts[b, a] + pad + size[a]) for a in range(3))
        np.testing.assert_allclose(got[b], windowed[sl], rtol=0, atol=1e-6 if order < 3 else 2e-6)
        np.testing.assert_allclose(raw[b], padded[sl], rtol=1e-6, atol=1e-3 if order < 3 else 4e-3)
    ref = resample_crop_reference(torch.from_numpy(volume), old, new, centers, size, order=order, window=window)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-6 if order < 3 else 2e-6)


def test_crop_geometry():
    """The output voxel nearest the centre is at index size // 2 of the box."""
    old, new = (2.5, 0.7, 0.7), (1.0, 1.0, 1.0)
    starts = crop_starts([[80.0, 256.0, 256.0], [0.0, 0.0, 0.0]], (160, 512, 512), old, new, (16, 64, 64))
    u = (np.array([[80.0, 256.0, 256.0], [0, 0, 0]]) + 0.5) / (np.array(new) / np.array(old)) - 0.5
    np.testing.assert_array_equal(starts + np.array([8, 32, 32]), np.floor(u + 0.5))
    assert resampled_shape((160, 512, 512), old, new) == (400, 358, 358)
    assert resampled_shape((5, 5, 5), (1, 1, 1), 2.0) == (3, 3, 3)  # 2.5 rounds half up


def _crop_starts_both_paths(monkeypatch, *args):
    """crop_starts and the op's flattened starts (_crop_starts) with the plain-Python loop forced,
    then the numpy path forced (the box-count threshold moved): [(kind, value or error message)] per
    path, and whether the numpy path ran (it hands inputs it cannot finish in int64 to the loop)."""
    import lungcore.ops.resample as module

    real, ran = module._crop_starts_array, []
    monkeypatch.setattr(module, "_crop_starts_array", lambda *a: ran.append(1) or real(*a))
    paths = []
    for threshold in (10**9, 0):
        monkeypatch.setattr(module, "_VECTORISE_FROM", threshold)
        got = []
        for fn in (crop_starts, module._crop_starts):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # the numpy path warns of nothing either
                    got.append(("ok", fn(*args)))
            except Exception as exc:  # noqa: BLE001 - ZeroDivisionError, OverflowError too: the same on both
                got.append((type(exc).__name__, str(exc)))
        paths.append(got)
        assert bool(ran) == (threshold == 0) or isinstance(args[0], (int, float)), (threshold, ran)
    return paths


def _assert_same_starts(python, vectorised, case):
    for (kind_p, p), (kind_v, v) in zip(python, vectorised):
        assert kind_p == kind_v, (case, p, v)
        if kind_p != "ok":
            assert p == v, case                                   # the same error message
        elif isinstance(p, np.ndarray):                          # crop_starts
            assert type(v) is np.ndarray and v.dtype == p.dtype == np.int64 and v.shape == p.shape, case
            assert v.flags.c_contiguous and v.flags.writeable, case
            assert np.array_equal(p, v), case
        else:                                                    # _crop_starts: Python ints for the op
            assert type(v) is list and v == p and all(type(x) is int for x in v), case


def test_crop_starts_numpy_path_equals_python_path(monkeypatch, rng):
    """The numpy path (eager, from _VECTORISE_FROM boxes) and the plain-Python loop (torch.compile,
    few boxes) give the same starts (values, dtype, type) and the same errors: random centres,
    centres on the edges (-0.5, n - 0.5) and on rounding ties (the output index exactly k + 0.5
    rounds up), odd and even sizes, every input kind, bad input of every sort."""
    cases = []
    for old, new in [*SPACINGS, ((1.0, 2.0, 4.0), 1.0), ((1.0, 1.0, 1.0), (2.0, 0.5, 0.25)), ((0.7, 0.7, 0.7), 0.7)]:
        for _ in range(6):
            shape = tuple(int(v) for v in rng.integers(1, 40, size=3))
            n = np.asarray(shape, dtype=np.float64)
            size = tuple(int(v) for v in rng.integers(1, 10, size=3))
            centres = [rng.uniform(-0.5, n - 0.5, size=(int(rng.integers(1, 40)), 3)),
                       np.array([-0.5 + 0 * n, n - 0.5, n - 1, 0 * n, (n - 1) / 2])]
            s = np.asarray(new, dtype=np.float64) / np.asarray(old, dtype=np.float64)
            k = np.arange(-1, int(n.max() / s.min()) + 1)[:, None]
            ties = (k + 1) * s - 0.5                                   # u = k + 0.5 exactly (s a power of 2)
            centres.append(np.where((ties >= -0.5) & (ties <= n - 0.5), ties, 0.0))
            centres.append(np.round(rng.uniform(-0.5, n - 0.5, size=(20, 3)) * 2) / 2)   # half indices
            cases += [(c, shape, old, new, size) for c in centres]
    c = rng.uniform(0, 6.5, size=(15, 3))
    kinds = [c.astype(np.float32), c.astype(np.int64), c.tolist(), tuple(map(tuple, c.tolist())), torch.from_numpy(c),
             torch.from_numpy(c).float(), c[0], c[0].tolist(), c[:0], [c[0].tolist(), np.float32(1.0)]]
    cases += [(k, (7, 8, 9), (2.5, 0.7, 0.7), 1.0, (5, 6, 7)) for k in kinds]
    bad_rows = [np.nan, np.inf, -np.inf]
    for value in bad_rows + [-0.5000001, 6.5000001, 7.0]:
        worse = c.copy()
        worse[7, 1], worse[11, 2] = value, np.nan
        cases.append((worse, (7, 8, 9), (2.5, 0.7, 0.7), 1.0, 3))
        worse = c.copy()
        worse[4, 0] = value
        cases.append((worse, (7, 8, 9), (2.5, 0.7, 0.7), 1.0, 3))
    cases += [(c[:, :2], (7, 8, 9), 1.0, 1.0, 3) for _ in [0]] + [
        (c[None], (7, 8, 9), (1.0, 1.0, 1.0), 1.0, 3), ([[1, 2, 3], [1, 2]] * 8, (7, 8, 9), (1.0, 1.0, 1.0), 1.0, 3),
        ([["1", "2", "3"]] * 20, (7, 8, 9), (1.0, 1.0, 1.0), 1.0, 3), ([], (7, 8, 9), (1.0, 1.0, 1.0), 1.0, 3),
        ("centres", (7, 8, 9), (1.0, 1.0, 1.0), 1.0, 3), (3.0, (7, 8, 9), (1.0, 1.0, 1.0), 1.0, 3),
        (c, (7, 8, 9), (0.0, 1.0, 1.0), 1.0, 3), (c, (7, 8, 9), (1.0, 1.0, 1.0), -1.0, 3),
        (c, (7, 8, 9), (1.0, 1.0, 1.0), 1.0, (0, 2, 2)), (c, (7, 8, 9), (1.0, 1.0, 1.0), 1.0, (2.5, 2, 2)),
        (c, (7, 8, 9), (1e200,) * 3, 1e-200, 3),                 # scale underflows to 0: ZeroDivisionError
        (c, (7, 8, 9), (1e150,) * 3, 1e-150, 3),                 # starts beyond int64: the loop's OverflowError
        (c, (7, 8, 9), (1.0, 1.0, 1.0), 1.0, (2**63, 3, 3)),     # size // 2 at the edge of int64
        (c, (7, 8, 9), (1.0, 1.0, 1.0), 1.0, (2**65, 3, 3)),     # beyond it
    ]
    for case in cases:
        python, vectorised = _crop_starts_both_paths(monkeypatch, *case)
        _assert_same_starts(python, vectorised, case)
    kinds_seen = {python[0][0] for python, _ in [_crop_starts_both_paths(monkeypatch, *x) for x in cases[-22:]]}
    assert {"ok", "ValueError", "TypeError", "ZeroDivisionError", "OverflowError"} <= kinds_seen


def test_crop_starts_of_many_boxes_is_vectorised(monkeypatch, rng):
    """Eager crop_starts and resample_crop check and place 10,000 boxes with numpy, not box by box
    in Python (~3 us a box: 30 ms here); a couple of boxes keep the Python loop, faster there."""
    import lungcore.checks as checks_module

    calls = []
    real = checks_module.point_rows
    monkeypatch.setattr(checks_module, "point_rows", lambda *a: calls.append(len(a[1])) or real(*a))
    shape, old, new, size = (160, 512, 512), (2.5, 0.7, 0.7), 1.0, (16, 64, 64)
    centres = rng.uniform(-0.5, np.asarray(shape) - 0.5, size=(10_000, 3))
    starts = crop_starts(centres, shape, old, new, size)
    u = (centres + 0.5) / (np.asarray(new) / np.asarray(old)) - 0.5
    np.testing.assert_array_equal(starts, np.floor(u + 0.5).astype(np.int64) - np.asarray(size) // 2)
    resample_crop(np.zeros((9, 10, 11), np.int16), old, new, rng.uniform(-0.5, 8.5, size=(64, 3)), (2, 3, 4))
    assert calls == []
    crop_starts(centres[:2], shape, old, new, size)
    assert calls == [2]


def test_many_boxes_and_poisoned_output(rng):
    """The C++ core writes every voxel of every box (out starts as NaN) and never reads out-of-bounds."""
    from lungcore import _C

    volume = rng.normal(size=(9, 14, 15)).astype(np.float32)
    starts = np.array([[-50, -50, -50], [0, 0, 0], [3, -2, 10], [100, 100, 100]], dtype=np.int64)
    out = np.full((4, 5, 6, 7), np.nan, dtype=np.float32)
    assert _C.resample_boxes(volume, out, starts, (18, 10, 11), (0.5, 1.4, 1.4), (-0.25, 0.2, 0.2), 1, -7.0, None)
    assert np.isfinite(out).all()
    assert (out[0] == -7.0).all() and (out[3] == -7.0).all()


def test_torch_cpu_in_torch_out(rng):
    volume = torch.from_numpy(rng.normal(size=(4, 6, 5)).astype(np.float32))
    with lc_backend.use_backend("cpu"):
        out = resample_volume(volume, (2.0, 1.0, 1.0), 1.0)
        crops = resample_crop(volume, (2.0, 1.0, 1.0), 1.0, torch.tensor([[2.0, 3.0, 2.0]]), 4)
    assert isinstance(out, torch.Tensor) and out.shape == (8, 6, 5) and out.dtype == torch.float32
    assert isinstance(crops, torch.Tensor) and crops.shape == (1, 4, 4, 4)
    with lc_backend.use_backend("reference"):
        ref = resample_volume(volume, (2.0, 1.0, 1.0), 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


def test_reference_backend_for_numpy(rng):
    volume = rng.normal(size=(4, 6, 5)).astype(np.float32)
    with lc_backend.use_backend("reference"), lc_backend.count_launches() as launches:
        out = resample_volume(volume, (2.0, 1.0, 1.3), 1.0)
    assert isinstance(out, np.ndarray) and not launches
    assert _rel(out, _scipy_resample(volume, (2.0, 1.0, 1.3), (1, 1, 1), 1)) < 1e-6


def test_rerun_bit_identical(rng):
    volume = (rng.normal(size=(20, 40, 40)) * 300).astype(np.int16)
    a = resample_volume(volume, (2.5, 0.7, 0.7), 1.0)
    b = resample_volume(volume, (2.5, 0.7, 0.7), 1.0)
    assert a.tobytes() == b.tobytes()


def test_affine_helper_keeps_extent_and_centres():
    rot = np.array([[0.0, 0.0, 1.0], [0.6, 0.8, 0.0], [-0.8, 0.6, 0.0]])
    old, new, shape = (2.5, 0.7, 0.6), (1.0, 1.0, 1.0), (10, 30, 40)
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(old)
    affine[:3, 3] = [-100.0, 20.0, 35.0]
    out_aff = resampled_affine(affine, old, new)
    np.testing.assert_allclose(np.linalg.norm(out_aff[:3, :3], axis=0), new)
    grid = resampled_shape(shape, old, new)
    for corner in ([-0.5] * 3, ):  # the first corner is shared exactly
        np.testing.assert_allclose(out_aff @ [*corner, 1], affine @ [*corner, 1], atol=1e-9)
    far_in = affine @ [*(np.asarray(shape) - 0.5), 1]
    far_out = out_aff @ [*(np.asarray(grid) - 0.5), 1]
    # the far corner moves by at most half an output voxel (rounding of the grid size)
    assert np.linalg.norm(far_in - far_out) <= 0.5 * np.linalg.norm(new) + 1e-9


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,error,match", [
    (lambda v: resample_volume(v[0], (1, 1, 1), 1.0), ValueError, "3-D"),
    (lambda v: resample_volume(v[None], (1, 1, 1), 1.0), ValueError, "3-D"),
    (lambda v: resample_volume(v, (1, 0, 1), 1.0), ValueError, "spacing"),
    (lambda v: resample_volume(v, (1, 1, 1), (1, -1, 1)), ValueError, "new_spacing"),
    (lambda v: resample_volume(v, (1, float("nan"), 1), 1.0), ValueError, "spacing"),
    (lambda v: resample_volume(v, (1, 1), 1.0), ValueError, "spacing"),
    (lambda v: resample_volume(v, 1.0, 1.0), ValueError, "spacing"),
    (lambda v: resample_volume(v, (1, 1, 1), 1.0, order=2), ValueError, "order"),
    (lambda v: resample_volume(v, (1, 1, 1), 1.0, fill=float("inf")), ValueError, "fill"),
    (lambda v: resample_volume(v, (1, 1, 1), 1.0, out_dtype=np.int64), TypeError, "out_dtype"),
    (lambda v: resample_volume(v.astype(np.complex64), (1, 1, 1), 1.0), TypeError, "dtype"),
    (lambda v: resample_volume(v.tolist(), (1, 1, 1), 1.0), TypeError, "volume"),
    (lambda v: resample_volume(v, (1, 1, 1), 1e-5), ValueError, "too large"),
    (lambda v: resample_crop(v, (1, 1, 1), 1.0, [[1, 1, float("nan")]], 4), ValueError, r"centers\[0\]"),
    (lambda v: resample_crop(v, (1, 1, 1), 1.0, [[1, 1, 1], [1, 9, 1]], 4), ValueError, r"centers\[1\].*outside"),
    (lambda v: resample_crop(v, (1, 1, 1), 1.0, [[1, 1]], 4), ValueError, "centers"),
    (lambda v: resample_crop(v, (1, 1, 1), 1.0, [[1, 1, 1]], (4, 0, 4)), ValueError, "size"),
    (lambda v: resample_crop(v, (1, 1, 1), 1.0, [[1, 1, 1]], (4, 2.5, 4)), ValueError, "size"),
    (lambda v: resample_crop(v, (1, 1, 1), 1.0, [[1, 1, 1]], 4, window=(600, -1200)), ValueError, "window"),
    (lambda v: resample_crop(v, (1, 1, 1), 1.0, [[1, 1, 1]], 4, window=(0, 1), out_dtype=np.int16),
     TypeError, "out_dtype"),
])
def test_bad_input(call, error, match):
    volume = np.zeros((4, 5, 6), dtype=np.int16)
    with pytest.raises(error, match=match):
        call(volume)


@pytest.mark.parametrize("which", ["cpu", "reference"])
def test_nan_volume_is_an_error(which):
    volume = np.zeros((4, 5, 6), dtype=np.float32)
    volume[2, 2, 2] = np.nan
    with lc_backend.use_backend(which), pytest.raises(ValueError, match="NaN"):
        resample_volume(volume, (1, 1, 1), 1.0)
    with lc_backend.use_backend(which), pytest.raises(ValueError, match="NaN"):
        resample_volume(torch.from_numpy(volume), (1, 1, 1), 1.0)
    volume[2, 2, 2] = np.inf
    with lc_backend.use_backend("cpu"), pytest.raises(ValueError, match="NaN or inf"):
        resample_crop(volume, (1, 1, 1), 1.0, [2, 2, 2], 3)


# ----------------------------------------------------------------------------- torch integration
def test_gradcheck_float64(rng):
    volume = torch.from_numpy(rng.normal(size=(2, 3, 4))).requires_grad_(True)
    centers = [[1.0, 1.5, 2.0], [0.0, 2.0, 3.0]]
    for which in ("cpu", "reference"):
        with lc_backend.use_backend(which), lc_backend.count_launches() as launches:
            assert torch.autograd.gradcheck(
                lambda v: resample_crop(v, (1.5, 1.0, 0.7), (1.0, 0.8, 1.0), centers, (3, 4, 4)), (volume,))
            assert torch.autograd.gradcheck(
                lambda v: resample_crop(v, (1.5, 1.0, 0.7), 1.0, centers, (3, 4, 4), window=(-0.5, 0.5)),
                (volume,))
            assert torch.autograd.gradcheck(lambda v: resample_volume(v, (1.5, 1.0, 0.7), 1.0), (volume,))
            assert torch.autograd.gradcheck(lambda v: resample_volume(v, (1.5, 1.0, 0.7), 1.0, order=3), (volume,))
        if which == "cpu":  # the analytical side of gradcheck was the C++ backward kernel
            assert launches["resample_crop.cpu_backward"] >= 2 and launches["resample_volume.cpu_backward"] >= 2
            assert launches["resample_volume.cpu_prefilter_adjoint"] >= 1


def _kernel_grad(fn, volume: torch.Tensor, weights: torch.Tensor, which: str,
                 op: str = "resample_crop") -> tuple[torch.Tensor, torch.Tensor]:
    """(output, d(sum(output * weights)) / d volume) with backend ``which`` forced; the launch of
    ``op``'s backward kernel is asserted for the kernel backends."""
    v = volume.clone().requires_grad_(True)
    with lc_backend.use_backend(which), lc_backend.count_launches() as launches:
        out = fn(v)
        (out * weights.to(out.dtype)).sum().backward()
    if which != "reference":
        assert launches[f"{op}.{which}_backward"] == 1, dict(launches)
    return out.detach(), v.grad


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("window", [None, (-0.4, 0.6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_kernel_matches_float64_oracle(rng, device, order, window, dtype):
    """The backward kernel (C++ on CPU, CUDA on a GPU; forced and counted) against autograd through
    the float64 oracle: odd sizes, up- and down-sampling, boxes on every border hanging out of
    the volume (their fill voxels get no gradient), a window that clamps part of the values."""
    shape = (7, 9, 11)
    volume = torch.from_numpy(rng.normal(size=shape)).to(device=device, dtype=dtype)
    centers = [[0.0, 0.0, 0.0], [3.2, 4.1, 5.5], [6.4, 8.4, 10.4], [-0.5, 8.5, 0.3]]

    def fn(v):
        return resample_crop(v, (1.5, 1.0, 0.7), (1.0, 1.3, 0.6), centers, (5, 6, 7), order=order, window=window,
                             fill=0.3)

    weights = torch.from_numpy(rng.normal(size=(4, 5, 6, 7))).to(device)
    out, grad = _kernel_grad(fn, volume, weights, _kernel_backend(device))
    ref_out, ref_grad = _kernel_grad(fn, volume.double(), weights.double(), "reference")
    assert rel_error(out, ref_out) < tolerance(dtype)
    assert rel_error(grad, ref_grad) < tolerance(dtype), rel_error(grad, ref_grad)
    assert grad.dtype == dtype and grad.device == volume.device


def test_backward_kernel_is_deterministic_and_thread_independent(rng):
    """No atomics on CPU: reruns and thread counts give bit-identical gradients."""
    volume = torch.from_numpy(rng.normal(size=(12, 40, 40)).astype(np.float32))
    centers = rng.uniform(0, 1, size=(6, 3)) * (np.asarray(volume.shape) - 1)
    weights = torch.from_numpy(rng.normal(size=(6, 8, 16, 16)).astype(np.float32))

    def fn(v):
        return resample_crop(v, (2.5, 0.7, 0.7), 1.0, centers, (8, 16, 16), window=(-1.0, 1.0))

    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            grads.append(_kernel_grad(fn, volume, weights, "cpu")[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


def test_numpy_goes_through_the_op_and_bfloat16_is_honoured(rng):
    volume = (rng.normal(size=(6, 8, 9)) * 300).astype(np.int16)
    with lc_backend.use_backend("cpu"), lc_backend.count_launches() as launches:
        out = resample_crop(volume, (2.0, 1.0, 1.0), 1.0, [[3, 4, 4]], (4, 5, 6), window=(-500, 500))
        half = resample_crop(torch.from_numpy(volume), (2.0, 1.0, 1.0), 1.0, [[3, 4, 4]], (4, 5, 6),
                             window=(-500, 500), out_dtype=torch.bfloat16)
    assert launches["resample_crop.cpu_forward"] == 2
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert half.dtype == torch.bfloat16
    assert rel_error(half, out) < tolerance(torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        resample_crop(volume, (2.0, 1.0, 1.0), 1.0, [[3, 4, 4]], 4, out_dtype=torch.bfloat16)


def test_compile_and_autocast(rng):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3)

        def forward(self, ct):
            boxes = resample_crop(ct, (2.5, 0.7, 0.7), 1.0, [[3.0, 6.0, 6.0], [4.0, 5.0, 7.0]], (5, 6, 6),
                                  window=(-1200.0, 600.0))
            return self.conv(boxes[:, None]).mean(dim=(1, 2, 3, 4))

    torch.manual_seed(0)
    model = Tiny()
    ct = torch.from_numpy((rng.normal(size=(6, 12, 12)) * 300).astype(np.float32))
    eager = model(ct)
    compiled = torch.compile(model)(ct)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ct)
    torch.testing.assert_close(mixed.float(), eager, rtol=2e-2, atol=2e-2)


def test_fullgraph_compile_equals_eager(rng):
    """Both ops trace whole under torch.compile(fullgraph=True) for a torch volume (plain-Python
    checks, the backend choice traced, one opaque op): output and gradient equal eager's bit for
    bit on two odd shapes (the second recompiles with dynamic shapes), the C++ kernels forced
    (backward launch counted); then the oracle forced through the same compiled function (dynamo
    guards on the backend, and the backward follows the forward's). The aot_eager backend traces
    what inductor is given (dynamo's graph, AOTAutograd's backward) without its code generation,
    which took minutes here; test_compile_and_autocast runs inductor."""
    def volume_fn(v):
        return resample_volume(v, (1.5, 1.0, 0.7), (1.0, 1.3, 0.6), order=3)

    def crop_fn(v):
        return resample_crop(v, (2.5, 0.7, 0.7), 1.0, [[1.0, 2.0, 3.5], (0, 8.4, 0.2)], (3, 5, 4),
                             window=(-1.0, 1.0), fill=0.5)

    for fn, op in ((volume_fn, "resample_volume"), (crop_fn, "resample_crop")):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        for shape in ((5, 9, 7), (3, 11, 6)):
            volume = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
            weights = torch.from_numpy(rng.normal(size=tuple(fn(volume).shape)))
            whiches = ("cpu", "reference") if fn is crop_fn and shape == (3, 11, 6) else ("cpu",)
            for which in whiches:
                out, grad = _kernel_grad(compiled, volume, weights, which, op)
                ref_out, ref_grad = _kernel_grad(fn, volume, weights, which, op)
                assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad), (op, shape, which)


def test_fullgraph_compile_with_many_boxes_equals_eager(monkeypatch, rng):
    """Enough boxes for the eager numpy path (_VECTORISE_FROM): eager takes it, the traced function
    takes the plain-Python loop (numpy would break the graph) and traces whole; same output and
    gradient bit for bit."""
    import lungcore.ops.resample as module

    real, ran = module._crop_starts_array, []
    monkeypatch.setattr(module, "_crop_starts_array", lambda *a: ran.append(1) or real(*a))
    centres = [tuple(float(v) for v in row) for row in rng.uniform(-0.5, 4.5, size=(module._VECTORISE_FROM + 3, 3))]
    centres[0] = (-0.5, 4.5, 2.5)                                 # the edges and a rounding tie

    def fn(v):
        return resample_crop(v, (2.0, 1.0, 0.5), 1.0, centres, (3, 4, 5), window=(-1.0, 1.0), fill=0.5)

    volume = torch.from_numpy(rng.normal(size=(5, 5, 5)).astype(np.float32))
    weights = torch.from_numpy(rng.normal(size=(len(centres), 3, 4, 5)))
    ref_out, ref_grad = _kernel_grad(fn, volume, weights, "cpu")
    assert ran, "eager did not take the numpy path"
    ran.clear()
    out, grad = _kernel_grad(torch.compile(fn, fullgraph=True, backend="aot_eager"), volume, weights, "cpu")
    assert not ran, "the traced function took the numpy path"
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


# ----------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
def test_cupy_arrays_and_dlpack_no_host_copy(rng):
    cupy = pytest.importorskip("cupy")
    volume = (rng.normal(size=(9, 17, 21)) * 300).astype(np.int16)
    ref = resample_volume(volume, (2.5, 0.7, 0.7), 1.0)
    with lc_backend.use_backend("cupy"):
        out_cp = resample_volume(cupy.asarray(volume), (2.5, 0.7, 0.7), 1.0)
        t = torch.from_numpy(volume).cuda()
        out_t = resample_volume(t, (2.5, 0.7, 0.7), 1.0)
    assert isinstance(out_cp, cupy.ndarray)
    assert out_t.is_cuda and out_t.dtype == torch.float32
    np.testing.assert_allclose(cupy.asnumpy(out_cp), ref, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(out_t.cpu().numpy(), ref, rtol=1e-6, atol=1e-3)


@pytest.mark.cuda
def test_cupy_matches_cupyx_scipy(rng):
    cupy = pytest.importorskip("cupy")
    cndi = pytest.importorskip("cupyx.scipy.ndimage")
    volume = cupy.asarray(rng.normal(size=(10, 31, 29)).astype(np.float32))
    old, new = (2.5, 0.7, 0.7), (1.0, 1.0, 1.0)
    s = np.asarray(new) / np.asarray(old)
    expected = cndi.affine_transform(volume.astype(cupy.float64), cupy.asarray(np.diag(s)), offset=0.5 * s - 0.5,
                                     output_shape=resampled_shape(volume.shape, old, new), order=1, mode="nearest")
    with lc_backend.use_backend("cupy"):
        got = resample_volume(volume, old, new)
    assert _rel(cupy.asnumpy(got), cupy.asnumpy(expected)) < 1e-4


@pytest.mark.cuda
def test_cuda_nan_is_an_error():
    volume = torch.zeros(4, 5, 6, device="cuda")
    volume[1, 1, 1] = float("nan")
    with lc_backend.use_backend("cupy"), pytest.raises(ValueError, match="NaN"):
        resample_volume(volume, (1, 1, 1), 1.0)


def test_docstring_examples_run():
    import doctest

    import lungcore.ops.resample as module

    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 7 and result.failed == 0


def test_thread_count_does_not_change_the_result(rng):
    """Rows are independent: 1 thread and the full team give bit-identical output (orders 0, 1, 3)."""
    from lungcore import _C

    volume = (rng.normal(size=(30, 70, 70)) * 300).astype(np.int16)
    starts = np.array([[0, 0, 0], [5, -3, 20]], dtype=np.int64)
    for order in (0, 1, 3):
        data = volume if order < 3 else np.pad(volume.astype(np.float32), 12, mode="edge")
        outs = []
        for threads in (1, 2, 0):
            if order == 3:
                coef = data.copy()
                _C.spline_prefilter3(coef, threads)
            else:
                coef = data
            out = np.empty((2, 60, 64, 64), np.float32)
            offset = (-0.3 + (12 if order == 3 else 0), 0.2 + (12 if order == 3 else 0), 0.2 + (12 if order == 3 else 0))
            assert _C.resample_boxes(coef, out, starts, (75, 49, 49), (0.4, 1.4, 1.4), offset, order, -1024.0, None,
                                     threads)
            outs.append(out)
        assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()


@pytest.mark.parametrize("order", [0, 1, 3])
def test_strided_inputs_every_order_cpu(rng, order):
    # a transposed (Fortran-ordered) view is what the readers hand over; the cubic path's
    # padding and in-place prefilter must cope with it (regression: "must be C-contiguous")
    base = rng.normal(size=(10, 12, 14)).astype(np.float32)
    view = base.transpose(2, 1, 0)
    old, new = (1.3, 0.9, 2.0), (1.0, 1.0, 1.0)
    with lc_backend.use_backend("cpu"):
        got = resample_volume(view, old, new, order=order)
        crops = resample_crop(view, old, new, [[6, 5, 4]], (4, 5, 6), order=order)
        crops_c = resample_crop(np.ascontiguousarray(view), old, new, [[6, 5, 4]], (4, 5, 6), order=order)
    assert _rel(got, _scipy_resample(np.ascontiguousarray(view), old, new, order)) < 1e-4
    np.testing.assert_array_equal(crops, crops_c)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_flipped_numpy_views_are_read_in_place(rng, order):
    """preprocess.canonical_orientation hands over np.flip views (negative strides): they go through
    the op as their base read mirrored (no copy) and equal the contiguous copy bit for bit."""
    volume = np.flip((rng.normal(size=(9, 10, 11)) * 300).astype(np.int16), axis=(0, 2))
    args = ((2.0, 0.7, 0.9), 1.0, [[4, 5, 5], [0, 9, 10]], (5, 6, 7))
    with lc_backend.use_backend("cpu"), lc_backend.count_launches() as launches:
        got = resample_crop(volume, *args, order=order, window=(-500, 500))
        copy = resample_crop(np.ascontiguousarray(volume), *args, order=order, window=(-500, 500))
    assert launches["resample_crop.cpu_forward"] == 2
    assert np.array_equal(got, copy)
    with lc_backend.use_backend("reference"):
        assert rel_error(got, resample_crop(volume, *args, order=order, window=(-500, 500))) < tolerance(np.float32)
