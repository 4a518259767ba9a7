"""Preprocessing: a synthetic cohort on disk round-trips to crops that match the generator; the cache."""
from __future__ import annotations

import csv

import numpy as np
import pytest

import lungcore.ops
from lungcore.data import PreprocessSettings, Preprocessor, read_ct, read_manifest, synth_cohort
from lungcore.data.preprocess import preprocess_manifest, shard_from_env

WINDOW = (-1200.0, 600.0)


def _hu(windowed: np.ndarray) -> np.ndarray:
    return windowed * (WINDOW[1] - WINDOW[0]) + WINDOW[0]


@pytest.fixture(scope="module")
def nodules(tmp_path_factory):
    d = tmp_path_factory.mktemp("nodules")
    synth_cohort("nodules", d, n=4, preset="tiny", seed=3)
    truth = {r["nodule_id"]: r for r in csv.DictReader(open(d / "truth.csv"))}
    return read_manifest(d / "manifest.csv"), truth


def test_round_trip_matches_the_generator(nodules, tmp_path):
    manifest, truth = nodules
    pre = Preprocessor(PreprocessSettings.csfnet(), cache_dir=tmp_path / "cache")
    for i, nid in enumerate(manifest.ids):
        for t in (0, 1):
            crop = pre.crop(manifest.images[i][t], manifest.centres[i, t])
            assert crop.shape == (16, 64, 64) and crop.dtype == np.float32
            assert 0.0 <= crop.min() and crop.max() <= 1.0
            hu = _hu(crop)
            # the planted nodule (~30 HU soft tissue) sits at the crop centre
            assert -150 < hu[8, 31:34, 31:34].mean() < 200
            # lung parenchyma and air are in the crop at their HU
            assert (np.abs(hu + 850) < 120).mean() > 0.2
            # the nodule's extent at 1 mm spacing is its planted diameter (partial volume: +-1 source voxel)
            d_true = float(truth[nid][f"diameter_t{t}_mm"])
            solid = hu[8, 32, :] > -400
            run = solid[32]
            lo = 32 - np.argmin(solid[32::-1]) if not solid[:33].all() else 0
            hi = 32 + np.argmin(solid[32:]) if not solid[32:].all() else 64
            assert run and abs((hi - lo) - d_true) <= 2 * float(truth[nid]["spacing_x"]) + 1
    assert pre.stats.misses == 2 * len(manifest) and pre.stats.hits == 0


def test_voxel_frame_centres_give_the_same_crop(nodules, tmp_path):
    manifest, truth = nodules
    path, world = manifest.images[0][0], manifest.centres[0, 0]
    ct = read_ct(path)
    voxel_xyz = ct.world_to_index(world)[::-1]
    pre = Preprocessor(PreprocessSettings.csfnet())
    np.testing.assert_allclose(pre.crop(path, voxel_xyz, frame="voxel"), pre.crop(path, world), atol=1e-6)
    row = truth[manifest.ids[0]]
    stored = [float(row[f"t0_index_{a}"]) for a in "zyx"]
    np.testing.assert_allclose(ct.world_to_index(world), stored, atol=1e-3)


def test_second_pass_does_no_resampling(nodules, tmp_path, monkeypatch):
    manifest, _ = nodules
    settings = PreprocessSettings.csfnet()
    first = Preprocessor(settings, cache_dir=tmp_path)
    report = preprocess_manifest(manifest, first)
    assert report["misses"] == report["boxes"] == 8 and first.stats.resample_calls == 8

    def forbidden(*args, **kwargs):
        raise AssertionError("resample_crop ran on a cached pass")
    monkeypatch.setattr(lungcore.ops, "resample_crop", forbidden)
    second = Preprocessor(settings, cache_dir=tmp_path)
    report = preprocess_manifest(manifest, second)
    assert (report["hits"], report["misses"], report["images_read"], report["resample_calls"]) == (8, 0, 0, 0)
    assert report["resample_s"] == 0.0 and report["read_s"] == 0.0
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


