"""Cohort-scale preprocessing: a cohort of full-size CTs on disk, cold and cached, per core and per machine.

The cohort (written once, kept under ``$LUNGCORE_BENCH_DATA`` or ``~/.cache/lungcore/``, never in
git): ``LUNGCORE_COHORT_N`` CTs (default 64) of 512 x 512 in-plane and 120-400 slices (slice
spacing 0.8-2.5 mm: about 320 mm of chest), in-plane spacing 0.6-0.8 mm, drawn by
:func:`lungcore.data.synth.chest_phantom` (body, lungs, vessels, one lesion, 20 HU noise), half
written as ``.nii.gz`` and half as DICOM series (uint16 + intercept -1024, as scanners write).
Preprocessing settings: CMML's (2 x 1 x 1 mm, window [-1000, 400] HU, a 32 x 128 x 128 crop
around the lesion).

Every pass is timed once over the whole cohort, the lungcore passes repeated (``rounds``) and
interleaved so a shared machine's load drift hits them alike; the load average is recorded
with each pass. Providers (CTs/s end to end, from source files to crops in a cache):

* ``lungcore_1w`` / ``lungcore_2w``: ``preprocess_manifest(workers=1 | 2, threads=1)`` with an
  empty cache: read + decompress, resample + window + crop, atomic cache write; per-stage times.
* ``lungcore_cached``: the same again on the filled cache (a second epoch).
* ``simpleitk_1t``: ``ReadImage`` (``ImageSeriesReader`` for DICOM) -> ``ResampleImageFilter``
  (linear, to the target spacing) -> the same window and crop, one ITK thread (per core).
* ``monai_1w`` / ``monai_2w``: ``LoadImaged`` -> ``Spacingd`` -> ``ScaleIntensityRanged`` -> a
  crop around the lesion, through ``PersistentDataset`` and a ``DataLoader`` with 1 or 2 workers
  (cold: an empty persistent cache), on the first ``LUNGCORE_COHORT_MONAI`` CTs (default 6:
  MONAI resamples the whole volume, tens of seconds per CT here), half NIfTI and half DICOM
  (0: left out).

Floors (same run): the inflater alone on every ``.nii.gz`` (``zlib``/``isal``/``zlib-ng``
``decompress`` of the whole file), against lungcore's read of the same files; memory bandwidth
(one-core ``np.copyto``) for the bytes the other stages must move. The check asserts that the
1-worker and 2-worker caches hold the same crops bit for bit before anything is reported. Each
lungcore pass also records the workers' CPU seconds over its wall seconds (``cores_obtained``): on a
machine that other jobs share, how much of the cores the pass really had (what its scaling can
reach).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Result

NAME = "cohort_scale"
SEED = 20


def cases(device: str, quick: bool) -> list:
    """None: this benchmark times whole passes over a cohort (see :func:`run_results`)."""
    return []


# -- the cohort ------------------------------------------------------------------------------------

def _plan(n: int, quick: bool) -> list[dict[str, Any]]:
    plans = []
    for i in range(n):
        rng = np.random.default_rng([SEED, i])
        if quick:
            slices, inplane, side = int(rng.integers(20, 41)), 2.5, 96
        else:
            slices, inplane, side = int(rng.integers(120, 401)), float(rng.uniform(0.6, 0.8)), 512
        sz = float(np.clip(round(320.0 / slices, 3), 0.8, 2.5)) if not quick else 4.0
        plans.append({"i": i, "shape": (slices, side, side), "spacing": (sz, inplane, inplane),
                      "dicom": i % 2 == 1})
    return plans


def _write_one(root: str, plan: dict[str, Any]) -> dict[str, Any]:
    from lungcore.data.io import write_dicom_series, write_nifti
    from lungcore.data.synth.phantom import chest_phantom, lesion_site, scan_affine

    i, shape, sp = plan["i"], tuple(plan["shape"]), np.asarray(plan["spacing"])
    rng = np.random.default_rng([SEED, i, 1])
    radius = float(rng.uniform(8.0, 20.0))
    site = lesion_site(shape, sp, radius, rng)
    vol = chest_phantom(shape, sp, rng, lesions=[(site, radius, float(rng.uniform()))], anatomy_seed=SEED * 1000 + i)
    affine = scan_affine(shape, sp, rng, flip_z=i % 3 == 2)
    if i % 3 == 2:
        vol = vol[::-1].copy()
    idx = site / sp + (np.asarray(shape) - 1) / 2
    if i % 3 == 2:
        idx[0] = shape[0] - 1 - idx[0]
    world = affine[:3, :3] @ idx + affine[:3, 3]
    rel = f"images/ct{i:04d}" + ("_dicom" if plan["dicom"] else ".nii.gz")
    if plan["dicom"]:
        write_dicom_series(Path(root) / rel, vol, affine, patient_id=f"P{i:04d}")
    else:
        write_nifti(Path(root) / rel, vol, affine)
    return {"patient_id": f"P{i:04d}", "ct": rel, "centre_x": f"{world[0]:.4f}", "centre_y": f"{world[1]:.4f}",
            "centre_z": f"{world[2]:.4f}", "pfs_time": "12", "pfs_event": "1", "os_time": "20", "os_event": "0"}


def build_cohort(root: Path, n: int, quick: bool) -> Path:
    """Write (once) the cohort's CTs and ``manifest.csv`` under ``root``; returns the manifest path."""
    from concurrent.futures import ProcessPoolExecutor

    from lungcore.data.schema import CohortSchema

    plans = _plan(n, quick)
    stamp = {"version": 1, "seed": SEED, "plans": plans}
    manifest = root / "manifest.csv"
    if manifest.is_file() and (root / "cohort.json").is_file() and json.loads((root / "cohort.json").read_text()) == \
            json.loads(json.dumps(stamp)):
        return manifest
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(len(plans), os.cpu_count() or 1)) as pool:
        rows = list(pool.map(_write_one, [str(root)] * len(plans), plans))
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    CohortSchema(kind="survival", centre_frame="world", clinical=[]).save(root / "manifest.schema.json")
    (root / "cohort.json").write_text(json.dumps(stamp))
    print(f"cohort_scale: wrote {n} CTs to {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return manifest


def _source_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


# -- floors ----------------------------------------------------------------------------------------

def memory_bandwidth_gbs() -> float:
    """One core's copy bandwidth (read + write bytes per second, GB/s): median of 5 copies of 256 MiB."""
    a = np.ones(1 << 25, dtype=np.float64)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(times) / 1e9


def inflate_floor(paths: list[Path]) -> dict[str, float]:
    """Seconds of each available inflater's whole-file ``decompress`` over ``paths`` (one core)."""
    import zlib

    inflaters: dict[str, Any] = {"zlib": lambda data: zlib.decompress(data, 31)}
    try:
        from isal import isal_zlib

        inflaters["isal"] = lambda data: isal_zlib.decompress(data, 31)
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        inflaters["zlib-ng"] = lambda data: zlib_ng.decompress(data, 31)
    except ImportError:
        pass
    out = {}
    for name, fn in inflaters.items():
        total = 0.0
        for p in paths:
            data = p.read_bytes()
            t0 = time.perf_counter()
            fn(data)
            total += time.perf_counter() - t0
        out[name] = total
    return out


def read_split(paths: list[Path]) -> dict[str, float]:
    """Seconds of lungcore's hot-path read (``dtype=None, contiguous=False, int16=True``) per format."""
    from lungcore.data.io import read_ct

    out = {"nifti": 0.0, "dicom": 0.0}
    for p in paths:
        t0 = time.perf_counter()
        read_ct(p, dtype=None, contiguous=False, int16=True)
        out["dicom" if p.is_dir() else "nifti"] += time.perf_counter() - t0
    return out


# -- providers -------------------------------------------------------------------------------------

def _lungcore(manifest: Any, settings: Any, cache: Path, workers: int) -> dict[str, Any]:
    from lungcore.data import Preprocessor
    from lungcore.data.preprocess import preprocess_manifest

    load = os.getloadavg()[0]
    report = preprocess_manifest(manifest, Preprocessor(settings, cache_dir=cache), workers=workers, threads=1)
    if report["failed"]:
        raise RuntimeError(f"cohort_scale: {report['failed']}")
    report["load_before"] = round(load, 2)
    report["load_after"] = round(os.getloadavg()[0], 2)
    return report


def _simpleitk(manifest: Any, settings: Any, rows: list[int]) -> float | None:
    """Seconds for ReadImage -> ResampleImageFilter -> window + crop over ``rows``, one ITK thread."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    lo, hi = settings.window
    t0 = time.perf_counter()
    for r in rows:
        path, centre = manifest.images[r][0], manifest.centres[r, 0]
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
        old_sp, old_size = np.array(img.GetSpacing()), np.array(img.GetSize())
        new_sp = np.array(settings.spacing[::-1])  # ITK is (x, y, z)
        new_size = [int(round(v)) for v in old_size * old_sp / new_sp]
        origin = np.array(img.GetOrigin()) + np.array(img.GetDirection()).reshape(3, 3) @ (0.5 * (new_sp - old_sp))
        res = sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, tuple(origin), tuple(new_sp),
                            img.GetDirection(), -1024.0, sitk.sitkFloat32)
        c = np.array(res.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in centre)))
        size = np.array(settings.crop[::-1])
        start = np.floor(c + 0.5).astype(int) - size // 2
        arr = sitk.GetArrayViewFromImage(res)  # (z, y, x)
        box = np.full(settings.crop, -1024.0, dtype=np.float32)
        src = [slice(max(s, 0), min(s + n, m)) for s, n, m in zip(start[::-1], size[::-1], arr.shape)]
        dst = [slice(a.start - s, a.stop - s) for a, s in zip(src, start[::-1])]
        box[tuple(dst)] = arr[tuple(src)]
        np.clip((box - lo) / (hi - lo), 0.0, 1.0, out=box)
    return time.perf_counter() - t0


class _CropAroundCentre:
    """MONAI-style dict transform: a ``roi_size`` crop of ``image`` around the world (LPS) centre."""

    def __init__(self, roi_size: tuple[int, int, int]):
        self.roi_size = roi_size

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        from monai.transforms import SpatialCrop

        img = d["image"]
        x, y, z = d["centre"]
        idx = np.linalg.inv(np.asarray(img.affine)) @ np.array([-x, -y, z, 1.0])  # LPS -> RAS -> (i, j, k)
        d = dict(d)
        d["image"] = SpatialCrop(roi_center=[int(round(v)) for v in idx[:3]], roi_size=self.roi_size)(img)
        return d


def _monai(manifest: Any, settings: Any, rows: list[int], workers: int, cache: Path) -> float | None:
    """Seconds for one cold pass of MONAI's chain through PersistentDataset with ``workers`` loader workers."""
    try:
        import torch
        from monai.data import DataLoader, PersistentDataset
        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged, Spacingd
    except ImportError:
        return None
    lo, hi = settings.window
    chain = Compose([
        LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
        Spacingd(keys="image", pixdim=settings.spacing[::-1], mode="bilinear", padding_mode="border"),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        _CropAroundCentre(tuple(settings.crop[::-1])),
    ])
    data = [{"image": str(manifest.images[r][0]), "centre": [float(v) for v in manifest.centres[r, 0]]} for r in rows]
    ds = PersistentDataset(data, transform=chain, cache_dir=str(cache))
    loader = DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=lambda batch: batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def _same_caches(a: Path, b: Path) -> None:
    names_a = sorted(p.relative_to(a) for p in a.glob("??/*.npz"))
    names_b = sorted(p.relative_to(b) for p in b.glob("??/*.npz"))
    assert names_a == names_b and names_a, "the 1- and 2-worker caches hold different entries"
    for rel in names_a:
        with np.load(a / rel) as x, np.load(b / rel) as y:
            np.testing.assert_array_equal(x["crop"], y["crop"])


# -- the run ---------------------------------------------------------------------------------------

def run_results(device: str, quick: bool, out: Path | None = None) -> list[Result]:
    """Build (or reuse) the cohort, time every provider, write ``cohort_scale.json``/``.md`` to ``out``."""
    if device != "cpu":
        return []  # reading and decompressing are host work; the GPU path of the resampler is bench_resample's
    from lungcore.data import PreprocessSettings, read_manifest
    from lungcore.data.io import _inflater

    n = int(os.environ.get("LUNGCORE_COHORT_N", 4 if quick else 64))
    n_monai = min(n, int(os.environ.get("LUNGCORE_COHORT_MONAI", 2 if quick else 6)))
    rounds = int(os.environ.get("LUNGCORE_COHORT_ROUNDS", 1 if quick else 2))
    base = Path(os.environ.get("LUNGCORE_BENCH_DATA", Path.home() / ".cache" / "lungcore"))
    root = base / f"cohort-scale-{'quick' if quick else 'full'}-n{n}"
    manifest = read_manifest(build_cohort(root, n, quick), images="exists")
    settings = PreprocessSettings.cmml()
    paths = [manifest.images[r][0] for r in range(n)]
    source_mb = sum(_source_bytes(p) for p in paths) / 1e6
    voxels = sum(int(np.prod(p["shape"])) for p in _plan(n, quick))
    work = Path(tempfile.mkdtemp(prefix="lungcore-cohort-scale-"))
    passes: dict[str, list[dict[str, Any]]] = {"lungcore_1w": [], "lungcore_2w": []}
    try:
        # start the pool's forkserver (it imports torch, nibabel, pydicom once) outside the timed passes
        # (and this process's first imports of nibabel / pydicom)
        warm = manifest.subset(list(range(min(n, 2))))
        _lungcore(warm, settings, work / "warm-up-1", 1)
        t0 = time.perf_counter()
        _lungcore(warm, settings, work / "warm-up-2", 2)
        pool_start = time.perf_counter() - t0
        for k in range(rounds):
            for name, workers in (("lungcore_1w", 1), ("lungcore_2w", 2)):
                cache = work / f"{name}-{k}"
                passes[name].append(_lungcore(manifest, settings, cache, workers))
            _same_caches(work / f"lungcore_1w-{k}", work / f"lungcore_2w-{k}")
            if k == 0:
                cached = _lungcore(manifest, settings, work / "lungcore_1w-0", 1)
                assert cached["hits"] == n and cached["misses"] == 0
            for name in passes:
                shutil.rmtree(work / f"{name}-{k}", ignore_errors=True)
        gz = [p for p in paths if str(p).endswith(".gz")]
        floors = inflate_floor(gz)
        reads = read_split(paths)
        bandwidth = memory_bandwidth_gbs()
        load_sitk = os.getloadavg()[0]
        sitk_s = _simpleitk(manifest, settings, list(range(n)))
        monai_rows = list(range(n_monai))
        monai = {}
        for workers in ((1, 2) if n_monai else ()):
            load = os.getloadavg()[0]
            s = _monai(manifest, settings, monai_rows, workers, work / f"monai-{workers}")
            if s is not None:
                monai[f"monai_{workers}w"] = {"seconds": s, "cts": n_monai, "load_before": round(load, 2)}
            shutil.rmtree(work / f"monai-{workers}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return float(statistics.median(p[key] for p in passes[name]))

    per_ct = {name: med(name, "seconds") / n for name in passes}
    per_ct["lungcore_cached"] = cached["seconds"] / n
    if sitk_s is not None:
        per_ct["simpleitk_1t"] = sitk_s / n
    for name, m in monai.items():
        per_ct[name] = m["seconds"] / m["cts"]
    inflater = _inflater()[0]
    crop_bytes = int(np.prod(settings.crop)) * 4
    one = passes["lungcore_1w"]
    summary = {
        "cohort": {"cts": n, "nifti_gz": len(gz), "dicom": n - len(gz), "source_mb": round(source_mb, 1),
                   "voxels": voxels, "root": str(root), "monai_cts": n_monai},
        "settings": settings.to_dict(), "rounds": rounds, "inflater": inflater,
        "ct_per_s": {k: round(1.0 / v, 3) for k, v in per_ct.items()},
        "source_mb_per_s": {k: round(source_mb / n / v, 1) for k, v in per_ct.items() if k.startswith("lungcore")},
        "scaling_2w_over_1w": round(per_ct["lungcore_1w"] / per_ct["lungcore_2w"], 3),
        "scaling_per_round": [round(a["seconds"] / b["seconds"], 3) for a, b in zip(passes["lungcore_1w"],
                                                                                     passes["lungcore_2w"])],
        "lungcore_vs_monai_per_core": round(per_ct["monai_1w"] / per_ct["lungcore_1w"], 2) if "monai_1w" in per_ct
        else None,
        "lungcore_vs_simpleitk_per_core": round(per_ct["simpleitk_1t"] / per_ct["lungcore_1w"], 2)
        if "simpleitk_1t" in per_ct else None,
        "stages_1w_s": {k: round(med("lungcore_1w", k), 3) for k in ("read_s", "resample_s", "hash_s", "cache_io_s")},
        # CPU seconds of the workers over the pass's wall time: the cores the pass got (2 for 2 workers
        # on an otherwise idle 2-core machine; less when other jobs hold a core)
        "cores_obtained": {name: [round(p["cpu_s"] / p["seconds"], 2) for p in ps] for name, ps in passes.items()},
        # CPU seconds per CT: equal for 1 and 2 workers when the workers do not slow each other down
        # (then 2 workers on 2 free cores give 2x; what the wall-clock ratio above gets is the cores)
        "cpu_s_per_ct": {name: round(med(name, "cpu_s") / n, 4) for name in passes},
        "read_by_format_s": {k: round(v, 3) for k, v in reads.items()},
        "floors": {
            "inflate_s": {k: round(v, 3) for k, v in floors.items()},
            "read_nifti_over_inflate": round(reads["nifti"] / floors[inflater], 3) if gz else None,
            "memory_bandwidth_gbs": round(bandwidth, 2),
            "dicom_bytes_copy_s": round(sum(_source_bytes(p) for p in paths if p.is_dir()) * 2 / bandwidth / 1e9, 3),
            "cache_write_copy_s": round(n * crop_bytes * 2 / bandwidth / 1e9, 4),
        },
        "loads": {name: [(p["load_before"], p["load_after"]) for p in ps] for name, ps in passes.items()},
        "load_simpleitk": round(load_sitk, 2), "monai": monai,
        "passes": {name: [{k: p[k] for k in ("seconds", "read_s", "resample_s", "hash_s", "cache_io_s", "cpu_s")}
                          for p in ps]
                   for name, ps in passes.items()},
        "cores": os.cpu_count(), "pool_start_and_2_cts_s": round(pool_start, 2),
    }
    if out is not None:
        (out / "cohort_scale.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / "cohort_scale.md").write_text(_markdown(summary) + "\n")
    print(_markdown(summary), flush=True)
    baseline = "monai_1w" if "monai_1w" in per_ct else "lungcore_1w"
    shape = f"{n} CTs ({len(gz)} .nii.gz + {n - len(gz)} DICOM), {source_mb:.0f} MB -> CMML crops; ms per CT"
    return [Result(op=NAME, shape=shape, provider=k, median_ms=v * 1e3, speedup=per_ct[baseline] / v, peak_mb=None,
                   repeats=rounds if k in passes else 1, size=float(n), baseline=baseline,
                   note=f"load {summary['loads'].get(k, '')}") for k, v in per_ct.items()]


def _markdown(s: dict[str, Any]) -> str:
    c = s["cohort"]
    lines = [f"cohort_scale: {c['cts']} CTs ({c['nifti_gz']} .nii.gz, {c['dicom']} DICOM), {c['source_mb']} MB of "
             f"source, inflater {s['inflater']}, {s['rounds']} rounds, {s['cores']} cores", "",
             "| provider | CTs/s | source MB/s |", "|---|---:|---:|"]
    for k, v in s["ct_per_s"].items():
        lines.append(f"| {k} | {v} | {s['source_mb_per_s'].get(k, '-')} |")
    f = s["floors"]
    lines += ["", f"2 workers / 1 worker: {s['scaling_2w_over_1w']}x (rounds {s['scaling_per_round']}); "
                  f"loads (before, after) {s['loads']}; cores obtained (worker CPU s / wall s) {s['cores_obtained']}; CPU s per CT {s['cpu_s_per_ct']}",
              f"per core: lungcore vs MONAI {s['lungcore_vs_monai_per_core']}x (on {c['monai_cts']} CTs), "
              f"vs SimpleITK {s['lungcore_vs_simpleitk_per_core']}x",
              f"stages, 1 worker (s): {s['stages_1w_s']}; read by format (s): {s['read_by_format_s']}",
              f"floors: inflate {f['inflate_s']} s; NIfTI read / inflater alone {f['read_nifti_over_inflate']}x; "
              f"memory {f['memory_bandwidth_gbs']} GB/s: DICOM bytes copied once {f['dicom_bytes_copy_s']} s, "
              f"crops written once {f['cache_write_copy_s']} s"]
    return "\n".join(lines)
