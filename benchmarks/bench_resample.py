"""CT resampling to 1 mm: lungcore vs torch (F.interpolate, torch.compile) vs scipy vs MONAI Spacing.

Case ``volume``: a 512 x 512 x 160 CT at (2.5, 0.7, 0.7) mm (z, y, x) to 1 mm isotropic, trilinear
(output 400 x 358 x 358); ``--quick`` uses 256 x 256 x 40. Baseline ("eager") is torch's own
trilinear ``F.interpolate`` with ``scale_factor=old/new, recompute_scale_factor=False``, which
samples exactly lungcore's grid (checked equal before timing). Peers on the same threads:
``scipy.ndimage.zoom`` (order 1, the DESIGN.md fact), ``scipy.ndimage.affine_transform`` (the
test reference, same mapping), MONAI ``Spacing`` (bilinear; float64 by default, as users run it).
lungcore runs on float32 (as the peers) and on int16 (what CT readers return; no cast pass).

Case ``order 3``: cubic B-spline (prefilter included) vs scipy's (cupyx's on CUDA) order 3 with the
same mapping (checked to 1e-5 before timing).

Case ``crops``: 64 CSF-Net boxes (16 x 64 x 64 at 1 mm, lung window [-1200, 600] -> [0, 1]) from
the same CT: the fused ``resample_crop`` vs resample-everything-then-crop (lungcore, and torch).

Case ``crops backward``: 32 boxes of 16 x 64 x 64 (lung window) from a 120 x 384 x 384 float32 CT that
requires grad (``--quick``: 8 boxes from 40 x 128 x 128): the forward alone, forward + backward
(the backward kernel: C++ on CPU, CUDA with atomicAdd on a GPU), and the eager peer
(F.interpolate of the whole volume, crop, window, autograd). The backward writes a dense gradient
of the whole CT (here 70 MB) where the forward writes 8 MB of crops; before the kernel it ran
autograd through the float64 oracle (23.9 s for this case on CPU).

On CUDA: lungcore (CuPy kernel, torch tensors via DLPack) vs ``cupyx.scipy.ndimage`` (zoom and
affine_transform) vs ``F.interpolate`` vs MONAI ``Spacing``, plus a device-to-device copy of the
output's bytes as the bandwidth yardstick; the note gives the bytes moved (input read once + output
written once), from which GB/s = bytes / median time.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import floors as _floors
from benchmarks.harness import Case, synthetic_ct
from lungcore.backend import use_backend
from lungcore.ops import crop_starts, resample_crop, resample_volume, resampled_shape

NAME = "resample"
OLD, NEW = (2.5, 0.7, 0.7), (1.0, 1.0, 1.0)
WINDOW = (-1200.0, 600.0)


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _interpolate(t: torch.Tensor) -> torch.Tensor:
    return F.interpolate(t[None, None], scale_factor=tuple(o / n for o, n in zip(OLD, NEW)), mode="trilinear",
                         align_corners=False, recompute_scale_factor=False)[0, 0]


def _volume_case(device: str, shape, ct: np.ndarray) -> Case:
    out_shape = resampled_shape(shape, OLD, NEW)
    vol32 = ct.astype(np.float32)
    providers = {}
    s = np.asarray(NEW) / np.asarray(OLD)
    if device == "cuda":
        t32 = torch.from_numpy(vol32).cuda()
        t16 = torch.from_numpy(ct).cuda()

        def lungcore32():
            with use_backend("cupy"):
                return resample_volume(t32, OLD, NEW)

        def lungcore16():
            with use_backend("cupy"):
                return resample_volume(t16, OLD, NEW)

        providers["lungcore"] = lungcore32
        providers["lungcore int16"] = lungcore16
        providers["eager"] = lambda: _interpolate(t32)
        copy_src = torch.empty(out_shape, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        providers["device copy (output bytes)"] = lambda: copy_dst.copy_(copy_src)  # the bandwidth yardstick
        if _have("cupy"):
            import cupy
            import cupyx.scipy.ndimage as cndi

            c32 = cupy.asarray(vol32)
            providers["cupyx affine_transform"] = lambda: cndi.affine_transform(
                c32, cupy.asarray(np.diag(s)), offset=0.5 * s - 0.5, output_shape=out_shape, order=1, mode="nearest")
            providers["cupyx zoom"] = lambda: cndi.zoom(c32, tuple(1 / s), order=1, grid_mode=True, mode="nearest")
        to_host = lambda out: out.cpu().numpy()  # noqa: E731
    else:
        t32 = torch.from_numpy(vol32)

        def lungcore32():
            with use_backend("cpu"):
                return resample_volume(vol32, OLD, NEW)

        def lungcore16():
            with use_backend("cpu"):
                return resample_volume(ct, OLD, NEW)

        providers["lungcore"] = lungcore32
        providers["lungcore int16"] = lungcore16
        providers["eager"] = lambda: _interpolate(t32)
        compiled = torch.compile(_interpolate)
        providers["torch.compile"] = lambda: compiled(t32)
        if _have("scipy"):
            import scipy.ndimage as ndi

            providers["scipy zoom"] = lambda: ndi.zoom(vol32, tuple(1 / s), order=1)
            providers["scipy affine_transform"] = lambda: ndi.affine_transform(
                vol32, np.diag(s), offset=0.5 * s - 0.5, output_shape=out_shape, order=1, mode="nearest")
        to_host = np.asarray
    if _have("monai"):
        from monai.data import MetaTensor
        from monai.transforms import Spacing

        spacing = Spacing(pixdim=NEW, mode="bilinear")
        image = MetaTensor(t32[None].clone(), affine=torch.diag(torch.tensor([*OLD, 1.0], dtype=torch.float64)))
        providers["MONAI Spacing"] = lambda: spacing(image)

    def check():
        ours = to_host(providers["lungcore"]())
        ref = to_host(providers["eager"]())
        assert ours.shape == tuple(out_shape) == ref.shape, (ours.shape, ref.shape)
        err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert err < 1e-5, f"lungcore vs F.interpolate rel err {err}"
        assert np.array_equal(ours, to_host(providers["lungcore int16"]())), "int16 and float32 inputs differ"

    moved = ct.size * 4 + int(np.prod(out_shape)) * 4
    return Case(shape=f"{shape[0]}x{shape[1]}x{shape[2]} -> {out_shape[0]}x{out_shape[1]}x{out_shape[2]}",
                size=float(np.prod(shape)), providers=providers, baseline="eager", check=check,
                note=f"float32 in/out moves {moved / 1e6:.0f} MB", floor=_floors.resample(shape, out_shape, 4, 4, 1))


def _crops_case(device: str, shape, ct: np.ndarray, n_boxes: int) -> Case:
    rng = np.random.default_rng(1)
    size = (16, 64, 64)
    centers = rng.uniform(0.2, 0.8, size=(n_boxes, 3)) * (np.asarray(shape) - 1)
    starts = crop_starts(centers, shape, OLD, NEW, size)
    pad = max(size)
    kind = "cupy" if device == "cuda" else "cpu"
    vol = torch.from_numpy(ct).cuda() if device == "cuda" else ct

    def fused():
        with use_backend(kind):
            return resample_crop(vol, OLD, NEW, centers, size, window=WINDOW)

    def crop_all(full, pad_fn):
        padded = pad_fn(full)
        return [padded[s0 + pad:s0 + pad + size[0], s1 + pad:s1 + pad + size[1], s2 + pad:s2 + pad + size[2]]
                for s0, s1, s2 in starts]

    def lungcore_then_crop():
        with use_backend(kind):
            full = resample_volume(vol, OLD, NEW)
        if device == "cuda":
            boxes = torch.stack(crop_all(full, lambda f: F.pad(f, [pad] * 6, value=-1024.0)))
        else:
            boxes = np.stack(crop_all(full, lambda f: np.pad(f, pad, constant_values=-1024.0)))
        return (boxes.clip(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])

    t32 = torch.from_numpy(ct.astype(np.float32))
    t32 = t32.cuda() if device == "cuda" else t32

    def eager():
        full = _interpolate(t32)
        boxes = torch.stack(crop_all(full, lambda f: F.pad(f, [pad] * 6, value=-1024.0)))
        return (boxes.clamp(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])

    def check():
        a = fused()
        a = a.cpu().numpy() if device == "cuda" else a
        # torch computes sample positions in float32 (~1e-5 voxel): 1e-4 of the window width
        for other, tol in ((lungcore_then_crop(), 1e-6), (eager(), 1e-4)):
            b = other.cpu().numpy() if isinstance(other, torch.Tensor) else other
            assert a.shape == b.shape and np.abs(a - b).max() < tol, float(np.abs(a - b).max())

    return Case(shape=f"{n_boxes} boxes 16x64x64 from {shape[0]}x{shape[1]}x{shape[2]}", size=float(n_boxes),
                providers={"lungcore fused": fused, "lungcore then crop": lungcore_then_crop, "eager": eager},
                baseline="eager", check=check, note="resample + lung window + crop",
                floor=_floors.resample_crops(n_boxes, size, OLD, NEW, ct.itemsize, 4))


def _crops_backward_case(device: str, quick: bool) -> Case:
    shape, n_boxes = ((40, 128, 128), 8) if quick else ((120, 384, 384), 32)
    size = (16, 64, 64)
    rng = np.random.default_rng(1)
    centers = rng.uniform(0.2, 0.8, size=(n_boxes, 3)) * (np.asarray(shape) - 1)
    starts = crop_starts(centers, shape, OLD, NEW, size)
    kind = "cupy" if device == "cuda" else "cpu"
    ct = torch.from_numpy(synthetic_ct(shape).astype(np.float32)).to(device).requires_grad_(True)
    pad = max(size)

    def forward():
        with use_backend(kind):
            return resample_crop(ct, OLD, NEW, centers, size, window=WINDOW)

    def forward_backward():
        ct.grad = None
        out = forward()
        out.sum().backward()
        return ct.grad

    def eager():
        ct.grad = None
        full = F.pad(_interpolate(ct), [pad] * 6, value=-1024.0)
        boxes = torch.stack([full[a + pad:a + pad + size[0], b + pad:b + pad + size[1], c + pad:c + pad + size[2]]
                             for a, b, c in starts])
        ((boxes.clamp(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).sum().backward()
        return ct.grad

    def check():
        ours, theirs = forward_backward().clone(), eager().clone()
        # torch computes sample positions in float32 (~1e-5 voxel): the gradients agree to ~1e-4
        assert float((ours - theirs).norm() / theirs.norm()) < 1e-3

    return Case(shape=f"crops backward: {n_boxes} boxes 16x64x64 from {shape[0]}x{shape[1]}x{shape[2]} fp32",
                size=float(n_boxes), providers={"lungcore forward": forward, "lungcore fwd+bwd": forward_backward,
                                                "eager fwd+bwd": eager},
                baseline="eager fwd+bwd", check=check, note="backward = the forward's transpose (dense CT gradient)")


def _cubic_case(device: str, shape, ct: np.ndarray) -> Case:
    """Order 3 (cubic B-spline, prefilter included) vs scipy's/cupyx's affine_transform order 3."""
    out_shape = resampled_shape(shape, OLD, NEW)
    s = np.asarray(NEW) / np.asarray(OLD)
    vol32 = ct.astype(np.float32)
    providers = {}
    if device == "cuda":
        t32 = torch.from_numpy(vol32).cuda()

        def lungcore():
            with use_backend("cupy"):
                return resample_volume(t32, OLD, NEW, order=3)

        providers["lungcore"] = lungcore
        to_host = lambda out: out.get() if hasattr(out, "get") else out.cpu().numpy()  # noqa: E731
        if _have("cupy"):
            import cupy
            import cupyx.scipy.ndimage as cndi

            c32 = cupy.asarray(vol32)
            providers["cupyx affine_transform"] = lambda: cndi.affine_transform(
                c32, cupy.asarray(np.diag(s)), offset=0.5 * s - 0.5, output_shape=out_shape, order=3, mode="nearest")
        baseline = "cupyx affine_transform"
    else:
        def lungcore():
            with use_backend("cpu"):
                return resample_volume(vol32, OLD, NEW, order=3)

        providers["lungcore"] = lungcore
        to_host = np.asarray
        if _have("scipy"):
            import scipy.ndimage as ndi

            providers["scipy affine_transform"] = lambda: ndi.affine_transform(
                vol32, np.diag(s), offset=0.5 * s - 0.5, output_shape=out_shape, order=3, mode="nearest")
        baseline = "scipy affine_transform"
    if baseline not in providers:
        baseline = "lungcore"

    def check():
        if baseline == "lungcore":
            return
        ours, ref = to_host(providers["lungcore"]()), to_host(providers[baseline]())
        err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert ours.shape == ref.shape and err < 1e-5, f"order 3 rel err {err}"

    return Case(shape=f"order 3: {shape[0]}x{shape[1]}x{shape[2]} -> {out_shape[0]}x{out_shape[1]}x{out_shape[2]}",
                size=float(np.prod(shape)), providers=providers, baseline=baseline, check=check,
                note="cubic B-spline incl. prefilter", floor=_floors.resample(shape, out_shape, 4, 4, 3))


def _shape(quick: bool) -> tuple[int, int, int]:
    return (40, 256, 256) if quick else (160, 512, 512)


def floors(device: str, quick: bool) -> list[_floors.Floor]:
    """The H200 floors of the cases below (whole volume fp32 -> fp32, int16 -> fp32, crops, order 3)."""
    shape = _shape(quick)
    out_shape = resampled_shape(shape, OLD, NEW)
    name = f"{shape[0]}x{shape[1]}x{shape[2]} -> {out_shape[0]}x{out_shape[1]}x{out_shape[2]}"
    n_boxes = 16 if quick else 64
    return [_floors.resample(shape, out_shape, 4, 4, 1, shape=f"{name} fp32"),
            _floors.resample(shape, out_shape, 2, 4, 1, shape=f"{name} int16 in"),
            _floors.resample_crops(n_boxes, (16, 64, 64), OLD, NEW, 2, 4,
                                   shape=f"{n_boxes} boxes 16x64x64 from {name.split(' ')[0]} (int16 in)"),
            _floors.resample(shape, out_shape, 4, 4, 3, shape=f"order 3: {name}")]


def cases(device: str, quick: bool) -> list[Case]:
    shape = _shape(quick)
    ct = synthetic_ct(shape)
    return [_volume_case(device, shape, ct), _crops_case(device, shape, ct, 16 if quick else 64),
            _cubic_case(device, shape, ct), _crops_backward_case(device, quick)]