def test_corrupted_and_stale_entries_are_rebuilt(nodules, tmp_path):
    manifest, _ = nodules
    settings = PreprocessSettings.csfnet()
    path, centre = manifest.images[1][0], manifest.centres[1, 0]
    reference = Preprocessor(settings, cache_dir=tmp_path).crop(path, centre)
    entries = sorted(tmp_path.glob("??/*.npz"))
    assert len(entries) == 1
    entry = entries[0]

    # a flipped byte inside the stored crop: the zip CRC catches it
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    pre = Preprocessor(settings, cache_dir=tmp_path)
    np.testing.assert_array_equal(pre.crop(path, centre), reference)
    assert (pre.stats.rebuilt, pre.stats.resample_calls) == (1, 1)

    # a truncated entry (a crash of a writer that did not rename atomically)
    entry.write_bytes(entry.read_bytes()[:100])
    pre = Preprocessor(settings, cache_dir=tmp_path)
    np.testing.assert_array_equal(pre.crop(path, centre), reference)
    assert pre.stats.rebuilt == 1

    # bytes that are no zip at all (a foreign file): named so, not as pickled data to trust
    entry.write_bytes(b"not a crop, not a zip")
    pre = Preprocessor(settings, cache_dir=tmp_path)
    np.testing.assert_array_equal(pre.crop(path, centre), reference)
    assert pre.stats.rebuilt == 1 and "not an .npz archive" in pre.stats.problems[0]
    assert "pickle" not in pre.stats.problems[0]

    # an entry whose metadata does not match its name (another scan's crop): stale
    other = Preprocessor(settings, cache_dir=tmp_path)
    other.crop(manifest.images[2][0], manifest.centres[2, 0])
    other_entry = next(p for p in tmp_path.glob("??/*.npz") if p != entry)
    entry.write_bytes(other_entry.read_bytes())
    pre = Preprocessor(settings, cache_dir=tmp_path)
    np.testing.assert_array_equal(pre.crop(path, centre), reference)
    assert pre.stats.rebuilt == 1 and "stale" in pre.stats.problems[0]


def test_changed_source_is_a_miss(tmp_path):
    from lungcore.data import write_nifti

    affine = np.diag([2.0, 1.5, 1.5, 1.0])
    write_nifti(tmp_path / "ct.nii.gz", np.full((10, 40, 40), -800.0), affine)
    settings = PreprocessSettings(spacing=2.0, crop=(4, 8, 8))
    before = Preprocessor(settings, cache_dir=tmp_path / "cache").crop(tmp_path / "ct.nii.gz")
    import os
    import time

    write_nifti(tmp_path / "ct.nii.gz", np.full((10, 40, 40), 0.0), affine)
    later = time.time() + 5
    os.utime(tmp_path / "ct.nii.gz", (later, later))
    pre = Preprocessor(settings, cache_dir=tmp_path / "cache")
    after = pre.crop(tmp_path / "ct.nii.gz")
    assert pre.stats.misses == 1 and pre.stats.resample_calls == 1
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, (0.0 - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), atol=1e-6)


def test_settings_change_the_key(nodules, tmp_path):
    manifest, _ = nodules
    a = Preprocessor(PreprocessSettings.csfnet(), cache_dir=tmp_path)
    b = Preprocessor(PreprocessSettings(spacing=1.0, crop=(16, 64, 64), window=(-1000.0, 400.0)), cache_dir=tmp_path)
    a.crop(manifest.images[0][0], manifest.centres[0, 0])
    b.crop(manifest.images[0][0], manifest.centres[0, 0])
    assert b.stats.misses == 1 and len(list(tmp_path.glob("??/*.npz"))) == 2


def test_shards_cover_the_cohort_once(nodules, tmp_path):
    manifest, _ = nodules
    settings = PreprocessSettings.csfnet()
    reports = [preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path), shard=(i, 3))
               for i in range(3)]
    assert sum(r["images"] for r in reports) == 8 and sum(r["misses"] for r in reports) == 8
    final = preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path))
    assert final["hits"] == 8 and final["misses"] == 0
    assert shard_from_env("1/4") == (1, 4)
    with pytest.raises(ValueError, match="shard must look like i/n"):
        shard_from_env("x")


def test_centre_outside_the_image_names_the_row(nodules, tmp_path):
    manifest, _ = nodules
    bad = manifest.subset([0])
    bad.centres[0, 1] = bad.centres[0, 1] + np.array([0.0, 0.0, 5000.0])
    with pytest.raises(ValueError, match=r"row 2, column 'ct_t1', value .*lies outside the image"):
        preprocess_manifest(bad, Preprocessor(PreprocessSettings.csfnet()))


def test_preprocess_command(nodules, tmp_path, capsys):
    from lungcore.cli import main

    manifest, _ = nodules
    args = ["preprocess", "--manifest", str(manifest.path), "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 CTs" in out and "volumes/s" in out and "8 misses" in out and "read" in out and "resample" in out
    assert main(args) == 0
    assert "8 hits, 0 misses" in capsys.readouterr().out
    assert (tmp_path / "report-0-of-1.json").is_file()


def test_native_dtype_strided_read_equals_float32_read(nodules):
    """The hot path reads int16 as stored, as a strided view; same crop as a float32 contiguous read."""
    from lungcore.data import canonical_orientation
    from lungcore.ops import resample_crop

    manifest, _ = nodules
    s = PreprocessSettings.csfnet()
    for path, centre in ((manifest.images[0][0], manifest.centres[0, 0]), (manifest.images[1][1], manifest.centres[1, 1])):
        native = read_ct(path, dtype=None, contiguous=False)
        assert native.array.dtype in (np.int16, np.float32)
        image = canonical_orientation(read_ct(path))
        idx = image.world_to_index(centre)[None]
        expected = resample_crop(image.array, image.spacing, s.spacing, idx, s.crop, window=s.window)[0]
        np.testing.assert_allclose(Preprocessor(s).crop(path, centre), expected, atol=1e-6)


def test_nodules_of_one_scan_are_cropped_from_one_read(tmp_path):
    m = read_manifest(synth_cohort("nodules", tmp_path / "c", n=12, preset="tiny", seed=4, dicom_every=0)["manifest"])
    unique = {p for row in m.images for p in row}
    assert len(unique) < 2 * len(m), "the cohort should have a patient with two nodules in the same scans"
    pre = Preprocessor(PreprocessSettings.csfnet(), cache_dir=tmp_path / "cache")
    report = preprocess_manifest(m, pre)
    assert report["images"] == report["images_read"] == report["resample_calls"] == len(unique)
    assert report["boxes"] == report["boxes_resampled"] == 2 * len(m)
    # each nodule's crop is centred on its own nodule (solid, heterogeneous: tens to a few hundred HU
    # either side of 30), not on the lung around it (-850 HU) or its neighbour
    for i in range(len(m)):
        hu = _hu(pre.crop(m.images[i][0], m.centres[i, 0]))
        assert -400 < hu[8, 31:34, 31:34].mean() < 300
        assert hu[8, 31:34, 31:34].mean() > hu[8].mean() + 200


def _scipy_crop(path, centre, s: PreprocessSettings) -> np.ndarray:
    """The crop by scipy's ``map_coordinates`` (spline mode "nearest"), written out from the grid
    convention alone: output index j samples input index ``scale * j + (scale - 1) / 2`` with
    ``scale = new / old spacing``; the box starts ``crop // 2`` before the output voxel nearest the
    centre; outside the resampled grid is ``fill``; then the HU window to [0, 1]."""
    from scipy import ndimage

    from lungcore.data import canonical_orientation

    image = canonical_orientation(read_ct(path, dtype=np.float64))
    scale = np.asarray(s.spacing) / np.asarray(image.spacing)
    grid = np.floor(np.asarray(image.shape) / scale + 0.5)
    u = (image.world_to_index(centre) + 0.5) / scale - 0.5
    axes = [np.floor(u[k] + 0.5) - s.crop[k] // 2 + np.arange(s.crop[k]) for k in range(3)]
    j = np.stack(np.meshgrid(*axes, indexing="ij"))
    inside = ((j >= 0) & (j < grid[:, None, None, None])).all(axis=0)
    coords = scale[:, None, None, None] * j + (scale[:, None, None, None] - 1) / 2
    hu = ndimage.map_coordinates(image.array, coords, order=s.order, mode="nearest")
    hu[~inside] = s.fill
    low, high = s.window
    return (np.clip(hu, low, high) - low) / (high - low)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_interpolation_orders_match_scipy(nodules, order):
    manifest, _ = nodules
    s = PreprocessSettings(order=order)
    for i in range(2):  # two nodules of different scans
        path, centre = manifest.images[i][0], manifest.centres[i, 0]
        crop = Preprocessor(s).crop(path, centre)
        assert crop.shape == s.crop and crop.dtype == np.float32
        np.testing.assert_allclose(crop, _scipy_crop(path, centre, s), rtol=0, atol=2e-6, err_msg=f"row {i}")


# -- the worker pool (--workers), --keep-going ----------------------------------------------------------

def _entries(cache) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(cache.glob("??/*.npz")):
        with np.load(p) as z:
            out[p.name] = z["crop"]
    return out


def test_two_workers_fill_the_same_cache_as_one(nodules, tmp_path):
    manifest, _ = nodules
    settings = PreprocessSettings.csfnet()
    one = preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path / "one"), workers=1)
    pre = Preprocessor(settings, cache_dir=tmp_path / "two")
    two = preprocess_manifest(manifest, pre, workers=2)
    # one report: the workers' counts are merged into the parent's stats
    assert two["workers"] == 2 and two["images"] == 8 and two["boxes"] == 8 and two["failed"] == []
    assert (two["misses"], two["images_read"], two["resample_calls"]) == (8, 8, 8) == (pre.stats.misses,
                                                                                       pre.stats.images_read, 8)
    assert two["read_s"] > 0 and two["resample_s"] > 0 and one["misses"] == 8
    a, b = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 8
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not list((tmp_path / "two").rglob("*.tmp")), "temporary files left behind"
    # a second pass over the pool: all hits, nothing read
    again = preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path / "two"), workers=2)
    assert (again["hits"], again["misses"], again["images_read"]) == (8, 0, 0)


def test_workers_compose_with_shards(nodules, tmp_path):
    manifest, _ = nodules
    settings = PreprocessSettings.csfnet()
    reports = [preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path), shard=(i, 2), workers=2)
               for i in range(2)]
    assert [r["images"] for r in reports] == [4, 4] and sum(r["misses"] for r in reports) == 8
    assert preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path))["hits"] == 8


def _with_a_broken_image(nodules, tmp_path):
    """The cohort's manifest copied beside a corrupt copy of one of its .nii.gz (row 3, column ct_t0)."""
    import shutil

    manifest, _ = nodules
    src = manifest.path.parent
    dst = tmp_path / "cohort"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache*"))
    m = read_manifest(dst / "manifest.csv")
    bad = m.images[1][0]
    assert str(bad).endswith(".nii.gz")
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # a truncated download
    return m, bad


@pytest.mark.parametrize("workers", [1, 2])
def test_keep_going_names_the_failed_row_and_does_the_rest(nodules, tmp_path, workers):
    m, bad = _with_a_broken_image(nodules, tmp_path)
    settings = PreprocessSettings.csfnet()
    with pytest.raises(ValueError, match=rf"row 3, column 'ct_t0', value '{bad}': .*truncated"):
        preprocess_manifest(m, Preprocessor(settings, cache_dir=tmp_path / "stop"), workers=workers)
    report = preprocess_manifest(m, Preprocessor(settings, cache_dir=tmp_path / "go"), workers=workers,
                                 keep_going=True)
    assert [(f["row"], f["column"], f["path"]) for f in report["failed"]] == [(3, "ct_t0", str(bad))]
    assert "truncated" in report["failed"][0]["error"]
    assert report["misses"] == 8 and len(list((tmp_path / "go").glob("??/*.npz"))) == 7
    assert report["boxes"] == 7  # the crops made, not those of the failed image


def test_preprocess_command_workers_and_keep_going(nodules, tmp_path, capsys):
    import json

    from lungcore.cli import main

    m, bad = _with_a_broken_image(nodules, tmp_path)
    args = ["preprocess", "--manifest", str(m.path), "--out", str(tmp_path / "cache"), "--quiet", "--device", "cpu",
            "--workers", "2"]
    assert main(args) == 1
    assert f"row 3, column 'ct_t0', value '{bad}'" in capsys.readouterr().err
    assert main(args + ["--keep-going"]) == 1
    captured = capsys.readouterr()
    assert "with 2 workers" in captured.out and "1 of 8 CTs failed" in captured.err
    assert f"failed: row 3, column 'ct_t0', value '{bad}'" in captured.err
    report = json.loads((tmp_path / "cache" / "report-0-of-1.json").read_text())
    assert report["workers"] == 2 and report["failed"][0]["row"] == 3
    assert main(args[:-2] + ["--workers", "0"]) == 2
    assert "--workers must be an integer >= 1, got 0" in capsys.readouterr().err


def test_pool_arguments_are_checked(nodules):
    manifest, _ = nodules
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        preprocess_manifest(manifest, Preprocessor(PreprocessSettings.csfnet()), workers=0)
    with pytest.raises(ValueError, match="workers > 1 needs a cache folder"):
        preprocess_manifest(manifest, Preprocessor(PreprocessSettings.csfnet()), workers=2)


def test_a_fully_cached_cohort_starts_no_worker_pool(nodules, tmp_path, monkeypatch, capsys):
    """Worker processes take seconds to start; loading cached crops takes milliseconds: with every crop
    cached (by size and modification time) the entries are loaded in this process."""
    import os

    import lungcore.data.preprocess.pool as pool
    from lungcore.cli import main

    manifest, _ = nodules
    settings = PreprocessSettings.csfnet()
    first = preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path), workers=1)
    assert first["misses"] == 8 and not first["all_cached"]

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started for a fully cached cohort")

    monkeypatch.setattr(pool, "map_images", no_pool)
    again = preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path), workers=2)
    assert (again["workers"], again["all_cached"], again["hits"], again["misses"]) == (1, True, 8, 0)
    assert main(["preprocess", "--manifest", str(manifest.path), "--out", str(tmp_path), "--quiet", "--device", "cpu",
                 "--workers", "2"]) == 0
    assert "with 1 worker (every crop had a cache entry: no worker pool)" in capsys.readouterr().out
    # one source rewritten (a new modification time): not every crop is known to be cached, the pool runs
    source = manifest.images[0][0]
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    started = []
    monkeypatch.setattr(pool, "map_images", lambda *args, **kwargs: started.append(args[1]))
    try:
        report = preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path), workers=2)
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert started and report["workers"] == 2 and not report["all_cached"]
    # verify="content" would hash every source to know: that is the pool's work
    started.clear()
    preprocess_manifest(manifest, Preprocessor(settings, cache_dir=tmp_path, verify="content"), workers=2)
    assert started


@pytest.mark.parametrize("kwargs, message", [
    ({"window": (0.0, float("inf"))}, "window must be finite"),
    ({"window": (float("nan"), 1.0)}, "window must be finite"),
    ({"window": (5.0, 1.0)}, "low < high"),
    ({"crop": (2048, 1024, 1024)}, "more than 1,073,741,824"),
])
def test_settings_refuse_what_no_crop_can_hold(kwargs, message):
    """A window with an infinite bound or a crop of more than 2^30 voxels is refused where it is
    set, not row by row when the first CT is resampled."""
    with pytest.raises(ValueError, match=message):
        PreprocessSettings(**kwargs)
    assert PreprocessSettings(crop=(1024, 1024, 1024)).crop == (1024, 1024, 1024)


def test_preprocess_and_validate_report_the_same_voxel_index(tmp_path):
    """A centre outside an image whose axes are flipped (canonical reorientation moves them): the
    preprocess error reports the voxel index in the file's own axes, as validate does."""
    import re

    from lungcore.data import read_ct_header, write_nifti
    from lungcore.data.image_checks import centre_outside

    affine = np.diag([2.0, -1.0, -1.0, 1.0])  # z, y flipped
    affine[:3, 3] = (0.0, 15.0, 15.0)
    path = write_nifti(tmp_path / "flipped.nii.gz", np.zeros((6, 16, 16), np.int16), affine)
    centre = np.array([-20.0, 40.0, 5.0])  # (x, y, z) LPS mm, outside in x and y
    why = centre_outside(centre, "world", read_ct_header(path))
    with pytest.raises(ValueError, match="lies outside the image") as err:
        Preprocessor(PreprocessSettings(crop=(2, 4, 4))).crop(path, centre)
    index = re.compile(r"voxel index \(z, y, x\) (\[[^\]]*\])")
    assert index.search(why).group(1) == index.search(str(err.value)).group(1)
